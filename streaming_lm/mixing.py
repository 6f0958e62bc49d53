"""Mixtures: several token streams, each with a weight, feeding one StreamingLMIterableDataset.

    mixture = mix_streams({"wiki": (wiki_tokens, 0.7), "sotu": (sotu_tokens, 0.3)}, seed=0)
    dataset = StreamingLMIterableDataset(mixture, shuffle=True)

Each source keeps its own pieces, plan and rolling buffer in every part, so a block never mixes two
sources, and each source's tokens land exactly once per that source's epoch. Which source gives a
part's next block is drawn in strata of MIX_STRATUM_BLOCKS (100) blocks: each stratum holds every
source's share of the 100 (floor(weight x 100), the rest drawn in proportion to what is left over),
in an order drawn from (seed, the part's key, the stratum). So the measured shares follow the
weights within a block per 100, and a checkpoint needs only the number of blocks drawn.

When a source's epoch runs out (`on_exhausted`):
- "repeat" (default): it starts its next epoch; a pass of `epochs` epochs ends once every source
  has completed that many (the smaller sources repeat meanwhile, like HF's "all_exhausted");
  with epochs=None the mixture is endless.
- "stop": the pass ends as soon as one source has completed `epochs` epochs (HF's
  "first_exhausted"); what the other sources had left of their epoch is not read in this pass.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import check_choice, is_int
from .config import MIX_STRATUM_BLOCKS
from .dataset import Snapshot
from .reading import PartReader, Settings, ones

POLICIES = ("repeat", "stop")


@dataclass(frozen=True, eq=False)
class Mixture:
    """Token streams with weights (normalized to sum 1), a seed, and what happens when one runs out."""

    streams: dict[str, Any]
    weights: dict[str, float]
    seed: int = 0
    on_exhausted: str = "repeat"
    is_mixture = True

    def check(self, settings: Settings) -> None:
        """ValueError for dataset settings this mixture cannot honour."""
        if self.on_exhausted == "stop" and settings.epochs is None:
            raise ValueError("on_exhausted='stop' needs a finite pass: epochs=N, not None (endless)")

    def config(self) -> dict[str, Any]:
        """What a checkpoint must match."""
        return {"weights": dict(self.weights), "on_exhausted": self.on_exhausted, "seed": self.seed}

    def fresh_mix(self, rank: int, worker: int) -> dict:
        """A part's draws at the start of a pass: none yet; its key names the layout and the part.
        drawn: blocks drawn from each source in this pass."""
        return {"chosen": 0, "key": [0, rank, worker], "drawn": dict.fromkeys(self.streams, 0)}

    def replanned_mix(self, old: list[dict], rank: int, worker: int) -> dict:
        """A new part's draws after an elastic resume: a fresh sequence of a new generation."""
        generation = max(m["key"][0] for m in old) + 1
        return {"chosen": 0, "key": [generation, rank, worker], "drawn": dict.fromkeys(self.streams, 0)}

    def pass_reader(
        self, readers: dict[str, PartReader], start: int, end: int | None, mix: dict, settings: Settings
    ) -> "MixReader":
        return MixReader(self, readers, start, end, mix)


def mix_streams(
    streams: dict[str, tuple[Any, float]], *, seed: int = 0, on_exhausted: str = "repeat"
) -> Mixture:
    """Several token streams (`tokenize_stream` outputs, or token rows), each with a weight, as one
    mixture for StreamingLMIterableDataset. {name: (stream, weight)}; weights > 0, normalized."""
    check_choice("on_exhausted", on_exhausted, POLICIES)
    if not isinstance(streams, dict) or not streams:
        raise ValueError("mix_streams needs a dict {name: (stream, weight)} with at least one stream")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    weights = {}
    for name, pair in streams.items():
        if not isinstance(name, str) or not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"mix_streams: entry {name!r} must be name: (stream, weight), got {pair!r:.60}")
        weight = pair[1]
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ValueError(f"mix_streams: the weight of {name!r} must be a positive number, got {weight!r}")
        weights[name] = float(weight)
    total = sum(weights.values())
    normalized = {name: w / total for name, w in weights.items()}
    return Mixture({name: pair[0] for name, pair in streams.items()}, normalized, int(seed), on_exhausted)


def stratum(weights: np.ndarray, key: list[int], index: int, size: int = MIX_STRATUM_BLOCKS) -> np.ndarray:
    """(size,) source indices of stratum `index`: every source's floor(weight x size) draws, the rest
    given in proportion to the fractions left, in an order drawn from (key, index)."""
    rng = np.random.default_rng([*key, index])
    quota = weights * size
    counts = np.floor(quota).astype(np.int64)
    left = size - int(counts.sum())
    if left:
        fractions = quota - counts
        counts[rng.choice(len(weights), size=left, replace=False, p=fractions / fractions.sum())] += 1
    return rng.permutation(np.repeat(np.arange(len(weights)), counts))


