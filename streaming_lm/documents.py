"""The document rule: where an EOS (50256) goes, and which rows hold text.

- "wikitext" (the WikiText family and the bundled sample): an article opens at a top-level heading
  row " = Title = \\n"; sections (" = = Sub = = ") and paragraphs continue it; blank rows are layout.
- "rows" (users' files, in-memory data): every row is a document of its own.
- "auto": "wikitext" where the source says so (WikiText's configs, on the Hub or as a local copy in
  the Hub's layout) or where the first rows look like it (blank rows and " = Title = " headings);
  else "rows". `TokenStream.description` says which rule was chosen, and why.
"""

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from .checks import check_choice
from .config import (
    LAYOUT_PEEK_ROWS,
    LAYOUTS,
    LONG_ROW_CHARS,
    TEXT_COLUMN,
)
from .source import SourceInfo, is_wikitext, peek_texts

if TYPE_CHECKING:
    from .tokenize import Segment

logger = logging.getLogger(__name__)


SAFE_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # one space between a non-space and a letter


def starts_document(text: str, layout: str = "wikitext") -> bool:
    """True if this row opens a new document (and so gets an EOS in front of it).

    "wikitext": an article opens at a top-level heading row " = Title = \\n" (not " = = Sub = = ").
    "rows": every row is a document.
    """
    if layout == "rows":
        return True
    return text.startswith(" = ") and not text.startswith(" = = ") and text.rstrip("\n").endswith(" = ")


def looks_like_wikitext(texts: Sequence[Any]) -> tuple[bool, str]:
    """(verdict, why) from a stream's first rows: WikiText's layout has blank rows, a top-level
    heading " = Title = " among them, and every other row starts with a space and ends in "\\n"."""
    rows = [t for t in texts if isinstance(t, str)]
    blank = sum(t == "" for t in rows)
    headings = sum(starts_document(t) for t in rows if t)
    lines = [t for t in rows if t]
    shaped = bool(lines) and all(t.startswith(" ") and t.endswith("\n") for t in lines)
    verdict = blank > 0 and headings > 0 and shaped
    return verdict, f"{headings} heading and {blank} blank rows among the first {len(texts)}"


def resolve_layout(
    stream: datasets.IterableDataset, layout: str = "auto", source: SourceInfo | None = None, peek: Any = None
) -> tuple[str, str]:
    """(rule, why): `layout`, or for "auto" what the source says or its first rows look like
    (`peek(n)`: the first n texts; default: read from `stream`)."""
    check_choice("layout", layout, LAYOUTS)
    if layout != "auto":
        return layout, "asked for"
    if source is not None and source.layout:
        return source.layout, "the source is WikiText"
    info = stream.info
    if is_wikitext(info.dataset_name if info.dataset_name == "wikitext" else None, info.config_name):
        return "wikitext", f"config {info.config_name}"
    if stream.column_names is None:  # maybe a one-shot generator: reading it here would lose rows
        return "rows", "auto: the stream cannot be peeked at"
    first = peek(LAYOUT_PEEK_ROWS) if peek is not None else peek_texts(stream, LAYOUT_PEEK_ROWS, source)
    verdict, why = looks_like_wikitext(first)
    return ("wikitext", f"auto: {why}") if verdict else ("rows", f"auto: {why}")


def check_encodable(texts: Sequence[str], rows: Sequence[int], where: str) -> None:
    """ValueError naming the row if a text cannot be UTF-8 encoded (a lone surrogate): HF's
    tokenizer would fail with an unclear TypeError and tiktoken would silently write U+FFFD."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for row, text in zip(rows, texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                bad = text[err.start : err.end].encode("unicode_escape").decode()
                raise ValueError(
                    f"row {row}{where}, column {TEXT_COLUMN!r}: not valid Unicode text ({bad} at character "
                    f"{err.start}, a lone surrogate): fix the source text"
                ) from None


def classify(segment: "Segment", layout: str, eos: int | None, label: str) -> tuple:
    """(kept, texts, blank, empty, doc) of a segment: the indices of its rows with text and those
    texts; blank (n,) bool, WikiText's blank rows ("" in the "wikitext" layout, layout only); empty
    (n,) bool, other rows without text (the packer counts them); doc (len(kept),) bool, the rows that
    open a document. Arrow text is classified by pyarrow compute (only kept rows become Python
    strings; Arrow strings are valid UTF-8); a Python value that is not a string, or not valid
    Unicode, names its row."""
    if not isinstance(segment.texts, list):
        return _classify_arrow(segment.texts, layout, eos)
    texts, n = segment.texts, len(segment.texts)
    kept, blank, empty = [], np.zeros(n, bool), np.zeros(n, bool)
    for i, text in enumerate(texts):
        if isinstance(text, str) and text:
            kept.append(i)
        elif text == "" and layout == "wikitext":
            blank[i] = True
        elif text is None or text == "":
            empty[i] = True
        else:
            raise TypeError(
                f"row {segment.first_row + i * segment.step}{label}, column {TEXT_COLUMN!r}: expected a "
                f"string or None, got {type(text).__name__} {text!r:.60}"
            )
    rows = [texts[i] for i in kept]
    check_encodable(rows, [segment.first_row + i * segment.step for i in kept], label)
    doc = np.array([eos is not None and starts_document(t, layout) for t in rows], bool)
    return np.array(kept, np.int64), rows, blank, empty, doc


def _classify_arrow(texts: Any, layout: str, eos: int | None) -> tuple:
    """`classify` of an Arrow string array, vectorized."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = np.asarray(texts.is_valid())  # (n,) False: null
    has_text = np.asarray(pc.binary_length(texts).fill_null(0)) > 0  # (n,)
    blank = valid & ~has_text if layout == "wikitext" else np.zeros(len(texts), bool)
    empty = ~has_text & ~blank
    kept = np.flatnonzero(has_text)
    rows = texts.filter(pa.array(has_text)) if len(kept) < len(texts) else texts
    if eos is None or layout == "rows":
        doc = np.full(len(kept), eos is not None)
    else:  # " = Title = " rows, not " = = Section = = "
        heading = pc.and_(pc.starts_with(rows, " = "), pc.invert(pc.starts_with(rows, " = = ")))
        doc = np.asarray(pc.and_(heading, pc.ends_with(pc.utf8_rtrim(rows, characters="\n"), " = ")), bool)
    return kept, rows.to_pylist(), blank, empty, doc


def cut_long(texts: list[str], size: int = LONG_ROW_CHARS) -> tuple[list[str], np.ndarray]:
    """(pieces, owner): rows longer than `size` characters cut where GPT-2's pre-tokenizer starts a
    new piece anyway (one space between a non-space and a letter), so that they can be encoded in
    parallel with exactly the ids of the whole row (tested on the bundled book, both backends);
    owner[k] is the row of piece k."""
    if all(len(t) <= size for t in texts):
        return texts, np.arange(len(texts))
    pieces, owner = [], []
    for row, text in enumerate(texts):
        start = 0
        while len(text) - start > size and (match := SAFE_CUT.search(text, start + size)):
            pieces.append(text[start : match.start()])
            owner.append(row)
            start = match.start()
        pieces.append(text[start:])
        owner.append(row)
    return pieces, np.array(owner, np.int64)
