"""Step 2, tokenize: GPT-2 ids for a text stream, lazily, with one EOS in front of each document.

    tokens = tokenize_stream(stream, tokenizer)   # a TokenStream: nothing is read yet
    for row in tokens: ...                        # {"input_ids": (n,) int32}, one per text row

Two backends give identical ids: Hugging Face's GPT2TokenizerFast (the default) and tiktoken's
GPT-2 encoding built from the same bundled files (several times faster, docs/benchmark.md).

The fast path never makes a Python object per token: a batch of rows goes to the tokenizer as a
whole and comes back as one flat id array plus row offsets (`TokenBatch`). tiktoken encodes the
rows joined by "<|endoftext|>" in one `encode_to_numpy` call per thread (it splits at special
tokens before its regex, so the ids are exactly the per-row ids; a row that holds that text
literally is encoded on its own, as text); HF's tokenizer encodes the batch with its Rust
`encode_batch_fast`. The EOS separators are then put in by the document rule with one np.insert.

The document rule decides where an EOS (50256) goes:
- "wikitext" (the WikiText family and the bundled sample): an article opens at a top-level heading
  row " = Title = \\n"; sections (" = = Sub = = ") and paragraphs continue it; blank rows are layout.
- "rows" (users' files, in-memory data): every row is a document of its own.
- "auto": "wikitext" where the source says so (WikiText's configs, on the Hub or as a local copy in
  the Hub's layout) or where the first rows look like it (blank rows and " = Title = " headings);
  else "rows". `TokenStream.description` says which rule was chosen, and why.
"""

import collections
import functools
import itertools
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .checks import check_choice, check_positive_int
from .config import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    LAYOUT_PEEK_ROWS,
    LAYOUTS,
    LONG_ROW_CHARS,
    TEXT_COLUMN,
    TOKENIZE_BATCH_CHARS,
    TOKENIZE_BATCH_ROWS,
    TOKENIZE_CHARS,
    TOKENIZER_BACKENDS,
    TOKENIZER_DIR,
)
from .parts import Task
from .source import Pieces, SourceInfo, TextStream, is_wikitext, peek_texts, read_piece_text

logger = logging.getLogger(__name__)
READ_AHEAD = 2  # token groups being tokenized ahead of the one packed, per stream (in-process)
THREAD_CHARS = 16_384  # characters: a smaller batch is encoded by one thread (a thread's turn costs ~50 us)
SAFE_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")  # one space between a non-space and a letter


