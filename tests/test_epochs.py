"""Shuffling and epochs: exactly once per epoch, deterministic, and exact resumes anywhere."""

import pickle
import re
import threading

import pytest
import torch

import lab2_helpers as L
from conftest import real_tokens_in_order, real_tokens_sorted, row_tokens_sorted, unique_token_stream

BLOCK = 16
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def shuffled(stream, **kwargs):
    settings = {"pad_last": True, "shuffle": True, "seed": 3, "shuffle_window": 8, **kwargs}
    return L.StreamingLMIterableDataset(stream, BLOCK, **settings)


def epochs_of(batches, n_epochs):
    """Split a multi-epoch list of batches into epochs by counting tokens (each epoch has all)."""
    out, current, per_epoch = [], [], None
    for batch in batches:
        current.append(batch)
        total = len(real_tokens_in_order(current))
        if per_epoch is not None and total == per_epoch or per_epoch is None and total == TOTAL[0]:
            out.append(current)
            current = []
    assert len(out) == n_epochs and not current
    return out


TOTAL = [0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_epoch_holds_every_token_once_in_a_new_order(num_workers):
    """epochs=3 in one pass (no workers: the batches of one epoch come before the next's), or
    one epoch per pass (2 workers: one worker may start its next epoch while the other ends his)."""
    stream, rows = unique_token_stream()
    TOTAL[0] = len(row_tokens_sorted(rows))
    if num_workers == 0:
        epochs = epochs_of(list(L.make_dataloader(shuffled(stream, epochs=3), batch_size=4)), 3)
    else:
        loader = L.make_dataloader(shuffled(stream), batch_size=4, num_workers=num_workers)
        epochs = [list(loader) for _ in range(3)]
    for epoch in epochs:
        assert real_tokens_sorted(epoch) == row_tokens_sorted(rows)
    orders = [real_tokens_in_order(epoch) for epoch in epochs]
    assert len({tuple(order) for order in orders}) == 3  # three different orders
    assert all(order != sorted(order) for order in orders)  # none is the corpus order


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_shuffled_epoch_exactly(world_size):
    stream, rows = unique_token_stream()
    for epoch in (0, 1):
        tokens = []
        for rank in range(world_size):
            dataset = shuffled(stream, rank=rank, world_size=world_size)
            dataset.set_epoch(epoch)
            tokens += real_tokens_sorted(L.make_dataloader(dataset, batch_size=4, num_workers=2))
        assert sorted(tokens) == row_tokens_sorted(rows)


def test_shuffle_is_deterministic_for_seed_and_epoch_and_differs_otherwise():
    stream, _ = unique_token_stream()

    def order(seed, epoch):
        dataset = shuffled(stream, seed=seed)
        dataset.set_epoch(epoch)
        return real_tokens_in_order(dataset)

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2)
    assert order(3, 1) != order(4, 1)
    assert real_tokens_in_order(L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True)) == sorted(
        order(3, 1)
    )


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_two_equals_the_uninterrupted_run(num_workers):
    stream, _ = unique_token_stream()

    def loader():
        return L.make_dataloader(shuffled(stream, epochs=3), batch_size=4, num_workers=num_workers)

    full = list(loader())
    per_epoch = len(full) // 3
    for k in (per_epoch + 1, per_epoch + per_epoch // 2, 2 * per_epoch - 1):  # all inside epoch 2 (index 1)
        first = loader()
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
        del it, first  # the crash
        resumed = loader()
        resumed.load_state_dict(state)
        assert_same_batches(head + list(resumed), full)


def test_state_after_an_epochs_last_batch_resumes_into_the_next_epoch():
    stream, rows = unique_token_stream()
    TOTAL[0] = len(row_tokens_sorted(rows))
    full = list(L.make_dataloader(shuffled(stream, epochs=2), batch_size=4))
    first_epoch, second_epoch = epochs_of(full, 2)
    loader = L.make_dataloader(shuffled(stream, epochs=2), batch_size=4)
    it = iter(loader)
    for _ in first_epoch:
        next(it)
    resumed = L.make_dataloader(shuffled(stream, epochs=2), batch_size=4)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(list(resumed), second_epoch)  # not a replay of the first


def test_loader_passes_advance_the_epoch_and_a_finished_pass_resumes_into_the_next():
    stream, _ = unique_token_stream()
    loader = L.make_dataloader(shuffled(stream), batch_size=4)
    epoch0, epoch1 = list(loader), list(loader)  # no set_epoch: the loader advances it
    assert real_tokens_in_order(epoch0) != real_tokens_in_order(epoch1)
    reference = shuffled(stream)
    reference.set_epoch(1)
    assert real_tokens_in_order(epoch1) == real_tokens_in_order(reference)
    fresh = L.make_dataloader(shuffled(stream), batch_size=4)
    fresh.load_state_dict(loader.state_dict())  # saved after epoch 1 finished
    reference.set_epoch(2)
    assert real_tokens_in_order(list(fresh)) == real_tokens_in_order(reference)


@pytest.mark.parametrize("window", [8, 256, 4096])
def test_checkpoint_stays_small_whatever_the_window(tokenizer, window):
    tokens = L.tokenize_stream(L.load_text_stream("local"), tokenizer)
    dataset = L.StreamingLMIterableDataset(tokens, shuffle=True, shuffle_window=window, epochs=None)
    loader = L.make_dataloader(dataset, num_workers=2)
    it = iter(loader)
    for _ in range(60):
        next(it)
    size = len(pickle.dumps(loader.state_dict()))
    assert size < 100_000, f"{size:,} bytes"


def test_endless_epochs_never_run_out():
    stream, rows = unique_token_stream(n_rows=6, num_shards=2)
    dataset = shuffled(stream, epochs=None)
    blocks = [b for _, b in zip(range(200), dataset)]
    assert len(blocks) == 200  # far more than one epoch
    assert len(real_tokens_in_order(blocks)) > 5 * len(row_tokens_sorted(rows))


def first_or_error(loader, wait_s=120):
    """next(iter(loader)) in a daemon thread: what it returned or raised, or "hung" (the bug: an
    endless epoch that never yields spins instead of raising)."""
    result = ["hung"]

    def run():
        try:
            result[0] = next(iter(loader))
        except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
            result[0] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait_s)
    return result[0]


