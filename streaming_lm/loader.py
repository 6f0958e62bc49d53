"""Step 5, the loader: blocks -> batches (collate.py), with a checkpoint, epochs and workers.

`make_dataloader` returns a `StreamingLoader`, a torch DataLoader whose `state_dict()` is the
dataset's checkpoint (state.py: every worker's part after the batches yielded) and whose
`load_state_dict()` resumes it exactly (same ranks and workers) or re-planned (others).

How batches travel: each worker ships several batches at a time with its part's state after each
(shipping.py: what the DataLoader iterates is a `Shipper` around the dataset), and the main process
splits them: the batches the user sees, and their order, are those of a plain DataLoader (workers
take turns, batch by batch). In-process (num_workers=0) the part is read directly.
"""

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .checks import check_positive_int
from .collate import as_batch, collate_arrays, collate_fn
from .config import BATCH_SIZE, PREFETCH_TRANSFERS, TRANSFER_BATCHES
from .dataset import StreamingLMIterableDataset
from .mixing import PassReader
from .shipping import Shipment, Shipper, Shipping
from .state import LoaderState, Part, Pass, to_plain

logger = logging.getLogger(__name__)


def _identity(item: Any) -> Any:
    return item


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while DataLoader workers are started, the parent's value back
    after: the Rust tokenizer's thread pool cannot cross a fork (a child that inherits "true" hangs
    on its first batch; one that inherits nothing warns on stderr), and the parent keeps its pool."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


class PlainLoader(torch.utils.data.DataLoader):
    """torch's DataLoader for a dataset that is not ours, its workers started as `forking_workers` says."""

    def __iter__(self) -> Any:
        with forking_workers():
            return super().__iter__()


def _init_worker(user_init: Any, worker_id: int) -> None:
    """In each DataLoader worker: no tokenizer thread pool (see forking_workers), then the user's init."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if user_init is not None:
        user_init(worker_id)


class Batches:
    """One pass of a StreamingLoader with workers: splits their shipments into batches, in the order
    a plain DataLoader gives (workers take turns; one that ran out is skipped), and keeps each
    worker's part after the last batch it yielded."""

    def __init__(
        self, shipments: Iterator[Shipment], starts: list[Part], turn: int, in_order: bool, pin: bool
    ) -> None:
        self.shipments, self.pin, self.in_order = shipments, pin, in_order  # no loader here: no cycle
        self.states = list(starts)  # per worker: after its last yielded batch
        self.queues: list[collections.deque] = [collections.deque() for _ in starts]
        self.done = [all(s.ended for s in p.sources.values()) for p in starts]
        self.turn = turn  # the worker whose batch comes next
        self.held = [0, 0]
        self.finished = False

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        while True:
            if all(self.done):
                self.finished = True
                for _ in self.shipments:  # the workers' last (empty) shipments, if any: end the pass
                    pass
                raise StopIteration
            worker = self._next_worker()
            if self.queues[worker]:
                batch, self.states[worker] = self.queues[worker].popleft()
                if batch is None:  # the end of this worker's pass
                    self.done[worker] = True
                    continue
                self.turn = (worker + 1) % len(self.queues)
                return as_batch(batch, self.pin) if isinstance(batch, np.ndarray) else batch
            shipment = next(self.shipments, None)
            if shipment is None:  # the DataLoader ended: every worker is done
                self.done = [True] * len(self.done)
                continue
            self.queues[shipment.worker].extend(shipment.batches())
            if shipment.final is not None:
                self.queues[shipment.worker].append((None, shipment.final))
            self.held = [self.held[0] + shipment.held[0], self.held[1] + shipment.held[1]]

    def close(self) -> None:
        """Shut the workers down now (after an error in one): left to the garbage collector, the
        reference cycle of a worker's re-raised exception keeps them waiting 5 s each."""
        stop = getattr(self.shipments, "_shutdown_workers", None)
        if stop is not None:
            stop()

    def _next_worker(self) -> int:
        if not self.in_order:
            return next((w for w, q in enumerate(self.queues) if q), self.turn)
        while self.done[self.turn] and not self.queues[self.turn]:
            self.turn = (self.turn + 1) % len(self.queues)
        return self.turn

    def next_worker(self) -> int:
        """The worker whose batch comes next (saved, so that a resume keeps the turns)."""
        return self._next_worker() if not all(self.done) else 0


