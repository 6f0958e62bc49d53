"""Step 2, tokenize: GPT-2 ids for a text stream, lazily, with one EOS in front of each document.

    tokens = tokenize_stream(stream, tokenizer)   # a TokenStream: nothing is read yet
    for row in tokens: ...                        # {"input_ids": (n,) int32}, one per text row

A stream's pieces are read as text batches (pieces.py), their rows classified by the document rule
(documents.py), encoded together by the fastest exact encoder (encoders.py), and come back as
`TokenBatch`es: one flat id array and row offsets per piece's run of rows, the EOS separators put in
with one np.insert. Rows of consecutive tasks are tokenized together and, in-process, the next
groups are tokenized while the current one is packed.
"""

import collections
import functools
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from .cache import TokenCache
from .cached_reads import CachedReads
from .checks import check_choice, check_positive_int
from .config import (
    LAYOUTS,
    TEXT_COLUMN,
    TOKENIZE_BATCH_CHARS,
    TOKENIZE_BATCH_ROWS,
)
from .documents import classify, cut_long, resolve_layout
from .encoders import _settle, make_encoder, tokenizer_identity
from .files import fingerprint
from .pieces import Pieces, read_piece_text
from .source import SourceInfo, TextStream
from .state import Task
from .token_rows import TokenBatch

logger = logging.getLogger(__name__)


READ_AHEAD = 2  # token groups being tokenized ahead of the one packed, per stream (in-process)


