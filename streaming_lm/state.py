"""The checkpoint: one typed value (`DataState`), its schema and version, and every check of it.

`state_dict()` returns `to_plain(state)`: plain data that pickles, `torch.save`s, loads with
`weights_only=True` and dumps to JSON. `from_plain` is the only way back; it names the first field
that is wrong ("corrupt checkpoint: parts[1].sources.main.next: ..."): format and version, then the
digests (every leaf has one, over its path and value: an edit, a deletion or a value moved to
another part is named), the type and range of every field (from the dataclasses below), what must
hold between fields. `check_resume` checks it against the dataset that resumes: settings, layout,
every position against its plan. No tokens are stored: a part reads again from its position (piece,
row, token) and draws the same shuffle windows, so a state is a few KB. `schema()` prints the schema.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar

from . import plain

FORMAT = "streaming_lm.data_state"
VERSION = 3
MAY_CHANGE = "world_size (with the state of every rank), num_workers, batch_size, DataLoader settings"
NonNeg = Annotated[int, 0]  # an int >= 0
Positive = Annotated[int, 1]  # an int >= 1


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """A place in the corpus: [piece, row, token] (a document's EOS is its row's token 0)."""

    LIST: ClassVar[bool] = True
    piece: NonNeg
    row: NonNeg = 0
    token: NonNeg = 0


@dataclasses.dataclass(frozen=True)
class Task:
    """Read a piece from (row, token) on, keeping the rows with index % step == offset."""

    LIST: ClassVar[bool] = True
    piece: NonNeg
    row: NonNeg = 0
    token: NonNeg = 0
    step: Positive = 1
    offset: NonNeg = 0

    @property
    def start(self) -> Position:
        return Position(self.piece, self.row, self.token)

    def holds(self, position: Position) -> bool:
        """True if `position` is one of this task's rows, at or after its start."""
        mine = position.piece == self.piece and position.row % self.step == self.offset
        return mine and (position.row, position.token) >= (self.row, self.token)

    def from_(self, position: Position) -> "Task":
        return Task(self.piece, position.row, position.token, self.step, self.offset)


@dataclasses.dataclass(frozen=True)
class Window:
    """A shuffle window: its blocks drawn in the order of (seed, epoch, start)."""

    start: Position  # where its first block begins
    end: Position | None  # where the block after its last begins; null: the plan's end, tail included
    emitted: NonNeg = 0  # blocks of it handed out
    tasks: tuple[Task, ...] = ()  # what it reads, for a window of an earlier layout


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """A part's work in an epoch where the default plan does not hold (after an elastic resume)."""

    epoch: NonNeg
    tasks: tuple[Task, ...]
    pending: tuple[Window, ...] = ()  # windows of the earlier layout, finished first


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a part gave of one whole epoch."""

    epoch: NonNeg
    blocks: NonNeg
    tokens: NonNeg  # real tokens (mask 1)
    dropped: NonNeg  # tail tokens dropped at its end (pad_last=False)


@dataclasses.dataclass(frozen=True)
class SourceState:
    """Where one part stands in one source, between two blocks."""

    epoch: NonNeg  # the epoch it reads (at the next one's start once an epoch is out)
    cursor: NonNeg  # the task of its plan it reads
    next: Position | None  # the first token not emitted (in an open window: its start); null: all read
    window: Window | None = None  # its own open shuffle window
    pending: tuple[Window, ...] = ()  # windows of an earlier layout it finishes first, this epoch
    plans: tuple[EpochPlan, ...] = ()  # its plans where the default does not hold
    blocks: NonNeg = 0  # emitted in this epoch
    tokens: NonNeg = 0  # real tokens emitted in this epoch
    dropped: NonNeg = 0  # tail tokens dropped in this pass (pad_last=False)
    last: Counts | None = None  # the last epoch it completed
    ended: bool = False  # the pass is over for this part

    def plan_for(self, epoch: int) -> EpochPlan | None:
        return next((p for p in self.plans if p.epoch == epoch), None)


@dataclasses.dataclass(frozen=True)
class Draws:
    """A part's draws between its sources in this pass (mixing.py)."""

    chosen: NonNeg  # blocks drawn
    generation: NonNeg  # +1 at each elastic re-plan: a fresh sequence of draws
    drawn: dict[str, NonNeg]  # blocks drawn from each source


