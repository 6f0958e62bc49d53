"""Step 5's collator: blocks -> one batch of `input_ids`, `attention_mask`, `labels` (B, T) each.

Batches are built as one (F, B, T) int64 array and handed out as views of one LongTensor: the
labels are the ids where the mask is 1 and -100 (IGNORE_INDEX) on padding, so padding never
counts in the loss; a real EOS keeps its label (only the mask decides, never the id: the pad id is
EOS too). With `position_ids`, positions restart at 0 at each document's EOS, as Hugging Face's
DataCollatorWithFlattening and torchtitan do.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .config import EOS_TOKEN_ID, IGNORE_INDEX
from .packing import token_ids

NAMES = ("input_ids", "attention_mask", "labels", "position_ids")


def document_positions(
    input_ids: np.ndarray, mask: np.ndarray, eos_token_id: int = EOS_TOKEN_ID
) -> np.ndarray:
    """(..., T) positions that restart at 0 at each document start (the EOS that opens it); before a
    block's first EOS they count from the block's start."""
    steps = np.arange(input_ids.shape[-1])  # (T,)
    starts = np.where((input_ids == eos_token_id) & (mask == 1), steps, 0)  # (..., T)
    return steps - np.maximum.accumulate(starts, axis=-1)


def collate_arrays(
    ids: np.ndarray, mask: np.ndarray, position_ids: bool = False, axis: int = 0
) -> np.ndarray:
    """(B, T) ids and mask -> (3 or 4, B, T) int64: input_ids, attention_mask, labels, and with
    `position_ids` the positions. With axis=1: (k, B, T) each -> (k, 3 or 4, B, T)."""
    features = 4 if position_ids else 3
    out = np.empty((*ids.shape[:axis], features, *ids.shape[axis:]), np.int64)  # (F, B, T) or (k, F, B, T)
    field = (slice(None),) * axis
    out[(*field, 0)] = ids
    out[(*field, 1)] = mask
    out[(*field, 2)] = np.where(mask == 1, ids, IGNORE_INDEX)  # labels: -100 on padding
    if position_ids:
        out[(*field, 3)] = document_positions(ids, mask)
    return out


def as_batch(array: np.ndarray, pin: bool = False) -> dict[str, torch.Tensor]:
    """(F, B, T) collated array -> {"input_ids", "attention_mask", "labels"[, "position_ids"]},
    views of one LongTensor (in pinned memory with `pin`)."""
    tensor = torch.from_numpy(array)
    return dict(zip(NAMES, tensor.pin_memory() if pin else tensor))


def collate_fn(examples: Sequence[Any], position_ids: bool = False) -> dict[str, torch.Tensor]:
    """Step 5: list of B blocks -> {"input_ids", "attention_mask", "labels"}, each LongTensor (B, T).

    A block is a dict with `input_ids` (and `attention_mask`; ones if absent) or a sequence of ids.
    labels equal input_ids where attention_mask is 1 and -100 where it is 0 (the model shifts labels
    itself, as Hugging Face causal LMs do). With `position_ids`, adds (B, T) positions restarting
    at each document's EOS. The tensors are views of one (3 or 4, B, T) tensor.
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
