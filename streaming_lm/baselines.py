"""Baselines to compare against (do not train on them): the seed-style pipeline this lab started
from, and the naive IterableDataset wrapper that every DataLoader worker replays in full.

Shared by the notebook, `scripts/benchmark.py` and the tests, so the three show the same code.
"""

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import BATCH_SIZE, BLOCK_SIZE
from .packing import Block, group_texts_streaming


class SeedStyleDataset(torch.utils.data.IterableDataset):
    """The seed's pipeline as it was described: per-row iteration, one tokenizer call per row, a
    Python list buffer cut with `buffer = buffer[block_size:]`, which copies the whole rest of the
    buffer for every block (quadratic in a document's length). Yields {"input_ids": list of ints}."""

    def __init__(self, stream: Iterable[dict], tokenizer: Any, block_size: int = BLOCK_SIZE) -> None:
        self.stream, self.tokenizer, self.block_size = stream, tokenizer, block_size

    def __iter__(self) -> Iterator[dict]:
        buffer: list[int] = []
        for example in self.stream:
            buffer.extend(self.tokenizer(example["text"])["input_ids"] + [self.tokenizer.eos_token_id])
            while len(buffer) >= self.block_size:
                yield {"input_ids": buffer[: self.block_size]}
                buffer = buffer[self.block_size :]


def seed_style_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The seed's collate: `torch.tensor` of nested lists -> (B, T) input_ids, mask, labels."""
    input_ids = torch.tensor([ex["input_ids"] for ex in examples])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def seed_style_loader(
    stream: Iterable[dict], tokenizer: Any, batch_size: int = BATCH_SIZE
) -> torch.utils.data.DataLoader:
    """A plain torch DataLoader over `SeedStyleDataset`, as the seed had."""
    dataset = SeedStyleDataset(stream, tokenizer)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=seed_style_collate)


class NaiveDataset(torch.utils.data.IterableDataset):
    """The classic bug: an IterableDataset that packs its rows without asking which worker it is,
    so every DataLoader worker replays the whole stream (2 workers: every token twice)."""

    def __init__(self, rows: Iterable[Any], block_size: int = BLOCK_SIZE) -> None:
        self.rows, self.block_size = rows, block_size

    def __iter__(self) -> Iterator[Block]:
        return group_texts_streaming(self.rows, self.block_size, pad_last=True)
