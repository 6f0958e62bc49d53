"""Step 4, the dataset: fixed-length LM blocks as a torch IterableDataset, exactly once per epoch
across DataLoader workers, distributed ranks and resumes, with optional shuffling and mixtures.

Who reads what is `parts.py`: each (rank, worker) part reads whole pieces of the stream (files or
parquet row groups), tokenizes only those, and packs them with its own rolling buffer
(`reading.SourceReader`); a mixture draws between its sources' readers (`mixing.PassReader`), and a
single stream is a mixture of one. With `shuffle=True` the piece order changes every epoch (from
seed and epoch), and blocks are shuffled within windows of `shuffle_window` blocks of a part.

`state_dict()` is `state.DataState` as plain data: per part, positions in the corpus (no tokens).
`load_state_dict()` checks it (state.py) against this dataset before a token is read; a state saved
with other ranks or workers is re-planned (`parts.take_over`): every token of the interrupted epochs
still lands exactly once. A pass read to its end resumes into the next pass.
"""

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import datasets
import torch

from .checks import check_positive_int, is_int
from .config import BLOCK_SIZE, EOS_TOKEN_ID, GPT2_VOCAB_SIZE, SHUFFLE_WINDOW_BLOCKS
from .mixing import MAIN, Mixture, PassReader, as_mixture
from .packing import check_block_size
from .parts import Dealing, continued, fresh_state, take_over
from .reading import SourceReader
from .state import (
    DataState,
    Draws,
    Layout,
    Part,
    Pass,
    Settings,
    SourceSettings,
    check_resume,
    from_plain,
    to_plain,
)
from .token_rows import DatasetRows, IterableRows
from .tokenize import TokenStream

logger = logging.getLogger(__name__)
_warned: set[str] = set()  # messages logged once per process


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
        raise ValueError(f"give both rank and world_size or neither, got {rank=}, {world_size=}")
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


def make_settings(mixture: Mixture, *args: Any) -> Settings:
    """The dataset's arguments (block_size, pad_last, shuffle, seed, shuffle_window, epochs,
    vocab_size) checked, ValueError naming the one that is wrong, as Settings."""
    block_size, pad_last, shuffle, seed, window, epochs, vocab_size = args
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if epochs is not None:
        epochs = check_positive_int("epochs (a positive int, or None for endless)", epochs)
    if mixture.on_exhausted == "stop" and epochs is None:
        raise ValueError("on_exhausted='stop' needs a finite pass: epochs=N, not None (endless)")
    block_size, window = check_block_size(block_size), check_positive_int("shuffle_window", window)
    vocab_size = check_positive_int("vocab_size", vocab_size)
    mixing = {"mix_seed": mixture.seed, "on_exhausted": mixture.on_exhausted}
    options = (bool(pad_last), bool(shuffle), int(seed), window, epochs, vocab_size, EOS_TOKEN_ID, {})
    return Settings(block_size, *options, **mixing)


def warn_shared(dealing: Dealing, name: str) -> None:
    """Once per process: parts share pieces (fewer pieces than parts), so each tokenizes what it skips."""
    if dealing.shares_pieces():
        warn_once(
            f"the stream{'' if name == MAIN else ' ' + repr(name)} has {dealing.n_pieces} piece(s) (files or "
            f"parquet row groups) for {dealing.world_size} rank(s) x {dealing.num_workers} worker(s): parts "
            "share pieces and keep every k-th row, so each tokenizes text it does not keep. Fix: more "
            "files, or parquet files with row groups (each row group is a piece)"
        )


