"""Step 4: the IterableDataset, exactly once across workers, ranks and resumes (token accounting).

Most tests stream unique token ids (conftest.unique_token_stream), so a token seen twice or never
is caught by comparing sorted lists, not by eye.
"""

import numpy as np
import pytest
import torch

import lab2_helpers as L
from conftest import (
    WIKI_ROWS,
    real_tokens_sorted,
    row_tokens_sorted,
    text_stream,
    unique_token_stream,
)

BLOCK = 16
# 3 workers on a 2-core machine is on purpose here (more workers than cores or shards must stay exact)
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def batches_of(dataset, num_workers, batch_size=4):
    return list(L.make_dataloader(dataset, batch_size=batch_size, num_workers=num_workers))


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_workers_read_every_token_exactly_once(num_workers):
    stream, rows = unique_token_stream()
    batches = batches_of(L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True), num_workers)
    assert real_tokens_sorted(batches) == row_tokens_sorted(rows)
    assert all(b["input_ids"].shape[1] == BLOCK for b in batches)


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_without_padding_workers_lose_only_their_own_tail(num_workers):
    stream, rows = unique_token_stream()
    got = real_tokens_sorted(batches_of(L.StreamingLMIterableDataset(stream, BLOCK), num_workers))
    assert len(got) == len(set(got))  # nothing twice
    assert set(got) <= set(row_tokens_sorted(rows))
    assert len(row_tokens_sorted(rows)) - len(got) < num_workers * BLOCK  # < one block per part


def test_two_workers_do_not_duplicate_data_unlike_a_naive_wrapper():
    stream, rows = unique_token_stream()
    naive = real_tokens_sorted(batches_of(L.NaiveDataset(rows, BLOCK), num_workers=2))
    assert len(naive) == 2 * len(row_tokens_sorted(rows))  # the accounting catches the duplicate-data bug
    ours = real_tokens_sorted(
        batches_of(L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True), num_workers=2)
    )
    assert ours == row_tokens_sorted(rows)


def test_workers_share_the_shards():
    stream, rows = unique_token_stream()
    loader = L.make_dataloader(
        L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True), batch_size=4, num_workers=2
    )
    batches = list(loader)
    parts = L.progress_by_part(loader.state_dict())
    assert [p["worker"] for p in parts] == [0, 1]
    assert all(p["tokens"] > 0 for p in parts)
    assert sum(p["tokens"] for p in parts) == len(row_tokens_sorted(rows)) == len(real_tokens_sorted(batches))


def test_more_workers_than_shards_stay_exactly_once():
    stream, rows = unique_token_stream(num_shards=1)
    batches = batches_of(L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True), num_workers=2)
    assert real_tokens_sorted(batches) == row_tokens_sorted(rows)


@pytest.mark.parametrize("world_size, num_workers", [(2, 0), (3, 0), (2, 2), (3, 2), (4, 0)])
def test_ranks_read_disjoint_parts_that_cover_the_stream(world_size, num_workers):
    stream, rows = unique_token_stream()  # 6 shards: by shard for 2 and 3 ranks, by row for 4
    per_rank = [
        real_tokens_sorted(
            batches_of(
                L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True, rank=r, world_size=world_size),
                num_workers,
            )
        )
        for r in range(world_size)
    ]
    assert all(per_rank)  # no rank is empty
    assert sorted(t for part in per_rank for t in part) == row_tokens_sorted(rows)


def test_plain_iterables_are_split_by_row_over_ranks_and_workers():
    _, rows = unique_token_stream()
    per_rank = [
        real_tokens_sorted(
            batches_of(L.StreamingLMIterableDataset(rows, BLOCK, pad_last=True, rank=r, world_size=2), 2)
        )
        for r in range(2)
    ]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == row_tokens_sorted(rows)


def test_ranks_of_the_bundled_sample_are_never_empty(tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("local"), tokenizer)
    total = sum(len(r["input_ids"]) for r in tokens)
    for world_size in (2, 3, 4, 8):
        parts = [
            L.StreamingLMIterableDataset(tokens, rank=r, world_size=world_size, pad_last=True)
            for r in range(world_size)
        ]
        counts = [len(real_tokens_sorted(part)) for part in parts]
        assert min(counts) > 0 and sum(counts) == total


def test_rank_and_world_size_are_checked():
    stream, _ = unique_token_stream()
    for rank, world_size in [(2, 2), (-1, 2), (0, 0), (1, None), (0.5, 2)]:
        with pytest.raises(ValueError, match="rank|world_size"):
            L.StreamingLMIterableDataset(stream, BLOCK, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="block_size"):
        L.StreamingLMIterableDataset(stream, 0)


