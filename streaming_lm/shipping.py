"""Step 5 in each DataLoader worker: one part's pass of the dataset, cut into batches, shipped
several at a time. A worker pays a fixed cost per item it ships (measured on 2 cores: ~1 ms for a
shared-memory tensor, ~0.3 ms for a pickled numpy array), so it ships TRANSFER_BATCHES batches as
one (k, F, B, T) numpy array, collated at once, with its part's state after each batch (a few ints).
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .collate import collate_arrays
from .dataset import StreamingLMIterableDataset, worker_slot
from .mixing import PassReader
from .state import Part, Pass


@dataclass
class Shipment:
    """What a worker sends per transfer: full batches as one (k, F, B, T) array, other batches (a
    short last one, or a user collate's outputs) in `extra`, its part after each batch, and at the
    end of its pass its final part."""

    worker: int
    full: np.ndarray | None = None
    extra: list = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    final: Part | None = None
    held: tuple[int, int] = (0, 0)  # drop_last: (batches, tokens) of its short last batch, not shipped

    def batches(self) -> Iterator[tuple[Any, Part]]:
        full = [] if self.full is None else list(self.full)
        return zip(itertools.chain(full, self.extra), self.parts)


@dataclass(frozen=True)
class Shipping:
    """`batch_size` blocks a batch, `per_transfer` batches a transfer, collated by ours (None) or
    the user's `collate`."""

    batch_size: int
    per_transfer: int
    collate: Callable | None = None
    position_ids: bool = False
    drop_last: bool = False

    def batch(self, reader: PassReader, n: int = 0) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Up to n (default batch_size) blocks as ((m, T) ids, (m, T) mask), m < n only at the pass's end."""
        got, n = [], n or self.batch_size
        while (have := sum(len(g[0]) for g in got)) < n and (out := reader.take(n - have)):
            got.append(out)
        if len(got) < 2:
            return got[0] if got else (None, None)
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])

    def users(self, ids: np.ndarray, mask: np.ndarray) -> Any:
        return self.collate([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)])

    def ship(self, reader: PassReader, worker: int) -> Iterator[Shipment]:
        """The shipments of one part's pass, the last with its final part. Our collate runs once per
        shipment on all its full batches: (k, F, B, T) in a few numpy calls."""
        ended = False
        while not ended:
            out, full = Shipment(worker), []
            while not ended and len(out.parts) < self.per_transfer:
                ids, mask = self.batch(reader)
                ended = ids is None or len(ids) < self.batch_size  # short only at the pass's end
                if ids is None or ended and self.drop_last:
                    out.held = (0, 0) if ids is None else (1, int(mask.sum()))
                    break
                if self.collate is not None:
                    out.extra.append(self.users(ids, mask))
                elif ended:
                    out.extra.append(collate_arrays(ids, mask, self.position_ids))
                else:
                    full.append((ids, mask))
                out.parts.append(reader.part())
            if full:  # (k, B, T) ids and masks -> (k, F, B, T)
                out.full = collate_arrays(
                    np.stack([i for i, _ in full]), np.stack([m for _, m in full]), self.position_ids, axis=1
                )
            out.final = reader.part() if ended else None
            yield out


class Shipper(torch.utils.data.IterableDataset):
    """What a StreamingLoader's DataLoader iterates: in each worker, one part's pass of `dataset`,
    shipped. `resume`: the state the next pass starts from; `carry`: per worker, its last finished
    pass (the next one continues it: a mixture's sources go on with their epochs)."""

    def __init__(self, dataset: StreamingLMIterableDataset, shipping: Shipping) -> None:
        self.lm, self.shipping = dataset, shipping
        self.resume: Any = None
        self.carry: dict[int, tuple[Part, Pass]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.lm.set_epoch(epoch)

    def open(self, worker: int, num_workers: int) -> tuple[PassReader, Pass]:
        part, pass_ = self.lm.start(worker, num_workers, self.resume, self.carry.get(worker))
        return self.lm.open(part, pass_, num_workers), pass_

    def __iter__(self) -> Iterator[Shipment]:
        worker, num_workers = worker_slot()
        reader, pass_ = self.open(worker, num_workers)
        self.resume = None  # a persistent worker's next pass starts from where this one ends
        yield from self.shipping.ship(reader, worker)
        self.carry[worker] = (reader.part(), dataclasses.replace(pass_, over=pass_.end is not None))