@dataclasses.dataclass(frozen=True)
class Part:
    """One (rank, worker) part of the pass."""

    rank: NonNeg
    worker: NonNeg
    sources: dict[str, SourceState]  # where it stands in each source
    draws: Draws


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """What a source is."""

    identity: dict[str, str]  # its files' fingerprint or Hub commit, tokenizer, document rule
    pieces: NonNeg  # parquet row groups or files
    weight: float  # in the mixture (1.0 alone)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How blocks are made: a resume must match every field."""

    block_size: Positive  # tokens per block
    pad_last: bool  # pad each part's last partial block per epoch instead of dropping it
    shuffle: bool  # piece order per epoch and blocks within windows, from (seed, epoch)
    seed: NonNeg  # of the shuffle
    shuffle_window: Positive  # blocks per shuffle window
    epochs: Positive | None  # per pass; null: endless
    vocab_size: Positive  # ids must be below it
    pad_token_id: NonNeg  # the id padding gets (mask 0)
    sources: dict[str, SourceSettings]  # "main" alone, or a mixture's names
    mix_seed: NonNeg = 0  # of a mixture's draws
    on_exhausted: str = "repeat"  # a mixture: "repeat" or "stop"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Who read."""

    world_size: Positive  # ranks
    num_workers: Positive  # parts per rank: its DataLoader workers (1 in-process)
    ranks: tuple[NonNeg, ...]  # whose parts the state holds: one rank's, or all (gather_states)


@dataclasses.dataclass(frozen=True)
class Pass:
    """The epochs of one pass."""

    start: NonNeg  # its first epoch
    end: NonNeg | None  # the epoch after its last; null: endless
    over: bool = False  # read to its end (StopIteration seen): a resume goes on with the next pass


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """A loader's own."""

    batch_size: Positive  # as saved (it may change on resume)
    next_worker: dict[str, NonNeg]  # per rank, the worker whose batch comes next


@dataclasses.dataclass(frozen=True)
class DataState:
    """The checkpoint."""

    settings: Settings
    layout: Layout
    pass_: Pass
    parts: tuple[Part, ...]  # one per (rank, worker) of the layout
    loader: LoaderState | None = None  # a loader's state only

    @property
    def ended(self) -> bool:
        """Every part finished the pass."""
        return all(s.ended for p in self.parts for s in p.sources.values())


# ----------------------------------------------------------------------------------- plain data
def to_plain(state: "DataState") -> dict:
    """The state as plain data, with its format, version and digests."""
    return seal({"format": FORMAT, "version": VERSION, **plain.to_plain(state)})


def seal(data: dict) -> dict:
    """Plain state data with its digests computed again (what a save does; a test forges with it)."""
    body = {k: v for k, v in data.items() if k not in ("format", "version", "digests")}
    return {
        "format": data.get("format"),
        "version": data.get("version"),
        **body,
        "digests": plain.digests(body),
    }


def from_plain(data: Any) -> "DataState":
    """The DataState in plain `data`; ValueError naming the first field that is wrong."""
    _check_envelope(data)
    body = {k: v for k, v in data.items() if k not in ("format", "version", "digests")}
    wrong = next(plain.differences(plain.digests(body), data["digests"]), None)
    if wrong is not None:
        raise ValueError(f"corrupt checkpoint: {wrong[0] or 'the state'}: {wrong[1]}")
    state = plain.typed(DataState, body, "")
    _check_invariants(state)
    return state


# ----------------------------------------------------------------------------------- checks
def _check_envelope(data: Any) -> None:
    """ValueError saying what `data` is when it is not a state of this format and version."""
    if not isinstance(data, dict) or not data:
        kind = "an empty dict" if data == {} else type(data).__name__
        raise ValueError(
            f"not a streaming_lm checkpoint: got {kind}. Pass what dataset.state_dict() or "
            "loader.state_dict() returned (an empty state does not mean 'start over': build a fresh loader)"
        )
    keys = sorted(map(str, data))[:8]
    if data.get("format") != FORMAT:
        old = {"cursor", "carry", "skip", "_snapshot", "dataset_state"} & set(data)
        raise ValueError(
            f"this checkpoint is in the unversioned format of streaming_lm before version 2 (keys {keys}); "
            f"this code reads version {VERSION} only: resume it with the older code, or start afresh"
            if old
            else f"not a streaming_lm checkpoint: no 'format': {FORMAT!r} (its keys: {keys}); "
            "is it a model's or optimizer's state?"
        )
    if data.get("version") != VERSION:
        raise ValueError(
            f"this checkpoint has format version {data.get('version')!r}; this code reads version "
            f"{VERSION}: resume it with the code that saved it, or start the epoch afresh"
        )
    if "digests" not in data:
        raise ValueError("corrupt checkpoint: digests: missing")