class MixReader:
    """One part's pass over a mixture: a PartReader per source and the draws between them."""

    def __init__(
        self, mixture: Mixture, readers: dict[str, PartReader], start: int, end: int | None, mix: dict
    ) -> None:
        self.mixture, self.readers, self.start, self.end = mixture, readers, start, end
        self.names = list(readers)
        self.weights = np.array([mixture.weights[name] for name in self.names])
        self.chosen, self.key = mix["chosen"], [mixture.seed, *mix["key"]]
        self.drawn = dict(mix["drawn"])
        self._stratum: tuple[int, np.ndarray] | None = None
        first = next(iter(readers.values()))
        self.rank, self.worker, self.block_size = first.rank, first.worker, first.settings.block_size

    @property
    def ended(self) -> bool:
        return all(r.ended for r in self.readers.values())

    def _draws(self, n: int) -> np.ndarray:
        """The sources of the next n blocks."""
        index, offset = divmod(self.chosen, MIX_STRATUM_BLOCKS)
        if self._stratum is not None and self._stratum[0] == index and offset + n <= MIX_STRATUM_BLOCKS:
            return self._stratum[1][offset : offset + n]  # within the current stratum (most calls)
        out, at = [], self.chosen
        while sum(map(len, out)) < n:
            index = at // MIX_STRATUM_BLOCKS
            if self._stratum is None or self._stratum[0] != index:
                self._stratum = (index, stratum(self.weights, self.key, index))
            offset = at - index * MIX_STRATUM_BLOCKS
            piece = self._stratum[1][offset : offset + n - sum(map(len, out))]
            out.append(piece)
            at += len(piece)
        return np.concatenate(out)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Up to n blocks, each from the source drawn for it ((m, T) ids and mask); None when the
        pass is over. Runs of the same source are taken at once, into one output array."""
        if self.ended:
            return None
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
                got = self._take_from(name, end - filled)
                if got is None:  # the pass is over
                    return (ids[:filled], mask[:filled]) if filled else None
                k = len(got[0])
                ids[filled : filled + k], mask[filled : filled + k] = got
                filled += k
                self.chosen += k
                self.drawn[name] += k
        return ids, mask

    def _scatter(self, draws: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The blocks of `draws` when every source has its share cut already: one take per source,
        placed where its draws are (the same blocks, in the same order, as run by run). Whole
        blocks share one read-only mask, as a single source's do."""
        got = {i: self.readers[self.names[i]].take(int(k)) for i, k in enumerate(counts) if k}
        for i, (blocks, _) in got.items():
            self.drawn[self.names[i]] += len(blocks)
        self.chosen += len(draws)
        if len(got) == 1:  # one source this time: its views as they are
            return next(iter(got.values()))
        ids = np.empty((len(draws), self.block_size), np.int64)
        whole = all(not m.flags.writeable for _, m in got.values())
        mask = ones(ids.shape) if whole else np.empty_like(ids)
        for i, (blocks, masks) in got.items():
            where = draws == i
            ids[where] = blocks
            if not whole:
                mask[where] = masks
        return ids, mask

    def _take_from(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Up to n blocks of source `name`, applying `on_exhausted` at the end of its epochs."""
        reader = self.readers[name]
        while not reader.ended:
            got = reader.take(n)
            if got is not None:
                return got
            if self._pass_over(reader):
                for other in self.readers.values():
                    other.ended = True
                return None
            if reader.default and reader.last_epoch and reader.last_epoch["blocks"] == 0:
                raise ValueError(
                    f"{reader.label} gives no block in a whole epoch ({reader.last_epoch['dropped']} tokens "
                    f"< block_size): it can never be drawn. Fix: more data for it, fewer ranks or workers, "
                    "a smaller block_size, or pad_last=True"
                )
            reader.next_epoch()
        return None

    def _pass_over(self, reader: PartReader) -> bool:
        """After `reader` completed an epoch: is the pass over?"""
        if self.end is None:
            return False
        if self.mixture.on_exhausted == "stop":
            return reader.epoch + 1 >= self.end
        return all(self._completed(r) >= self.end - 1 for r in self.readers.values())

    @staticmethod
    def _completed(reader: PartReader) -> int:
        """The last epoch `reader` completed (-1 if none)."""
        done = reader.last_epoch["epoch"] if reader.last_epoch else -1
        return max(reader.epoch - 1, done)

    def snapshot(self) -> Snapshot:
        sources = {name: reader.state() for name, reader in self.readers.items()}
        mix = {"chosen": self.chosen, "key": self.key[1:], "drawn": dict(self.drawn)}
        return Snapshot(self.rank, self.worker, sources, mix)
