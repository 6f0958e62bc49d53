"""Token sources of rows already tokenized: a `datasets` stream with an `input_ids` column (read as
Arrow list arrays: flat values and offsets, no per-row Python) or any re-iterable of id rows (one
piece). Like a `TokenStream`, they turn a plan's tasks into TokenBatches (`read_tasks`).
"""

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from .encoders import flatten
from .packing import as_id_array, token_ids
from .pieces import Pieces
from .state import Task


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


if TYPE_CHECKING:
    pass

ROWS_PER_BATCH = 256  # rows of a plain iterable or an untyped datasets stream converted together


class TokenRows:
    """A TokenSource of rows already tokenized, read one piece at a time by `self.read`."""

    piece_weights = None

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.description}

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        for index, task in enumerate(tasks):
            for batch in self.read(task.piece, task.row, task.step, task.offset):
                yield index, batch


@dataclass(frozen=True, eq=False)
class DatasetRows(TokenRows):
    """A `datasets` stream of token rows (an `input_ids` column), each piece read as Arrow batches."""

    stream: datasets.IterableDataset
    piece_rows = None

    @property
    def pieces(self) -> Pieces:
        if "_pieces" not in self.__dict__:
            object.__setattr__(self, "_pieces", Pieces(self.stream))  # this frozen value's own cache
        return self.__dict__["_pieces"]

    @property
    def n_pieces(self) -> int:
        return self.pieces.num_shards

    @property
    def description(self) -> str:
        info = self.stream.info
        name = "/".join(filter(None, [info.builder_name, info.config_name])) or "in-memory stream"
        return info.description or f"{name}, {self.stream.num_shards} shards"

    def read(self, piece: int, row: int = 0, step: int = 1, offset: int = 0) -> Iterator[TokenBatch]:
        one = self.pieces.get(piece)
        typed = one.features is not None
        batches = one.with_format("arrow").iter(ROWS_PER_BATCH) if typed else one.iter(ROWS_PER_BATCH)
        first = 0
        for batch in batches:
            n = batch.num_rows if typed else len(next(iter(batch.values())))
            if first + n > row:
                skip = max(0, row - first)
                ids, starts = _arrow_rows(batch, skip) if typed else _python_rows(batch, first + skip, skip)
                yield from _select(TokenBatch(ids, starts, piece, first + skip), step, offset)
            first += n
        if row > first + step - 1:
            raise ValueError(f"corrupt checkpoint: position row={row}, but piece {piece} has {first} rows")


def _arrow_rows(table: Any, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, starts) of an Arrow table's `input_ids` list column from row `skip`, without copying rows."""
    if "input_ids" not in table.column_names:
        raise ValueError(f"row {skip} has no 'input_ids' (keys: {sorted(table.column_names)})")
    column = table.column("input_ids").combine_chunks().slice(skip)
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = np.asarray(column.values.slice(offsets[0], offsets[-1] - offsets[0]))
    if values.dtype.kind not in "iu":
        raise ValueError(f"row {skip}: token ids must be integers, got dtype {values.dtype}")
    return values, offsets - offsets[0]


def _python_rows(batch: dict, first: int, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, starts) of a batch of Python rows (dict of columns) from row `skip`."""
    if "input_ids" not in batch:
        raise ValueError(f"row {first} has no 'input_ids' (keys: {sorted(batch)})")
    rows = batch["input_ids"][skip:]
    return flatten([as_id_array(r if r is not None else [], first + i) for i, r in enumerate(rows)])


def _select(batch: TokenBatch, step: int, offset: int) -> Iterator[TokenBatch]:
    """`batch` keeping only the rows whose index % step == offset (step 1: itself)."""
    if step == 1:
        yield batch
        return
    rows = np.arange(batch.rows) + batch.first_row
    keep = np.flatnonzero(rows % step == offset)
    if not len(keep):
        return
    lengths = np.diff(batch.starts)[keep]
    ids = np.concatenate([batch.ids[batch.starts[k] : batch.starts[k + 1]] for k in keep])
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = None if batch.empty is None else batch.empty[keep]
    yield TokenBatch(ids, starts, batch.piece, int(rows[keep[0]]), step, empty=empty)


@dataclass(frozen=True, eq=False)
class IterableRows(TokenRows):
    """A plain iterable of token rows (lists, arrays, dicts with `input_ids`): one piece."""

    rows: Iterable[Any]
    n_pieces = 1

    @property
    def piece_rows(self) -> tuple[int, ...] | None:
        return (len(self.rows),) if hasattr(self.rows, "__len__") else None

    @property
    def description(self) -> str:
        size = f", {len(self.rows)} rows" if hasattr(self.rows, "__len__") else ""
        return f"{type(self.rows).__name__}{size}"

    def read(self, piece: int, row: int = 0, step: int = 1, offset: int = 0) -> Iterator[TokenBatch]:
        rows = itertools.islice(self.rows, row, None)
        index = row
        while chunk := list(itertools.islice(rows, ROWS_PER_BATCH)):
            arrays = [as_id_array(token_ids(r, index + i), index + i) for i, r in enumerate(chunk)]
            ids, starts = flatten(arrays)
            yield from _select(TokenBatch(ids, starts, 0, index, empty=np.diff(starts) == 0), step, offset)
            index += len(chunk)
        if row > index + step - 1:
            raise ValueError(f"corrupt checkpoint: position row={row}, but the stream has {index} rows")
