"""Any corpus (local half of issue 19): damaged files named with their line or row group, lines split
on "\\n" only, a file named twice read once, the text column, and WikiText copies found by "auto".
The Hub half (other repos and configs over the loopback stand-in) is in test_hub.py."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lab2_helpers as L
from streaming_lm import config as C

EOS = L.EOS_TOKEN_ID
SAMPLE_TRAIN = sorted((C.SAMPLE_DIR / "wikitext-103-v1").glob("train-*.parquet"))


def write_jsonl_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(lines))
    return path


def damaged_txt(tmp_path):
    return write_jsonl_lines(tmp_path / "notes.txt", [b"fine\n", b"also fine\n", b"bad \xff\xfe here\n"])


def damaged_jsonl_bytes(tmp_path):
    good = [json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(3)]
    return write_jsonl_lines(tmp_path / "docs.jsonl", [*good, b'{"text": "\xff"}\n'])


def truncated_jsonl(tmp_path):
    good = [json.dumps({"text": f"row {i} of a longer file"}).encode() + b"\n" for i in range(400)]
    return write_jsonl_lines(tmp_path / "cut.jsonl", [*good, b'{"text": "cut off in the mid'])


def damaged_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4000)]}), path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = meta.data_page_offset + 40  # inside row group 2's data page, after its header
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))
    return path


DAMAGED = [
    (damaged_txt, r"notes\.txt, line 3: not valid UTF-8 .*re-save the file as UTF-8"),
    (damaged_jsonl_bytes, r"docs\.jsonl, line 4: not valid UTF-8 .*fix or remove that line"),
    (truncated_jsonl, r"cut\.jsonl, line 401: not valid JSON .*fix or remove that line"),
    (damaged_parquet, r"rows\.parquet \(row group 2\): .*re-create it, or leave it out of data_files"),
]


@pytest.mark.parametrize("make, match", DAMAGED, ids=["txt-utf8", "jsonl-utf8", "jsonl-cut", "parquet"])
def test_a_damaged_file_is_named_with_its_line_or_row_group(tmp_path, fast_tokenizer, make, match):
    files = str(make(tmp_path))
    with pytest.raises(ValueError, match=match):
        list(L.load_text_stream(data_files=files))  # the rows, as a student reads them in step 1
    for layout in ("auto", "rows"):  # the layout peek, and the pipeline's own reader
        stream = L.tokenize_stream(L.load_text_stream(data_files=files), fast_tokenizer, layout=layout)
        with pytest.raises(ValueError, match=match):
            list(L.StreamingLMIterableDataset(stream, block_size=8))


def test_a_damaged_file_is_named_from_a_dataloader_worker_too(tmp_path, fast_tokenizer):
    stream = L.tokenize_stream(L.load_text_stream(data_files=str(truncated_jsonl(tmp_path))), fast_tokenizer)
    loader = L.make_dataloader(
        L.StreamingLMIterableDataset(stream, block_size=8), batch_size=2, num_workers=1
    )
    with pytest.raises(ValueError, match=r"cut\.jsonl, line 401: not valid JSON"):
        list(loader)


def test_text_lines_end_at_newline_only_and_keep_it(tmp_path, fast_tokenizer):
    path = tmp_path / "old_mac.txt"
    path.write_text("one\rstill the first line\r\nsecond\n\x0bthird\u2028same line\n", newline="")
    texts = [row["text"] for row in L.load_text_stream(data_files=str(path))]
    assert texts == ["one\rstill the first line\r\n", "second\n", "\x0bthird\u2028same line\n"]
    rows = list(L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer))
    expected = [[EOS] + fast_tokenizer(t)["input_ids"] for t in texts]
    assert [list(r["input_ids"]) for r in rows] == expected


def test_a_file_named_twice_is_read_once_and_said(tmp_path, caplog):
    path = tmp_path / "docs.txt"
    path.write_text("a\nb\n")
    with caplog.at_level("WARNING"):
        stream = L.load_text_stream(
            data_files=[str(path), str(tmp_path / "." / "docs.txt"), str(tmp_path / "*.txt")]
        )
    assert [row["text"] for row in stream] == ["a\n", "b\n"]
    assert any("twice" in r.getMessage() and "read once" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_the_text_column_of_local_files_is_renamed_to_text(tmp_path, fast_tokenizer, suffix):
    records = [{"id": i, "story": f"Story number {i}.\n"} for i in range(5)]
    path = tmp_path / f"stories{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    stream = L.load_text_stream(data_files=str(path), text_column="story")
    assert stream.column_names == ["text"]
    assert [row["text"] for row in stream] == [r["story"] for r in records]
    blocks = list(L.StreamingLMIterableDataset(L.tokenize_stream(stream, fast_tokenizer), block_size=1))
    expected = [t for r in records for t in [EOS] + fast_tokenizer(r["story"])["input_ids"]]
    assert [int(b["input_ids"][0]) for b in blocks] == expected
    with pytest.raises(ValueError, match=r"no 'body' column in .*stories.*'id', 'story'"):
        L.load_text_stream(data_files=str(path), text_column="body")


def wikitext2_rows(sample_rows: list[str]) -> int:
    """The number of articles among WikiText rows: ' = Title = ' headings (not ' = = Section = = ')."""
    return sum(1 for r in sample_rows if r.startswith(" = ") and not r.startswith(" = = "))


@pytest.mark.parametrize("folder", ["wikitext-2-raw-v1", "my_copy"])
def test_a_local_wikitext2_copy_gets_one_eos_per_article_and_no_warning(
    tmp_path, fast_tokenizer, folder, caplog
):
    """By the config folder's name (the Hub's layout), or by its first rows (any folder)."""
    copy = tmp_path / folder
    copy.mkdir()
    for i, path in enumerate(SAMPLE_TRAIN):
        shutil.copy(path, copy / f"train-0000{i}-of-0000{len(SAMPLE_TRAIN)}.parquet")
    texts = pq.read_table(SAMPLE_TRAIN, columns=["text"]).column("text").to_pylist()
    stream = L.load_text_stream(data_files=str(copy / "*.parquet"))
    with caplog.at_level("WARNING"):
        tokens = L.tokenize_stream(stream, fast_tokenizer)
        rows = list(tokens)
    eos = sum(int(np.count_nonzero(np.asarray(r["input_ids"]) == EOS)) for r in rows)
    assert eos == wikitext2_rows(texts) > 0
    assert len(rows) == sum(1 for t in texts if t)  # blank rows give nothing, and are not counted lost
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    why = "the source is WikiText" if folder.startswith("wikitext") else "heading and"
    assert "wikitext" in tokens.description and why in tokens.description
