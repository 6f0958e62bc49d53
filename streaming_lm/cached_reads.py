"""Step 2 through the token cache: a TokenStream's tasks read from cache entries where they exist,
else tokenized and written as they go (cache.py keeps the entries; this module knows TokenBatches).

    CachedReads(stream, cache).read(tasks)   # (task index, TokenBatch), as TokenStream.read_tasks

A task that reads its piece whole (or, of a piece parts share, all the rows it keeps) is written as
one entry, keyed by `piece_key`; a later task finds its own entry, or the whole piece's and keeps
its rows of it. Positions stay positions in the corpus: (piece, row, token) as the text gives them.
"""

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import Entry, TokenCache
from .encoders import tokenizer_key
from .state import Task
from .token_rows import TokenBatch

if TYPE_CHECKING:
    from .tokenize import TokenStream

BLANK, EMPTY = 1, 2  # an entry's row flags: WikiText's blank rows, rows without text


@dataclass(frozen=True)
class CachedReads:
    """The reads of one TokenStream through one TokenCache."""

    stream: "TokenStream"
    cache: TokenCache

    def read(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """(task index, TokenBatch) of each task in turn: cached ones from their entries, runs of
        the others tokenized together (and written)."""
        run: list[int] = []  # the tasks before the next cached one
        for index, task in enumerate(tasks):
            found = self._cached(task)
            if found is None:
                run.append(index)
                continue
            yield from self._written(tasks, run)
            run = []
            yield from ((index, batch) for batch in found)
        yield from self._written(tasks, run)

    def piece_key(self, piece: int, step: int = 1, offset: int = 0) -> dict | None:
        """What a cache entry of `piece` (rows offset, offset + step, ...) is: the piece (its file's
        resolved path, size and modification time, or its Hub commit and file), the tokenizer, the
        document rule, the text column; None where the stream cannot name its pieces."""
        source, stream = self.stream.source, self.stream
        if source is None or not source.piece_names or len(source.piece_names) != stream.n_pieces:
            return None
        if source.local is not None:
            path, group = source.local[piece]
            stat = os.stat(path)
            where = {"file": resolved(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            where["row_group"] = group
        else:
            where = {k: source.identity[k] for k in ("hub", "config", "split", "revision")}
            where["file"] = source.piece_names[piece]
        rule = {"layout": stream.rule[0], "eos": stream.eos, "text_column": source.identity["text_column"]}
        return {**where, **rule, "tokenizer": self.tokenizer_key, "step": step, "offset": offset}

    @functools.cached_property
    def tokenizer_key(self) -> str:
        return tokenizer_key(self.stream.tokenizer)

    def _cached(self, task: Task) -> Iterator[TokenBatch] | None:
        """The TokenBatches of `task` from its cache entry (or the whole piece's, for rows a part
        keeps of a shared piece), or None if the cache has neither."""
        for step, offset in {(task.step, task.offset), (1, 0)}:
            key = self.piece_key(task.piece, step, offset)
            entry = self.cache.open(key, self.stream.source.piece_names[task.piece]) if key else None
            if entry is not None:
                return cached_batches(entry, task, step)
        return None

    def _written(self, tasks: Sequence[Task], run: list[int]) -> Iterator[tuple[int, TokenBatch]]:
        """The tokenized batches of tasks[run], each whole task's written to the cache as it goes
        (and finished once a later task's batch comes: a task's batches come in order)."""
        writers: dict[int, Any] = {}  # task (index in run) -> its writer, or None: not written
        try:
            for k, batch in self.stream._tokenized([tasks[i] for i in run]):
                for done in [j for j in writers if j < k and writers[j] is not None]:
                    writers[done].finish()
                    writers[done] = None
                if k not in writers:
                    writers[k] = self._writer(tasks[run[k]])
                if writers[k] is not None and not writers[k].add(batch.ids, batch.starts, flags_of(batch)):
                    writers[k] = None
                yield run[k], batch
            for k, i in enumerate(run):  # the last task's writer; a task without a batch: an empty entry
                writer = writers.pop(k) if k in writers else self._writer(tasks[i])
                _ = writer and writer.finish()
        finally:
            for writer in filter(None, writers.values()):
                writer.abort()

    def _writer(self, task: Task) -> Any:
        """A Writer of `task`'s entry if it reads its piece (or its rows of a shared one) whole."""
        whole = task.token == 0 and task.row == (task.offset if task.step > 1 else 0)
        key = self.piece_key(task.piece, task.step, task.offset) if whole else None
        tokenizer = self.stream.tokenizer
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        return self.cache.writer(key, self.stream.source.piece_names[task.piece], dtype) if key else None


@functools.lru_cache(maxsize=4096)
def resolved(path: str) -> str:
    return str(Path(path).resolve())


def flags_of(batch: TokenBatch) -> np.ndarray:
    """(rows,) uint8: BLANK for WikiText's blank rows, EMPTY for rows without text (cache.py)."""
    flags = np.zeros(batch.rows, np.uint8)
    for mask, value in ((batch.blank, BLANK), (batch.empty, EMPTY)):
        if mask is not None:
            flags[mask] = value
    return flags


def cached_batches(entry: Entry, task: Task, step: int) -> Iterator[TokenBatch]:
    """The TokenBatches of `task` from a cache entry of its piece's rows offset, offset + step, ...
    (`step` is the task's own, or 1 for the whole piece's entry: its rows are then selected)."""
    first = (task.row - task.offset) // step if step > 1 else task.row
    if first > entry.n_rows + (task.step - 1 if step == 1 else 0):  # past the end: no run stands there
        raise ValueError(
            f"corrupt checkpoint: position row={task.row}, but piece {task.piece} has {entry.n_rows} rows"
        )
    for row, ids, starts, flags in entry.chunks(first):
        if step == 1 and task.step > 1:  # rows of the whole piece: keep this task's
            keep = np.flatnonzero((np.arange(len(flags)) + row) % task.step == task.offset)
            if not len(keep):
                continue
            lengths = starts[keep + 1] - starts[keep]
            at = np.repeat(starts[keep] - np.cumsum(np.concatenate([[0], lengths[:-1]])), lengths)
            ids, flags = ids[at + np.arange(len(at))], flags[keep]
            starts, row = np.concatenate([[0], np.cumsum(lengths)]), row + int(keep[0])
        row = row * step + task.offset if step > 1 else row
        yield TokenBatch(
            np.asarray(ids), starts, task.piece, row, task.step, 0, flags == BLANK, flags == EMPTY
        )
