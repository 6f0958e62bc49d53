"""The consumer: a small GPT-2 trained on the pipeline's batches, and its held-out loss.

Random init from a GPT2Config (nothing downloaded). On a CPU most of a small model's work is its
output layer: 50,257 scores for every position (a (positions, 50257) tensor each step, ~1.5 s for
8 x 256 on 2 cores). With `frequencies` (the training text's token counts) the model gets an
adaptive softmax instead (Grave et al. 2017, as Transformer-XL used on WikiText-103): the 2,000
most frequent tokens (84 % of the bundled sample's text) are scored in full at every position, the
rarer ones in clusters scored only when needed, with smaller vectors. It is still a probability
distribution over all 50,257 tokens, so its loss compares with any other model's; a step takes
~0.2 s (measured: 228 steps of 8 x 256 in 45 s; held-out loss 5.93, 1.14 nats below the unigram
baseline).
"""

import functools
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .config import BLOCK_SIZE, GPT2_VOCAB_SIZE, IGNORE_INDEX

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 128}  # ~6.5M parameters, 6.4M of them the embedding
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768}  # 124M parameters
LEARNING_RATE = 3e-3  # AdamW, tiny model: the loss falls > 1 nat within 40 steps
WARMUP_STEPS = 10  # linear warm-up, then constant (or a cosine decay when the steps are known)
FINAL_LR_SHARE = 0.1  # the cosine ends at 10 % of the peak learning rate
ADAPTIVE_CUTOFFS = (2_000, 10_000)  # frequency ranks: head (84 % of the sample's text), 2 clusters
ADAPTIVE_DIV = 4.0  # each cluster's vectors are 4x smaller than the one before


def make_model(
    size: dict[str, int] = TINY,
    block_size: int = BLOCK_SIZE,
    dropout: float = 0.0,
    frequencies: np.ndarray | None = None,
) -> Any:
    """A randomly initialised GPT-2 with `size` (n_layer, n_head, n_embd) and GPT-2's vocabulary:
    GPT2LMHeadModel, or with `frequencies` ((V,) token counts of the training text) an
    `AdaptiveGPT2` whose output layer is an adaptive softmax clustered by those frequencies."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=block_size,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **size,
    )
    if frequencies is not None:
        return AdaptiveGPT2(config, frequencies)
    return GPT2LMHeadModel(config)


class AdaptiveGPT2(torch.nn.Module):
    """GPT-2's body with an adaptive softmax output (torch's AdaptiveLogSoftmaxWithLoss) over the
    tokens ranked by their frequency in the training text: ADAPTIVE_CUTOFFS split the ranks into a
    head scored in full and clusters of rarer tokens scored with smaller vectors (ADAPTIVE_DIV)."""

    def __init__(self, config: Any, frequencies: np.ndarray) -> None:
        from transformers import GPT2Model

        super().__init__()
        self.transformer = GPT2Model(config)
        order = np.argsort(-np.asarray(frequencies), kind="stable")  # most frequent first
        rank = np.empty(config.vocab_size, np.int64)
        rank[order] = np.arange(config.vocab_size)
        self.register_buffer("rank", torch.from_numpy(rank))  # (V,) token id -> frequency rank
        self.head = torch.nn.AdaptiveLogSoftmaxWithLoss(
            config.n_embd, config.vocab_size, list(ADAPTIVE_CUTOFFS), div_value=ADAPTIVE_DIV
        )

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of a batch (see lm_loss)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.transformer(**inputs).last_hidden_state[:, :-1]  # (B, T - 1, D): predicts tokens 1..T-1
        labels = batch["labels"][:, 1:]  # (B, T - 1)
        keep = labels != IGNORE_INDEX
        return self.head(hidden[keep], self.rank[labels[keep]]).loss  # (n, D), (n,) -> mean NLL


def make_optimizer(
    model: torch.nn.Module, lr: float = LEARNING_RATE, total_steps: int | None = None
) -> tuple[Any, Any]:
    """(AdamW, LambdaLR): linear warm-up over WARMUP_STEPS, then constant, or with `total_steps`
    a cosine decay to FINAL_LR_SHARE of `lr` at the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_share, total_steps=total_steps)
    )
    return optimizer, schedule


def lr_share(step: int, total_steps: int | None) -> float:
    """The share of the peak learning rate at `step` (0-based) of the schedule."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
    return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a batch of (B, T) input_ids, attention_mask, labels
    (and position_ids, if the loader adds them): token t predicts label t + 1; labels -100 do not
    count. Computed here (the model is not given the labels)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if isinstance(model, AdaptiveGPT2) or isinstance(getattr(model, "module", None), AdaptiveGPT2):
        return (model.module if hasattr(model, "module") else model).loss(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]  # (B, T - 1, V): predictions of tokens 1..T-1
    labels = batch["labels"][:, 1:]  # (B, T - 1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


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
