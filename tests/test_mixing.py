"""Mixtures: weighted sources, each with its own buffer, exactly once per source epoch, resumable."""

import collections

import datasets
import numpy as np
import pytest
import torch

import lab2_helpers as L
from conftest import real_tokens_in_order
from streaming_lm.reading import SourceReader

BLOCK = 16
VOCAB = 400_000  # source "b" holds ids from 200,000 on: a token tells its source
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def source(n_rows, first_id, num_shards=6, seed=0):
    """A stream of unique token rows (ids first_id + r * 500 + i) and the sorted list of its ids."""
    lengths = np.random.default_rng(seed).integers(5, 41, size=n_rows)
    rows = [list(range(first_id + r * 500, first_id + r * 500 + n)) for r, n in enumerate(lengths)]
    stream = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=num_shards)
    return stream, sorted(t for row in rows for t in row)


A, A_TOKENS = source(300, 0)
B, B_TOKENS = source(100, 200_000, seed=1)  # its epoch ends first at 0.7 / 0.3 and at 0.5 / 0.5


def mixture(weights=(0.7, 0.3), **kwargs):
    return L.mix_streams({"a": (A, weights[0]), "b": (B, weights[1])}, seed=5, **kwargs)


def dataset(mix=None, **kwargs):
    settings = {"pad_last": True, "vocab_size": VOCAB, "shuffle_window": 8, **kwargs}
    return L.StreamingLMIterableDataset(mix or mixture(), BLOCK, **settings)


def as_blocks(batches):
    """The blocks of a list of batches, in order."""
    return [
        {"input_ids": ids, "attention_mask": mask}
        for b in batches
        for ids, mask in zip(b["input_ids"], b["attention_mask"])
    ]


def split_by_source(blocks):
    """{'a': [tokens in order], 'b': [...]}; asserts that no block mixes two sources."""
    out = collections.defaultdict(list)
    for block in blocks:
        tokens = real_tokens_in_order([block])
        sources = {"a" if t < 200_000 else "b" for t in tokens}
        assert len(sources) == 1, "a block mixes two sources"
        out[sources.pop()] += tokens
    return out


def epochs_of(tokens, corpus):
    """`tokens` (one source, in order, unshuffled) cut into epochs of len(corpus) tokens."""
    return [tokens[i : i + len(corpus)] for i in range(0, len(tokens), len(corpus))]


def test_shares_follow_the_weights_and_blocks_never_mix_sources():
    blocks = [b for _, b in zip(range(2400), dataset(epochs=None))]
    by_source = split_by_source(blocks)
    shares = {name: len(tokens) / BLOCK / len(blocks) for name, tokens in by_source.items()}
    assert abs(shares["a"] - 0.7) < 0.02 and abs(shares["b"] - 0.3) < 0.02, shares


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_source_lands_exactly_once_per_its_epoch(shuffle):
    """on_exhausted="repeat", one epoch: "b" (smaller share, fewer tokens) repeats until "a" is done."""
    blocks = list(dataset(shuffle=shuffle))
    by_source = split_by_source(blocks)
    assert sorted(by_source["a"]) == A_TOKENS  # "a" read once: the pass ends with its first epoch
    b_epochs = epochs_of(by_source["b"], B_TOKENS)
    assert len(b_epochs) >= 2  # "b" ran out first and started its next epoch
    for epoch in b_epochs[:-1]:
        assert sorted(epoch) == B_TOKENS
    assert len(set(b_epochs[-1])) == len(b_epochs[-1])  # the last one partly, nothing twice


def test_stop_ends_the_pass_when_the_first_source_runs_out():
    blocks = list(dataset(mixture(weights=(0.5, 0.5), on_exhausted="stop")))
    by_source = split_by_source(blocks)
    assert sorted(by_source["b"]) == B_TOKENS  # "b" is the smaller: its epoch ends the pass
    assert len(set(by_source["a"])) == len(by_source["a"]) < len(A_TOKENS)  # "a" partly, nothing twice
    with pytest.raises(ValueError, match="needs a finite pass"):
        dataset(mixture(on_exhausted="stop"), epochs=None)


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_one_take_per_source_path_gives_the_blocks_of_the_run_by_run_path(shuffle, monkeypatch):
    """A batch whose sources all have their blocks cut is filled by one take per source; the same
    batches, in order, masks included (padded last blocks), as taking them draw run by draw run."""

    def batches():
        loader = L.make_dataloader(dataset(shuffle=shuffle), batch_size=8, num_workers=0)
        return [{k: v.clone() for k, v in b.items()} for b in loader]

    fast = batches()
    with monkeypatch.context() as patch:
        patch.setattr(SourceReader, "ready", lambda self, n: False)  # never cut ahead: run by run
        slow = batches()
    assert len(fast) == len(slow) > 20
    assert all(torch.equal(a[k], b[k]) for a, b in zip(fast, slow) for k in a)
    assert any(not bool(b["attention_mask"].all()) for b in fast)  # a padded block among them


