"""Who reads what, and where each part is: the pieces of a stream for each rank and worker, the
typed positions a checkpoint holds, and the re-plan that lets a checkpoint resume on other ranks
and workers. Pure functions and frozen dataclasses, no I/O.

Each epoch:

1. the pieces (parquet row groups or files) are put in an order: as they are, or, with shuffling,
   a permutation drawn from (seed, epoch), the same on every rank;
2. that order is cut into `world_size` contiguous runs of about equal weight (the pieces' bytes
   where the source knows them; else equal piece counts), one per rank, and each rank's run into
   `num_workers` runs the same way, one per DataLoader worker: a part's plan is a list of Tasks.

So every part reads whole pieces, tokenizes only its own text, and a document is split only where
a piece ends. Where there are fewer pieces than parts (one JSONL file and 2 workers, say), parts
share pieces and each keeps the rows whose index % step == offset: still exactly once.

A position is a place in the corpus, independent of who reads it: token `token` of row `row` of
piece `piece`. A part's state (`PartState`) is its epoch, its plan when it is not the default one,
the next position it has not emitted yet, and its open shuffle window (start and end positions,
blocks emitted). No tokens are stored: a resume re-reads from the position. To resume on another
layout, `replan` hands out the remaining work of each epoch: windows still open and pieces being
read go whole to one new part each; pieces nobody started are shared out again.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, order=True)
class Position:
    """Token `token` of row `row` of piece `piece` (rows and tokens counted from 0, the EOS that
    opens a document being its row's token 0)."""

    piece: int
    row: int = 0
    token: int = 0

    def to_list(self) -> list[int]:
        return [self.piece, self.row, self.token]

    @classmethod
    def from_list(cls, value: Any) -> "Position | None":
        return None if value is None else cls(*value)


@dataclass(frozen=True)
class Task:
    """Read piece `piece` from row `row`, token `token` to its end, keeping the rows whose index %
    step == offset (step 1: every row)."""

    piece: int
    row: int = 0
    token: int = 0
    step: int = 1
    offset: int = 0

    @property
    def start(self) -> Position:
        return Position(self.piece, self.row, self.token)

    def holds(self, position: Position) -> bool:
        """True if `position` lies in this task's rows."""
        return position.piece == self.piece and (self.step == 1 or position.row % self.step == self.offset)

    def from_(self, position: Position) -> "Task":
        """This task, starting at `position` instead."""
        return Task(self.piece, position.row, position.token, self.step, self.offset)

    def to_list(self) -> list[int]:
        return [self.piece, self.row, self.token, self.step, self.offset]

    @classmethod
    def from_list(cls, value: Sequence[int]) -> "Task":
        return cls(*value)


@dataclass(frozen=True)
class Window:
    """A shuffle window: the blocks cut from `start` on, `end` the position after its last block
    (None: the plan's end, tail included), drawn in the permutation of (seed, epoch, start);
    `emitted` of them are out. `tasks`: what it reads when it belongs to an earlier layout
    (pending after an elastic resume); () for a part's own window (its plan)."""

    start: Position
    end: Position | None
    emitted: int = 0
    tasks: tuple[Task, ...] = ()

    def to_dict(self) -> dict:
        out = {"start": self.start.to_list(), "end": None if self.end is None else self.end.to_list()}
        out["emitted"] = self.emitted
        if self.tasks:
            out["tasks"] = [t.to_list() for t in self.tasks]
        return out

    @classmethod
    def from_dict(cls, value: dict) -> "Window":
        tasks = tuple(Task.from_list(t) for t in value.get("tasks", ()))
        return cls(
            Position.from_list(value["start"]), Position.from_list(value["end"]), value["emitted"], tasks
        )


@dataclass(frozen=True)
class EpochPlan:
    """A part's work in `epoch` when it is not the default plan (after an elastic resume): windows
    of the earlier layout to finish first, then its tasks."""

    epoch: int
    tasks: tuple[Task, ...]
    pending: tuple[Window, ...] = ()

    def to_dict(self) -> dict:
        out: dict = {"epoch": self.epoch, "tasks": [t.to_list() for t in self.tasks]}
        if self.pending:
            out["pending"] = [w.to_dict() for w in self.pending]
        return out

    @classmethod
    def from_dict(cls, value: dict) -> "EpochPlan":
        tasks = tuple(Task.from_list(t) for t in value["tasks"])
        return cls(value["epoch"], tasks, tuple(Window.from_dict(w) for w in value.get("pending", ())))


@dataclass(frozen=True)
class PartState:
    """Where one part (rank, worker) of one source is, between two blocks.

    epoch: the epoch it reads (with epochs=N per pass, the pass ends at `end` of the dataset).
    pending: windows of an earlier layout it still finishes first in this epoch (the first one
        possibly begun: its `emitted`).
    cursor, next: the index of the task in its plan and the first position of the plan not yet
        emitted (None: the plan is done). Inside an open window, where the window began.
    window: its own open shuffle window, or None.
    plans: its plans for epochs where the default does not hold (after an elastic resume).
    blocks, tokens: emitted in this epoch (real tokens). dropped: tail tokens dropped at the end of
        epochs of this pass (pad_last=False). last_epoch: {"epoch", "blocks", "tokens", "dropped"}
        of the last epoch it completed, or None. ended: the pass is over for this part.
    """

    rank: int
    worker: int
    epoch: int
    cursor: int = 0
    next: Position | None = None
    window: Window | None = None
    pending: tuple[Window, ...] = ()
    plans: tuple[EpochPlan, ...] = ()
    blocks: int = 0
    tokens: int = 0
    dropped: int = 0
    last_epoch: dict | None = None
    ended: bool = False
    extra: dict = field(default_factory=dict)

    def plan_for(self, epoch: int) -> EpochPlan | None:
        """Its explicit plan for `epoch`, or None (the default plan holds)."""
        return next((p for p in self.plans if p.epoch == epoch), None)

    def to_dict(self) -> dict:
        out = {
            "rank": self.rank,
            "worker": self.worker,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "next": None if self.next is None else self.next.to_list(),
            "window": None if self.window is None else self.window.to_dict(),
            "pending": [w.to_dict() for w in self.pending],
            "plans": [p.to_dict() for p in self.plans],
            "blocks": self.blocks,
            "tokens": self.tokens,
            "dropped": self.dropped,
            "last_epoch": self.last_epoch,
            "ended": self.ended,
        }
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, value: dict) -> "PartState":
        window = value["window"]
        known = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            rank=value["rank"],
            worker=value["worker"],
            epoch=value["epoch"],
            cursor=value["cursor"],
            next=Position.from_list(value["next"]),
            window=None if window is None else Window.from_dict(window),
            pending=tuple(Window.from_dict(w) for w in value["pending"]),
            plans=tuple(EpochPlan.from_dict(p) for p in value["plans"]),
            blocks=value["blocks"],
            tokens=value["tokens"],
            dropped=value["dropped"],
            last_epoch=value["last_epoch"],
            ended=value["ended"],
            extra={k: v for k, v in value.items() if k not in known},
        )