def test_rank_and_world_size_come_from_torch_distributed(monkeypatch):
    """Rank 1 of 2, where the no-distributed fallback (0 of 1) would give another answer."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dataset = L.StreamingLMIterableDataset(unique_token_stream()[0], BLOCK)
    assert (dataset.rank, dataset.world_size) == (1, 2)


# ----------------------------------------------------------------------------- resume
def text_dataset(tokenizer, **kwargs):
    rows = WIKI_ROWS * 8 + [f"Document number {i} has some words." for i in range(40)]
    return L.StreamingLMIterableDataset(
        L.tokenize_stream(text_stream(rows, num_shards=4), tokenizer), BLOCK, pad_last=True, **kwargs
    )


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_where_the_checkpoint_was(tokenizer, num_workers):
    full = list(L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=num_workers))
    assert len(full) > 6
    for k in (1, len(full) // 2, len(full) - 1, len(full)):
        loader = L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=num_workers)
        it = iter(loader)
        head = [next(it) for _ in range(k)]
        state = loader.state_dict()
        del it, loader  # the "crash"
        fresh = L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=num_workers)
        fresh.load_state_dict(state)
        assert_same_batches(head + list(fresh), full)


def test_resume_survives_a_save_restore_chain(tokenizer):
    full = list(L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=2))
    got, state = [], None
    for stop in (2, 5, len(full)):
        loader = L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=2)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        got += [next(it) for _ in range(stop - len(got))]
        state = loader.state_dict()
    assert_same_batches(got, full)


def test_resume_of_a_plain_iterable_mid_row():
    _, rows = unique_token_stream()
    full = list(L.make_dataloader(L.StreamingLMIterableDataset(rows, BLOCK), batch_size=3))
    loader = L.make_dataloader(L.StreamingLMIterableDataset(rows, BLOCK), batch_size=3)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    fresh = L.make_dataloader(L.StreamingLMIterableDataset(rows, BLOCK), batch_size=3)
    fresh.load_state_dict(loader.state_dict())
    assert_same_batches(head + list(fresh), full)


def test_dataset_state_holds_the_position_of_the_next_token_not_tokens():
    stream, rows = unique_token_stream()
    dataset = L.StreamingLMIterableDataset(stream, BLOCK)
    first = next(iter(dataset))
    tokens = row_tokens_sorted(rows)
    assert first["input_ids"].tolist() == tokens[:BLOCK]
    (part,) = dataset.state_dict()["parts"]
    state = part["sources"]["main"]
    assert state["blocks"] == 1 and state["tokens"] == BLOCK
    piece, row, token = state["next"]  # token BLOCK of the stream: find it by counting
    lengths = [len(r) for r in rows]
    before = sum(lengths[:row])  # the 6 pieces of 10 rows: piece 0 holds rows 0-9
    assert piece == 0 and before + token == BLOCK and token < lengths[row]
    assert "carry" not in state  # no tokens in a checkpoint: a resume reads them again


def test_a_second_pass_after_resume_starts_from_the_beginning():
    stream, rows = unique_token_stream()
    dataset = L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True)
    it = iter(dataset)
    next(it)
    state = dataset.state_dict()
    resumed = L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == len(list(dataset)) - 1
    assert real_tokens_sorted(collate(list(resumed))) == row_tokens_sorted(rows)


def collate(blocks):
    return [L.collate_fn(blocks)]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"block_size": 32}, "settings.block_size: saved 16, now 32"),
        ({"shuffle": True}, "settings.shuffle: saved False, now True"),
        ({"epochs": None}, "settings.epochs: saved 1, now None"),
    ],
)
def test_state_from_another_configuration_is_refused(change, match):
    stream, _ = unique_token_stream()
    dataset = L.StreamingLMIterableDataset(stream, BLOCK)
    next(iter(dataset))
    state = dataset.state_dict()
    other = L.StreamingLMIterableDataset(stream, **{"block_size": BLOCK, **change})
    with pytest.raises(ValueError, match=match) as err:
        other.load_state_dict(state)
    assert "may change: world_size" in str(err.value)  # the message says what may change


def test_state_from_another_source_is_refused(tokenizer):
    stream, _ = unique_token_stream()
    dataset = L.StreamingLMIterableDataset(stream, BLOCK)
    other = L.StreamingLMIterableDataset(L.tokenize_stream(L.load_text_stream("local"), tokenizer), BLOCK)
    with pytest.raises(ValueError, match=r"settings\.sources\.main\.identity\.name"):
        other.load_state_dict(dataset.state_dict())


@pytest.mark.parametrize("per_transfer", [1, 4])
def test_resume_is_exact_whatever_the_batches_per_transfer(tokenizer, per_transfer):
    """Workers ship several batches at a time; a state taken between them is still exact."""
    full = list(L.make_dataloader(text_dataset(tokenizer), batch_size=4, num_workers=2))
    for k in (1, 5, 7):
        loader = L.make_dataloader(
            text_dataset(tokenizer), batch_size=4, num_workers=2, transfer_batches=per_transfer
        )
        it = iter(loader)
        head = [next(it) for _ in range(k)]
        fresh = L.make_dataloader(
            text_dataset(tokenizer), batch_size=4, num_workers=2, transfer_batches=per_transfer
        )
        fresh.load_state_dict(loader.state_dict())
        assert_same_batches(head + list(fresh), full)


def test_a_users_collate_fn_and_dataloader_arguments_pass_through():
    stream, rows = unique_token_stream()
    seen = []

    def my_collate(blocks):
        seen.append(len(blocks))
        return {"ids": torch.as_tensor(np.stack([b["input_ids"] for b in blocks]))}

    for workers in (0, 2):
        loader = L.make_dataloader(
            L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True),
            batch_size=4,
            num_workers=workers,
            collate_fn=my_collate,
            timeout=60 if workers else 0,
        )
        batches = list(loader)
        assert all(set(b) == {"ids"} for b in batches)
        assert sorted(
            t for b in batches for t in b["ids"].reshape(-1).tolist() if t != L.EOS_TOKEN_ID
        ) == row_tokens_sorted(rows)
    assert seen and max(seen) == 4


def test_batch_size_and_drop_last_are_what_was_given_and_drop_last_is_reported(caplog):
    stream, rows = unique_token_stream()
    loader = L.make_dataloader(
        L.StreamingLMIterableDataset(stream, BLOCK, pad_last=True), batch_size=5, drop_last=True
    )
    assert (loader.batch_size, loader.drop_last) == (5, True)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert all(b["input_ids"].shape == (5, BLOCK) for b in batches)
    held = loader.not_yielded["tokens"]
    assert held > 0 and len(real_tokens_sorted(batches)) + held == len(row_tokens_sorted(rows))
    assert "drop_last=True" in caplog.text
