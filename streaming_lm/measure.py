"""Measuring the pipeline: token-length statistics, their histogram, and throughput.

Helpers return values; the notebook prints and plots them.
"""

import itertools
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from .checks import check_positive_int
from .packing import token_ids


def progress_bar(iterable: Iterable[Any], enabled: bool, **kwargs: Any) -> Iterable[Any]:
    """tqdm around `iterable` when `enabled` (off by default: the notebook's outputs stay stable)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def sample_stats(
    tokenized_stream: Iterable[Any], n_examples: int = 200, *, progress: bool = False
) -> dict[str, Any]:
    """Token-length statistics of the first `n_examples` rows of a tokenized stream.

    Returns a dict: n_examples, total_tokens, mean, median, p90, min, max, seconds (reading and
    tokenizing included), tokens_per_sec, lengths ((n,) int64 array, one entry per row).
    """
    n_examples = check_positive_int("n_examples", n_examples)
    start = time.perf_counter()
    rows = progress_bar(
        itertools.islice(tokenized_stream, n_examples), progress, total=n_examples, unit="row"
    )
    lengths = np.array([len(token_ids(row, i)) for i, row in enumerate(rows)], dtype=np.int64)
    seconds = time.perf_counter() - start
    if len(lengths) == 0:
        raise ValueError("the tokenized stream is empty: no lengths to describe")
    total = int(lengths.sum())
    return {
        "n_examples": len(lengths),
        "total_tokens": total,
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "seconds": seconds,
        "tokens_per_sec": total / seconds if seconds > 0 else float("inf"),
        "lengths": lengths,
    }


def plot_token_lengths(
    lengths: Any,
    ax: Any = None,
    xlabel: str = "tokens per row (WikiText: a paragraph; your files: a document)",
) -> Any:
    """Histogram of tokens per stream row with mean and median marked; returns the Axes."""
    import matplotlib.pyplot as plt

    lengths = np.asarray(lengths)
    if lengths.size == 0:
        raise ValueError("plot_token_lengths needs at least one length")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(50, max(1, np.unique(lengths).size)), color="steelblue", alpha=0.8)
    ax.axvline(lengths.mean(), color="crimson", linestyle="--", label=f"mean {lengths.mean():.1f}")
    ax.axvline(np.median(lengths), color="black", linestyle=":", label=f"median {np.median(lengths):.0f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of rows")
    ax.set_title(f"GPT-2 token lengths of {lengths.size} rows")
    ax.legend()
    return ax


def measure_throughput(
    loader: Iterable[Any], max_batches: int | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Iterate `loader` (at most `max_batches`) and time it.

    Returns {"batches", "tokens" (real tokens: attention_mask sum), "seconds", "tokens_per_sec"}.
    """
    if max_batches is not None:
        max_batches = check_positive_int("max_batches", max_batches)
    batches = tokens = 0
    start = time.perf_counter()
    for batch in progress_bar(
        itertools.islice(loader, max_batches), progress, total=max_batches, unit="batch"
    ):
        batches += 1
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    rate = tokens / seconds if seconds else 0.0
    return {"batches": batches, "tokens": tokens, "seconds": seconds, "tokens_per_sec": rate}


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two equal-length sequences (no ties expected)."""
    ranks_a, ranks_b = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def shuffle_quality(
    token_rows: list[Any], n_pieces: int, eos_token_id: int, **dataset_kwargs: Any
) -> dict[str, Any]:
    """Where each document lands in one shuffled epoch, against its place in the corpus.

    token_rows: the corpus's token rows in order (documents open with `eos_token_id`). They are
    replaced by their tokens' corpus positions, split into `n_pieces` pieces, and read through
    StreamingLMIterableDataset(shuffle=True, **dataset_kwargs): the same permutations the real
    tokens get. Returns {"corpus" ((D,) document index), "shuffled" ((D,) median position of the
    document's tokens in the epoch, 0..1), "rho" (Spearman of the two)}.
    """
    import datasets

    from .dataset import StreamingLMIterableDataset

    tokens = np.concatenate([np.asarray(r, dtype=np.int64) for r in token_rows])  # (N,)
    document = np.cumsum(tokens == eos_token_id) - 1  # (N,) document index of every token
    bounds = np.cumsum([len(r) for r in token_rows])[:-1]
    positions = [p.tolist() for p in np.split(np.arange(len(tokens)), bounds)]
    stream = datasets.Dataset.from_dict({"input_ids": positions}).to_iterable_dataset(num_shards=n_pieces)
    settings = {"pad_last": True, **dataset_kwargs, "shuffle": True, "vocab_size": len(tokens)}
    order = np.concatenate(
        [b["input_ids"][b["attention_mask"] == 1] for b in StreamingLMIterableDataset(stream, **settings)]
    )  # (N,) corpus positions in the order the epoch yields them
    where = np.empty(len(tokens))
    where[order] = np.arange(len(order)) / len(order)
    keep = document >= 0  # tokens before the first document start belong to none
    shuffled = np.array([np.median(where[keep][document[keep] == d]) for d in range(document.max() + 1)])
    corpus = np.arange(len(shuffled))
    return {"corpus": corpus, "shuffled": shuffled, "rho": spearman(corpus, shuffled)}


def token_counts(rows: Iterable[Any], vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: how often each id occurs in `rows` (id sequences or dicts with `input_ids`)."""
    counts = np.zeros(vocab_size, np.int64)
    for i, row in enumerate(rows):
        counts += np.bincount(np.asarray(token_ids(row, i), np.int64), minlength=vocab_size)
    return counts


def unigram_cross_entropy(train_rows: Iterable[Any], heldout_rows: Iterable[Any], vocab_size: int) -> float:
    """Cross-entropy (nats per token) of held-out tokens under the unigram model of the training
    tokens (each id's frequency, add-one smoothed over the vocabulary): what a model that ignores
    context scores. Rows: token id sequences or dicts with `input_ids`."""
    counts = token_counts(train_rows, vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)  # (V,)
    held = np.concatenate([np.asarray(token_ids(r, i), np.int64) for i, r in enumerate(heldout_rows)])
    if not len(held):
        raise ValueError("unigram_cross_entropy: the held-out rows hold no tokens")
    return float(-log_p[held].mean())