class Direct:
    """One pass read in this process (num_workers=0): `per_transfer` batches at a time straight from
    the part's reader, collated at once, without torch's per-item machinery. Its state is the
    reader's; asked between two batches of a chunk, it is found by reading the chunk again from
    the part it began at (`reopen(part)`: a few batches), so that it stays exact."""

    def __init__(self, reader: PassReader, shipping: Shipping, pin: bool, reopen: Callable) -> None:
        self.reader, self.shipping, self.pin, self.reopen = reader, shipping, pin, reopen
        self.chunk: collections.deque = collections.deque()  # batches taken, not yet yielded
        self.start: Part | None = None  # the part before the chunk
        self.out = 0  # batches of the chunk yielded
        self.held = [0, 0]
        self.last = False  # the pass ended in the chunk taken
        self.finished = False  # StopIteration: the pass was read to its end

    @property
    def states(self) -> list[Part]:
        if not self.chunk:
            return [self.reader.part()]
        again = self.reopen(self.start)
        for _ in range(self.out):
            self.shipping.batch(again)
        return [again.part()]

    def next_worker(self) -> int:
        return 0

    def __iter__(self) -> "Direct":
        return self

    def __next__(self) -> Any:
        if not self.chunk and not self.last:
            self._fill()
        if not self.chunk:
            self.finished = True
            raise StopIteration
        self.out += 1
        return self.chunk.popleft()

    def _fill(self) -> None:
        """Take the next chunk: up to per_transfer batches, the full ones collated at once."""
        shipping, size = self.shipping, self.shipping.batch_size
        self.start, self.out = self.reader.part(), 0
        ids, mask = shipping.batch(self.reader, shipping.per_transfer * size)
        if ids is None:
            self.last = True
            return
        self.last = len(ids) < shipping.per_transfer * size
        full, position_ids = len(ids) // size * size, shipping.position_ids
        if shipping.drop_last and len(ids) > full:
            self.held, ids, mask = [1, int(mask[full:].sum())], ids[:full], mask[:full]
        if shipping.collate is not None:
            self.chunk.extend(
                shipping.users(ids[a : a + size], mask[a : a + size]) for a in range(0, len(ids), size)
            )
            return
        if full:  # (k * B, T) -> (k, B, T) -> (k, F, B, T)
            shape = (full // size, size, -1)
            batches = collate_arrays(ids[:full].reshape(shape), mask[:full].reshape(shape), position_ids, 1)
            self.chunk.extend(as_batch(batch, self.pin) for batch in batches)
        if len(ids) > full:
            self.chunk.append(as_batch(collate_arrays(ids[full:], mask[full:], position_ids), self.pin))


class StreamingLoader(torch.utils.data.DataLoader):
    """A torch DataLoader over a StreamingLMIterableDataset, with what a training loop needs of it:

    - `state_dict()` / `load_state_dict()`: the checkpoint (state.py), exact batch by batch with
      the same ranks and workers, re-planned with others (every token still once);
    - epochs advance by themselves: a finished pass moves the dataset to the next epoch (unless the
      caller set one), and the next pass continues it; with persistent workers too;
    - `even_steps`: under torch.distributed, every rank yields the smallest rank's batch count.

    `loader.dataset` is the Shipper the workers iterate (`set_epoch` reaches the dataset);
    `loader.batch_size` and `loader.drop_last` are the values given.
    """

    def __init__(
        self, dataset: StreamingLMIterableDataset, *, shipping: Shipping, even_steps: bool, **kwargs: Any
    ) -> None:
        self._pin = bool(kwargs.pop("pin_memory", False)) and torch.cuda.is_available()
        super().__init__(Shipper(dataset, shipping), batch_size=None, collate_fn=_identity, **kwargs)
        self.lm_dataset, self.shipping, self.even_steps = dataset, shipping, even_steps
        self.not_yielded = {"batches": 0, "tokens": 0}  # even_steps / drop_last: this rank's, last pass
        self._batches: Batches | Direct | None = None
        self._resume: Any = None
        self._lm_pass: Pass | None = None

    # the values given (torch's own are None and False: the workers ship whole batches)
    @property
    def batch_size(self) -> int | None:
        return self.shipping.batch_size if hasattr(self, "shipping") else None

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._base_batch_size = value

    @property
    def drop_last(self) -> bool:
        return self.shipping.drop_last if hasattr(self, "shipping") else False

    @drop_last.setter
    def drop_last(self, value: bool) -> None:
        self._base_drop_last = value

    def _workers(self) -> int:
        return max(self.num_workers, 1)

    def __iter__(self) -> Iterator[Any]:
        dataset, shipper, workers = self.lm_dataset, self.dataset, self._workers()
        resume, self._resume = self._resume, None
        if resume is not None:
            self._iterator, shipper.carry = None, {}  # persistent workers start again, with the resume
        shipper.resume = resume
        starts = [dataset.start(w, workers, resume, shipper.carry.get(w)) for w in range(workers)]
        self._lm_pass = starts[0][1]
        same = resume is not None and resume.loader and resume.layout.num_workers == workers
        turn = resume.loader.next_worker.get(str(dataset.rank), 0) if same else 0
        if self.num_workers == 0:  # in this process: the part read directly, its state taken when asked
            part, pass_ = starts[0]
            reopen = functools.partial(dataset.open, pass_=pass_, num_workers=1)
            self._batches = Direct(dataset.open(part, pass_, 1), self.shipping, self._pin, reopen)
        else:
            with forking_workers():
                shipments = super().__iter__()
            shipper.resume = None  # the workers have their copies; the next pass starts afresh
            in_order = getattr(self, "in_order", True)
            self._batches = Batches(shipments, [p for p, _ in starts], turn, in_order, self._pin)
        if self.even_steps and torch.distributed.is_available() and torch.distributed.is_initialized():
            return self._lockstep(self._batches)
        return self._track(self._batches)

    def _track(self, batches: "Batches | Direct") -> Iterator[Any]:
        try:
            yield from batches
        except Exception:
            if isinstance(batches, Batches):
                batches.close()
                self._iterator = None  # persistent workers start again on the next pass
            raise
        self._finish(batches)

    def _finish(self, batches: "Batches | Direct") -> None:
        """After a pass: what drop_last held back, the workers' carry, the dataset's next epoch."""
        if batches.held[0]:
            self.not_yielded = {"batches": batches.held[0], "tokens": batches.held[1]}
            logger.warning("drop_last=True: %d short last batch(es) of %d tokens not yielded", *batches.held)
        pass_ = self._lm_pass = dataclasses.replace(self._lm_pass, over=self._lm_pass.end is not None)
        self.dataset.carry = {w: (part, pass_) for w, part in enumerate(batches.states)}
        if pass_.end is not None and self.lm_dataset.epoch == pass_.start:  # the caller did not set one
            self.lm_dataset.set_epoch(pass_.end)

    def _lockstep(self, batches: "Batches | Direct") -> Iterator[dict]:
        """Yield a batch only while every rank has one (one all_reduce of a flag per step), so a
        step's collectives never wait for a rank that ran out; count what this rank did not yield."""
        dist = torch.distributed
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        steps = 0
        while True:
            batch = next(batches, None)
            flag = torch.tensor([int(batch is not None)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                break
            steps += 1
            yield batch
        rest = [] if batch is None else itertools.chain([batch], batches)  # read to the end: count it
        left = [int(b["attention_mask"].sum()) for b in rest]
        self.not_yielded = {"batches": len(left), "tokens": sum(left)}
        self._finish(batches)
        if left:
            logger.warning(
                "even_steps: rank %d stopped with the other ranks after %d batches; %d batches (%d tokens) "
                "of its part were not yielded (endless epochs, epochs=None, lose nothing instead)",
                dist.get_rank(), steps, len(left), sum(left),
            )  # fmt: skip

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of this rank's parts: each worker's part after the batches yielded; after
        a finished pass, the pass as it ended (a resume goes on with the next). Ranks that may resume
        on another world size save `gather_states` of every rank's state (scripts/train.py does)."""
        if self._resume is not None:
            return to_plain(self._resume)
        dataset, workers, batches = self.lm_dataset, self._workers(), self._batches
        turn = 0
        if batches is not None and not batches.finished:
            parts, pass_, turn = batches.states, self._lm_pass, batches.next_worker()
        elif self._carried():
            parts, pass_ = [self.dataset.carry[w][0] for w in range(workers)], self.dataset.carry[0][1]
        else:
            starts = [dataset.start(w, workers) for w in range(workers)]
            parts, pass_ = [p for p, _ in starts], starts[0][1]
        loader = LoaderState(self.batch_size, {str(dataset.rank): turn})
        return to_plain(dataset.state(parts, workers, pass_, loader))

    def _carried(self) -> bool:
        """True if the next pass continues the last one (it was read to its end, no epoch was set)."""
        carry = self.dataset.carry
        return len(carry) == self._workers() and all(
            p.over and p.end == self.lm_dataset.epoch for _, p in carry.values()
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the next pass from `state` (checked now: ValueError naming what is wrong)."""
        self._resume = self.lm_dataset.check(state, self._workers())
        self._batches = None
        pass_ = self._resume.pass_  # a pass read to its end resumes into the next one
        self.lm_dataset.set_epoch(pass_.end if pass_.over else pass_.start)


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int = BATCH_SIZE,
    num_workers: int = 0,
    *,
    even_steps: bool = False,
    position_ids: bool = False,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
    transfer_batches: int = TRANSFER_BATCHES,
    **kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A resumable DataLoader (`StreamingLoader`) of batches of `batch_size` blocks.

    Yields dicts of `input_ids`, `attention_mask`, `labels`, each LongTensor (batch_size, T) (or
    what `collate_fn` returns for a list of block dicts). `loader.state_dict()` / `load_state_dict()`
    checkpoint every worker's position. Any other DataLoader argument (`pin_memory`,
    `persistent_workers`, `prefetch_factor` (in transfers of `transfer_batches` batches),
    `worker_init_fn`, `timeout`, `multiprocessing_context`, `in_order`, ...) passes through.

    position_ids: add `position_ids` (B, T) restarting at 0 at each document (see collate_fn).
    even_steps: when torch.distributed is initialized, every rank yields the same number of
    batches (the smallest rank's): a step's collectives never wait for a rank that ran out. The
    batches other ranks had left are counted in `loader.not_yielded` and logged at WARNING. This
    trades exactly-once for lockstep; endless epochs (`epochs=None`, training by step count) need
    neither. Without torch.distributed it does nothing.
    A dataset that is not a StreamingLMIterableDataset gets a plain torch DataLoader with collate_fn.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    transfer_batches = check_positive_int("transfer_batches", transfer_batches)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if position_ids and collate_fn is not None:
        raise ValueError(
            "position_ids=True is done by our collate; with your own collate_fn, add them there "
            "(streaming_lm.collate.document_positions(input_ids, attention_mask))"
        )
    if num_workers > 0:
        kwargs["worker_init_fn"] = functools.partial(_init_worker, kwargs.get("worker_init_fn"))
        kwargs.setdefault("prefetch_factor", PREFETCH_TRANSFERS)
    if not isinstance(dataset, StreamingLMIterableDataset):
        collate = collate_fn or functools.partial(default_collate, position_ids=position_ids)
        kwargs.update(collate_fn=collate, drop_last=drop_last)
        return PlainLoader(dataset, batch_size, num_workers=num_workers, **kwargs)
    shipping = Shipping(batch_size, transfer_batches, collate_fn, position_ids, drop_last)
    with warnings.catch_warnings():  # 3 workers on 2 cores is a choice the caller made
        return StreamingLoader(
            dataset, shipping=shipping, even_steps=even_steps, num_workers=num_workers, **kwargs
        )


default_collate = collate_fn  # make_dataloader's argument of the same name shadows it there
