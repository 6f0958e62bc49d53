"""Step 4, the dataset: fixed-length LM blocks as a torch IterableDataset, exactly once across
DataLoader workers, distributed ranks and resumes.

Who reads what: ranks get disjoint parts of the stream through `datasets.distributed.
split_dataset_by_node` (whole shards when n_shards % world_size == 0, else every world_size-th row);
DataLoader workers of a rank get disjoint shards of the rank's part (datasets does this when it is
iterated inside a worker). Each (rank, worker) part is packed by its own RollingBuffer, and its
`state_dict()` is the stream position plus the buffer's carried tokens (as in torchtitan), so a
restored iterator continues with exactly the next block.
"""

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .checks import is_int
from .config import BLOCK_SIZE, GPT2_VOCAB_SIZE
from .packing import Block, RollingBuffer, check_block_size

logger = logging.getLogger(__name__)


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


def describe_source(stream: Any) -> str:
    """A short name of a stream, stored in checkpoints to refuse a state from another source."""
    if isinstance(stream, datasets.IterableDataset):
        info = stream.info
        name = "/".join(filter(None, [info.builder_name, info.config_name])) or "in-memory stream"
        return info.description or f"{name}, {stream.n_shards} shards"
    size = f", {len(stream)} rows" if hasattr(stream, "__len__") else ""
    return f"{type(stream).__name__}{size}"


class StreamingLMIterableDataset(torch.utils.data.IterableDataset):
    """Step 4: yields dicts of `input_ids` and `attention_mask`, each (block_size,) int64.

    tokenized_stream: `tokenize_stream` output (or any re-iterable of `input_ids` rows).
    rank, world_size: this process's part (default: torch.distributed's, else 0 of 1).
    pad_last: pad each part's final partial block (mask 0) instead of dropping it.
    """

    def __init__(
        self,
        tokenized_stream: Iterable[Any],
        block_size: int = BLOCK_SIZE,
        *,
        pad_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        vocab_size: int = GPT2_VOCAB_SIZE,
    ) -> None:
        self.block_size, self.pad_last = check_block_size(block_size), pad_last
        self.vocab_size = vocab_size
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.source = describe_source(tokenized_stream)
        if isinstance(tokenized_stream, datasets.IterableDataset):
            # always split (also for world_size 1): the copy keeps its own iteration state
            tokenized_stream = split_dataset_by_node(
                tokenized_stream, rank=self.rank, world_size=self.world_size
            )
        self.stream = tokenized_stream
        self._packer: RollingBuffer | None = None  # the current pass's
        self._rows_read = 0  # plain iterables: rows of this part read so far
        self._resume: dict | None = None  # position loaded by load_state_dict, used by the next pass

    def __iter__(self) -> Iterator[Block]:
        resume, self._resume = self._resume or self._position(None, []), None
        self._packer = RollingBuffer(
            self.block_size, resume["carry"], resume["blocks"], resume["tokens"], vocab_size=self.vocab_size
        )
        return self._packer.pack(self._token_rows(resume["stream"]), pad_last=self.pad_last)

    def _token_rows(self, stream_state: dict | None) -> Iterator[Any]:
        """This rank's and worker's rows, from the start (None) or from `stream_state`."""
        if isinstance(self.stream, datasets.IterableDataset):
            # datasets re-applies a loaded state on every pass; None makes this pass start fresh
            self.stream.load_state_dict(stream_state)
            return iter(self.stream)
        worker, n_workers = worker_slot()
        part, n_parts = self.rank * n_workers + worker, self.world_size * n_workers
        self._rows_read = stream_state["rows"] if stream_state else 0
        rows = itertools.islice(self.stream, part, None, n_parts)
        return self._count_rows(itertools.islice(rows, self._rows_read, None))

    def _count_rows(self, rows: Iterator[Any]) -> Iterator[Any]:
        for row in rows:
            self._rows_read += 1  # counted before the packer sees the row, like datasets' own state
            yield row

    def _position(self, stream_state: dict | None, carry: Any, blocks: int = 0, tokens: int = 0) -> dict:
        return {"stream": stream_state, "carry": carry, "blocks": blocks, "tokens": tokens}

    def state_dict(self) -> dict:
        """This part's position: config, `stream` state, `carry` (list of the tokens read but not
        yet emitted) and the `blocks` / real `tokens` emitted so far."""
        if self._resume is not None or self._packer is None:  # nothing read since the last load
            position = self._resume or self._position(None, [])
        else:
            packer = self._packer
            if isinstance(self.stream, datasets.IterableDataset):
                stream_state = self.stream.state_dict()
            else:
                stream_state = {"rows": self._rows_read}
            position = self._position(stream_state, packer.carry(), packer.blocks, packer.tokens)
        # a list, not a tensor: a worker sends its state with every batch, and a tensor would cost
        # one more shared-memory segment per batch; lists also load with torch.load(weights_only=True)
        carry = np.asarray(position["carry"], dtype=np.int64).tolist()
        return {**self._config(), **position, "carry": carry}

    def load_state_dict(self, state: dict) -> None:
        """Resume the next pass from `state`; refuses a state saved with another configuration."""
        missing = {*self._config(), *self._position(None, [])} - set(state)
        if missing:
            raise ValueError(f"not a StreamingLMIterableDataset state dict: missing {sorted(missing)}")
        wrong = {key: value for key, value in self._config().items() if state[key] != value}
        if wrong:
            saved = ", ".join(f"{key}={state[key]!r}" for key in wrong)
            ours = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
            raise ValueError(
                f"state dict saved with {saved} cannot resume this dataset ({ours}): "
                "build the dataset and DataLoader with the same settings to resume"
            )
        carry = np.asarray(state["carry"], dtype=np.int64)
        self._resume = self._position(state["stream"], carry, state["blocks"], state["tokens"])

    def _config(self) -> dict:
        worker, n_workers = worker_slot()
        return {
            "block_size": self.block_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": [worker, n_workers],
            "source": self.source,
        }


def progress_by_part(state: dict) -> list[dict]:
    """Blocks and real tokens emitted by each (rank, worker) part, read from a dataset's or a
    StatefulDataLoader's `state_dict()` (the dataset states sit inside, one per worker).

    Returns a list of {"rank", "worker", "blocks", "tokens"}, sorted by rank and worker.
    """
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict) and {"worker", "blocks", "tokens", "carry"} <= set(node):
            part = {
                "rank": node["rank"],
                "worker": node["worker"][0],
                "blocks": node["blocks"],
                "tokens": node["tokens"],
            }
            found.append(part)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(state)
    return sorted(found, key=lambda part: (part["rank"], part["worker"]))
