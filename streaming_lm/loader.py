"""Step 5, the loader: blocks -> batches of `input_ids`, `attention_mask`, `labels`, each (B, T).

`make_dataloader` returns a `StreamingLoader`, a torch DataLoader with a checkpoint: its
`state_dict()` is the envelope of state.py (every worker's position, per batch), and
`load_state_dict()` resumes it exactly (same ranks and workers) or re-planned (others).

How batches travel: a worker pays a fixed cost per item it ships (measured on 2 cores: ~1 ms for
a shared-memory tensor, ~0.3 ms for a pickled numpy array), so each worker ships TRANSFER_BATCHES
batches at a time as one numpy array, with its part's state after each batch (a few ints), and
the main process splits them: the batches the user sees, and their order, are those of a plain
DataLoader (workers take turns, batch by batch).
"""

import collections
import contextlib
import functools
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import BATCH_SIZE, EOS_TOKEN_ID, IGNORE_INDEX, PREFETCH_TRANSFERS, TRANSFER_BATCHES
from .dataset import Snapshot, StreamingLMIterableDataset
from .packing import token_ids
from .state import gather_states

logger = logging.getLogger(__name__)
NAMES = ("input_ids", "attention_mask", "labels", "position_ids")


def document_positions(
    input_ids: np.ndarray, mask: np.ndarray, eos_token_id: int = EOS_TOKEN_ID
) -> np.ndarray:
    """(B, T) positions that restart at 0 at each document start (the EOS that opens it), as
    Hugging Face's DataCollatorWithFlattening and torchtitan do; before a block's first EOS they
    count from the block's start."""
    steps = np.arange(input_ids.shape[-1])  # (T,)
    starts = np.where((input_ids == eos_token_id) & (mask == 1), steps, 0)  # (..., T)
    return steps - np.maximum.accumulate(starts, axis=-1)


def collate_arrays(
    ids: np.ndarray, mask: np.ndarray, position_ids: bool = False, axis: int = 0
) -> np.ndarray:
    """(B, T) ids and mask -> (3 or 4, B, T) int64: input_ids, attention_mask, labels (-100 where
    the mask is 0), and with `position_ids` positions restarting at each document. With axis=1:
    (k, B, T) each -> (k, 3 or 4, B, T)."""
    features = 4 if position_ids else 3
    out = np.empty((*ids.shape[:axis], features, *ids.shape[axis:]), np.int64)  # (F, B, T) or (k, F, B, T)
    field = (slice(None),) * axis
    out[(*field, 0)] = ids
    out[(*field, 1)] = mask
    out[(*field, 2)] = np.where(mask == 1, ids, IGNORE_INDEX)  # labels: -100 on padding
    if position_ids:
        out[(*field, 3)] = document_positions(ids, mask)
    return out


def as_batch(array: np.ndarray) -> dict[str, torch.Tensor]:
    """(F, B, T) collated array -> {"input_ids", "attention_mask", "labels"[, "position_ids"]},
    views of one LongTensor."""
    return dict(zip(NAMES, torch.from_numpy(array)))


def collate_fn(examples: Sequence[Any], position_ids: bool = False) -> dict[str, torch.Tensor]:
    """Step 5: list of B blocks -> {"input_ids", "attention_mask", "labels"}, each LongTensor (B, T).

    labels equal input_ids where attention_mask is 1 and -100 where it is 0, so padding never counts
    in the loss (the model shifts labels itself, as in Hugging Face causal LMs). A real EOS keeps its
    label: only the mask decides, never the id (the pad id is EOS too). With `position_ids`, adds
    (B, T) positions restarting at each document's EOS. The tensors are views of one (3 or 4, B, T)
    tensor.
    """
    if not examples:
        raise ValueError("collate_fn got an empty batch")
    ids = [token_ids(ex, i) for i, ex in enumerate(examples)]
    masks = [
        ex["attention_mask"] if isinstance(ex, dict) and "attention_mask" in ex else np.ones(len(x), np.int64)
        for ex, x in zip(examples, ids)
    ]
    try:
        input_ids, mask = np.stack(ids), np.stack(masks)  # (B, T) each
    except ValueError as err:
        raise ValueError(f"collate_fn needs blocks of one length: {err}") from err
    if input_ids.shape != mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {mask.shape} must be equal (B, T)")
    return as_batch(collate_arrays(input_ids, mask, position_ids))


default_collate = collate_fn  # make_dataloader's argument of the same name shadows it there


