"""Step 4, the dataset: fixed-length LM blocks as a torch IterableDataset, exactly once per epoch
across DataLoader workers, distributed ranks and resumes, with optional shuffling and mixtures.

Who reads what is `parts.py`: each (rank, worker) part reads whole pieces of the stream (files or
parquet row groups), tokenizes only those, and packs them with its own rolling buffer
(`reading.PartReader`). With `shuffle=True` the piece order changes every epoch (from seed and
epoch), and blocks are shuffled within windows of `shuffle_window` consecutive blocks of a part.

`state_dict()` is the checkpoint envelope of `state.py`: per part, positions in the corpus (no
tokens), so it stays a few KB whatever the window. `load_state_dict()` verifies it (format,
version, digests, settings, and every position against its plan) before a token is read; a state
saved with other ranks or workers is re-planned (`parts.replan`): every token of the interrupted
epochs still lands exactly once.
"""

import copy
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import check_positive_int, is_int
from .config import BLOCK_SIZE, GPT2_VOCAB_SIZE, SHUFFLE_WINDOW_BLOCKS
from .packing import check_block_size
from .parts import Layout, PartState, fresh_state, replan
from .reading import PartReader, Settings, TokenSource, as_token_source
from .state import MAY_CHANGE, open_state, seal

logger = logging.getLogger(__name__)
_warned: set[str] = set()  # messages logged once per process
MAIN = "main"  # the name of the one source of a dataset that is not a mixture


def warn_once(message: str) -> None:
    """logger.warning, once per process for the same message."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given pair, else torch.distributed's when initialized, else (0, 1)."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(
            f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}"
        )
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class Snapshot:
    """A part's state between two blocks: per source a PartState, and a mixture's draws (or None)."""

    rank: int
    worker: int
    sources: dict[str, PartState]
    mix: dict | None = None

    def to_dict(self) -> dict:
        sources = {name: s.to_dict() for name, s in self.sources.items()}
        return {"rank": self.rank, "worker": self.worker, "sources": sources, "mix": self.mix}

    @property
    def ended(self) -> bool:
        return all(s.ended for s in self.sources.values())

    def carrying(self, done: "Snapshot") -> "Snapshot":
        """This (fresh) snapshot with the last completed epoch of `done`, for progress reports."""
        sources = {
            name: dataclasses.replace(s, last_epoch=done.sources[name].last_epoch)
            for name, s in self.sources.items()
        }
        return Snapshot(self.rank, self.worker, sources, self.mix)


class PassReader:
    """One part's pass over one source: epochs from its state's to `end` (None: endless)."""

    def __init__(self, reader: PartReader, start: int, end: int | None) -> None:
        self.reader, self.start, self.end = reader, start, end

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Up to n blocks ((m, T) ids, (m, T) mask); None when the pass is over."""
        reader = self.reader
        while not reader.ended:
            out = reader.take(n)
            if out is not None:
                return out
            if self.end is not None and reader.epoch + 1 >= self.end:
                reader.ended = True
                return None
            reader.next_epoch()
        return None

    def snapshot(self) -> Snapshot:
        return Snapshot(self.reader.rank, self.reader.worker, {MAIN: self.reader.state()})