def small_and_big_files(tmp_path):
    (tmp_path / "big.txt").write_text("".join(f"line {i} of the big file\n" for i in range(400)))
    (tmp_path / "tiny.txt").write_text("tiny\n")
    return [str(tmp_path / "big.txt"), str(tmp_path / "tiny.txt")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_endless_epoch_that_can_never_yield_a_block_raises_with_the_numbers(
    tmp_path, fast_tokenizer, num_workers
):
    """Worker 1 of 2 (or the one part, in-process) holds fewer tokens than a block: raise, not spin."""
    files = small_and_big_files(tmp_path)[1:] if num_workers == 0 else small_and_big_files(tmp_path)
    tokens = L.tokenize_stream(L.load_text_stream(data_files=files), fast_tokenizer)
    dataset = L.StreamingLMIterableDataset(tokens, BLOCK, epochs=None)
    loader = L.make_dataloader(dataset, batch_size=2, num_workers=num_workers)
    got = first_or_error(drained(loader))  # worker 0 may deliver batches first: the error must still come
    assert isinstance(got, ValueError), got
    assert re.search(r"holds 3 tokens per epoch, fewer than block_size=16.*can never yield a block", str(got))
    assert "Fix: pad_last=True" in str(got)


def drained(loader):
    """An iterator whose first item is None after the whole (endless) loader ended: never, unless
    it raises."""
    for _ in loader:
        pass
    yield None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": 1.5}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"shuffle_window": 0}, "shuffle_window"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.0}, "epochs"),
    ],
)
def test_bad_shuffle_and_epoch_settings_are_refused(kwargs, match):
    stream, _ = unique_token_stream()
    with pytest.raises(ValueError, match=match):
        L.StreamingLMIterableDataset(stream, BLOCK, **kwargs)


def test_negative_epoch_is_refused():
    dataset = L.StreamingLMIterableDataset(unique_token_stream()[0], BLOCK)
    for bad in (-1, 1.0, None):
        with pytest.raises(ValueError, match="epoch"):
            dataset.set_epoch(bad)