@pytest.mark.parametrize("num_workers, world_size", [(0, 1), (2, 1), (0, 2)])
def test_a_mixture_resumes_batch_by_batch(num_workers, world_size):
    for rank in range(world_size):

        def loader(rank=rank):
            d = dataset(shuffle=True, rank=rank, world_size=world_size)
            return L.make_dataloader(d, batch_size=4, num_workers=num_workers)

        full = list(loader())
        for k in (1, len(full) // 3, len(full) - 2):
            first = loader()
            it = iter(first)
            head = [next(it) for _ in range(k)]
            resumed = loader()
            resumed.load_state_dict(first.state_dict())
            rest = list(resumed)
            assert len(head) + len(rest) == len(full)
            assert all(torch.equal(a[n], b[n]) for a, b in zip(head + rest, full) for n in a)


def test_an_elastic_resume_of_a_mixture_keeps_each_source_epoch_whole():
    def make(workers):
        return L.make_dataloader(dataset(), batch_size=4, num_workers=workers)

    first = make(2)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    resumed = make(0)
    resumed.load_state_dict(first.state_dict())
    by_source = split_by_source(as_blocks(head + list(resumed)))
    assert sorted(by_source["a"]) == A_TOKENS  # "a": one epoch, exactly once across the resume
    counts = collections.Counter(by_source["b"])  # "b" repeats: k whole epochs and part of one more
    k = min(counts[t] for t in B_TOKENS)
    assert k >= 1 and set(counts.values()) <= {k, k + 1} and set(counts) == set(B_TOKENS)


def test_progress_and_checkpoint_checks_are_per_source():
    loader = L.make_dataloader(dataset(), batch_size=4)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    parts = L.progress_by_part(state)
    assert {p["source"] for p in parts} == {"a", "b"}
    assert sum(p["blocks"] for p in parts) == 20  # 5 batches of 4
    other = L.mix_streams({"a": (A, 0.7), "b": (source(100, 200_000, num_shards=4)[0], 0.3)}, seed=5)
    with pytest.raises(ValueError, match=r"settings\.sources\.b"):
        L.make_dataloader(dataset(other), batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"settings\.sources\.a\.weight"):
        L.make_dataloader(dataset(mixture(weights=(0.5, 0.5))), batch_size=4).load_state_dict(state)


@pytest.mark.parametrize(
    "streams, match",
    [
        ({}, "at least one stream"),
        ({"a": A}, r"must be name: \(stream, weight\)"),
        ({"a": (A, 0)}, "positive number"),
        ({"a": (A, float("nan"))}, "positive number"),
        ({"a": (A, True)}, "positive number"),
    ],
)
def test_bad_mixtures_are_refused(streams, match):
    with pytest.raises(ValueError, match=match):
        L.mix_streams(streams)
    with pytest.raises(ValueError, match="on_exhausted"):
        L.mix_streams({"a": (A, 1.0)}, on_exhausted="cycle")


def test_draws_interleave_the_sources_and_change_with_the_seed():
    from streaming_lm.mixing import stratum

    weights = np.array([0.7, 0.3])
    first = stratum(weights, [5, 0, 0, 0], 0)
    switches = int((first[1:] != first[:-1]).sum())
    assert switches > 20  # mixed within the stratum, not 70 blocks of "a" then 30 of "b"
    assert not np.array_equal(first, stratum(weights, [6, 0, 0, 0], 0))
    assert np.array_equal(first, stratum(weights, [5, 0, 0, 0], 0))  # deterministic


def test_equal_weights_get_equal_shares_even_when_100_does_not_divide():
    streams = {
        name: (source(200, first, seed=i)[0], 1.0)
        for i, (name, first) in enumerate([("a", 0), ("b", 100_000), ("c", 200_000)])
    }
    blocks = [b for _, b in zip(range(3000), dataset(L.mix_streams(streams), epochs=None))]
    counts = collections.Counter(min(real_tokens_in_order([b])) // 100_000 for b in blocks)
    assert all(abs(n / 3000 - 1 / 3) < 0.005 for n in counts.values()), counts


def test_progress_reports_the_blocks_drawn_from_each_source_in_the_pass():
    loader = L.make_dataloader(dataset(epochs=None), batch_size=8)
    it = iter(loader)
    blocks = [b for _, b in zip(range(300), it)]  # 2,400 blocks: "b" is in its second epoch by then
    parts = {p["source"]: p for p in L.progress_by_part(loader.state_dict())}
    assert parts["a"]["drawn"] + parts["b"]["drawn"] == 2400
    from_b = sum(min(real_tokens_in_order([b])) >= 200_000 for b in as_blocks(blocks))
    assert parts["b"]["drawn"] == from_b  # what was drawn is what came out
    assert abs(parts["b"]["drawn"] / 2400 - 0.3) < 0.02


def test_an_endless_mixture_with_a_source_smaller_than_a_block_raises_instead_of_spinning():
    tiny = datasets.Dataset.from_dict({"input_ids": [[200_000, 200_001, 200_002]]}).to_iterable_dataset()
    mix = L.mix_streams({"a": (A, 0.5), "tiny": (tiny, 0.5)}, seed=5)
    blocks = iter(dataset(mix, pad_last=False, epochs=None))
    with pytest.raises(
        ValueError, match=r"'tiny' holds 3 tokens per epoch, fewer than block_size=16.*never yield a block"
    ):
        for _ in range(10_000):  # far more draws than "a" has blocks: "tiny" is drawn early
            next(blocks)
