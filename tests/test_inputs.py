"""Every input named: what a library would fail on with its own error either works or ends in ours,
naming the file, the column and the row."""

import decimal
import fractions
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lab2_helpers as L

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def tokens_through(files, tokenizer, workers=2, **kwargs):
    stream = L.tokenize_stream(L.load_text_stream(data_files=[str(f) for f in files], **kwargs), tokenizer)
    loader = L.make_dataloader(L.StreamingLMIterableDataset(stream, 16, pad_last=True), num_workers=workers)
    return sum(int(b["attention_mask"].sum()) for b in loader)


def expected_tokens(texts, tokenizer):
    return sum(len(tokenizer.encoding.encode_ordinary(t)) + 1 for t in texts if t)


def test_parquet_text_stored_as_a_dictionary_or_as_bytes_is_text(tmp_path, fast_tokenizer):
    texts = ["the whale", "a ship at sea", "the whale"] * 10
    pd.DataFrame({"text": pd.Categorical(texts)}).to_parquet(tmp_path / "categorical.parquet")
    pq.write_table(
        pa.table({"text": pa.array([t.encode() for t in texts], pa.binary())}), tmp_path / "bytes.parquet"
    )
    pq.write_table(pa.table({"text": texts}), tmp_path / "plain.parquet")
    files = sorted(tmp_path.glob("*.parquet"))
    assert tokens_through(files, fast_tokenizer) == 3 * expected_tokens(texts, fast_tokenizer)


@pytest.mark.parametrize(
    "column, shown",
    [(pa.array(list(range(12))), "int64"), (pa.array([["a", "b"]] * 12), "list<element: string>")],
    ids=["int64", "list<string>"],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_parquet_column_that_is_not_text_names_the_file_column_and_row(
    tmp_path, fast_tokenizer, column, shown, workers
):
    pq.write_table(pa.table({"body": column}), tmp_path / "numbers.parquet")
    with pytest.raises(
        ValueError,
        match=re.escape(f"numbers.parquet (row group 0), column 'body' holds {shown}, not text (row 0"),
    ):
        tokens_through([tmp_path / "numbers.parquet"], fast_tokenizer, workers, text_column="body")


def test_bytes_that_are_not_utf8_name_their_row(tmp_path, fast_tokenizer):
    rows = [b"fine", b"also fine", b"\xff\xfe bad"]
    pq.write_table(pa.table({"text": pa.array(rows, pa.binary())}), tmp_path / "bytes.parquet")
    with pytest.raises(
        ValueError, match=r"bytes\.parquet \(row group 0\), column 'text', row 2: not valid UTF-8"
    ):
        tokens_through([tmp_path / "bytes.parquet"], fast_tokenizer, 0)


def test_a_number_in_a_jsonl_text_key_names_its_line_on_every_path(tmp_path, fast_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": 7 if i == 1500 else f"row {i}"}) + "\n" for i in range(1600)))
    said = re.escape(f"data file {path}, line 1501 (row 1500), key 'text': a number 7, not text")
    with pytest.raises(ValueError, match=said):
        tokens_through([path], fast_tokenizer)
    tokens = L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer)
    with pytest.raises(ValueError, match=said):  # the lab's step 3 iterates the rows
        list(L.group_texts_streaming(tokens))


def test_a_json_array_file_takes_its_text_column(tmp_path, fast_tokenizer):
    texts = [f"document {i} of the array" for i in range(6)]
    (tmp_path / "docs.json").write_text(json.dumps([{"content": t, "id": i} for i, t in enumerate(texts)]))
    assert tokens_through(
        [tmp_path / "docs.json"], fast_tokenizer, 0, text_column="content"
    ) == expected_tokens(texts, fast_tokenizer)


def test_a_jsonl_file_without_the_text_key_is_named_with_its_keys(tmp_path, fast_tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(3)))
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(3))
    )
    with pytest.raises(
        ValueError,
        match=r"b\.jsonl: no line has the key 'content' \(its first line's keys: \['id', 'text'\]\)",
    ):
        tokens_through([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], fast_tokenizer, text_column="content")


@pytest.mark.parametrize("bad", [None, 0, -1, 2.5, "8", True])
def test_a_batch_size_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
        L.make_dataloader(L.StreamingLMIterableDataset([[1, 2, 3]] * 4, 2), batch_size=bad)


def test_position_ids_with_a_users_collate_fn_is_refused_not_dropped():
    with pytest.raises(ValueError, match=r"position_ids=True.*your own collate_fn.*document_positions"):
        L.make_dataloader(
            L.StreamingLMIterableDataset([[1, 2, 3]] * 4, 2), collate_fn=list, position_ids=True
        )


@pytest.mark.parametrize(
    "streams, match",
    [
        ({"": ([[1]], 1.0)}, "non-empty strings"),
        ({"a": ("text", 1.0)}, "must be a token stream"),
        ({"a": (None, 1.0)}, "must be a token stream"),
    ],
)
def test_a_mixture_of_an_empty_name_a_string_or_none_is_refused_at_once(streams, match):
    with pytest.raises(ValueError, match=match):
        L.mix_streams(streams)


@pytest.mark.parametrize(
    "weight", [np.float32(0.3), np.int64(3), fractions.Fraction(3, 10), decimal.Decimal("0.3")]
)
def test_any_positive_real_weight_is_a_weight(weight):
    mixture = L.mix_streams({"a": ([[1, 2]], weight), "b": ([[3, 4]], 0.7)})
    assert abs(sum(mixture.weights.values()) - 1) < 1e-9 and mixture.weights["a"] > 0


def test_weights_that_sum_to_infinity_are_refused():
    with pytest.raises(ValueError, match="the weights sum to inf"):
        L.mix_streams({"a": ([[1]], 1e308), "b": ([[2]], 1e308)})


def test_a_part_that_can_never_yield_a_block_with_pad_last_on_is_not_told_to_turn_it_on():
    dataset = L.StreamingLMIterableDataset([[]], 4, pad_last=True, epochs=None)  # one empty row: no text
    with pytest.raises(ValueError, match="holds 0 tokens per epoch") as err:
        next(iter(dataset))
    assert "pad_last=True," not in str(err.value) and "even with pad_last=True" in str(err.value)


# ----------------------------------------------------------------- long documents: memory
def test_threaded_encoding_frees_its_results_without_waiting_for_the_garbage_collector(fast_tokenizer):
    import gc
    import time
    import weakref

    fast_tokenizer.threads = lambda: 2  # the pool's path, whatever this machine's cores
    texts = [" call me Ishmael" * 2_000 for _ in range(8)]
    gc.disable()  # a reference cycle would keep each batch's ids until the next collection
    try:
        encoded = fast_tokenizer.submit_flat(texts)
        ids, _ = encoded.result()
        assert len(ids) > 0
        freed = weakref.ref(encoded)
        del encoded
        deadline = time.monotonic() + 10  # the pool thread drops its work item just after the result
        while freed() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert freed() is None
    finally:
        gc.enable()
        del fast_tokenizer.threads


def test_the_layout_peek_holds_the_ends_of_a_batch_of_long_rows_not_fifty_whole_rows(
    tmp_path, fast_tokenizer
):
    path = tmp_path / "long.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"document {i} " + "words " * 200_000}) + "\n" for i in range(60))
    )
    stream = L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer)
    first = stream.first_texts(50)
    assert 0 < len(first) < 10  # one tokenizing batch of 1.2 MB rows, not 50 of them
    assert all(len(t) <= 128 and t.startswith("document ") for t in first)
    assert stream.rule == ("rows", stream.rule[1]) and "auto" in stream.rule[1]
