"""Step 3: the rolling buffer, by token accounting."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lab2_helpers as L
from conftest import real_tokens_in_order
from streaming_lm.packing import RollingBuffer

PAD = 10**6  # a pad id no generated token can take (the tests pass vocab_size=PAD + 1)


def test_blocks_concatenate_to_the_token_stream():
    docs = [list(range(0, 300)), list(range(300, 310)), list(range(310, 700))]  # 700 tokens
    blocks = list(L.group_texts_streaming(docs, block_size=256))
    assert len(blocks) == 2
    assert all(len(b["input_ids"]) == len(b["attention_mask"]) == 256 for b in blocks)
    assert real_tokens_in_order(blocks) == list(
        range(512)
    )  # the final 188 tokens are dropped (pad_last=False)


def test_pad_last_keeps_the_tail_with_mask_zero():
    docs = [[1] * 300, [2] * 100]
    *full, last = L.group_texts_streaming(docs, block_size=256, pad_last=True, pad_token_id=0)
    assert len(full) == 1
    assert last["input_ids"].tolist() == [1] * 44 + [2] * 100 + [0] * 112
    assert list(last["attention_mask"]) == [1] * 144 + [0] * 112


def test_a_stream_that_fills_blocks_exactly_has_no_padded_block():
    blocks = list(L.group_texts_streaming([[7] * 128] * 4, block_size=256, pad_last=True))
    assert len(blocks) == 2 and all(b["attention_mask"].all() for b in blocks)


def test_dropped_tail_is_counted_and_logged(caplog):
    packer = RollingBuffer(block_size=4)
    assert packer.push(np.array([1, 2, 3, 4, 5, 6])).tolist() == [[1, 2, 3, 4]]
    assert packer.finish(pad_last=False) is None and packer.dropped == 2
    with caplog.at_level("WARNING"):
        assert len(list(L.group_texts_streaming([[1, 2, 3], [4, 5, 6]], block_size=4))) == 1
    assert "dropped the final 2 tokens" in caplog.text and "pad_last=True" in caplog.text


def test_rows_may_be_dicts_lists_arrays_or_tensors():
    rows = [{"input_ids": [1, 2]}, [3, 4], np.array([5, 6]), torch.tensor([7, 8])]
    (block,) = L.group_texts_streaming(rows, block_size=8)
    assert block["input_ids"].tolist() == list(range(1, 9)) and block["input_ids"].dtype == np.int64


def test_empty_rows_and_empty_stream_yield_nothing():
    assert list(L.group_texts_streaming([], block_size=4, pad_last=True)) == []
    assert list(L.group_texts_streaming([[], [], []], block_size=4, pad_last=True)) == []


@pytest.mark.parametrize("bad", [0, -1, 2.5, "256", None, True])
def test_bad_block_size_is_refused(bad):
    with pytest.raises(ValueError, match="block_size"):
        L.group_texts_streaming([[1, 2, 3]], block_size=bad)


def test_row_without_input_ids_is_named():
    with pytest.raises(ValueError, match=r"row 1 has no 'input_ids' \(keys: \['text'\]\)"):
        list(L.group_texts_streaming([{"input_ids": [1]}, {"text": "x"}], block_size=2))


def test_carry_is_the_read_but_unemitted_tokens():
    rows = [list(range(i * 100, i * 100 + 37)) for i in range(60)]
    packer, emitted, read = RollingBuffer(block_size=16), [], []
    for row in rows:
        read += row
        emitted += packer.push(np.array(row)).reshape(-1).tolist()
        assert emitted + packer.carry().tolist() == read  # every token read is emitted or carried
        assert packer.pushed - packer.emitted == len(packer.carry()) < 16
    last = packer.finish(pad_last=True)
    assert emitted + last["input_ids"][last["attention_mask"] == 1].tolist() == read


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=40),
    block_size=st.integers(min_value=1, max_value=300),
    pad_last=st.booleans(),
)
def test_every_token_lands_in_exactly_one_block_in_order(lengths, block_size, pad_last):
    tokens = np.arange(sum(lengths))
    docs = np.split(tokens, np.cumsum(lengths)[:-1]) if lengths else []
    blocks = list(
        L.group_texts_streaming(
            [d.tolist() for d in docs], block_size, pad_last=pad_last, pad_token_id=PAD, vocab_size=PAD + 1
        )
    )
    assert all(len(b["input_ids"]) == len(b["attention_mask"]) == block_size for b in blocks)
    kept = len(tokens) if pad_last else len(tokens) // block_size * block_size
    assert real_tokens_in_order(blocks) == tokens[:kept].tolist()
    padded = [b for b in blocks if not b["attention_mask"].all()]
    assert len(padded) == (1 if pad_last and len(tokens) % block_size else 0)
    assert all((b["input_ids"][b["attention_mask"] == 0] == PAD).all() for b in padded)
