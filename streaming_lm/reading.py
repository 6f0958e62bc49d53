"""How one part reads one source: plan -> token batches -> rolling buffer -> blocks, and where it is.

    reader = SourceReader(source, settings, dealing, rank, worker, state, label)
    ids, mask = reader.take(8)      # (m, T) int64 each; None at the epoch's end
    reader.state()                  # a state.SourceState: resume from exactly here

A token source is anything with pieces whose rows `read_tasks` turns into TokenBatches: a
tokenized text stream (`TokenStream`) or rows already tokenized (token_rows.py). A `Tape` pushes a
plan's batches through a RollingBuffer and knows the corpus position of every token it pushed, so
the state after any block is a position, not the carried tokens. With shuffling, blocks are cut
into windows of `shuffle_window` blocks, each drawn in the permutation of (seed, epoch, start).
"""

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .packing import RollingBuffer, out_of_vocabulary, warn_dropped, warn_empty
from .parts import Dealing, fresh_state, tasks_of
from .state import Counts, Position, Settings, SourceState, Task, Window
from .token_rows import TokenBatch


class TokenSource(Protocol):
    """What a part reads: pieces of token rows."""

    n_pieces: int
    piece_weights: tuple[int, ...] | None
    piece_rows: tuple[int, ...] | None  # rows per piece, where known (checks positions before reading)
    identity: dict[str, str]
    description: str

    def read_tasks(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TokenBatch]]:
        """(task index, TokenBatch) of each task's piece in turn, from its row (rows with index %
        step == offset); the task's `token` is the caller's to trim."""
        ...


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


Blocks = tuple[np.ndarray, np.ndarray]  # ((m, T) ids, (m, T) mask), int64


@dataclass(frozen=True, eq=False)
class Record:
    """A pushed TokenBatch, its task, and where its tokens start in the tape's count."""

    start: int
    batch: TokenBatch
    task: int

    @property
    def end(self) -> int:
        return self.start + len(self.batch.ids)


class Tape:
    """The blocks of a run of tasks (from task `cursor`, at `start`), cut by one RollingBuffer, and
    the (task, position) of any token it pushed (`position(count)`; count 0 is `start`)."""

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
            raise ValueError(f"corrupt checkpoint: position {task.start}: piece {task.piece} has no such row")
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

    def fill(self, n: int) -> int:
        """Cut blocks ahead until `n` are ready or the tasks are read (a mixture takes each source's
        share of a batch at once then); returns the blocks ready. Positions and counts stay as they are."""
        if self.ready >= n:
            return self.ready
        ready = [self._ready[self._next :]]
        while sum(map(len, ready)) < n and (record := next(self._batches, None)) is not None:
            ready.append(self._push(record))
        self._ready, self._next = np.concatenate(ready), 0
        return len(self._ready)

    def take(self, n: int) -> np.ndarray | None:
        """Up to `n` next whole blocks, (m, T) views; None when the tasks are read to the end."""
        while self._next >= len(self._ready):
            record = next(self._batches, None)
            if record is None:
                return None
            self._ready, self._next = self._push(record), 0
        blocks = self._ready[self._next : self._next + n]
        self._next += len(blocks)
        self.taken += blocks.size
        while self._records and self._records[0].end <= self.taken - blocks.size:
            self._records.popleft()  # keep positions from the first block just taken on
        return blocks

    def _push(self, record: Record) -> np.ndarray:
        """Push a record's tokens (ids checked, rows without text counted): the blocks now complete."""
        batch, vocab = record.batch, self.packer.vocab_size
        if out_of_vocabulary(batch.ids, vocab):
            bad = int(np.flatnonzero((batch.ids < 0) | (batch.ids >= vocab))[0])
            row = batch.first_row + (int(np.searchsorted(batch.starts, bad, side="right")) - 1) * batch.step
            raise ValueError(
                f"row {row} of piece {batch.piece}: token id {batch.ids[bad]} is outside the vocabulary "
                f"[0, {vocab})"
            )
        if batch.empty is not None and batch.empty.any():
            first = int(np.flatnonzero(batch.empty)[0])
            self.first_empty = self.rows + first if self.first_empty is None else self.first_empty
            self.empty_rows += int(batch.empty.sum())
        self.rows += batch.rows
        self._records.append(record)
        return self.packer.push(batch.ids)

    def finish(self) -> Blocks | None:
        """The tail after the last whole block: one padded (1, T) block with its mask, or None
        (nothing left, or dropped: `packer.dropped`)."""
        last = self.packer.finish(self.settings.pad_last, self.settings.pad_token_id)
        if last is None:
            return None
        self.taken += int(last["attention_mask"].sum())
        return last["input_ids"][None], last["attention_mask"][None]


