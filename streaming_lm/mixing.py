"""Mixtures: several token streams, each with a weight, feeding one StreamingLMIterableDataset. A
single stream is a mixture of one ("main", weight 1): the dataset has one path.

    mixture = mix_streams({"wiki": (wiki_tokens, 0.7), "sotu": (sotu_tokens, 0.3)}, seed=0)
    dataset = StreamingLMIterableDataset(mixture, shuffle=True)

Each source keeps its own pieces, plan and rolling buffer in every part, so a block never mixes two
sources, and each source's tokens land exactly once per that source's epoch. Which source gives a
part's next block is drawn in strata of MIX_STRATUM_BLOCKS (100) blocks: each stratum holds every
source's share of the 100 (floor(weight x 100), the rest drawn in proportion to what is left over),
in an order drawn from (seed, the part's draw generation, rank, worker, the stratum). So the shares
follow the weights within a block per 100, and a checkpoint needs only the number of blocks drawn.

When a source's epoch runs out (`on_exhausted`):
- "repeat" (default): it starts its next epoch; a pass of `epochs` epochs ends once every source
  has completed that many (the smaller sources repeat meanwhile, like HF's "all_exhausted");
  with epochs=None the mixture is endless.
- "stop": the pass ends as soon as one source has completed `epochs` epochs (HF's "first_exhausted").
Either way the next pass continues every source where it stands, so its epochs go on, each in a
new order, and none is read twice.
"""

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import check_choice, is_int
from .config import EMPTY_EPOCHS_PER_PIECE, MIX_STRATA_DRAWN, MIX_STRATUM_BLOCKS
from .reading import Blocks, SourceReader, ones
from .state import Draws, Part, Pass

POLICIES = ("repeat", "stop")
MAIN = "main"  # the name of a dataset's one source when it is not a mixture


@dataclass(frozen=True, eq=False)
class Mixture:
    """Token streams with weights (normalized to sum 1), a seed, and what happens when one runs out."""

    streams: dict[str, Any]
    weights: dict[str, float]
    seed: int = 0
    on_exhausted: str = "repeat"


def as_mixture(stream: Any) -> Mixture:
    """`stream` itself if it is a Mixture, else a mixture of one."""
    return stream if isinstance(stream, Mixture) else Mixture({MAIN: stream}, {MAIN: 1.0})


def mix_streams(
    streams: dict[str, tuple[Any, float]], *, seed: int = 0, on_exhausted: str = "repeat"
) -> Mixture:
    """Several token streams (`tokenize_stream` outputs, or token rows), each with a weight, as one
    mixture for StreamingLMIterableDataset. {name: (stream, weight)}; weights are positive real
    numbers (int, float, numpy, Fraction, Decimal), normalized to sum 1."""
    check_choice("on_exhausted", on_exhausted, POLICIES)
    if not isinstance(streams, dict) or not streams:
        raise ValueError("mix_streams needs a dict {name: (stream, weight)} with at least one stream")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    weights = {}
    for name, pair in streams.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mix_streams: names must be non-empty strings, got {name!r}")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"mix_streams: entry {name!r} must be name: (stream, weight), got {pair!r:.60}")
        if pair[0] is None or isinstance(pair[0], str | bytes | Mixture):
            raise ValueError(
                f"mix_streams: {name!r} must be a token stream (tokenize_stream's), got {pair[0]!r:.60}"
            )
        weights[name] = _weight(name, pair[1])
    total = sum(weights.values())
    if not math.isfinite(total):
        raise ValueError(f"mix_streams: the weights sum to {total}: give them on a smaller scale")
    normalized = {name: w / total for name, w in weights.items()}
    return Mixture({name: pair[0] for name, pair in streams.items()}, normalized, int(seed), on_exhausted)