# ----------------------------------------------------------------------------------- default plans
def piece_order(n_pieces: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
    """The reading order of the pieces in `epoch`: 0..n-1, or a permutation from (seed, epoch)."""
    if not shuffle:
        return list(range(n_pieces))
    return np.random.default_rng([seed, epoch]).permutation(n_pieces).tolist()


def contiguous_run(
    items: list[int], n_runs: int, index: int, weights: Sequence[float] | None = None, min_len: int = 1
) -> list[int]:
    """The `index`-th of `n_runs` contiguous runs of `items`, each at least `min_len` long
    (len(items) >= n_runs * min_len).

    Without `weights` (one per item value) the runs' lengths differ by at most one; with them each
    cut falls where the running weight is closest to its share, within those length bounds.
    """
    if weights is None:
        size, extra = divmod(len(items), n_runs)
        start = index * size + min(index, extra)
        return items[start : start + size + (index < extra)]
    cumulative = np.cumsum([weights[i] for i in items])
    cuts = [0]
    for k in range(1, n_runs):
        low, high = cuts[-1] + min_len, len(items) - (n_runs - k) * min_len  # room for later runs
        target = cumulative[-1] * k / n_runs
        cuts.append(low + int(np.argmin(np.abs(cumulative[low - 1 : high] - target))))
    cuts.append(len(items))
    return items[cuts[index] : cuts[index + 1]]


def plan_part(
    order: list[int],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    weights: Sequence[float] | None = None,
) -> tuple[Task, ...]:
    """The tasks worker `worker` of rank `rank` reads: whole pieces of `order`, or every k-th row.

    Ranks take contiguous runs of `order` when there are at least `world_size` pieces, else every
    world_size-th row of all of them; workers split their rank's share the same way.
    """
    if len(order) >= world_size:
        min_len = num_workers if len(order) >= world_size * num_workers else 1  # a piece per worker
        mine = contiguous_run(order, world_size, rank, weights, min_len)
        if len(mine) >= num_workers:
            return tuple(Task(p) for p in contiguous_run(mine, num_workers, worker, weights))
        return tuple(Task(p, step=num_workers, offset=worker) for p in mine)
    step, offset = world_size * num_workers, rank * num_workers + worker
    return tuple(Task(p, step=step, offset=offset) for p in order)


@dataclass(frozen=True)
class Layout:
    """How an epoch's pieces are dealt: the pieces, their weights, ranks x workers, the shuffle."""

    n_pieces: int
    world_size: int
    num_workers: int
    weights: tuple[float, ...] | None = None
    shuffle: bool = False
    seed: int = 0

    def order(self, epoch: int) -> list[int]:
        return piece_order(self.n_pieces, shuffle=self.shuffle, seed=self.seed, epoch=epoch)

    def plan(self, epoch: int, rank: int, worker: int) -> tuple[Task, ...]:
        """The default plan of part (rank, worker) in `epoch`."""
        return plan_part(self.order(epoch), rank, self.world_size, worker, self.num_workers, self.weights)

    def shares_pieces(self) -> bool:
        """True if parts share pieces (fewer pieces than parts somewhere): rows are dealt instead."""
        return any(t.step > 1 for r in range(self.world_size) for t in self.plan(0, r, 0))


def fresh_state(
    layout: Layout, epoch: int, rank: int, worker: int, plan: EpochPlan | None = None
) -> PartState:
    """The state of part (rank, worker) at the start of `epoch` (its explicit `plan`, if any)."""
    tasks = plan.tasks if plan is not None else layout.plan(epoch, rank, worker)
    pending = plan.pending if plan is not None else ()
    plans = (plan,) if plan is not None else ()
    start = tasks[0].start if tasks else None
    return PartState(rank, worker, epoch, 0, start, None, pending, plans)


# ----------------------------------------------------------------------------------- elastic resume
@dataclass(frozen=True)
class Work:
    """One unit of an epoch's remaining work: a window to finish, or a task; `at` orders it (its
    first piece's place in the epoch's order) and `weight` balances it."""

    at: tuple[int, int]
    weight: float
    task: Task | None = None
    window: Window | None = None


def remaining_work(state: PartState, layout: Layout, epoch: int) -> list[Work]:
    """What part `state` (saved under `layout`) still has to emit of `epoch`, as indivisible units."""
    if state.ended or state.epoch > epoch:
        return []
    explicit = state.plan_for(epoch)
    tasks = explicit.tasks if explicit is not None else layout.plan(epoch, state.rank, state.worker)
    pending = explicit.pending if explicit is not None else ()
    where = {p: i for i, p in enumerate(layout.order(epoch))}
    weight = (lambda p: layout.weights[p]) if layout.weights else (lambda p: 1.0)
    if state.epoch < epoch:  # not started: all of it
        units = [Work((where[w.start.piece], 0), weight(w.start.piece), window=w) for w in pending]
        return units + [Work((where[t.piece], t.offset), weight(t.piece), task=t) for t in tasks]
    units = [Work((where[w.start.piece], 0), weight(w.start.piece), window=w) for w in state.pending]
    if state.next is None:
        return units
    first = state.next
    if state.window is not None:  # its own open window goes whole, with the tasks it reads
        window = state.window
        end = (
            len(tasks)
            if window.end is None
            else next(i for i in range(state.cursor, len(tasks)) if tasks[i].holds(window.end))
        )
        reads = (tasks[state.cursor].from_(window.start), *tasks[state.cursor + 1 : end + 1])
        units.append(
            Work(
                (where[window.start.piece], 0),
                weight(window.start.piece),
                window=Window(window.start, window.end, window.emitted, reads),
            )
        )
        if window.end is None:
            return units
        first, cursor = window.end, end
    else:
        cursor = state.cursor
    rest = [tasks[cursor].from_(first), *tasks[cursor + 1 :]]
    return units + [Work((where[t.piece], t.offset), weight(t.piece), task=t) for t in rest]


def deal(units: list[Work], n_parts: int, index: int) -> list[Work]:
    """The `index`-th of `n_parts` contiguous runs of `units` (in corpus order), balanced by weight."""
    units = sorted(units, key=lambda u: u.at)
    if len(units) < n_parts:
        return [units[index]] if index < len(units) else []
    weights = [u.weight for u in units]
    positions = contiguous_run(list(range(len(units))), n_parts, index, weights)
    return [units[i] for i in positions]


def replan(
    states: Sequence[PartState], saved: Layout, now: Layout, rank: int, worker: int, ranks: Sequence[int]
) -> PartState:
    """The state of new part (rank, worker) of layout `now`, taking over its share of the work that
    parts `states` (of layout `saved`, ranks `ranks` of it) left in their epochs.

    Each epoch from the earliest any of them is in to the latest: the remaining work (windows still
    open and tasks from their positions go whole; pieces nobody started one by one) is sorted in
    corpus order and cut into contiguous runs, over the new ranks `ranks` then over their workers.
    Later epochs use the default plan of `now`.
    """
    first, last = min(s.epoch for s in states), max(s.epoch for s in states)
    plans = []
    for epoch in range(first, last + 1):
        units = [u for s in states for u in remaining_work(s, saved, epoch)]
        mine = deal(deal(units, len(ranks), ranks.index(rank)), now.num_workers, worker)
        tasks = tuple(u.task for u in mine if u.task is not None)
        pending = tuple(u.window for u in mine if u.window is not None)
        plans.append(EpochPlan(epoch, tasks, pending))
    state = fresh_state(now, first, rank, worker, plans[0])
    return PartState(**{**state.__dict__, "plans": tuple(plans)})