def _check_invariants(state: DataState) -> None:
    """What must hold between the fields of a state that no save breaks."""
    layout, settings, ranks = state.layout, state.settings, state.layout.ranks
    if not ranks or len(set(ranks)) < len(ranks) or max(ranks) >= layout.world_size:
        _refuse("layout.ranks", f"distinct ranks below world_size={layout.world_size}", ranks)
    expected = {(r, w) for r in layout.ranks for w in range(layout.num_workers)}
    found = [(p.rank, p.worker) for p in state.parts]
    if len(set(found)) != len(found) or set(found) != expected:
        missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
        twice = sorted({k for k in found if found.count(k) > 1})
        raise ValueError(
            "corrupt checkpoint: parts: must be every (rank, worker) of layout.ranks x "
            f"layout.num_workers once; missing {missing}, unexpected {extra}, twice {twice}"
        )
    if state.pass_.end is not None and state.pass_.end <= state.pass_.start:
        _refuse("pass.end", f"after pass.start={state.pass_.start}", state.pass_.end)
    if state.pass_.over and not state.ended:
        _refuse("pass.over", "True only when every part ended its pass", state.pass_.over)
    for i, part in enumerate(state.parts):
        if set(part.sources) != set(settings.sources) or set(part.draws.drawn) != set(settings.sources):
            _refuse(f"parts[{i}].sources", f"the sources {sorted(settings.sources)}", sorted(part.sources))
        if sum(part.draws.drawn.values()) != part.draws.chosen:
            _refuse(f"parts[{i}].draws.chosen", "the sum of draws.drawn", part.draws.chosen)
        for name, source in part.sources.items():
            _check_source(source, state, f"parts[{i}].sources.{name}")


def _check_source(source: SourceState, state: DataState, path: str) -> None:
    settings, first, end, window = state.settings, state.pass_.start, state.pass_.end, source.window
    alone = len(settings.sources) == 1  # a mixture's sources keep their own epochs across passes
    if alone and (source.epoch < first or end is not None and source.epoch > end):
        _refuse(f"{path}.epoch", f"in the pass [{first}, {end}]", source.epoch)
    for name, w in (("window", window), *(("pending", w) for w in source.pending)):
        if w is not None and not 0 < w.emitted <= settings.shuffle_window:
            _refuse(f"{path}.{name}.emitted", f"in 1..shuffle_window={settings.shuffle_window}", w.emitted)
    if window is not None and (not settings.shuffle or source.next != window.start):
        _refuse(f"{path}.window", "a shuffle window that starts at next", window)
    if source.tokens > (most := source.blocks * settings.block_size):
        _refuse(f"{path}.tokens", f"at most blocks x block_size = {most}", source.tokens)


def check_resume(
    state: DataState,
    settings: Settings,
    rank: int,
    world_size: int,
    num_workers: int,
    plan_of: Callable[[str, int, int, int], tuple[Task, ...]],
    rows_of: Callable[[str], Any],
) -> DataState:
    """`state` if the dataset with `settings` (as they are now) can resume it as part (rank, worker
    0..num_workers-1) of `world_size` ranks; else ValueError naming the field. `plan_of(name, epoch,
    rank, worker)`: the default plan of the saved layout; `rows_of(name)`: rows per piece, or None."""
    wrong = list(_mismatches(plain.to_plain(state.settings), plain.to_plain(settings), "settings"))
    if wrong:
        raise ValueError(
            "this checkpoint cannot resume this dataset; it was saved with other settings or data:\n  "
            + "\n  ".join(wrong) + f"\nthese must be as they were when it was saved; may change: {MAY_CHANGE}"
        )  # fmt: skip
    check_layout(state.layout, rank, world_size, num_workers)
    for i, part in enumerate(state.parts):
        for name, source in part.sources.items():
            explicit = source.plan_for(source.epoch)
            tasks = explicit.tasks if explicit else plan_of(name, source.epoch, part.rank, part.worker)
            pieces = state.settings.sources[name].pieces
            _check_places(source, tasks, pieces, rows_of(name), f"parts[{i}].sources.{name}")
    return state