def _weight(name: str, weight: Any) -> float:
    real = isinstance(weight, numbers.Real) or type(weight).__name__ == "Decimal"
    value = float(weight) if real and not isinstance(weight, bool) else math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"mix_streams: the weight of {name!r} must be a positive number, got {weight!r}")
    return value


def strata(weights: np.ndarray, key: list[int], group: int, size: int = MIX_STRATUM_BLOCKS) -> np.ndarray:
    """(MIX_STRATA_DRAWN, size) source indices of the strata of `group`: in each, every source's
    floor(weight x size) draws and the rest given in proportion to the fractions left (weighted,
    without replacement: Gumbel top-k), in an order drawn from (key, group)."""
    rng, count = np.random.default_rng([*key, group]), MIX_STRATA_DRAWN
    quota = weights * size
    base = np.floor(quota).astype(np.int64)
    counts = np.tile(base, (count, 1))  # (G, S)
    left = size - int(base.sum())
    if left:
        with np.errstate(divide="ignore"):  # a source with nothing left over is never picked
            scores = np.log(quota - base) - np.log(-np.log(rng.random(counts.shape)))
        np.add.at(counts, (np.arange(count)[:, None], np.argsort(-scores, axis=1)[:, :left]), 1)
    ends = np.cumsum(counts, axis=1)  # (G, S)
    rows = (np.arange(size)[None, :, None] >= ends[:, None, :]).sum(axis=2)  # (G, size): sorted by source
    return rng.permuted(rows, axis=1)