# ----------------------------------------------------------------------------------- in the worker
@dataclass
class Shipment:
    """What a worker sends per transfer: full batches as one (k, F, B, T) array, other batches (a
    short last one, or a user collate's outputs) in `extra`, its part's state after each batch,
    and at the end of its pass its final state."""

    worker: int
    full: np.ndarray | None
    extra: list = field(default_factory=list)
    states: list[Snapshot] = field(default_factory=list)
    final: Snapshot | None = None
    held: tuple[int, int] = (0, 0)  # drop_last: (batches, tokens) of its short last batch, not shipped

    def batches(self) -> Iterator[tuple[Any, Snapshot]]:
        full = [] if self.full is None else list(self.full)
        return zip(itertools.chain(full, self.extra), self.states)


@dataclass(frozen=True)
class Shipping:
    """How a loader's view of a dataset ships its blocks: `batch_size` blocks a batch, `per_transfer`
    batches a transfer, collated by ours (None) or the user's `collate`."""

    batch_size: int
    per_transfer: int
    collate: Callable | None = None
    position_ids: bool = False
    drop_last: bool = False

    def ship(self, reader: Any, worker: int) -> Iterator[Shipment]:
        """The shipments of one part's pass (`reader` a PassReader), the last with its final state.
        Our collate runs once per shipment on all its full batches: (k, F, B, T) in a few numpy calls."""
        ended = False
        while not ended:
            out, full = Shipment(worker, None), []
            for _ in range(self.per_transfer):
                ids, mask = gather(reader, self.batch_size)
                ended = ids is None or len(ids) < self.batch_size  # m < n only at the pass's end
                if ids is None:
                    break
                if ended and self.drop_last:
                    out.held = (1, int(mask.sum()))
                    break
                if self.collate is not None:
                    out.extra.append(
                        self.collate([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)])
                    )
                elif not ended:
                    full.append((ids, mask))
                else:
                    out.extra.append(collate_arrays(ids, mask, self.position_ids))
                out.states.append(reader.snapshot())
                if ended:
                    break
            out.full = self._collate_full(full) if full else None
            out.final = reader.snapshot() if ended else None
            yield out

    def _collate_full(self, full: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """k full batches of (B, T) ids and masks -> (k, F, B, T) int64, collated at once."""
        ids = np.stack([i for i, _ in full])  # (k, B, T)
        mask = np.stack([m for _, m in full])  # (k, B, T)
        return collate_arrays(ids, mask, self.position_ids, axis=1)


def gather(reader: Any, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Up to n blocks from `reader` as ((m, T) ids, (m, T) mask), m < n only at the pass's end."""
    parts = []
    while (have := sum(len(p[0]) for p in parts)) < n:
        got = reader.take(n - have)
        if got is None:
            break
        parts.append(got)
    if not parts:
        return None, None
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def to_batch(batch: Any, pin: bool = False) -> Any:
    """A shipped batch as the user gets it (ours: a dict of LongTensor views of one tensor)."""
    if isinstance(batch, np.ndarray):
        tensor = torch.from_numpy(batch)
        return dict(zip(NAMES, tensor.pin_memory() if pin else tensor))
    return batch


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
    """In each DataLoader worker: no tokenizer thread pool (see make_dataloader), then the user's init."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if user_init is not None:
        user_init(worker_id)


# ----------------------------------------------------------------------------------- in the main process
class Batches:
    """One pass of a StreamingLoader: splits the workers' shipments into batches, in the order a
    plain DataLoader gives (workers take turns; a worker that ran out is skipped), and keeps each
    part's state after the last batch it yielded."""

    def __init__(
        self, shipments: Iterator[Shipment], starts: list[Snapshot], turn: int, in_order: bool, pin: bool
    ) -> None:
        self.shipments, self.pin = shipments, pin  # no reference to the loader: no cycle to collect
        self.states = list(starts)  # per worker: after its last yielded batch
        self.queues: list[collections.deque] = [collections.deque() for _ in starts]
        self.done = [s.ended for s in starts]
        self.turn = turn  # the worker whose batch comes next
        self.in_order = in_order
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
                return self._pop(worker)
            shipment = next(self.shipments, None)
            if shipment is None:  # the DataLoader ended: every worker is done
                self.done = [True] * len(self.done)
                continue
            self._receive(shipment)

    def _next_worker(self) -> int:
        if not self.in_order:
            return next((w for w, q in enumerate(self.queues) if q), self.turn)
        while self.done[self.turn] and not self.queues[self.turn]:
            self.turn = (self.turn + 1) % len(self.queues)
        return self.turn

    def _receive(self, shipment: Shipment) -> None:
        queue = self.queues[shipment.worker]
        queue.extend(shipment.batches())
        if shipment.final is not None:
            queue.append((None, shipment.final))
        self.held = [self.held[0] + shipment.held[0], self.held[1] + shipment.held[1]]

    def _pop(self, worker: int) -> Any:
        batch, state = self.queues[worker].popleft()
        self.states[worker] = state
        if batch is None:  # the end of this worker's pass
            self.done[worker] = True
            return self.__next__()
        self.turn = (worker + 1) % len(self.queues)
        return to_batch(batch, self.pin)

    def next_worker(self) -> int:
        """The worker whose batch comes next (saved, so that a resume keeps the turns)."""
        return self._next_worker() if not all(self.done) else 0


class Direct:
    """One pass read in this process (num_workers=0): batches straight from the part's reader,
    without shipments or torch's per-item machinery; nothing is buffered between the reader and
    the caller, so the part's state is the reader's, taken when asked (not after every batch)."""

    def __init__(self, reader: Any, shipping: Shipping, pin: bool) -> None:
        self.reader, self.shipping, self.pin = reader, shipping, pin
        self.held = [0, 0]
        self.finished = False

    @property
    def states(self) -> list[Snapshot]:
        return [self.reader.snapshot()]

    def next_worker(self) -> int:
        return 0

    def __iter__(self) -> "Direct":
        return self

    def __next__(self) -> Any:
        shipping = self.shipping
        ids, mask = (None, None) if self.finished else gather(self.reader, shipping.batch_size)
        if ids is None or (len(ids) < shipping.batch_size and shipping.drop_last):
            if ids is not None:
                self.held = [1, int(mask.sum())]
            self.finished = True
            raise StopIteration
        if shipping.collate is not None:
            return shipping.collate([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)])
        return to_batch(collate_arrays(ids, mask, shipping.position_ids), self.pin)


class StreamingLoader(torch.utils.data.DataLoader):
    """A torch DataLoader over a StreamingLMIterableDataset, with what a training loop needs of it:

    - `state_dict()` / `load_state_dict()`: the checkpoint envelope (state.py), exact batch by
      batch with the same ranks and workers, re-planned with others (every token still once);
    - epochs advance by themselves: each new pass after a finished one starts at the next epoch
      unless the caller called `set_epoch`; with persistent workers too (the epoch is shared);
    - `even_steps`: under torch.distributed, every rank yields the smallest rank's batch count.

    `loader.dataset` is the dataset as the workers see it (it ships batches); `loader.batch_size`
    and `loader.drop_last` are the values given.
    """

    def __init__(
        self,
        dataset: StreamingLMIterableDataset,
        *,
        batch_size: int,
        num_workers: int,
        collate: Callable | None,
        position_ids: bool,
        drop_last: bool,
        even_steps: bool,
        per_transfer: int,
        **kwargs: Any,
    ) -> None:
        self._pin = bool(kwargs.pop("pin_memory", False)) and torch.cuda.is_available()
        shipping = Shipping(batch_size, per_transfer, collate, position_ids, drop_last)
        super().__init__(
            dataset.view(shipping), batch_size=None, num_workers=num_workers, collate_fn=_identity, **kwargs
        )
        self.lm_dataset = dataset
        self._lm_batch_size, self._lm_drop_last = batch_size, drop_last
        self.even_steps = even_steps
        self.not_yielded = {"batches": 0, "tokens": 0}  # even_steps / drop_last: this rank's, last pass
        self._batches: Batches | Direct | None = None
        self._resume: dict | None = None
        self._pass_epoch: int | None = None

    # the values given (torch's own are None and False: the workers ship whole batches)
    @property
    def batch_size(self) -> int | None:
        return getattr(self, "_lm_batch_size", None)

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._base_batch_size = value

    @property
    def drop_last(self) -> bool:
        return getattr(self, "_lm_drop_last", False)

    @drop_last.setter
    def drop_last(self, value: bool) -> None:
        self._base_drop_last = value

    def _workers(self) -> int:
        return max(self.num_workers, 1)

    def __iter__(self) -> Iterator[Any]:
        dataset, view = self.lm_dataset, self.dataset
        if self._batches is not None and self._batches.finished and dataset.epoch == self._pass_epoch:
            dataset.set_epoch(
                dataset.epoch + (dataset.epochs or 1)
            )  # the caller did not set it: the next epoch
        resume, self._resume = self._resume, None
        if resume is not None:
            self._iterator = None  # persistent workers start again: the resume travels with the dataset
        view._control["resume"] = resume  # the view's own slot: its workers take it with them
        self._pass_epoch = dataset.epoch
        workers = self._workers()
        starts = [view.start_states(w, workers, resume) for w in range(workers)]
        turns = (resume or {}).get("loader", {}).get("next_worker", {})
        same = resume is not None and resume["layout"]["num_workers"] == workers
        self._bounds = view._pass_bounds(resume)
        if self.num_workers == 0:  # in this process: the part read directly, its state taken when asked
            self._batches = Direct(view.open_pass(0, 1), view.shipping, self._pin)
        else:
            with forking_workers():
                shipments = super().__iter__()
            view._control["resume"] = None  # the workers have their copies; the next pass starts afresh
            turn = turns.get(str(dataset.rank), 0) if same else 0
            self._batches = Batches(shipments, starts, turn, getattr(self, "in_order", True), self._pin)
        if self.even_steps and torch.distributed.is_available() and torch.distributed.is_initialized():
            return self._lockstep(self._batches)
        return self._track(self._batches)

    def _track(self, batches: "Batches | Direct") -> Iterator[Any]:
        yield from batches
        self._report_held(batches)

    def _report_held(self, batches: "Batches | Direct") -> None:
        if batches.held[0]:
            self.not_yielded = {"batches": batches.held[0], "tokens": batches.held[1]}
            logger.warning(
                "drop_last=True: %d short last batch(es) of %d tokens were not yielded", *batches.held
            )

    def _lockstep(self, batches: Iterator[dict]) -> Iterator[dict]:
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
        if left:
            logger.warning(
                "even_steps: rank %d stopped with the other ranks after %d batches; %d batches (%d tokens) "
                "of its part were not yielded (endless epochs, epochs=None, lose nothing instead)",
                dist.get_rank(),
                steps,
                len(left),
                sum(left),
            )

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of this rank's parts (state.py): where each worker's part is, after the
        batches yielded; after a finished pass, where the next pass starts. Ranks that may resume
        on another world size save `gather_states` of every rank's state (scripts/train.py)."""
        if self._resume is not None:
            return self._resume
        dataset, workers, batches = self.lm_dataset, self._workers(), self._batches
        if batches is not None and not batches.finished:
            turn = {str(dataset.rank): batches.next_worker()}
            return dataset.envelope(batches.states, workers, *self._bounds, self._loader_info(turn))
        start = dataset.epoch
        if batches is not None and start == self._pass_epoch:  # finished: the next pass starts an epoch on
            start += dataset.epochs or 1
        end = None if dataset.epochs is None else start + dataset.epochs
        parts = [dataset.start_states(w, workers, epoch=start) for w in range(workers)]
        if batches is not None:  # a part between passes reports the epoch it completed
            parts = [fresh.carrying(done) for fresh, done in zip(parts, batches.states)]
        return dataset.envelope(parts, workers, start, end, self._loader_info({str(dataset.rank): 0}))

    def _loader_info(self, turn: dict[str, int]) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "next_worker": turn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the next pass from `state` (verified now: ValueError naming what is wrong)."""
        self._resume = self.lm_dataset.check(state)
        self._batches = None
        self.lm_dataset.set_epoch(self._resume["pass"]["start"])
        self._pass_epoch = self.lm_dataset.epoch


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
    if num_workers > 0:
        kwargs["worker_init_fn"] = functools.partial(_init_worker, kwargs.get("worker_init_fn"))
        kwargs.setdefault("prefetch_factor", PREFETCH_TRANSFERS)
    collate = (
        functools.partial(default_collate, position_ids=position_ids) if collate_fn is None else collate_fn
    )
    if not isinstance(dataset, StreamingLMIterableDataset):
        return PlainLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            **kwargs,
        )
    per_transfer = transfer_batches  # in-process too: torch's DataLoader costs ~0.1 ms per item
    with warnings.catch_warnings():  # 3 workers on 2 cores is a choice the caller made
        return StreamingLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate=collate_fn,
            position_ids=position_ids,
            drop_last=drop_last,
            even_steps=even_steps,
            per_transfer=per_transfer,
            **kwargs,
        )


__all__ = ["collate_fn", "make_dataloader", "StreamingLoader", "gather_states"]