def in_worker() -> bool:
    """True inside a DataLoader worker process (whose parallelism is the workers: one thread each)."""
    return torch.utils.data.get_worker_info() is not None


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding built from the bundled files, called like a HF tokenizer.

    `tok(texts)["input_ids"]` -> list of id lists, identical to GPT2TokenizerFast's ids; a literal
    "<|endoftext|>" in text is ordinary text unless `split_special_tokens=False`. `encode_flat(texts)`
    is the fast path: (ids (N,) uint32, row offsets (n + 1,) int64). Both use one thread inside a
    DataLoader worker and a long-lived pool of `num_threads` (default: all cores) in-process;
    tiktoken releases the GIL, so the threads run in parallel (2 cores: 7.1 M tokens/s, 4.1 M on one).
    """

    eos_token = EOS_TOKEN
    eos_token_id = EOS_TOKEN_ID

    def __init__(self, folder: str | Path = TOKENIZER_DIR, num_threads: int | None = None) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        folder = Path(folder)
        ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "merges.txt"), str(folder / "vocab.json"))
        specials = {self.eos_token: EOS_TOKEN_ID}
        self.encoding = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials
        )
        self.name_or_path = str(folder)
        self.vocab_size = self.encoding.n_vocab
        self.num_threads = num_threads or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None

    def threads(self) -> int:
        """Threads to encode with here: 1 in a DataLoader worker, else `num_threads`."""
        return 1 if in_worker() else self.num_threads

    def pool(self) -> ThreadPoolExecutor:
        """One thread pool per process, made on first use (a pool per call cost ~0.3 ms)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor, self._executor_pid = ThreadPoolExecutor(self.num_threads), os.getpid()
        return self._executor

    def _encode_rows(self, texts: Sequence[str], allowed: str | set) -> list[list[int]]:
        if allowed:
            return [self.encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        return [self.encoding.encode_ordinary(t) for t in texts]

    def __call__(self, text: str | Sequence[str], split_special_tokens: bool = True, **_ignored: Any) -> dict:
        """Encode a string or a list of strings; returns {"input_ids": ids or list of ids}."""
        allowed = set() if split_special_tokens else "all"
        if isinstance(text, str):
            return {"input_ids": self._encode_rows([text], allowed)[0]}
        ids, starts = self.encode_flat(list(text)) if split_special_tokens else (None, None)
        if ids is None:
            return {"input_ids": self._encode_rows(list(text), allowed)}
        return {"input_ids": [ids[a:b].tolist() for a, b in itertools.pairwise(starts)]}

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) uint32, starts (n + 1,) int64): row k is ids[starts[k]:starts[k + 1]], each row
        encoded as ordinary text. Threads take contiguous chunks of rows."""
        encoded = self.submit_flat(texts)
        return encoded.result() if isinstance(encoded, Future) else encoded

    def submit_flat(self, texts: list[str]) -> "Future | tuple[np.ndarray, np.ndarray]":
        """`encode_flat(texts)` started in the pool, one chunk of rows per thread (in-process), so
        that the caller can pack the previous batch meanwhile; in a worker, the result itself."""
        lengths = np.fromiter(map(len, texts), np.int64, count=len(texts))
        threads = min(self.threads(), len(texts), max(1, int(lengths.sum()) // THREAD_CHARS))
        if threads <= 1:
            return self._encode_joined(texts)
        share = np.cumsum(lengths) * threads // max(int(lengths.sum()), 1)  # (n,) which thread, by characters
        cuts = [0, *np.searchsorted(share, np.arange(1, threads), side="left").tolist(), len(texts)]
        pool = self.pool()
        chunks = [pool.submit(self._encode_joined, texts[a:b]) for a, b in itertools.pairwise(cuts) if b > a]
        return gather_futures(chunks)

    def _encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One encode_to_numpy call over the rows joined by EOS; the separators give the offsets."""
        if not texts:
            return np.empty(0, np.uint32), np.zeros(1, np.int64)
        joined = EOS_TOKEN.join(texts)
        if joined.count(EOS_TOKEN) != len(texts) - 1:  # a row holds the literal: encode it as text
            return self._encode_with_literals(texts)
        ids = self.encoding.encode_to_numpy(joined, allowed_special={EOS_TOKEN})  # (N + n - 1,)
        seps = np.flatnonzero(ids == EOS_TOKEN_ID)  # (n - 1,) the separators, one per row boundary
        starts = np.empty(len(texts) + 1, np.int64)
        starts[0], starts[-1] = 0, len(ids) - len(seps)
        starts[1:-1] = seps - np.arange(len(seps))  # each separator shifts the rest left by one
        return np.delete(ids, seps), starts

    def _encode_with_literals(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding the literal "<|endoftext|>" encoded one by one as text, the others joined."""
        pieces = []
        for literal, group in itertools.groupby(texts, key=lambda t: EOS_TOKEN in t):
            rows = list(group)
            if not literal:
                pieces.append(self._encode_joined(rows))
                continue
            encoded = [np.asarray(self.encoding.encode_ordinary(t), np.uint32) for t in rows]
            lengths = np.array([len(e) for e in encoded], np.int64)
            pieces.append((np.concatenate(encoded), np.concatenate([[0], np.cumsum(lengths)])))
        return join_flat(pieces)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None, "_executor_pid": None}  # threads do not pickle

    def decode(self, ids: Sequence[int], **_ignored: Any) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"TiktokenGPT2(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def gather_futures(chunks: list[Future]) -> Future:
    """One Future of the joined (ids, starts) of chunk futures, done when the last chunk is."""
    out: Future = Future()
    left, lock = [len(chunks)], threading.Lock()

    def done(_: Future) -> None:
        with lock:  # pool threads finish at once
            left[0] -= 1
            last = not left[0]
        if last:
            _settle(out, lambda: join_flat([c.result() for c in chunks]))

    for chunk in chunks:
        chunk.add_done_callback(done)
    return out


def join_flat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several (ids, starts) of consecutive row chunks as one (ids, starts)."""
    ids = np.concatenate([p[0] for p in parts])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    starts = np.concatenate([p[1][:-1] + o for p, o in zip(parts, offsets)] + [[len(ids)]])
    return ids, starts.astype(np.int64, copy=False)


def load_tokenizer(name_or_path: str | None = None, *, backend: str = "hf") -> Any:
    """The GPT-2 tokenizer. None: the bundled files (ids identical to the Hub's `gpt2`), offline.

    backend="hf" (default): transformers' GPT2TokenizerFast; any other `name_or_path` goes to
    AutoTokenizer.from_pretrained. backend="tiktoken": `TiktokenGPT2`, same ids, several times faster.
    """
    check_choice("backend", backend, TOKENIZER_BACKENDS)
    if backend == "tiktoken":
        if name_or_path is not None:
            raise ValueError("backend='tiktoken' reads only the bundled GPT-2 files: leave name_or_path=None")
        return TiktokenGPT2()
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name_or_path is None:
        # Not GPT2TokenizerFast(vocab_file=..., merges_file=...): in transformers 5.x that builds an
        # empty tokenizer. from_pretrained(folder) reads the two files correctly (4.x and 5.x).
        return GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(name_or_path)


def tokenizer_identity(tokenizer: Any) -> str:
    """What a checkpoint records of the tokenizer: the bundled GPT-2 files (either backend: same
    ids) or its name, with the vocabulary size."""
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if Path(name).resolve() == TOKENIZER_DIR.resolve():
        name = "gpt2 (bundled files)"
    size = getattr(tokenizer, "vocab_size", None)
    return f"{name}, vocab {size}"


# ----------------------------------------------------------------------------------- encoders
def gpt2_pretokenizer(tokenizer: Any) -> bool:
    """True if a fast tokenizer splits text as GPT-2 does before BPE (byte-level, GPT-2's regex, no
    prefix space, no normalizer): then `cut_long` keeps its ids (the bundled GPT-2 files do)."""
    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    byte_level = type(pre).__name__ == "ByteLevel" and getattr(pre, "use_regex", False)
    return backend.normalizer is None and byte_level and not getattr(pre, "add_prefix_space", True)


class HFFastEncoder:
    """A transformers fast tokenizer's Rust backend, `encode_batch_fast` (no offsets): the same ids
    as `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`, checked on the first
    batch (else the call itself is used). Batches holding a special token's text go through the call.
    In-process a batch is encoded in a helper thread (the Rust encoder releases the GIL and uses all
    cores) while the caller packs the previous one."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cuts_long_rows = gpt2_pretokenizer(tokenizer)
        backend = tokenizer.backend_tokenizer
        self.encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.specials = tuple(tokenizer.all_special_tokens)
        self.checked = False
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None

    def __call__(self, texts: list[str]) -> "tuple[np.ndarray, np.ndarray] | Future":
        if in_worker():
            return self.encode(texts)
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor, self._executor_pid = ThreadPoolExecutor(1), os.getpid()
        return self._executor.submit(self.encode, texts)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        joined = "\0".join(texts)  # one scan for special tokens' text (\0 never joins two rows into one)
        if self.encode_batch is None or any(s in joined for s in self.specials):
            return CallEncoder(self.tokenizer)(texts)
        if not self.checked:
            self.check(texts)
        if self.encode_batch is None:
            return CallEncoder(self.tokenizer)(texts)
        return flatten([e.ids for e in self.encode_batch(texts, add_special_tokens=False)])

    def check(self, texts: list[str]) -> None:
        """Compare the Rust encoder with the call on a prefix of the first batch (16 rows of at most
        1,000 characters: cheap next to the batch); on any difference, use the call from now on."""
        self.checked = True
        sample = [t[:1000] for t in texts[:16]]
        rows = [e.ids for e in self.encode_batch(sample, add_special_tokens=False)]
        if rows != CallEncoder.rows(self.tokenizer, sample):
            logger.warning("%s: its Rust batch encoder differs from its call: using the call", self.tokenizer)
            self.encode_batch = None

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "checked": self.checked}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"])
        self.checked = state["checked"]


class CallEncoder:
    """Any callable tokenizer: `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`,
    about TOKENIZE_CHARS characters per call (its Python lists of ints cost ~32 bytes a token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def rows(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)
        return list(out["input_ids"])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts, start = [], 0
        while start < len(texts):
            end, chars = start + 1, len(texts[start])
            while end < len(texts) and chars + len(texts[end]) <= TOKENIZE_CHARS:
                chars, end = chars + len(texts[end]), end + 1
            parts.append(flatten(self.rows(self.tokenizer, texts[start:end])))
            start = end
        return join_flat(parts) if parts else flatten([])


def flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (ids (N,) int64, starts (n + 1,) int64)."""
    lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=int(starts[-1]))
    return ids, starts


class TiktokenEncoder:
    """`TiktokenGPT2.submit_flat` as an encoder: texts -> (ids, starts), or a Future of them."""

    cuts_long_rows = True  # GPT-2's pre-tokenizer: see cut_long

    def __init__(self, tokenizer: TiktokenGPT2) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> "tuple[np.ndarray, np.ndarray] | Future":
        return self.tokenizer.submit_flat(texts)


def make_encoder(tokenizer: Any) -> Any:
    """The fastest exact encoder for `tokenizer`: texts -> (ids, starts), or a Future of them."""
    if isinstance(tokenizer, TiktokenGPT2):
        return TiktokenEncoder(tokenizer)
    if getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
        return HFFastEncoder(tokenizer)
    return CallEncoder(tokenizer)


# ----------------------------------------------------------------------------------- the document rule
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
    stream: datasets.IterableDataset, layout: str = "auto", source: SourceInfo | None = None
) -> tuple[str, str]:
    """(rule, why): `layout`, or for "auto" what the source says or its first rows look like."""
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
    first = peek_texts(stream, LAYOUT_PEEK_ROWS, source)
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


# ----------------------------------------------------------------------------------- token batches
@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Consecutive rows of one piece as one flat array: row k is ids[starts[k]:starts[k + 1]].

    ids: (N,) integer ids, each document's EOS included. starts: (n + 1,) int64 offsets.
    piece, first_row, step: row k is row first_row + k * step of piece `piece`.
    first_token: where row 0 starts within its row (a batch read from inside a row).
    blank: (n,) bool, rows that are layout only (WikiText's blank rows), or None.
    empty: (n,) bool, rows without text (None, or "" outside WikiText's layout), or None.
    """

    ids: np.ndarray
    starts: np.ndarray
    piece: int = 0
    first_row: int = 0
    step: int = 1
    first_token: int = 0
    blank: np.ndarray | None = None
    empty: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.starts) - 1

    def trim(self, tokens: int) -> "TokenBatch":
        """This batch without the first `tokens` tokens of its first row."""
        have = int(self.starts[1] - self.starts[0]) if self.rows else 0
        if tokens > have:
            raise ValueError(
                f"corrupt checkpoint: position token={tokens}, but row {self.first_row} of piece "
                f"{self.piece} has {have} tokens"
            )
        starts = self.starts - tokens
        starts[0] = 0
        return TokenBatch(
            self.ids[tokens:], starts, self.piece, self.first_row, self.step, tokens, self.blank, self.empty
        )


@dataclass(frozen=True, eq=False)
class Segment:
    """Rows of one piece read together: row k is row first_row + k * step of piece `piece`, the
    plan's task `task` (texts: str or None)."""

    task: int
    piece: int
    first_row: int
    step: int
    texts: list


def classify(segment: Segment, layout: str, eos: int | None, label: str) -> tuple:
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


def encode_segments(
    encode: Any, segments: list[Segment], *, layout: str, eos: int | None, labels: list[str]
) -> "list[tuple[int, TokenBatch]] | Future":
    """Segments -> [(task, TokenBatch)], tokenized together in one call (or a Future of that list),
    each document's row opened by `eos` (None: no EOS)."""
    kept, blank, empty, texts, doc = [], [], [], [], []
    base = 0
    for segment, label in zip(segments, labels):
        rows, some, b, e, d = classify(segment, layout, eos, label)
        kept.append(rows + base)
        texts += some
        blank.append(b)
        empty.append(e)
        doc.append(d)
        base += len(segment.texts)
    pieces, owner = cut_long(texts) if getattr(encode, "cuts_long_rows", False) else (texts, None)
    parts = (segments, np.concatenate(blank), np.concatenate(empty), owner)
    return _assemble(encode(pieces), np.concatenate(kept), np.concatenate(doc), base, eos, parts)


def _assemble(
    encoded: Any, kept: np.ndarray, doc: np.ndarray, n: int, eos: int | None, parts: tuple
) -> "list[tuple[int, TokenBatch]] | Future":
    """The per-segment TokenBatches from the encoder's (ids, starts) of the kept rows, or a Future."""
    if isinstance(encoded, Future):
        out: Future = Future()
        encoded.add_done_callback(
            lambda f: _settle(out, lambda: _assemble(f.result(), kept, doc, n, eos, parts))
        )
        return out
    segments, blank, empty, owner = parts
    ids, kept_starts = encoded
    if owner is not None and len(owner) != len(kept):  # rows were cut in pieces: one start per row
        firsts = np.searchsorted(owner, np.arange(len(kept)))
        kept_starts = np.concatenate([kept_starts[firsts], kept_starts[-1:]])
    at = kept_starts[:-1][doc]  # (d,) where each document's row begins
    ids = np.insert(ids, at, eos) if len(at) else ids
    lengths = np.zeros(n, np.int64)
    lengths[kept] = np.diff(kept_starts) + doc  # a document's row holds its EOS
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out, row = [], 0
    for segment in segments:
        end = row + len(segment.texts)
        a, b = starts[row], starts[end]
        batch = TokenBatch(
            ids[a:b],
            starts[row : end + 1] - a,
            segment.piece,
            segment.first_row,
            segment.step,
            0,
            blank[row:end],
            empty[row:end],
        )
        out.append((segment.task, batch))
        row = end
    return out


def _settle(out: Future, make: Any) -> None:
    try:
        out.set_result(make())
    except Exception as err:  # noqa: BLE001 - handed to the waiting reader, which raises it
        out.set_exception(err)


# ----------------------------------------------------------------------------------- the stream
@dataclass(frozen=True, eq=False)
class TokenStream:
    """Step 2's output: a lazy stream of GPT-2 token rows, {"input_ids": (n,) int32} each.

    text: the text rows (a datasets stream with a `text` column), cut into pieces on first use.
    layout: the document rule asked for ("auto" is decided on first use: `rule`).
    source: the SourceInfo of a stream from load_text_stream, else None (then `name` identifies it).
    Iterating it (or `take(n)`) reads every piece in order; `StreamingLMIterableDataset` reads its
    pieces by `read()`, as flat TokenBatches.
    """

    text: datasets.IterableDataset
    tokenizer: Any
    layout: str
    eos: int | None
    batch_rows: int
    source: SourceInfo | None
    name: str
    encoder: Any = field(default=None, repr=False)

    @functools.cached_property
    def pieces(self) -> Pieces:
        """The text cut into pieces (parquet: row groups; else shards, e.g. files)."""
        return Pieces(self.text)

    @functools.cached_property
    def rule(self) -> tuple[str, str]:
        """(document rule, why): `layout`, or what "auto" decided (it may read the first rows)."""
        return resolve_layout(self.text, self.layout, self.source)

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match: the source, the tokenizer, the document rule, the EOS setting."""
        return {
            "source": dict(self.source.identity) if self.source is not None else {"name": self.name},
            "tokenizer": tokenizer_identity(self.tokenizer),
            "layout": self.rule[0],
            "separate_documents": self.eos is not None,
        }

    @property
    def description(self) -> str:
        """Where the text comes from and which document rule was chosen, and why."""
        where = self.source.description if self.source is not None else self.name
        return f"{where}; documents: {self.rule[0]} ({self.rule[1]})"

    @property
    def n_pieces(self) -> int:
        return self.pieces.num_shards

    @property
    def piece_weights(self) -> tuple[int, ...] | None:
        weights = self.source.piece_weights if self.source is not None else None
        return weights if weights is not None and len(weights) == self.n_pieces else None

    @property
    def piece_rows(self) -> tuple[int, ...] | None:
        rows = self.source.piece_rows if self.source is not None else None
        return rows if rows is not None and len(rows) == self.n_pieces else None

    def _label(self, piece: int) -> str:
        return f" of piece {piece}" if self.n_pieces > 1 else ""

    def read(self, piece: int, row: int = 0, step: int = 1, offset: int = 0) -> Iterator[TokenBatch]:
        """TokenBatches of piece `piece` from row `row` (with step > 1: only rows whose index % step ==
        offset)."""
        for _, batch in self.read_tasks([Task(piece, row, 0, step, offset)]):
            yield batch

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """(task index, TokenBatch) of each task's piece in turn, from its row (its `token` is the
        caller's to trim). Rows of consecutive tasks are tokenized together, about `batch_rows` at a
        time; in-process READ_AHEAD groups are tokenized in the pool while the caller packs
        (two: a mixture's sources share the pool, and one waiting behind another's group stalls)."""
        group: list[Segment] = []
        pending: collections.deque = collections.deque()
        for index, task in enumerate(tasks):
            texts = read_piece_text(
                self.pieces,
                task.piece,
                task.row,
                self.batch_rows,
                step=task.step,
                offset=task.offset,
                source=self.source,
            )
            for first, rows in texts:
                group.append(Segment(index, task.piece, first, task.step, rows))
                if sum(len(g.texts) for g in group) >= self.batch_rows:
                    pending.append(self._encode(group))
                    group = []
                    if len(pending) > READ_AHEAD:
                        yield from _result(pending.popleft())
        if group:
            pending.append(self._encode(group))
        while pending:
            yield from _result(pending.popleft())

    def _encode(self, group: list[Segment]) -> "list[tuple[int, TokenBatch]] | Future":
        labels = [self._label(g.piece) for g in group]
        return encode_segments(self.encoder, group, layout=self.rule[0], eos=self.eos, labels=labels)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row in order, {"input_ids": (n,) int32}, read in one pass over the stream (not piece
        by piece: a remote file is opened once); WikiText's blank rows are left out."""
        texts = read_piece_text(self.text, None, 0, self.batch_rows, source=self.source)
        for first, rows in texts:
            ((_, batch),) = _result(self._encode([Segment(0, 0, first, 1, rows)]))
            ids = batch.ids.astype(np.int32, copy=False)
            for k in range(batch.rows):
                if batch.blank is None or not batch.blank[k]:
                    yield {"input_ids": ids[batch.starts[k] : batch.starts[k + 1]]}

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` rows (as iterating gives them)."""
        return list(itertools.islice(self, check_positive_int("n", n)))


def _result(encoded: Any) -> Any:
    return encoded.result() if isinstance(encoded, Future) else encoded


def tokenize_stream(
    stream: datasets.IterableDataset,
    tokenizer: Any,
    *,
    separate_documents: bool = True,
    layout: str = "auto",
    batch_rows: int = TOKENIZE_BATCH_ROWS,
) -> TokenStream:
    """Step 2: lazily tokenize a text stream -> a `TokenStream` of {"input_ids": (n,) int32} rows.

    No padding, no truncation, one output row per input row (WikiText's blank rows left out; rows
    without text are 0-token rows, counted and reported by the packer). Memory holds one batch of
    `batch_rows` rows (fewer when rows are long: about TOKENIZE_BATCH_CHARS characters).
    With `separate_documents`, EOS (50256) goes in front of every row that opens a document:
    `layout` "wikitext" (WikiText articles), "rows" (every row) or "auto" (see the module's
    docstring; `tokens.description` says what it chose). A literal "<|endoftext|>" in the text is
    encoded as ordinary text, never as the separator. Nothing is read until the stream is used.
    """
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer (see load_tokenizer()), got {tokenizer!r}")
    batch_rows = check_positive_int("batch_rows", batch_rows)
    check_choice("layout", layout, LAYOUTS)
    if isinstance(stream, datasets.Dataset):
        stream = stream.to_iterable_dataset()
    if not isinstance(stream, datasets.IterableDataset):
        raise TypeError(f"tokenize_stream needs a datasets.IterableDataset, got {type(stream).__name__}")
    columns = stream.column_names  # None when unknown (from_generator): the reader names them instead
    if columns is not None and TEXT_COLUMN not in columns:
        raise ValueError(f"the stream has no {TEXT_COLUMN!r} column; its columns are {columns}")
    source = stream.source if isinstance(stream, TextStream) else None
    if source is None:
        logger.info(
            "the stream carries no SourceInfo (not from load_text_stream): checkpoints check its name"
        )
    if source is not None and source.row_chars:  # long documents: fewer rows, ~TOKENIZE_BATCH_CHARS a batch
        batch_rows = max(1, min(batch_rows, int(TOKENIZE_BATCH_CHARS // source.row_chars)))
    text = stream.select_columns([TEXT_COLUMN]) if columns is not None and len(columns) > 1 else stream
    eos = tokenizer.eos_token_id if separate_documents else None
    name = stream_name(stream)
    return TokenStream(text, tokenizer, layout, eos, batch_rows, source, name, make_encoder(tokenizer))


def stream_name(stream: datasets.IterableDataset) -> str:
    """A short name for a datasets stream without a SourceInfo."""
    info = stream.info
    name = "/".join(filter(None, [info.dataset_name or info.builder_name, info.config_name]))
    return info.description or f"{name or 'in-memory stream'}, {stream.num_shards} shards"