class StreamingLMIterableDataset(torch.utils.data.IterableDataset):
    """Step 4: yields dicts of `input_ids` and `attention_mask`, each (block_size,) int64.

    tokenized_stream: `tokenize_stream` output, `mix_streams` output, a datasets stream with an
        `input_ids` column, or any re-iterable of token rows.
    rank, world_size: this process's part (default: torch.distributed's, else 0 of 1).
    pad_last: pad each part's final partial block per epoch (mask 0) instead of dropping it.
    shuffle, seed: shuffle the piece order per epoch and blocks within windows, from (seed, epoch).
    shuffle_window: blocks per shuffle window (memory: window x block_size x 8 bytes).
    epochs: epochs per pass (iter), starting at `set_epoch`'s epoch; None: endless.
    """

    def __init__(
        self,
        tokenized_stream: Any,
        block_size: int = BLOCK_SIZE,
        *,
        pad_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int = SHUFFLE_WINDOW_BLOCKS,
        epochs: int | None = 1,
        vocab_size: int = GPT2_VOCAB_SIZE,
    ) -> None:
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if epochs is not None:
            epochs = check_positive_int("epochs (a positive int, or None for endless)", epochs)
        self.settings = Settings(
            block_size=check_block_size(block_size),
            pad_last=bool(pad_last),
            shuffle=bool(shuffle),
            seed=int(seed),
            shuffle_window=check_positive_int("shuffle_window", shuffle_window),
            epochs=epochs,
            vocab_size=vocab_size,
        )
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.mixture = getattr(tokenized_stream, "is_mixture", False) and tokenized_stream
        streams = tokenized_stream.streams if self.mixture else {MAIN: tokenized_stream}
        self.sources: dict[str, TokenSource] = {name: as_token_source(s) for name, s in streams.items()}
        if self.mixture:
            self.mixture.check(self.settings)
        self.source = self._settings()["sources"]  # reads each source's pieces and document rule now
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
        self._control: dict[str, Any] = {"resume": None}  # shared with a loader's view of this dataset
        self.shipping: Any = None  # set on a loader's view: what to ship (loader.py)
        self._live: Any = None  # the pass being read directly in this process (for state_dict)

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        """The epoch the next pass starts at."""
        return int(self._epoch[0])

    @property
    def epochs(self) -> int | None:
        return self.settings.epochs

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at `epoch` (shuffling draws its orders from seed and epoch); seen by
        persistent DataLoader workers too."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch[0] = int(epoch)

    def view(self, shipping: Any) -> "StreamingLMIterableDataset":
        """This dataset as a DataLoader iterates it for `make_dataloader` (shipping batches): it
        shares the epoch and the resume to come."""
        other = copy.copy(self)
        other.shipping, other._live = shipping, None
        other._control = {"resume": self._control["resume"]}  # its own slot (its workers take it along)
        return other

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = worker_slot()
        reader = self.open_pass(worker, num_workers)
        if self.shipping is not None:
            yield from self.shipping.ship(reader, worker)
            return
        self._live = reader
        while (out := reader.take(1)) is not None:
            yield {"input_ids": out[0][0], "attention_mask": out[1][0]}

    def layout(self, name: str, num_workers: int, world_size: int | None = None) -> Layout:
        """How source `name`'s pieces are dealt to world_size x num_workers parts."""
        source = self.sources[name]
        return Layout(
            source.n_pieces,
            world_size or self.world_size,
            num_workers,
            source.piece_weights,
            self.settings.shuffle,
            self.settings.seed,
        )

    def open_pass(self, worker: int, num_workers: int) -> Any:
        """The reader of part (rank, worker) for the next pass: fresh at `epoch`, or resumed."""
        resume, self._control["resume"] = self._control["resume"], None
        start, end = self._pass_bounds(resume)
        states = self.start_states(worker, num_workers, resume)
        label = f"part rank {self.rank} worker {worker}"
        readers = {}
        for name, state in states.sources.items():
            where = label if not self.mixture else f"{label} of source {name!r}"
            layout = self.layout(name, num_workers)
            readers[name] = PartReader(self.sources[name], self.settings, layout, state, where)
            self._warn_shared(layout, name)
        if self.mixture:
            return self.mixture.pass_reader(readers, start, end, states.mix, self.settings)
        return PassReader(readers[MAIN], start, end)

    def _pass_bounds(self, resume: dict | None) -> tuple[int, int | None]:
        if resume is not None:
            return resume["pass"]["start"], resume["pass"]["end"]
        start = self.epoch
        return start, None if self.settings.epochs is None else start + self.settings.epochs

    def start_states(
        self, worker: int, num_workers: int, resume: dict | None = None, epoch: int | None = None
    ) -> Snapshot:
        """Where part (rank, worker) starts its next pass, at `epoch` (default: the dataset's) or
        from `resume` (pure: the loader computes it too)."""
        if resume is None:
            start = self.epoch if epoch is None else epoch
            sources = {
                name: fresh_state(self.layout(name, num_workers), start, self.rank, worker)
                for name in self.sources
            }
            mix = self.mixture.fresh_mix(self.rank, worker) if self.mixture else None
            return Snapshot(self.rank, worker, sources, mix)
        return self._resumed(resume, worker, num_workers)

    def _resumed(self, resume: dict, worker: int, num_workers: int) -> Snapshot:
        """Part (rank, worker)'s share of a verified state: its own part, or a re-plan."""
        layout = resume["layout"]
        saved_ranks, saved_workers = layout["ranks"], layout["num_workers"]
        parts = {(p["rank"], p["worker"]): p for p in resume["parts"]}
        same = layout["world_size"] == self.world_size and saved_workers == num_workers
        if same and self.rank in saved_ranks:
            part = parts[(self.rank, worker)]
            sources = {name: PartState.from_dict(s) for name, s in part["sources"].items()}
            return Snapshot(self.rank, worker, sources, part["mix"])
        if layout["world_size"] == self.world_size and self.rank in saved_ranks:
            old = [p for (r, _), p in sorted(parts.items()) if r == self.rank]
            ranks = [
                self.rank
            ]  # only the workers changed: this rank's parts are re-planned among its workers
        else:
            self._check_layout(layout)
            old = [p for _, p in sorted(parts.items())]
            ranks = list(range(self.world_size))
        sources = {}
        for name in self.sources:
            states = [PartState.from_dict(p["sources"][name]) for p in old]
            saved = self.layout(name, saved_workers, layout["world_size"])
            sources[name] = replan(states, saved, self.layout(name, num_workers), self.rank, worker, ranks)
        mix = self.mixture.replanned_mix([p["mix"] for p in old], self.rank, worker) if self.mixture else None
        logger.info("part rank %d worker %d: re-planned from %d saved parts", self.rank, worker, len(old))
        return Snapshot(self.rank, worker, sources, mix)

    def _warn_shared(self, layout: Layout, name: str) -> None:
        if layout.shares_pieces():
            warn_once(
                f"the stream{'' if name == MAIN else ' ' + repr(name)} has {layout.n_pieces} piece(s) "
                f"(files or parquet row groups) for {layout.world_size} rank(s) x {layout.num_workers} "
                "worker(s): parts "
                "share pieces and keep every k-th row, so each tokenizes text it does not keep. Fix: more "
                "files, or parquet files with row groups (each row group is a piece)"
            )

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict:
        sources = {
            name: {"identity": source.identity, "pieces": source.n_pieces}
            for name, source in self.sources.items()
        }
        mixture = self.mixture.config() if self.mixture else None
        return {**self.settings.to_dict(), "sources": sources, "mixture": mixture}

    def envelope(
        self, parts: list[Snapshot], num_workers: int, start: int, end: int | None, loader: dict | None = None
    ) -> dict:
        """The checkpoint of `parts` of this rank (state.py's schema)."""
        layout = {"world_size": self.world_size, "num_workers": num_workers, "ranks": [self.rank]}
        return seal(
            self._settings(), layout, {"start": start, "end": end}, [p.to_dict() for p in parts], loader
        )

    def state_dict(self) -> dict:
        """The checkpoint of this dataset iterated directly in this process (one part): where its
        pass is, or where the next pass starts. (A DataLoader's state: `loader.state_dict()`.)"""
        resume = self._control["resume"]
        if resume is not None:
            return resume
        if self._live is not None:
            return self.envelope([self._live.snapshot()], 1, *self._live_bounds())
        start, end = self._pass_bounds(None)
        return self.envelope([self.start_states(0, 1)], 1, start, end)

    def _live_bounds(self) -> tuple[int, int | None]:
        return self._live.start, self._live.end

    def load_state_dict(self, state: dict) -> None:
        """Resume the next pass from `state`: refused (ValueError naming the field) if it is not a
        whole checkpoint of this version, was saved with other settings or data, or holds a position
        its plan cannot have."""
        self._control["resume"] = self.check(state)
        self._live = None

    def check(self, state: Any) -> dict:
        """`state` verified for this dataset (see `load_state_dict`)."""
        state = open_state(state)
        wrong = list(_mismatches(state["settings"], self._settings(), "settings"))
        if wrong:
            raise ValueError(
                "this checkpoint cannot resume this dataset; it was saved with other settings or data:\n  "
                + "\n  ".join(wrong)
                + f"\nthese must be as they were when it was saved; may change: {MAY_CHANGE}"
            )
        self._check_layout(state["layout"])
        self._check_positions(state)
        return state

    def _check_layout(self, layout: dict) -> None:
        """ValueError if this rank cannot take its share from the parts saved (see `_resumed`)."""
        mine = layout["world_size"] == self.world_size and self.rank in layout["ranks"]
        every = sorted(layout["ranks"]) == list(range(layout["world_size"]))
        if not (mine or every):
            raise ValueError(
                f"this checkpoint holds the parts of rank(s) {layout['ranks']} of {layout['world_size']}; "
                f"resuming rank {self.rank} of {self.world_size} needs the parts of every rank: save "
                "streaming_lm.state.gather_states(all ranks' loader.state_dict()) instead "
                "(torch.distributed.all_gather_object; scripts/train.py does)"
            )

    def _check_positions(self, state: dict) -> None:
        """ValueError naming the part and field of a position no run could have reached."""
        layout = state["layout"]
        first, end = state["pass"]["start"], state["pass"]["end"]
        for part in state["parts"]:
            for name, value in part["sources"].items():
                if name not in self.sources:
                    raise ValueError(
                        f"corrupt checkpoint: part r{part['rank']}w{part['worker']} has source {name!r}"
                    )
                saved = self.layout(name, layout["num_workers"], layout["world_size"])
                where = f"part rank {part['rank']} worker {part['worker']}" + (
                    f" source {name!r}" if self.mixture else ""
                )
                rows = self.sources[name].piece_rows
                last = (
                    None if self.mixture and self.mixture.on_exhausted == "repeat" else end
                )  # may run ahead
                check_part(PartState.from_dict(value), saved, self.settings, first, last, where, rows)


