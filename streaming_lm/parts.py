"""Who reads what: the pieces of a stream (files or parquet row groups) for each rank and worker.

Pure functions, no I/O. Each epoch:

1. the pieces are put in an order: as they are (0, 1, ..., n-1), or, with shuffling, a permutation
   drawn from (seed, epoch), the same on every rank;
2. that order is cut into `world_size` contiguous runs of about equal weight (the pieces' bytes
   where the source knows them, as local parquet does; else equal piece counts), one per rank, and
   each rank's run into `num_workers` runs the same way, one per DataLoader worker.

So every part reads whole pieces, tokenizes only its own text, and a document is split only where
a piece ends. Where there are fewer pieces than parts (one JSONL file and 2 workers, say), a part
reads its parent's pieces and keeps every k-th row instead: still exactly once, but each of those
parts tokenizes all of its parent's text (a WARNING says so, with the fix).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PartPlan:
    """What one (rank, worker) part reads in one epoch.

    pieces: piece indices, in reading order.
    step, offset: of the rows these pieces yield, the part keeps those with row_index % step ==
        offset (step 1: every row, the normal case).
    """

    pieces: tuple[int, ...]
    step: int = 1
    offset: int = 0


def piece_order(n_pieces: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
    """The reading order of the pieces in `epoch`: 0..n-1, or a permutation from (seed, epoch)."""
    if not shuffle:
        return list(range(n_pieces))
    return np.random.default_rng([seed, epoch]).permutation(n_pieces).tolist()


def contiguous_run(
    items: list[int], n_runs: int, index: int, weights: list[float] | None = None, min_len: int = 1
) -> list[int]:
    """The `index`-th of `n_runs` contiguous runs of `items`, each at least `min_len` long
    (len(items) >= n_runs * min_len).

    Without `weights` (one per piece index) the runs' lengths differ by at most one; with them each
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
    weights: list[float] | None = None,
) -> PartPlan:
    """The pieces (or every k-th row of them) that worker `worker` of rank `rank` reads.

    Ranks take contiguous runs of `order` when there are at least `world_size` pieces, else every
    world_size-th row of all of them; workers split their rank's share the same way.
    """
    if len(order) >= world_size:
        min_len = num_workers if len(order) >= world_size * num_workers else 1  # a piece per worker
        mine = contiguous_run(order, world_size, rank, weights, min_len)
        if len(mine) >= num_workers:
            return PartPlan(tuple(contiguous_run(mine, num_workers, worker, weights)))
        return PartPlan(tuple(mine), step=num_workers, offset=worker)
    return PartPlan(tuple(order), step=world_size * num_workers, offset=rank * num_workers + worker)