def check_layout(layout: Layout, rank: int, world_size: int, num_workers: int) -> None:
    """ValueError unless rank `rank` of `world_size` with `num_workers` parts can take its share from
    the parts saved: its own (same layout), or every rank's (a re-plan over the new layout)."""
    every = list(layout.ranks) == list(range(layout.world_size))
    same = layout.world_size == world_size and rank in layout.ranks and layout.num_workers == num_workers
    if not (every or same):
        raise ValueError(
            f"this checkpoint holds the parts of rank(s) {list(layout.ranks)} of {layout.world_size} with "
            f"{layout.num_workers} worker(s) each; resuming rank {rank} of {world_size} with {num_workers} "
            "needs the parts of every rank: save streaming_lm.state.gather_states(all ranks' "
            "loader.state_dict()) instead (torch.distributed.all_gather_object; scripts/train.py does)"
        )


def _check_places(source: SourceState, tasks: tuple[Task, ...], pieces: int, rows: Any, path: str) -> None:
    """ValueError naming a position outside the pieces (and their rows, where known), or not in its
    task of the plan."""
    past = max([t.step for t in tasks] + [t.step for p in source.plans for t in p.tasks], default=1) - 1
    for where, position in _positions(source):  # a position may stand past a dealt task's last row
        if position.piece >= pieces:
            _refuse(f"{path}.{where}", f"a piece below {pieces}", position.piece)
        if rows is not None and position.row > rows[position.piece] + past:
            _refuse(
                f"{path}.{where}",
                f"a row of piece {position.piece} ({rows[position.piece]} rows)",
                position.row,
            )
    if source.cursor > len(tasks):
        _refuse(f"{path}.cursor", f"at most the {len(tasks)} tasks of its plan", source.cursor)
    done, start = source.cursor == len(tasks), source.next
    if (start is None) != done or start is not None and not tasks[source.cursor].holds(start):
        _refuse(f"{path}.next", f"a place in task {source.cursor} of its plan", start)


def _positions(source: SourceState) -> Iterator[tuple[str, Position]]:
    windows = [("window", source.window)] if source.window else []
    for where, window in windows + [(f"pending[{k}]", w) for k, w in enumerate(source.pending)]:
        yield from ((f"{where}.{e}", p) for e, p in (("start", window.start), ("end", window.end)) if p)
    yield from [("next", source.next)] if source.next is not None else []
    yield from ((f"plans[epoch {p.epoch}]", t.start) for p in source.plans for t in p.tasks)


def _mismatches(saved: Any, ours: Any, path: str) -> Iterator[str]:
    """'path: saved X, now Y' for each field where `saved` and `ours` differ (recursing into dicts)."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours), key=str):
            yield from _mismatches(saved.get(key), ours.get(key), f"{path}.{key}")
    elif saved != ours:
        yield f"{path}: saved {saved!r}, now {ours!r}"


def _refuse(path: str, expected: str, got: Any) -> None:
    raise ValueError(f"corrupt checkpoint: {path}: expected {expected}, got {got!r:.80}")


def gather_states(states: list[dict]) -> dict:
    """One state holding the parts of every rank, from the states each rank saved (e.g. the list
    torch.distributed.all_gather_object returns): what a resume on another layout needs."""
    typed = [from_plain(s) for s in states]
    first = typed[0]
    for state in typed[1:]:
        for name in ("settings", "pass_"):
            if getattr(state, name) != getattr(first, name):
                raise ValueError(
                    f"the ranks' states differ in {name.rstrip('_')}: they were not saved by one run"
                )
    parts = sorted((p for s in typed for p in s.parts), key=lambda p: (p.rank, p.worker))
    ranks = tuple(sorted({r for s in typed for r in s.layout.ranks}))
    turns = {k: v for s in typed if s.loader for k, v in s.loader.next_worker.items()}
    loader = dataclasses.replace(first.loader, next_worker=turns) if first.loader else None
    layout = dataclasses.replace(first.layout, ranks=ranks)
    return to_plain(DataState(first.settings, layout, first.pass_, tuple(parts), loader))


def schema() -> str:
    """The plain form of a state, field by field with types (the README's schema)."""
    head = f"format: {FORMAT!r}\nversion: {VERSION}\n"
    return head + plain.describe(DataState) + "\ndigests: the same shape, 8 hex digits at each leaf"