def check_part(
    state: PartState,
    layout: Layout,
    settings: Settings,
    first: int,
    end: int | None,
    where: str,
    rows: tuple[int, ...] | None = None,
) -> None:
    """ValueError naming the field of `state` that its plan (saved `layout`), its pieces' rows (where
    known) and settings rule out."""
    if state.epoch < first or (end is not None and state.epoch >= end):
        raise ValueError(
            f"corrupt checkpoint: {where}, epoch={state.epoch} is outside the pass [{first}, {end})"
        )
    plan = state.plan_for(state.epoch)
    tasks = plan.tasks if plan is not None else layout.plan(state.epoch, state.rank, state.worker)
    n = layout.n_pieces
    pieces = [t.piece for p in state.plans for t in p.tasks] + [
        t.piece for w in state.pending for t in w.tasks
    ]
    positions = [state.next] + [p for w in (state.window, *state.pending) if w for p in (w.start, w.end)]
    bad = [p for p in pieces if p >= n] + [p.piece for p in positions if p is not None and p.piece >= n]
    if bad:
        raise ValueError(f"corrupt checkpoint: {where} names piece {bad[0]}, but the stream has {n} pieces")
    tasks_all = [t for p in state.plans for t in p.tasks] + [t for w in state.pending for t in w.tasks]
    places = [(p.piece, p.row) for p in positions if p is not None] + [(t.piece, t.row) for t in tasks_all]
    for piece, row in places if rows is not None else ():
        if row > rows[piece]:
            raise ValueError(
                f"corrupt checkpoint: {where} names row {row} of piece {piece}, which has {rows[piece]} rows"
            )
    if state.cursor > len(tasks):
        raise ValueError(
            f"corrupt checkpoint: {where}, cursor={state.cursor}, but its plan has {len(tasks)} tasks"
        )
    if state.next is not None and (state.cursor == len(tasks) or not tasks[state.cursor].holds(state.next)):
        raise ValueError(
            f"corrupt checkpoint: {where}, next={state.next.to_list()} is not in task {state.cursor} "
            "of its plan"
        )
    if (state.next is None) != (state.cursor == len(tasks)) and state.window is None:
        raise ValueError(f"corrupt checkpoint: {where}, cursor={state.cursor} and next={state.next} disagree")
    if state.window is not None and (not settings.shuffle or state.next != state.window.start):
        raise ValueError(
            f"corrupt checkpoint: {where}, a shuffle window that does not start at next={state.next}"
        )
    for window in (state.window, *state.pending):
        if window is not None and not 0 < window.emitted <= settings.shuffle_window:
            raise ValueError(
                f"corrupt checkpoint: {where}, window.emitted={window.emitted} is outside "
                f"1..shuffle_window={settings.shuffle_window}"
            )
    if state.blocks * settings.block_size < state.tokens:
        raise ValueError(f"corrupt checkpoint: {where}, tokens={state.tokens} > blocks x block_size")


