"""Step 5 (collate, DataLoader), the statistics, the plot, the throughput, and the whole pipeline."""

import matplotlib
import numpy as np
import pytest
import torch

import lab2_helpers as L

matplotlib.use("Agg")
EOS = L.EOS_TOKEN_ID


def test_collate_stacks_blocks_and_masks_padding_in_labels():
    blocks = [
        {"input_ids": np.arange(4), "attention_mask": np.ones(4, np.int64)},
        {"input_ids": [7, 8, EOS, EOS], "attention_mask": [1, 1, 0, 0]},
    ]
    batch = L.collate_fn(blocks)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.int64 and v.shape == (2, 4) for v in batch.values())
    assert batch["labels"].tolist() == [[0, 1, 2, 3], [7, 8, -100, -100]]
    assert batch["input_ids"][1].tolist() == [7, 8, EOS, EOS]


def test_collate_accepts_tensors_and_missing_masks():
    batch = L.collate_fn([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3, 4])}])
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 1]] and batch["labels"].tolist() == [
        [1, 2],
        [3, 4],
    ]


def test_collate_refuses_ragged_or_empty_batches():
    with pytest.raises(ValueError, match="one length"):
        L.collate_fn([{"input_ids": [1, 2]}, {"input_ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match="empty"):
        L.collate_fn([])


def test_dataloader_batches_are_8_by_256(tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("local"), tokenizer)
    batch = next(iter(L.make_dataloader(L.StreamingLMIterableDataset(tokens))))
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        k: ((L.BATCH_SIZE, L.BLOCK_SIZE), torch.int64) for k in ("input_ids", "attention_mask", "labels")
    }
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"][0, 0] == EOS


def test_bundled_sample_token_accounting(tokenizer, sample_rows):
    """All real tokens of all blocks == all tokenized rows, concatenated; one EOS per article."""
    lines = [r for r in sample_rows if r]
    expected = [t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in ids]
    assert EOS not in expected
    dataset = L.StreamingLMIterableDataset(
        L.tokenize_stream(L.load_text_stream("local"), tokenizer), pad_last=True
    )
    batches = list(L.make_dataloader(dataset))
    real = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).tolist()
    assert [t for t in real if t != EOS] == expected  # in order, nothing lost, nothing twice
    assert real.count(EOS) == 126  # articles
    assert sum(b["input_ids"].shape[0] for b in batches) == -(-len(real) // L.BLOCK_SIZE)


def test_sample_stats_describe_the_first_rows():
    rows = [{"input_ids": [1] * n} for n in (1, 2, 3, 4, 100)] + [{"input_ids": [9]}] * 5
    stats = L.sample_stats(iter(rows), n_examples=5)
    assert stats["n_examples"] == 5 and stats["total_tokens"] == 110
    assert (stats["min"], stats["median"], stats["max"], stats["mean"]) == (1, 3.0, 100, 22.0)
    assert stats["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert stats["lengths"].tolist() == [1, 2, 3, 4, 100]
    assert stats["seconds"] > 0 and stats["tokens_per_sec"] == pytest.approx(110 / stats["seconds"])


def test_sample_stats_of_a_short_stream_and_bad_arguments():
    assert L.sample_stats([[1, 2]], n_examples=200)["n_examples"] == 1
    with pytest.raises(ValueError, match="empty"):
        L.sample_stats([], n_examples=3)
    with pytest.raises(ValueError, match="n_examples"):
        L.sample_stats([[1]], n_examples=0)


def test_plot_marks_mean_and_median_with_labelled_axes():
    ax = L.plot_token_lengths([1, 2, 3, 10])
    assert ax.get_xlabel() and ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["mean 4.0", "median 2"]
    assert sum(p.get_height() for p in ax.patches) == 4  # every length is in the histogram
    with pytest.raises(ValueError):
        L.plot_token_lengths([])


def test_measure_throughput_counts_real_tokens():
    blocks = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, m]} for m in (1, 1, 0)]
    loader = [L.collate_fn(blocks[:2]), L.collate_fn(blocks[2:])]
    result = L.measure_throughput(loader)
    assert (result["batches"], result["tokens"]) == (2, 11)
    assert result["tokens_per_sec"] == pytest.approx(11 / result["seconds"])
    assert L.measure_throughput(loader, max_batches=1)["tokens"] == 8
    with pytest.raises(ValueError, match="max_batches"):
        L.measure_throughput(loader, max_batches=0)


def test_progress_bars_are_opt_in(capsys):
    rows = [[1, 2, 3]] * 50
    L.sample_stats(rows, n_examples=50)
    assert capsys.readouterr().err == ""  # off by default: nbval-checked cells stay stable
    L.sample_stats(rows, n_examples=50, progress=True)
    assert "50/50" in capsys.readouterr().err
