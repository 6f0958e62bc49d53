"""Who reads what (parts.py, pure) and the contiguous parts it gives ranks and workers."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lab2_helpers as L
from conftest import real_tokens_in_order, real_tokens_sorted, row_tokens_sorted, unique_token_stream
from streaming_lm.parts import contiguous_run, piece_order, plan_part


@given(
    n_pieces=st.integers(0, 40),
    world_size=st.integers(1, 6),
    num_workers=st.integers(1, 4),
    weighted=st.booleans(),
    seed=st.integers(0, 3),
)
def test_every_piece_or_row_belongs_to_exactly_one_part(n_pieces, world_size, num_workers, weighted, seed):
    order = piece_order(n_pieces, shuffle=True, seed=seed, epoch=1)
    weights = list(np.random.default_rng(seed).integers(1, 100, n_pieces)) if weighted else None
    plans = [
        plan_part(order, r, world_size, w, num_workers, weights)
        for r in range(world_size)
        for w in range(num_workers)
    ]
    n_rows = 7  # rows per piece: a task keeps the rows whose index % step == offset
    owners = {}
    for part, tasks in enumerate(plans):
        for task in tasks:
            for row in range(task.row, n_rows):
                if row % task.step == task.offset:
                    assert (task.piece, row) not in owners, (
                        f"{(task.piece, row)} read by parts {owners[(task.piece, row)]} and {part}"
                    )
                    owners[(task.piece, row)] = part
    assert len(owners) == n_pieces * n_rows
    if n_pieces >= world_size * num_workers:  # enough pieces: whole pieces only, every part busy
        assert all(tasks and all(t.step == 1 for t in tasks) for tasks in plans)


def test_runs_are_contiguous_in_the_order_and_balanced():
    order = piece_order(33, shuffle=True, seed=0, epoch=0)
    runs = [contiguous_run(order, 4, i) for i in range(4)]
    assert list(itertools.chain(*runs)) == order
    assert {len(r) for r in runs} == {8, 9}
    weights = [1] * 30 + [100, 100, 100]  # three heavy pieces at the end of the order
    heavy = [contiguous_run(list(range(33)), 3, i, weights) for i in range(3)]
    assert list(itertools.chain(*heavy)) == list(range(33))
    assert [sum(weights[p] for p in run) for run in heavy] == [130, 100, 100]


def test_piece_order_depends_on_seed_and_epoch_only():
    assert piece_order(10) == list(range(10))
    assert piece_order(10, shuffle=True, seed=1, epoch=2) == piece_order(10, shuffle=True, seed=1, epoch=2)
    assert piece_order(10, shuffle=True, seed=1, epoch=2) != piece_order(10, shuffle=True, seed=1, epoch=3)
    assert piece_order(10, shuffle=True, seed=1, epoch=2) != piece_order(10, shuffle=True, seed=2, epoch=2)


def test_ranks_get_whole_consecutive_rows_of_the_stream():
    """3 ranks on 6 pieces of 10 rows: each rank's tokens are whole pieces, in order, never every n-th row."""
    stream, rows = unique_token_stream(n_rows=60, num_shards=6)
    for rank in range(3):
        dataset = L.StreamingLMIterableDataset(stream, 16, pad_last=True, rank=rank, world_size=3)
        got = real_tokens_in_order(dataset)
        expected = [t for row in rows[rank * 20 : rank * 20 + 20] for t in row]  # pieces 2r and 2r+1
        assert got == expected


def test_bundled_sample_parts_start_at_an_article(tokenizer):
    """Row groups hold whole articles: every part of 3 ranks x 2 workers opens with an EOS."""
    tokens = L.tokenize_stream(L.load_text_stream("local"), tokenizer)
    for rank in range(3):
        dataset = L.StreamingLMIterableDataset(tokens, pad_last=True, rank=rank, world_size=3)
        assert all(t.step == 1 for t in dataset.dealing("main", 2).plan(0, rank, 0))  # whole pieces
        loader = iter(L.make_dataloader(dataset, batch_size=1, num_workers=2))
        first_of_each_worker = [next(loader)["input_ids"][0, 0] for _ in range(2)]  # workers take turns
        assert first_of_each_worker == [L.EOS_TOKEN_ID] * 2


def test_fewer_pieces_than_parts_warns_once_with_the_fix_and_stays_exact(caplog):
    stream, rows = unique_token_stream(num_shards=1)
    with caplog.at_level("WARNING"):
        parts = [
            real_tokens_sorted(L.StreamingLMIterableDataset(stream, 16, pad_last=True, rank=r, world_size=2))
            for r in range(2)
        ]
    assert sorted(parts[0] + parts[1]) == row_tokens_sorted(rows) and all(parts)
    warnings = [r.getMessage() for r in caplog.records if "piece(s)" in r.getMessage()]
    assert len(warnings) == 1 and "more files, or parquet" in warnings[0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_more_ranks_than_workers_than_pieces_still_cover_the_stream(world_size):
    stream, rows = unique_token_stream(num_shards=3)
    batches = []
    for rank in range(world_size):
        dataset = L.StreamingLMIterableDataset(stream, 16, pad_last=True, rank=rank, world_size=world_size)
        batches += list(L.make_dataloader(dataset, batch_size=4, num_workers=2))
    assert real_tokens_sorted(batches) == row_tokens_sorted(rows)