@dataclass(frozen=True, eq=False)
class Drawn:
    """A shuffle window cut and drawn: its blocks in their drawn order, where it ends (the task and
    position after its last block; None: the tasks ran out inside it), the tail dropped."""

    ids: np.ndarray  # (w, T) int64
    mask: np.ndarray  # (w, T) int64
    end: tuple[int, Position | None]
    dropped: int


def draw(tape: Tape, window: Window, settings: Settings, epoch: int, label: str) -> Drawn:
    """Cut the blocks of `window` from `tape` (standing at its start): shuffle_window blocks, or
    fewer and the tail where the tasks run out; drawn in the order of (seed, epoch, start). A window
    cut again after a resume must hold at least the blocks it had emitted."""
    size, parts, masks = settings.shuffle_window, [], []
    while (have := sum(map(len, parts))) < size and (blocks := tape.take(size - have)) is not None:
        parts.append(blocks)
        masks.append(ones(blocks.shape))
    end, dropped = tape.position(tape.taken), 0
    if sum(map(len, parts)) < size:  # the tasks ran out: the tail goes in (padded) or is dropped
        last, end, dropped = tape.finish(), (len(tape.tasks), None), tape.packer.dropped
        parts, masks = (parts + [last[0]], masks + [last[1]]) if last is not None else (parts, masks)
    ids = np.concatenate(parts) if parts else np.empty((0, settings.block_size), np.int64)
    mask = np.concatenate(masks) if masks else ids.copy()
    if window.emitted > len(ids) or window.emitted and (window.end is None) != (end[1] is None):
        raise ValueError(
            f"corrupt checkpoint: {label}: its shuffle window from {window.start} was saved with "
            f"{window.emitted} blocks emitted and {'no ' if window.end is None else ''}end, but holds "
            f"{len(ids)} blocks when read again (other data, or an edited state)"
        )
    key = [settings.seed, epoch, window.start.piece, window.start.row, window.start.token]
    order = np.random.default_rng(key).permutation(len(ids))
    return Drawn(ids[order], mask[order], end, dropped)


