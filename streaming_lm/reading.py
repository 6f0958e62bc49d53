"""How one part reads one source: plan -> token batches -> rolling buffer -> blocks, and where it is.

    reader = PartReader(source, settings, layout, state)   # state: parts.PartState (fresh or resumed)
    ids, mask = reader.take(8)                             # (m, T) int64 each; None at the epoch's end
    reader.state()                                         # a PartState: resume from exactly here

A token source is anything with pieces that `read(piece, row, token, step, offset)` turns into
TokenBatches: a tokenized text stream (`TokenStream`), a pre-tokenized `datasets` stream (its
`input_ids` column read as Arrow list arrays: flat values and offsets, no per-row Python), or a
plain iterable of rows (one piece). A `Tape` reads a list of tasks and pushes their batches through
a RollingBuffer; it knows the corpus position of every token it pushed, so the state after any
block is a position, not the carried tokens. With shuffling, the blocks are cut into windows of
`shuffle_window` blocks, each drawn in the permutation of (seed, epoch, the window's start).
"""

import collections
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import datasets
import numpy as np

from .config import EOS_TOKEN_ID, GPT2_VOCAB_SIZE, SHUFFLE_WINDOW_BLOCKS
from .packing import RollingBuffer, as_id_array, out_of_vocabulary, token_ids, warn_dropped, warn_empty
from .parts import Layout, PartState, Position, Task, Window
from .source import Pieces
from .tokenize import TokenBatch, TokenStream, flatten

logger = logging.getLogger(__name__)
ROWS_PER_BATCH = 256  # rows of a plain iterable or an untyped datasets stream converted together


class TokenSource(Protocol):
    """What a part reads: pieces of token rows."""

    n_pieces: int
    piece_weights: tuple[int, ...] | None
    piece_rows: tuple[int, ...] | None  # rows per piece, where known (checks positions before reading)
    identity: dict[str, Any]
    description: str

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """(task index, TokenBatch) of each task's piece in turn, from its row (rows with index %
        step == offset); the task's `token` is the caller's to trim."""
        ...


class PieceByPiece:
    """A TokenSource's `read_tasks` and `identity` for a source that reads one piece at a time
    (`self.read`) and is known by its description."""

    @property
    def identity(self) -> dict[str, Any]:
        return {"source": {"name": self.description}}

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        for index, task in enumerate(tasks):
            for batch in self.read(task.piece, task.row, task.step, task.offset):
                yield index, batch


@dataclass(frozen=True, eq=False)
class DatasetRows(PieceByPiece):
    """A `datasets` stream of token rows (an `input_ids` column), each piece read as Arrow batches."""

    stream: datasets.IterableDataset

    @property
    def pieces(self) -> Pieces:
        if "_pieces" not in self.__dict__:
            object.__setattr__(self, "_pieces", Pieces(self.stream))  # this frozen value's own cache
        return self.__dict__["_pieces"]

    @property
    def n_pieces(self) -> int:
        return self.pieces.num_shards

    piece_weights = None
    piece_rows = None

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
        if row > first:
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
    rows = [
        as_id_array(r if r is not None else [], first + i) for i, r in enumerate(batch["input_ids"][skip:])
    ]
    return flatten(rows)


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
    yield TokenBatch(ids, starts, batch.piece, int(rows[keep[0]]), step)


@dataclass(frozen=True, eq=False)
class IterableRows(PieceByPiece):
    """A plain iterable of token rows (lists, arrays, dicts with `input_ids`): one piece."""

    rows: Iterable[Any]
    n_pieces = 1
    piece_weights = None

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
            ids, starts = flatten(arrays) if arrays else (np.empty(0, np.int64), np.zeros(1, np.int64))
            empty = np.diff(starts) == 0
            yield from _select(TokenBatch(ids, starts, 0, index, empty=empty), step, offset)
            index += len(chunk)
        if row > index:
            raise ValueError(f"corrupt checkpoint: position row={row}, but the stream has {index} rows")