@dataclass(frozen=True, eq=False)
class Segment:
    """Rows of one piece read together: row k is row first_row + k * step of piece `piece`, the
    plan's task `task` (texts: str or None)."""

    task: int
    piece: int
    first_row: int
    step: int
    texts: list


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
    cache: TokenCache | None = field(default=None, repr=False)

    @functools.cached_property
    def pieces(self) -> Pieces:
        """The text cut into pieces (parquet: row groups; else shards, e.g. files)."""
        return Pieces(self.text)

    @functools.cached_property
    def rule(self) -> tuple[str, str]:
        """(document rule, why): `layout`, or what "auto" decided (it may read the first rows)."""
        return resolve_layout(self.text, self.layout, self.source, self.first_texts)

    def first_texts(self, n: int) -> list[Any]:
        """The texts of the first `n` rows (fewer if they are long: up to TOKENIZE_BATCH_CHARS
        characters), each cut to its first and last 64 characters: the document rule's "auto" looks
        at how rows start and end (50 rows of 1 MB held whole were a 100 MiB peak)."""
        texts: list[Any] = []
        chars = 0  # read so far: a tokenizing batch of long rows is enough (WikiText's rows are short)
        for _, rows in self.text_batches():
            rows = rows.to_pylist() if hasattr(rows, "to_pylist") else rows
            chars += sum(len(t) for t in rows if isinstance(t, str))
            texts += map(_ends, rows)
            if len(texts) >= n or chars >= TOKENIZE_BATCH_CHARS:
                break
        return texts[:n]

    @property
    def identity(self) -> dict[str, str]:
        """What a checkpoint must match: the source (its files looked at again now: a file changed
        since the stream was made is another source), the tokenizer, the document rule, the EOS."""
        source = dict(self.source.identity) if self.source is not None else {"name": self.name}
        if self.source is not None and self.source.files:
            source["files"] = fingerprint(self.source.files)
        rule = {"layout": self.rule[0], "separate_documents": str(self.eos is not None)}
        return {**source, "tokenizer": tokenizer_identity(self.tokenizer), **rule}

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

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """(task index, TokenBatch) of each task's piece in turn, from its row (its `token` is the
        caller's to trim): from the token cache where it holds the piece, else tokenized (and a
        task that reads its piece whole written to the cache as it goes)."""
        if self.cache is None:
            yield from self._tokenized(tasks)
        else:
            yield from self.cached_reads.read(tasks)

    @functools.cached_property
    def cached_reads(self) -> CachedReads:
        """This stream's reads through its token cache (one, so the tokenizer's key is made once)."""
        return CachedReads(self, self.cache)

    def _tokenized(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """read_tasks from the text: rows of consecutive tasks tokenized together, about `batch_rows`
        at a time; in-process READ_AHEAD groups are tokenized in the pool while the caller packs
        (two: a mixture's sources share the pool, and one waiting behind another's group stalls)."""
        group: list[Segment] = []
        pending: collections.deque = collections.deque()
        for index, task in enumerate(tasks):
            where = {"step": task.step, "offset": task.offset, "source": self.source}
            for first, rows in read_piece_text(self.pieces, task.piece, task.row, self.batch_rows, **where):
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

    def text_batches(self) -> Iterator[tuple[int, Any]]:
        """(first row, texts) of the whole stream in order: local files piece by piece, as the
        pipeline reads them (a damaged row is named with its file and line), else the stream in one
        pass (a remote file is opened once)."""
        if self.source is None or self.source.local is None:
            yield from read_piece_text(self.text, None, 0, self.batch_rows, source=self.source)
            return
        for piece in range(self.n_pieces):
            yield from read_piece_text(self.pieces, piece, 0, self.batch_rows, source=self.source)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row in order, {"input_ids": (n,) int32}; WikiText's blank rows are left out."""
        for first, rows in self.text_batches():
            ((_, batch),) = _result(self._encode([Segment(0, 0, first, 1, rows)]))
            ids = batch.ids.astype(np.int32, copy=False)
            for k in range(batch.rows):
                if batch.blank is None or not batch.blank[k]:
                    yield {"input_ids": ids[batch.starts[k] : batch.starts[k + 1]]}

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` rows (as iterating gives them)."""
        return list(itertools.islice(self, check_positive_int("n", n)))


def _ends(text: Any, keep: int = 64) -> Any:
    """A row's first and last `keep` characters (the row itself if short or not text)."""
    return text[:keep] + text[-keep:] if isinstance(text, str) and len(text) > 2 * keep else text


def _result(encoded: Any) -> Any:
    return encoded.result() if isinstance(encoded, Future) else encoded


def tokenize_stream(
    stream: datasets.IterableDataset,
    tokenizer: Any,
    *,
    separate_documents: bool = True,
    layout: str = "auto",
    batch_rows: int = TOKENIZE_BATCH_ROWS,
    cache_dir: str | os.PathLike | None = None,
) -> TokenStream:
    """Step 2: lazily tokenize a text stream -> a `TokenStream` of {"input_ids": (n,) int32} rows.

    No padding, no truncation, one output row per input row (WikiText's blank rows left out; rows
    without text are 0-token rows, counted and reported by the packer). Memory holds one batch of
    `batch_rows` rows (fewer when rows are long: about TOKENIZE_BATCH_CHARS characters).
    With `separate_documents`, EOS (50256) goes in front of every row that opens a document:
    `layout` "wikitext" (WikiText articles), "rows" (every row) or "auto" (see the module's
    docstring; `tokens.description` says what it chose). A literal "<|endoftext|>" in the text is
    encoded as ordinary text, never as the separator. Nothing is read until the stream is used.
    cache_dir: a folder for the token cache (cache.py): each piece the dataset tokenizes whole is
    kept there, verified, and read from there by later passes and runs instead of its text.
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
    name, cache = stream_name(stream), None if cache_dir is None else TokenCache(cache_dir)
    if cache is not None and (source is None or not source.piece_names):
        logger.warning(
            "token cache: the stream cannot name its pieces (not from load_text_stream): not cached"
        )
        cache = None
    return TokenStream(text, tokenizer, layout, eos, batch_rows, source, name, make_encoder(tokenizer), cache)


def stream_name(stream: datasets.IterableDataset) -> str:
    """A short name for a datasets stream without a SourceInfo."""
    info = stream.info
    name = "/".join(filter(None, [info.dataset_name or info.builder_name, info.config_name]))
    return info.description or f"{name or 'in-memory stream'}, {stream.num_shards} shards"