class SourceReader:
    """One part (rank, worker) of one source: the blocks of its epochs, and where it stands.

    `take(n)` hands out up to n blocks of the current epoch, None at its end, after which the
    reader stands at the next epoch's start. `state()` is a SourceState after the blocks handed
    out. Within an epoch: the pending windows of an earlier layout (an elastic resume) first, then
    the part's own tasks, in order or in shuffle windows.
    """

    def __init__(
        self,
        source: TokenSource,
        settings: Settings,
        dealing: Dealing,
        rank: int,
        worker: int,
        state: SourceState,
        label: str,
    ) -> None:
        self.source, self.settings, self.dealing, self.label = source, settings, dealing, label
        self.rank, self.worker = rank, worker
        self.warned = False  # empty rows and dropped tails are said once per pass
        self.empty_epochs = 0  # epochs in a row that gave no block
        self._begin(state)

    def _begin(self, state: SourceState) -> None:
        self.epoch, self.plans, self.ended = state.epoch, state.plans, state.ended
        self.explicit = state.plan_for(state.epoch) is not None
        self.tasks = tasks_of(state, self.dealing, self.rank, self.worker)
        self.pending = list(state.pending)
        self.blocks, self.tokens = state.blocks, state.tokens  # this epoch's
        self.dropped, self.last = state.dropped, state.last
        self.tail = 0  # tail tokens dropped in this epoch, not yet in self.dropped
        self.tape = Tape(self.source, self.tasks, state.cursor, state.next, self.settings)
        self.done = state.next is None and state.window is None  # its own tasks are all out
        self.window, self.window_at = state.window, state.cursor  # its open window and where it began
        self.drawn: Drawn | None = None
        self.pending_drawn: Drawn | None = None

    def _end_epoch(self) -> None:
        """The epoch's last block is out: its counts, the warnings, and the next epoch's start."""
        tape, explicit, tail = self.tape, self.explicit, self.tail
        if not self.warned and tape.empty_rows:
            warn_empty(tape.empty_rows, tape.rows, tape.first_empty, self.label)
        if not self.warned and tail:
            warn_dropped(tail, self.tokens, self.settings.block_size, self.label)
        self.warned = self.warned or bool(tape.empty_rows or tail)
        self.dropped, self.tail = self.dropped + tail, 0
        self.last = Counts(self.epoch, self.blocks, self.tokens, tail)
        self._begin(fresh_state(self.dealing, self.epoch + 1, self.rank, self.worker, self.state()))
        self.empty_epochs = self.empty_epochs + 1 if self.last.blocks == 0 and not explicit else 0

    def ready(self, n: int) -> bool:
        """True if `take(n)` gives exactly n blocks of this epoch from what is already cut."""
        if self.pending or self.ended:
            return False
        if self.settings.shuffle:
            return self.drawn is not None and len(self.drawn.ids) - self.window.emitted >= n
        return not self.done and self.tape.fill(n) >= n

    def take(self, n: int) -> Blocks | None:
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

    def _count(self, out: Blocks) -> Blocks:
        ids, mask = out
        self.blocks += len(ids)
        self.tokens += ids.size if not mask.flags.writeable else int(mask.sum())  # shared ones: whole blocks
        return out

    def _take_in_order(self, n: int) -> Blocks | None:
        if self.done:
            return None
        blocks = self.tape.take(n)
        if blocks is not None:
            return blocks, ones(blocks.shape)
        self.done = True
        last = self.tape.finish()
        self.tail += self.tape.packer.dropped
        return last

    def _take_shuffled(self, n: int) -> Blocks | None:
        while self.drawn is None or self.window.emitted >= len(self.drawn.ids):
            if self.done:
                return None
            if self.drawn is not None or self.window is None:  # a new window, where the last one ended
                self.window_at, start = self.tape.position(self.tape.taken)
                self.window = Window(start, None)
            self.drawn = draw(self.tape, self.window, self.settings, self.epoch, self.label)
            self.done = self.drawn.end[1] is None
            self.tail += self.drawn.dropped
            self.window = Window(self.window.start, self.drawn.end[1], self.window.emitted)
        emitted = self.window.emitted
        out = self.drawn.ids[emitted : emitted + n], self.drawn.mask[emitted : emitted + n]
        self.window = Window(self.window.start, self.window.end, emitted + len(out[0]))
        return out

    def _take_pending(self, n: int) -> Blocks | None:
        """Blocks of the first pending window (of an earlier layout); it is dropped once all out."""
        window = self.pending[0]
        if self.pending_drawn is None:
            tape = Tape(self.source, window.tasks, 0, window.start, self.settings)
            self.pending_drawn = draw(tape, window, self.settings, self.epoch, self.label)
            self.tail += self.pending_drawn.dropped
        drawn, emitted = self.pending_drawn, window.emitted
        if emitted >= len(drawn.ids):
            self.pending.pop(0)
            self.pending_drawn = None
            return None
        self.pending[0] = Window(
            window.start, window.end, emitted + min(n, len(drawn.ids) - emitted), window.tasks
        )
        return drawn.ids[emitted : emitted + n], drawn.mask[emitted : emitted + n]

    def state(self) -> SourceState:
        """Where this part stands: a resume reads again from `next` (in an open window: its start)."""
        window, drawn = self.window, self.drawn
        held = self.pending_drawn.dropped if self.pending_drawn is not None else 0
        if window is not None and drawn is not None and window.emitted >= len(drawn.ids):
            (cursor, start), window = drawn.end, None  # all out: the part stands at the window's end
        elif window is not None:
            cursor, start = self.window_at, window.start
            held += drawn.dropped if drawn is not None else 0  # cut again on resume, its tail with it
        elif self.done:
            cursor, start = len(self.tasks), None
        else:
            cursor, start = self.tape.position(self.tape.taken)
        return SourceState(
            self.epoch, cursor, start, window, tuple(self.pending), self.plans, self.blocks, self.tokens,
            self.dropped + self.tail - held, self.last, self.ended,
        )  # fmt: skip