def as_token_source(stream: Any) -> TokenSource:
    """The token source for what StreamingLMIterableDataset is given: a TokenStream, a datasets
    stream of token rows, or any re-iterable of rows."""
    if isinstance(stream, TokenStream):
        return stream
    if isinstance(stream, datasets.Dataset):
        return IterableRows(stream)
    if isinstance(stream, datasets.IterableDataset):
        return DatasetRows(stream)
    return IterableRows(stream)


# ----------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """How blocks are made from a source; what a checkpoint must match, with the source's identity.

    block_size: tokens per block. pad_last: pad each part's final partial block per epoch instead of
    dropping it. shuffle, seed, shuffle_window: piece order per epoch and blocks within windows of
    `shuffle_window` blocks, from (seed, epoch). epochs: per pass (None: endless). vocab_size: ids
    must be below it. pad_token_id: the id padding gets (mask 0).
    """

    block_size: int
    pad_last: bool = False
    shuffle: bool = False
    seed: int = 0
    shuffle_window: int = SHUFFLE_WINDOW_BLOCKS
    epochs: int | None = 1
    vocab_size: int = GPT2_VOCAB_SIZE
    pad_token_id: int = EOS_TOKEN_ID

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ones(shape: tuple[int, int]) -> np.ndarray:
    """A read-only (k, T) int64 array of ones: the mask of k whole blocks, shared (no allocation
    per take; writing into a block's mask raises instead of changing others)."""
    k, size = shape
    cached = _ONES.get(size)
    if cached is None or len(cached) < k:
        cached = np.ones((max(k, 256), size), np.int64)
        cached.setflags(write=False)
        _ONES[size] = cached
    return cached[:k]


_ONES: dict[int, np.ndarray] = {}  # block size -> a read-only array of ones (a cache)


# ----------------------------------------------------------------------------------- the tape
@dataclass(frozen=True, eq=False)
class Record:
    """A pushed TokenBatch and where its tokens start in the tape's count."""

    start: int
    batch: TokenBatch
    task: int

    @property
    def end(self) -> int:
        return self.start + len(self.batch.ids)


class Tape:
    """The blocks of a run of tasks (from task `cursor`, at `start`), cut by one RollingBuffer, and
    the corpus position of any token it pushed (`position(count)`; count 0 is `start`)."""

    def __init__(
        self,
        source: TokenSource,
        tasks: tuple[Task, ...],
        cursor: int,
        start: Position | None,
        settings: Settings,
    ) -> None:
        self.source, self.tasks, self.settings = source, tasks, settings
        self.packer = RollingBuffer(settings.block_size, vocab_size=settings.vocab_size)
        self.cursor: tuple[int, Position | None] = (cursor, start)  # the task and place read next
        self._records: collections.deque[Record] = collections.deque()
        self._batches = self._read(cursor, start)
        self._ready = np.empty((0, settings.block_size), np.int64)
        self._next = 0  # the next block of _ready to hand out
        self.taken = 0  # tokens handed out in whole blocks
        self.rows = self.empty_rows = 0
        self.first_empty: int | None = None

    def _read(self, cursor: int, start: Position | None) -> Iterator[Record]:
        tasks = list(self.tasks[cursor:])
        if tasks and start is not None:
            tasks[0] = tasks[0].from_(start)
        untrimmed = {i for i, t in enumerate(tasks) if t.token}  # tasks that start inside a row
        for index, batch in self.source.read_tasks(tasks):
            task = tasks[index]
            if index in untrimmed:  # its first batch: leave out the tokens before the task's start
                batch = batch.trim(task.token)
                untrimmed.discard(index)
            after = Position(task.piece, batch.first_row + batch.rows * task.step, 0)
            self.cursor = (cursor + index, after)  # set before the batch is pushed: no query in between
            yield Record(self.packer.pushed, batch, cursor + index)
        if untrimmed:
            task = tasks[min(untrimmed)]
            raise ValueError(
                f"corrupt checkpoint: position {task.start.to_list()}: piece {task.piece} has no such row"
            )
        self.cursor = (len(self.tasks), None)

    def position(self, count: int) -> tuple[int, Position | None]:
        """(task index, position) of token number `count` (the cursor if all pushed are counted)."""
        for record in self._records:
            if record.start <= count < record.end:
                batch, local = record.batch, count - record.start
                k = int(np.searchsorted(batch.starts, local, side="right")) - 1
                token = local - int(batch.starts[k]) + (batch.first_token if k == 0 else 0)
                return record.task, Position(batch.piece, batch.first_row + k * batch.step, token)
        return self.cursor

    @property
    def ready(self) -> int:
        """Blocks cut and not yet taken: `take(k)` for k up to this reads nothing."""
        return len(self._ready) - self._next

    def take(self, n: int) -> np.ndarray | None:
        """Up to `n` next whole blocks, (m, T) views; None when the tasks are read to the end."""
        while self._next >= len(self._ready):
            record = next(self._batches, None)
            if record is None:
                return None
            self._push(record)
        blocks = self._ready[self._next : self._next + n]
        self._next += len(blocks)
        self.taken += blocks.size
        while self._records and self._records[0].end <= self.taken - blocks.size:
            self._records.popleft()  # keep positions from the first block just taken on
        return blocks

    def _push(self, record: Record) -> None:
        batch = record.batch
        if out_of_vocabulary(batch.ids, self.packer.vocab_size):
            bad = int(np.flatnonzero((batch.ids < 0) | (batch.ids >= self.packer.vocab_size))[0])
            row = batch.first_row + (int(np.searchsorted(batch.starts, bad, side="right")) - 1) * batch.step
            raise ValueError(
                f"row {row} of piece {batch.piece}: token id {batch.ids[bad]} is outside the vocabulary "
                f"[0, {self.packer.vocab_size})"
            )
        if batch.empty is not None and batch.empty.any():
            first = int(np.flatnonzero(batch.empty)[0])
            self.first_empty = self.rows + first if self.first_empty is None else self.first_empty
            self.empty_rows += int(batch.empty.sum())
        self.rows += batch.rows
        self._records.append(record)
        self._ready, self._next = self.packer.push(batch.ids), 0

    def finish(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The tail after the last whole block: one padded (1, T) block with its mask, or None
        (nothing left, or dropped: `packer.dropped`)."""
        last = self.packer.finish(self.settings.pad_last, self.settings.pad_token_id)
        if last is None:
            return None
        self.taken += int(last["attention_mask"].sum())
        return last["input_ids"][None], last["attention_mask"][None]


# ----------------------------------------------------------------------------------- a part
@dataclass(frozen=True, eq=False)
class Drawn:
    """A shuffle window cut and drawn: its blocks in their drawn order, its end, the tail dropped."""

    ids: np.ndarray  # (w, T) int64
    mask: np.ndarray  # (w, T) int64
    end: Position | None  # None: the tasks ran out inside it (their tail is in it, or dropped)
    dropped: int


class PartReader:
    """One part (rank, worker) of one source: its epochs' plans, windows and blocks, and its state.

    `take(n)` hands out up to n blocks of the current epoch; None at the epoch's end, after which
    `next_epoch()` starts the next one. `state()` is a PartState after the blocks handed out.
    Within an epoch: first the pending windows of an earlier layout (elastic resume), then the
    part's own tasks, in order or in shuffle windows.
    """

    def __init__(
        self, source: TokenSource, settings: Settings, layout: Layout, state: PartState, label: str
    ) -> None:
        self.source, self.settings, self.layout, self.label = source, settings, layout, label
        self.rank, self.worker, self.plans = state.rank, state.worker, state.plans
        self.dropped, self.last_epoch, self.ended = state.dropped, state.last_epoch, state.ended
        self.warned = False
        self._begin(state)

    # ----- epochs
    def _begin(self, state: PartState) -> None:
        """Set up reading epoch `state.epoch` from `state`."""
        self.epoch = state.epoch
        plan = state.plan_for(state.epoch)
        self.default = plan is None
        self.tasks = plan.tasks if plan is not None else self.layout.plan(state.epoch, self.rank, self.worker)
        self.pending = list(state.pending)
        self.blocks, self.tokens = state.blocks, state.tokens
        self.tail_dropped = 0  # dropped at this epoch's end, not yet in self.dropped
        self.tape = Tape(self.source, self.tasks, state.cursor, state.next, self.settings)
        self.done = state.next is None and state.window is None  # the own tasks are all out
        self.window = state.window  # the own open window (a resumed one is cut again first)
        self.drawn: Drawn | None = None
        self.pending_drawn: Drawn | None = None

    def next_epoch(self) -> None:
        """Start the next epoch (after `take` returned None)."""
        epoch = self.epoch + 1
        plan = next((p for p in self.plans if p.epoch == epoch), None)
        tasks = plan.tasks if plan is not None else self.layout.plan(epoch, self.rank, self.worker)
        pending = plan.pending if plan is not None else ()
        start = tasks[0].start if tasks else None
        state = PartState(
            self.rank, self.worker, epoch, 0, start, None, pending, self.plans, dropped=self.dropped
        )
        self._begin(state)

    def _end_epoch(self) -> None:
        """When the epoch's last block is out: counters, warnings (once per pass), the endless check."""
        self.dropped += self.tail_dropped
        summary = {
            "epoch": self.epoch,
            "blocks": self.blocks,
            "tokens": self.tokens,
            "dropped": self.tail_dropped,
        }
        self.last_epoch, tape = summary, self.tape
        if not self.warned and tape.empty_rows:
            warn_empty(tape.empty_rows, tape.rows, tape.first_empty, self.label)
        if not self.warned and self.tail_dropped:
            warn_dropped(self.tail_dropped, self.tokens, self.settings.block_size, self.label)
        self.warned = self.warned or bool(tape.empty_rows or self.tail_dropped)
        self.tail_dropped = 0
        if self.settings.epochs is None and self.default and self.blocks == 0:
            raise ValueError(
                f"{self.label} holds {summary['dropped']:,} tokens per epoch, fewer than block_size="
                f"{self.settings.block_size}: with pad_last=False and endless epochs (epochs=None) it can "
                f"never yield a block. Fix: pad_last=True, fewer ranks or workers ({self.layout.world_size} "
                f"x {self.layout.num_workers} parts share {self.layout.n_pieces} piece(s)), a smaller "
                "block_size, or more data"
            )

    # ----- blocks
    def ready(self, n: int) -> bool:
        """True if `take(n)` gives exactly n blocks of this epoch from what is already cut."""
        if self.pending or self.ended:
            return False
        if self.settings.shuffle:
            return self.drawn is not None and len(self.drawn.ids) - self.window.emitted >= n
        return not self.done and self.tape.ready >= n

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Up to `n` blocks of this epoch: ((m, T) ids, (m, T) mask) int64; None at its end."""
        while self.pending:
            out = self._take_pending(n)
            if out is not None:
                return self._count(out)
        out = self._take_shuffled(n) if self.settings.shuffle else self._take_in_order(n)
        if out is None:
            self._end_epoch()
            return None
        return self._count(out)

    def _count(self, out: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = out
        self.blocks += len(ids)
        self.tokens += ids.size if not mask.flags.writeable else int(mask.sum())  # shared ones: whole blocks
        return out

    def _take_in_order(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.done:
            return None
        blocks = self.tape.take(n)
        if blocks is not None:
            return blocks, ones(blocks.shape)
        self.done = True
        last = self.tape.finish()
        self.tail_dropped = self.tape.packer.dropped
        return last

    def _take_shuffled(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.drawn is None or self.window.emitted >= len(self.drawn.ids):
            if self.done:
                return None
            resumed = self.window if self.drawn is None else None  # a saved open window: cut it again
            start = resumed.start if resumed is not None else self.tape.position(self.tape.taken)[1]
            self.drawn = self._draw(self.tape, resumed or Window(start, None))
            self.done = self.drawn.end is None
            self.tail_dropped += self.drawn.dropped
            self.window = Window(start, self.drawn.end, resumed.emitted if resumed else 0)
            if self.window.emitted >= len(self.drawn.ids):
                return None if self.done else self._take_shuffled(n)
        emitted = self.window.emitted
        out = self.drawn.ids[emitted : emitted + n], self.drawn.mask[emitted : emitted + n]
        self.window = Window(self.window.start, self.window.end, emitted + len(out[0]))
        return out

    def _take_pending(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Blocks of the first pending window (of an earlier layout); it is dropped once all out."""
        window = self.pending[0]
        if self.pending_drawn is None:
            tape = Tape(self.source, window.tasks, 0, window.start, self.settings)
            self.pending_drawn = self._draw(tape, window)
            self.dropped += self.pending_drawn.dropped
        drawn, emitted = self.pending_drawn, window.emitted
        if emitted >= len(drawn.ids):
            self.pending.pop(0)
            self.pending_drawn = None
            return None
        self.pending[0] = Window(
            window.start, window.end, emitted + min(n, len(drawn.ids) - emitted), window.tasks
        )
        return drawn.ids[emitted : emitted + n], drawn.mask[emitted : emitted + n]

    def _draw(self, tape: Tape, window: Window) -> Drawn:
        """Cut the blocks of `window` from `tape` (standing at its start): shuffle_window blocks, or
        fewer and the tail where the tasks run out; drawn in the order of (seed, epoch, start). A
        window cut again after a resume must hold at least the blocks it had emitted."""
        size, parts, masks = self.settings.shuffle_window, [], []
        while (have := sum(map(len, parts))) < size and (blocks := tape.take(size - have)) is not None:
            parts.append(blocks)
            masks.append(ones(blocks.shape))
        end, dropped = tape.position(tape.taken)[1], 0
        if sum(map(len, parts)) < size:  # the tasks ran out: the tail goes in (padded) or is dropped
            last, end = tape.finish(), None
            dropped = tape.packer.dropped
            if last is not None:
                parts.append(last[0])
                masks.append(last[1])
        ids = np.concatenate(parts) if parts else np.empty((0, self.settings.block_size), np.int64)
        mask = np.concatenate(masks) if masks else ids.copy()
        if window.emitted > len(ids) or (window.end is None) != (end is None) and window.emitted:
            raise ValueError(
                f"corrupt checkpoint: {self.label}'s shuffle window from {window.start} was saved with "
                f"{window.emitted} blocks emitted and {'no ' if window.end is None else ''}end, but holds "
                f"{len(ids)} blocks when read again (other data, or an edited state)"
            )
        start = window.start
        key = [self.settings.seed, self.epoch, *(start.to_list() if start is not None else [])]
        order = np.random.default_rng(key).permutation(len(ids))
        return Drawn(ids[order], mask[order], end, dropped)

    # ----- state
    def state(self) -> PartState:
        """Where this part is: a resume re-reads from `next` (inside a window: from its start)."""
        window = self.window if self.settings.shuffle and self.drawn is not None else self.window
        if window is not None and self.drawn is not None and window.emitted >= len(self.drawn.ids):
            window = None  # all out: the part stands at the window's end
            cursor, start = self._at(self.drawn.end) if not self.done else (len(self.tasks), None)
        elif window is not None:
            cursor, start = self._at(window.start)
        elif self.done:
            cursor, start = len(self.tasks), None
        else:
            cursor, start = self.tape.position(self.tape.taken)
        return PartState(
            self.rank,
            self.worker,
            self.epoch,
            cursor,
            start,
            window,
            tuple(self.pending),
            self.plans,
            self.blocks,
            self.tokens,
            self.dropped + self.tail_dropped,
            self.last_epoch,
            self.ended,
        )

    def _at(self, position: Position | None) -> tuple[int, Position | None]:
        """(task index, position) of a position in this part's tasks."""
        if position is None:
            return len(self.tasks), None
        index = next((i for i, t in enumerate(self.tasks) if t.holds(position)), None)
        if index is None:
            raise ValueError(f"corrupt checkpoint: {self.label}: position {position} is in none of its tasks")
        return index, position
