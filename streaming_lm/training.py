"""The consumer: a small GPT-2 trained on the pipeline's batches, and its held-out loss.

Random init from a GPT2Config (nothing downloaded). The tiny model (2 layers, width 128) trains on
2 CPU cores at about 0.9 s per 8 x 256 batch (measured: the notebook's 60 steps took 56 s); most
of its work is the 50,257-way output layer.
"""

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import BLOCK_SIZE, GPT2_VOCAB_SIZE

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 128}  # ~6.5M parameters, 6.4M of them the embedding
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768}  # 124M parameters
LEARNING_RATE = 3e-3  # AdamW, tiny model: the loss falls > 1 nat within 40 steps
WARMUP_STEPS = 10  # linear warm-up, then constant


def make_model(size: dict[str, int] = TINY, block_size: int = BLOCK_SIZE, dropout: float = 0.0) -> Any:
    """A randomly initialised GPT2LMHeadModel with `size` (n_layer, n_head, n_embd), GPT-2's vocab."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=block_size,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **size,
    )
    return GPT2LMHeadModel(config)


def make_optimizer(model: torch.nn.Module, lr: float = LEARNING_RATE) -> tuple[Any, Any]:
    """(AdamW, LambdaLR with linear warm-up over WARMUP_STEPS)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    return optimizer, schedule


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a batch of (B, T) input_ids, attention_mask, labels
    (and position_ids, if the loader adds them); labels -100 do not count."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return model(**inputs).loss


def train_steps(
    model: torch.nn.Module,
    batches: Iterable[dict],
    steps: int,
    optimizer: Any,
    schedule: Any,
    device: str = "cpu",
    bf16: bool = False,
) -> Iterator[dict[str, float]]:
    """Yield one record per training step: step (1-based), loss, tokens, data_wait_s (time spent
    waiting for the batch), step_s (the whole step). `bf16`: autocast the forward pass to bfloat16.
    Stops early if the batches run out (a finite number of epochs)."""
    model.train()
    batches = iter(batches)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        waited = time.perf_counter() - start
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, batch, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the device: step_s is the whole step
        tokens = int(batch["attention_mask"].sum())
        yield {
            "step": step,
            "loss": value,
            "tokens": tokens,
            "data_wait_s": waited,
            "step_s": time.perf_counter() - start,
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[dict], max_batches: int | None = None, device: str = "cpu"
) -> float:
    """Mean loss (nats per predicted token) over up to `max_batches` batches; perplexity = exp of it."""
    model.eval()
    total, count = 0.0, 0
    for batch in itertools.islice(batches, max_batches):
        predicted = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        total += lm_loss(model, batch, device).item() * predicted
        count += predicted
    model.train()
    return total / count if count else math.nan