def stratum(weights: np.ndarray, key: list[int], index: int, size: int = MIX_STRATUM_BLOCKS) -> np.ndarray:
    """(size,) source indices of stratum `index` (see `strata`)."""
    return strata(weights, key, index // MIX_STRATA_DRAWN, size)[index % MIX_STRATA_DRAWN]


class PassReader:
    """One part's pass: a SourceReader per source, the draws between them, the pass's end."""

    def __init__(self, readers: dict[str, SourceReader], mixture: Mixture, draws: Draws, pass_: Pass) -> None:
        self.readers, self.mixture, self.pass_ = readers, mixture, pass_
        self.names = list(readers)
        self.weights = np.array([mixture.weights[name] for name in self.names])
        self.chosen, self.generation, self.drawn = draws.chosen, draws.generation, dict(draws.drawn)
        first = next(iter(readers.values()))
        self.rank, self.worker, self.block_size = first.rank, first.worker, first.settings.block_size
        self.key = [mixture.seed, self.generation, self.rank, self.worker]
        self._strata: tuple[int, np.ndarray] | None = None  # a group of strata drawn

    @property
    def ended(self) -> bool:
        return all(r.ended for r in self.readers.values())

    def part(self) -> Part:
        """Where this part stands (state.Part)."""
        sources = {name: reader.state() for name, reader in self.readers.items()}
        return Part(self.rank, self.worker, sources, Draws(self.chosen, self.generation, dict(self.drawn)))

    def take(self, n: int) -> Blocks | None:
        """Up to n blocks, each from the source drawn for it ((m, T) ids and mask); None when the
        pass is over. Several blocks of a source are taken at once, into one output array."""
        if self.ended:
            return None
        if len(self.names) == 1:
            return self._count(self.names[0], self._take_from(self.names[0], n))
        draws = self._draws(n)
        counts = np.bincount(draws, minlength=len(self.names))
        if all(self.readers[name].ready(int(k)) for name, k in zip(self.names, counts) if k):
            return self._scatter(draws, counts)
        ids, mask = np.empty((n, self.block_size), np.int64), np.empty((n, self.block_size), np.int64)
        runs = [0, *(np.flatnonzero(draws[1:] != draws[:-1]) + 1).tolist(), n]
        filled = 0
        for start, end in itertools.pairwise(runs):
            name = self.names[draws[start]]
            while filled < end:  # fewer than the run when the source's buffer ran low: the run goes on
                got = self._count(name, self._take_from(name, end - filled))
                if got is None:  # the pass is over
                    return (ids[:filled], mask[:filled]) if filled else None
                ids[filled : filled + len(got[0])], mask[filled : filled + len(got[0])] = got
                filled += len(got[0])
        return ids, mask

    def _count(self, name: str, got: Blocks | None) -> Blocks | None:
        if got is not None:
            self.chosen += len(got[0])
            self.drawn[name] += len(got[0])
        return got

    def _draws(self, n: int) -> np.ndarray:
        """The sources of the next n blocks."""
        out, at, per = [], self.chosen, MIX_STRATUM_BLOCKS * MIX_STRATA_DRAWN
        while (have := sum(map(len, out))) < n:
            group = at // per
            if self._strata is None or self._strata[0] != group:
                self._strata = (group, strata(self.weights, self.key, group).reshape(-1))
            out.append(self._strata[1][at - group * per : at - group * per + n - have])
            at += len(out[-1])
        return np.concatenate(out)

    def _scatter(self, draws: np.ndarray, counts: np.ndarray) -> Blocks:
        """The blocks of `draws` when every source has its share cut already: one take per source,
        placed where its draws are (the same blocks, in the same order, as run by run)."""
        got = {
            i: self._count(self.names[i], self.readers[self.names[i]].take(int(k)))
            for i, k in enumerate(counts)
            if k
        }
        if len(got) == 1:  # one source this time: its views as they are
            return next(iter(got.values()))
        ids = np.empty((len(draws), self.block_size), np.int64)
        whole = all(not m.flags.writeable for _, m in got.values())
        mask = ones(ids.shape) if whole else np.empty_like(ids)
        for i, (blocks, masks) in got.items():
            ids[draws == i] = blocks
            if not whole:
                mask[draws == i] = masks
        return ids, mask

    def _take_from(self, name: str, n: int) -> Blocks | None:
        """Up to n blocks of source `name`, going on to its next epochs as `on_exhausted` says."""
        reader = self.readers[name]
        while not reader.ended:
            got = reader.take(n)
            if got is not None:
                return got
            if self._pass_over(reader):
                for other in self.readers.values():
                    other.ended = True
                return None
            self._check_yields(reader)
        return None

    def _pass_over(self, reader: SourceReader) -> bool:
        """After `reader` completed an epoch: is the pass over?"""
        end = self.pass_.end
        if end is None:
            return False
        if self.mixture.on_exhausted == "stop":
            return reader.epoch >= end
        return all(r.epoch >= end for r in self.readers.values())

    def _check_yields(self, reader: SourceReader) -> None:
        """ValueError when a pass that cannot end without this source's blocks never gets one."""
        finite = self.pass_.end is not None and (len(self.names) == 1 or self.mixture.on_exhausted == "stop")
        dealing = reader.dealing
        limit = 1 if dealing.fixed_share() else EMPTY_EPOCHS_PER_PIECE * dealing.n_pieces + 1
        if finite or reader.empty_epochs < limit:
            return
        raise never_yields(reader)


def never_yields(reader: SourceReader) -> ValueError:
    """The error for a part that can never yield a block, with its numbers and the fixes that apply."""
    last, settings, dealing = reader.last, reader.settings, reader.dealing
    held = last.tokens + last.dropped
    share = f"{dealing.world_size} x {dealing.num_workers} parts share {dealing.n_pieces} piece(s)"
    fixes = [f"fewer ranks or workers ({share})", "more data"]
    if held:
        fixes = [*(["pad_last=True"] if not settings.pad_last else []), f"block_size={held} or less", *fixes]
    why = "with pad_last=False" if held else "it holds no text, so even with pad_last=True"
    return ValueError(
        f"{reader.label} holds {held:,} tokens per epoch, fewer than block_size={settings.block_size} "
        f"({reader.empty_epochs} epoch(s) in a row without a block): {why} it can never yield a block, "
        f"and the pass cannot end without it. Fix: {', '.join(fixes)}"
    )
