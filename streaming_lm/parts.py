"""Who reads what: the pieces of a stream for each rank and worker, and the re-plan that lets a
checkpoint resume on other ranks and workers. Pure functions, no I/O.

Each epoch:

1. the pieces (parquet row groups, or files) are put in an order: as they are, or, with shuffling,
   a permutation drawn from (seed, epoch), the same on every rank;
2. that order is cut into `world_size` contiguous runs of about equal weight (the pieces' bytes
   where the source knows them; else equal piece counts), one per rank, and each rank's run into
   `num_workers` runs the same way, one per DataLoader worker: a part's plan is a tuple of Tasks.

So every part reads whole pieces, tokenizes only its own text, and a document is split only where
a piece ends. Where there are fewer pieces than parts (one JSONL file and 2 workers, say), parts
share pieces and each keeps the rows whose index % step == offset, from its first own row on:
still exactly once.

To resume on another layout, `replan` hands out the remaining work of each epoch: windows still
open and pieces being read go whole to one new part each; pieces nobody started are dealt again.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .state import DataState, Draws, EpochPlan, Part, Pass, SourceState, Task, Window, check_layout


def piece_order(n_pieces: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
    """The reading order of the pieces in `epoch`: 0..n-1, or a permutation from (seed, epoch)."""
    if not shuffle:
        return list(range(n_pieces))
    return np.random.default_rng([seed, epoch]).permutation(n_pieces).tolist()


def contiguous_run(
    items: list[int], n_runs: int, index: int, weights: Sequence[float] | None = None, min_len: int = 1
) -> list[int]:
    """The `index`-th of `n_runs` contiguous runs of `items`, each at least `min_len` long
    (len(items) >= n_runs * min_len). Without `weights` (one per item value) the runs' lengths
    differ by at most one; with them each cut falls where the running weight is closest to its share."""
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


def dealt(pieces: Sequence[int], step: int, offset: int) -> tuple[Task, ...]:
    """Rows `offset`, `offset + step`, ... of each piece: a share of pieces that parts share."""
    return tuple(Task(p, row=offset, step=step, offset=offset) for p in pieces)


def plan_part(
    order: list[int],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    weights: Sequence | None = None,
) -> tuple[Task, ...]:
    """The tasks of worker `worker` of rank `rank`: whole pieces of `order`, or every k-th row.

    Ranks take contiguous runs of `order` when there are at least `world_size` pieces, else every
    world_size-th row of all of them; workers split their rank's share the same way."""
    if len(order) < world_size:
        return dealt(order, world_size * num_workers, rank * num_workers + worker)
    min_len = num_workers if len(order) >= world_size * num_workers else 1  # a piece per worker
    mine = contiguous_run(order, world_size, rank, weights, min_len)
    if len(mine) < num_workers:
        return dealt(mine, num_workers, worker)
    return tuple(Task(p) for p in contiguous_run(mine, num_workers, worker, weights))


@dataclass(frozen=True)
class Dealing:
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

    def fixed_share(self) -> bool:
        """True if every epoch gives each part the same rows (no shuffle, or rows of every piece)."""
        return not self.shuffle or self.n_pieces < self.world_size


def tasks_of(state: SourceState, dealing: Dealing, rank: int, worker: int) -> tuple[Task, ...]:
    """The tasks of `state`'s epoch: its explicit plan, else the default one."""
    explicit = state.plan_for(state.epoch)
    return explicit.tasks if explicit is not None else dealing.plan(state.epoch, rank, worker)


def fresh_state(
    dealing: Dealing, epoch: int, rank: int, worker: int, before: SourceState | None = None
) -> SourceState:
    """Part (rank, worker) at the start of `epoch`; `before`: its state so far in the pass (its
    plans, dropped tail tokens and last epoch are kept)."""
    plans = tuple(p for p in before.plans if p.epoch >= epoch) if before else ()
    state = SourceState(epoch, 0, None, plans=plans)
    if before is not None:
        state = replace(state, dropped=before.dropped, last=before.last)
    tasks = tasks_of(state, dealing, rank, worker)
    explicit = state.plan_for(epoch)
    return replace(
        state, next=tasks[0].start if tasks else None, pending=explicit.pending if explicit else ()
    )


# ----------------------------------------------------------------------------------- elastic resume
@dataclass(frozen=True)
class Work:
    """One unit of an epoch's remaining work: a window to finish, or a task; `at` orders it (its
    first piece's place in the epoch's order) and `weight` balances it."""

    at: tuple[int, int]
    weight: float
    task: Task | None = None
    window: Window | None = None