def as_token_source(stream: Any) -> Any:
    """The token source for a TokenStream, a datasets stream of token rows, or any re-iterable of rows."""
    if isinstance(stream, TokenStream):
        return stream
    if isinstance(stream, datasets.IterableDataset):
        return DatasetRows(stream)
    return IterableRows(stream)


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
        self.mixture = as_mixture(tokenized_stream)
        args = (block_size, pad_last, shuffle, seed, shuffle_window, epochs, vocab_size)
        self.settings = make_settings(self.mixture, *args)
        self.sources = {name: as_token_source(s) for name, s in self.mixture.streams.items()}
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.settings = self.settings_now()  # reads each source's pieces and document rule now
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
        self._resume: DataState | None = None  # the state the next pass resumes from
        self._live: tuple[PassReader, Pass] | None = None  # the pass iterated directly in this process

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

    def next_pass(self, start: int) -> Pass:
        return Pass(start, None if self.epochs is None else start + self.epochs)

    def dealing(self, name: str, num_workers: int, world_size: int | None = None) -> Dealing:
        """How source `name`'s pieces are dealt to world_size x num_workers parts."""
        source, world, s = self.sources[name], world_size or self.world_size, self.settings
        return Dealing(source.n_pieces, world, num_workers, source.piece_weights, s.shuffle, s.seed)

    def start(
        self, worker: int, num_workers: int, resume: Any = None, carry: Any = None
    ) -> tuple[Part, Pass]:
        """Where part (rank, worker) starts its next pass: from `resume` (a checked state), else
        from `carry` ((Part, Pass) of its own last pass) if the next pass continues that one, else
        afresh at `epoch`. Pure: the loader computes the workers' starts with it too."""
        if resume is not None:
            world = self.world_size
            return take_over(resume, self.rank, worker, num_workers, world, self.dealing, self.next_pass)
        if carry is not None and carry[1].over and carry[1].end == self.epoch:
            return continued(carry[0]), self.next_pass(self.epoch)
        epoch, rank = self.epoch, self.rank
        sources = {n: fresh_state(self.dealing(n, num_workers), epoch, rank, worker) for n in self.sources}
        return Part(rank, worker, sources, Draws(0, 0, dict.fromkeys(sources, 0))), self.next_pass(epoch)

    def open(self, part: Part, pass_: Pass, num_workers: int) -> PassReader:
        """The reader of `part`'s pass."""
        readers = {}
        for name, state in part.sources.items():
            label = f"part rank {self.rank} worker {part.worker}" + (f" of source {name!r}" * (name != MAIN))
            dealing = self.dealing(name, num_workers)
            warn_shared(dealing, name)
            where = (self.rank, part.worker, state, label)
            readers[name] = SourceReader(self.sources[name], self.settings, dealing, *where)
        return PassReader(readers, self.mixture, part.draws, pass_)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The blocks of this part's next pass, one by one (a DataLoader made by make_dataloader
        reads `open` directly instead, and ships batches)."""
        worker, num_workers = worker_slot()
        live = self._live
        carry = (live[0].part(), live[1]) if live is not None and live[0].ended else None
        part, pass_ = self.start(worker, num_workers, self._resume, carry)
        self._resume, reader = None, self.open(part, pass_, num_workers)
        self._live = (reader, pass_)
        while (out := reader.take(1)) is not None:
            yield {"input_ids": out[0][0], "attention_mask": out[1][0]}
        self._live = (reader, dataclasses.replace(pass_, over=pass_.end is not None))

    def settings_now(self) -> Settings:
        """The settings with each source's identity as it is now (files are looked at again)."""
        weights = self.mixture.weights
        sources = {
            n: SourceSettings(dict(s.identity), s.n_pieces, weights[n]) for n, s in self.sources.items()
        }
        return dataclasses.replace(self.settings, sources=sources)

    def state(self, parts: list[Part], num_workers: int, pass_: Pass, loader: Any = None) -> DataState:
        """The checkpoint of `parts` of this rank."""
        layout = Layout(self.world_size, num_workers, (self.rank,))
        return DataState(self.settings_now(), layout, pass_, tuple(parts), loader)

    def state_dict(self) -> dict:
        """The checkpoint of this dataset iterated directly in this process (one part): where its
        pass is, or where the next pass starts. (A DataLoader's state: `loader.state_dict()`.)"""
        if self._resume is not None:
            return to_plain(self._resume)
        part, pass_ = (self._live[0].part(), self._live[1]) if self._live is not None else self.start(0, 1)
        return to_plain(self.state([part], 1, pass_))

    def load_state_dict(self, state: dict) -> None:
        """Resume the next pass from `state`: refused (ValueError naming the field) if it is not a
        whole checkpoint of this version, was saved with other settings or data, or holds a position
        its plan cannot have."""
        self._resume, self._live = self.check(state), None

    def check(self, plain: Any, num_workers: int = 1) -> DataState:
        """`plain` as a DataState that this dataset (its rank, `num_workers` parts) can resume."""
        state = from_plain(plain)
        layout = state.layout

        def plan_of(name: str, epoch: int, rank: int, worker: int) -> tuple:
            return self.dealing(name, layout.num_workers, layout.world_size).plan(epoch, rank, worker)

        def rows_of(name: str) -> tuple[int, ...] | None:
            return self.sources[name].piece_rows

        here = (self.rank, self.world_size, num_workers)
        return check_resume(state, self.settings_now(), *here, plan_of, rows_of)


def progress_by_part(state: dict) -> list[dict]:
    """What each (rank, worker) part has emitted, from a dataset's or loader's `state_dict()`.

    Returns a list of {"rank", "worker", "source", "epoch", "blocks", "tokens", "dropped", "drawn"},
    sorted by rank, worker and source: blocks and real tokens emitted in `epoch` (a part between two
    epochs, or at the end of its pass, reports the epoch it completed), tail tokens dropped in this
    pass (pad_last=False), and the blocks drawn from the source in this pass. `source` is "main"
    for a single stream, else the mixture's name.
    """
    found = []
    for part in from_plain(state).parts:
        for name, s in part.sources.items():
            done = s.last if s.blocks == 0 and s.last is not None else s
            row = {"rank": part.rank, "worker": part.worker, "source": name, "epoch": done.epoch}
            counts = {"blocks": done.blocks, "tokens": done.tokens, "dropped": s.dropped}
            found.append({**row, **counts, "drawn": part.draws.drawn[name]})
    return sorted(found, key=lambda p: (p["rank"], p["worker"], p["source"]))