def _mismatches(saved: Any, ours: Any, path: str) -> Iterator[str]:
    """'path: saved X, now Y' for each field where `saved` and `ours` differ (recursing into dicts)."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours), key=str):
            yield from _mismatches(saved.get(key), ours.get(key), f"{path}.{key}")
    elif saved != ours:
        yield f"{path}: saved {saved!r}, now {ours!r}"


def progress_by_part(state: dict) -> list[dict]:
    """What each (rank, worker) part has emitted, from a dataset's or loader's `state_dict()`.

    Returns a list of {"rank", "worker", "source", "epoch", "blocks", "tokens", "dropped"}, sorted by
    rank, worker and source: blocks and real tokens emitted in `epoch`, tail tokens dropped in this
    pass (pad_last=False). A part that sits between epochs or finished its pass reports the epoch it
    completed. A mixture has one entry per source (`source` is its name; "main" otherwise) with
    "drawn": the blocks drawn from it in this pass, all its epochs together.
    """
    found = []
    for part in open_state(state)["parts"]:
        for name, value in part["sources"].items():
            s = PartState.from_dict(value)
            done = s.last_epoch if (s.ended or (s.blocks == 0 and s.last_epoch)) else None
            if done:
                epoch, blocks, tokens, dropped = (
                    done["epoch"],
                    done["blocks"],
                    done["tokens"],
                    done["dropped"],
                )
            else:
                epoch, blocks, tokens, dropped = s.epoch, s.blocks, s.tokens, s.dropped
            row = {"rank": s.rank, "worker": s.worker, "source": name, "epoch": epoch}
            drawn = {"drawn": part["mix"]["drawn"][name]} if part.get("mix") else {}
            found.append({**row, "blocks": blocks, "tokens": tokens, "dropped": dropped, **drawn})
    return sorted(found, key=lambda p: (p["rank"], p["worker"], p["source"]))