def remaining_work(state: SourceState, dealing: Dealing, epoch: int, rank: int, worker: int) -> list[Work]:
    """What part (rank, worker) in `state` (saved under `dealing`) still has to emit of `epoch`."""
    if state.epoch > epoch:
        return []
    explicit = state.plan_for(epoch)
    tasks = explicit.tasks if explicit is not None else dealing.plan(epoch, rank, worker)
    where = {p: i for i, p in enumerate(dealing.order(epoch))}

    def unit(piece: int, offset: int, **kind: Task | Window) -> Work:
        return Work((where[piece], offset), dealing.weights[piece] if dealing.weights else 1.0, **kind)

    if state.epoch < epoch:  # not begun: all of it
        pending = explicit.pending if explicit is not None else ()
        return [unit(w.start.piece, 0, window=w) for w in pending] + [
            unit(t.piece, t.offset, task=t) for t in tasks
        ]
    units = [unit(w.start.piece, 0, window=w) for w in state.pending]
    if state.next is None:
        return units
    first, cursor = state.next, state.cursor
    if state.window is not None:  # its own open window goes whole, with the tasks it reads
        window = state.window
        last = (
            len(tasks) - 1
            if window.end is None
            else next(i for i in range(cursor, len(tasks)) if tasks[i].holds(window.end))
        )
        reads = (tasks[cursor].from_(window.start), *tasks[cursor + 1 : last + 1])
        units.append(unit(window.start.piece, 0, window=replace(window, tasks=reads)))
        if window.end is None:
            return units
        first, cursor = window.end, last
    rest = [tasks[cursor].from_(first), *tasks[cursor + 1 :]]
    return units + [unit(t.piece, t.offset, task=t) for t in rest]


def deal(units: list[Work], n_parts: int, index: int) -> list[Work]:
    """The `index`-th of `n_parts` contiguous runs of `units` (in corpus order), balanced by weight."""
    units = sorted(units, key=lambda u: u.at)
    if len(units) < n_parts:
        return [units[index]] if index < len(units) else []
    positions = contiguous_run(list(range(len(units))), n_parts, index, [u.weight for u in units])
    return [units[i] for i in positions]


def replan(
    saved: Sequence[tuple[int, int, SourceState]], before: Dealing, now: Dealing, rank: int, worker: int
) -> SourceState:
    """The state of new part (rank, worker) of dealing `now`, taking over its share of the work that
    the parts `saved` ((rank, worker, state) under dealing `before`) left in their epochs.

    Each epoch from the earliest any of them is in to the latest: the remaining work is sorted in
    corpus order and cut into contiguous runs over the new ranks, then over their workers. Later
    epochs use the default plan of `now`. Part (0, 0) carries the old parts' dropped tail tokens, so
    that the pass's count stays whole."""
    epochs = [s.epoch for _, _, s in saved]
    plans = []
    for epoch in range(min(epochs), max(epochs) + 1):
        units = [u for r, w, s in saved for u in remaining_work(s, before, epoch, r, w)]
        mine = deal(deal(units, now.world_size, rank), now.num_workers, worker)
        tasks = tuple(u.task for u in mine if u.task is not None)
        plans.append(EpochPlan(epoch, tasks, tuple(u.window for u in mine if u.window is not None)))
    dropped = sum(s.dropped for _, _, s in saved) if (rank, worker) == (0, 0) else 0
    start = SourceState(min(epochs), 0, None, plans=tuple(plans), dropped=dropped)
    return fresh_state(now, min(epochs), rank, worker, start)


def continued(part: Part, ended: bool = False) -> Part:
    """A part that finished its pass, at the start of the next: every source where it stands (a
    mixture's sources go on with their epochs), the pass's counters afresh. With `ended`: still in
    the finished pass with its counters, to be re-planned and marked ended again."""
    sources = {n: replace(s, ended=False, dropped=s.dropped if ended else 0) for n, s in part.sources.items()}
    draws = part.draws if ended else Draws(0, part.draws.generation, dict.fromkeys(sources, 0))
    return Part(part.rank, part.worker, sources, draws)


def take_over(
    state: DataState,
    rank: int,
    worker: int,
    num_workers: int,
    world_size: int,
    dealing_of: Callable[[str, int, int], Dealing],
    next_pass: Callable[[int], Pass],
) -> tuple[Part, Pass]:
    """Part (rank, worker) of `num_workers` per rank and `world_size` ranks resuming `state`: its
    own saved part on the same layout, else its share of every saved part's remaining work (a
    re-plan). A pass read to its end goes on with the next one (`next_pass(end)`); one saved after
    its last batch (all parts ended) has nothing left for anyone until the next.
    `dealing_of(name, num_workers, world_size)` deals a source's pieces."""
    if state.pass_.over:
        parts = tuple(continued(p) for p in state.parts)
        state = replace(state, parts=parts, pass_=next_pass(state.pass_.end))
    layout = state.layout
    check_layout(layout, rank, world_size, num_workers)
    if layout.world_size == world_size and rank in layout.ranks and layout.num_workers == num_workers:
        return next(p for p in state.parts if (p.rank, p.worker) == (rank, worker)), state.pass_
    ended = state.ended
    old = [continued(p, ended=True) for p in state.parts] if ended else state.parts
    sources = {}
    for name in state.settings.sources:
        saved = [(p.rank, p.worker, p.sources[name]) for p in old]
        before = dealing_of(name, layout.num_workers, layout.world_size)
        now = dealing_of(name, num_workers, world_size)
        sources[name] = replace(replan(saved, before, now, rank, worker), ended=ended)
    generation = max(p.draws.generation for p in old) + 1  # a fresh sequence of draws
    return Part(rank, worker, sources, Draws(0, generation, dict.fromkeys(sources, 0))), state.pass_
