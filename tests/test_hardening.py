"""No silent surprises: every row, file and checkpoint either works or says why (one test or more
per numbered point of the hardening issue)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lab2_helpers as L
from conftest import real_tokens_sorted, unique_token_stream
from streaming_lm import config as C

EOS = L.EOS_TOKEN_ID


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# 1. documents in users' files ------------------------------------------------------------------
def test_user_jsonl_and_txt_rows_are_one_document_each_by_default(tmp_path, fast_tokenizer):
    jsonl = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": f"Document {i} ends in a newline.\n"} for i in range(3)]
    )
    txt = tmp_path / "docs.txt"
    txt.write_text("first document\nsecond document\nthird document\n")
    for path in (jsonl, txt):
        rows = list(L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer))
        assert [int(r["input_ids"][0]) for r in rows] == [EOS] * 3, path.suffix
        assert sum(list(r["input_ids"]).count(EOS) for r in rows) == 3
    asked = L.tokenize_stream(L.load_text_stream(data_files=str(jsonl)), fast_tokenizer, layout="wikitext")
    assert all(EOS not in list(r["input_ids"]) for r in asked)  # no heading rows: one running text


# 2. rows lost without a word ---------------------------------------------------------------------
def test_rows_whose_text_sits_under_another_key_are_counted_and_reported(tmp_path, fast_tokenizer, caplog):
    records = [{"text": "kept"}, {"Text": "lost"}, {"text": "kept too"}, {"body": "lost"}]
    stream = L.load_text_stream(data_files=str(write_jsonl(tmp_path / "mixed.jsonl", records)))
    with caplog.at_level("WARNING"):
        blocks = list(L.group_texts_streaming(L.tokenize_stream(stream, fast_tokenizer), block_size=1))
    kept = fast_tokenizer(["kept", "kept too"])["input_ids"]
    assert len(blocks) == sum(len(ids) + 1 for ids in kept)  # each kept row with its EOS, nothing else
    (message,) = [r.getMessage() for r in caplog.records if "gave no tokens" in r.getMessage()]
    assert message.startswith("2 of 4 rows gave no tokens") and "the first is row 1" in message


def test_a_one_shot_source_loses_no_row_to_a_column_peek(fast_tokenizer):
    rows = iter([{"text": f"row {i}"} for i in range(5)])  # can be read once only
    stream = datasets.IterableDataset.from_generator(lambda: rows)
    tokens = L.tokenize_stream(stream, fast_tokenizer, separate_documents=False)
    assert [fast_tokenizer.decode(r["input_ids"]) for r in tokens] == [f"row {i}" for i in range(5)]


# 3. errors that name the file, row and field ---------------------------------------------------
def test_empty_files_and_directories_are_named(tmp_path):
    for name in ("empty.jsonl", "empty.parquet"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match=f"{name} is empty"):
            L.load_text_stream(data_files=str(tmp_path / name))
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="folder is a directory"):
        L.load_text_stream(data_files=str(tmp_path / "folder"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet"):
        L.load_text_stream(data_files=str(tmp_path / "broken.parquet"))


def test_a_lone_surrogate_fails_the_same_clear_way_on_both_backends(tokenizer, fast_tokenizer):
    for tok in (tokenizer, fast_tokenizer):
        stream = datasets.IterableDataset.from_generator(
            lambda: iter([{"text": "fine"}, {"text": "bad \ud800 here"}])
        )
        with pytest.raises(
            ValueError, match=r"row 1, column 'text': not valid Unicode text \(\\ud800 at character 4"
        ):
            list(L.tokenize_stream(stream, tok))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: L.tokenize_stream(L.load_text_stream("local"), None), TypeError, "tokenizer must be"),
        (
            lambda: L.tokenize_stream(L.load_text_stream("local"), L.load_tokenizer(), batch_rows=0),
            ValueError,
            "batch_rows",
        ),
        (
            lambda: list(L.group_texts_streaming([[1]], pad_last=True, pad_token_id=50257)),
            ValueError,
            "pad_token_id",
        ),
        (
            lambda: list(L.group_texts_streaming([[1]], pad_last=True, pad_token_id=-1)),
            ValueError,
            "pad_token_id",
        ),
        (lambda: L.StreamingLMIterableDataset([], 2**31), ValueError, "block_size must be at most 1,048,576"),
        (lambda: list(L.group_texts_streaming([[1, 2], [3, -4]], 2)), ValueError, "row 1: token id -4"),
        (lambda: list(L.group_texts_streaming([[1, 2], [50257]], 2)), ValueError, "row 1: token id 50257"),
        (
            lambda: list(L.group_texts_streaming([[1, 2.5]], 2)),
            ValueError,
            "row 0: token ids must be integers",
        ),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(call, error, match):
    with pytest.raises(error, match=match):
        call()


# 4. checkpoints that cannot resume the wrong thing ---------------------------------------------
def write_corpus(folder, n_files=4, text="a few words of text"):
    folder.mkdir(exist_ok=True)
    for k in range(n_files):
        pq.write_table(
            pa.table({"text": [f"{text} {k} {i}" for i in range(40)]}), folder / f"part-{k}.parquet"
        )
    return sorted(str(p) for p in folder.glob("*.parquet"))


def state_after_two_blocks(files, tokenizer, **kwargs):
    dataset = L.StreamingLMIterableDataset(
        L.tokenize_stream(L.load_text_stream(data_files=files), tokenizer, **kwargs), 16
    )
    it = iter(dataset)
    next(it), next(it)
    return dataset.state_dict()


def dataset_on(files, tokenizer, **kwargs):
    return L.StreamingLMIterableDataset(
        L.tokenize_stream(L.load_text_stream(data_files=files), tokenizer, **kwargs), 16
    )


def test_checkpoint_refuses_swapped_or_edited_files_and_other_tokenizing(tmp_path, fast_tokenizer):
    files = write_corpus(tmp_path / "corpus")
    state = state_after_two_blocks(files, fast_tokenizer)
    relative = [os.path.relpath(f) for f in files]  # the same files by another spelling: accepted
    dataset_on(relative, fast_tokenizer).load_state_dict(state)
    for change, field in [
        ({"separate_documents": False}, "sources.main.identity.separate_documents"),
        ({"layout": "wikitext"}, "sources.main.identity.layout"),
    ]:
        with pytest.raises(ValueError, match=re.escape(field)):
            dataset_on(files, fast_tokenizer, **change).load_state_dict(state)
    swapped = write_corpus(tmp_path / "other", text="other words")  # 4th file from another corpus
    with pytest.raises(ValueError, match=re.escape("sources.main.identity.files")):
        dataset_on(files[:3] + swapped[3:], fast_tokenizer).load_state_dict(state)
    time.sleep(0.01)
    Path(files[3]).write_bytes(Path(files[3]).read_bytes())  # touched: same bytes, new mtime
    with pytest.raises(ValueError, match=re.escape("sources.main.identity.files")):
        dataset_on(files, fast_tokenizer).load_state_dict(state)


def test_a_reused_stream_whose_file_was_rewritten_refuses_the_checkpoint_like_a_fresh_one(
    tmp_path, fast_tokenizer
):
    """The issue's case: a row inserted at the top of the file behind a TokenStream already made."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i} has a few words"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer)
    first = L.StreamingLMIterableDataset(tokens, 16)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    time.sleep(0.01)
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a new first row"}, *rows]))
    for dataset in (first, L.StreamingLMIterableDataset(tokens, 16)):  # the same stream object, reused
        with pytest.raises(ValueError, match=re.escape("sources.main.identity.files")):
            dataset.load_state_dict(state)


# 5. a hang ------------------------------------------------------------------------------------------
HANG_SCRIPT = """
import lab2_helpers as L
tok = L.load_tokenizer()
tok(["warm up the Rust thread pool " * 50] * 256)  # the parent tokenizes in parallel first
tokens = L.tokenize_stream(L.load_text_stream("local"), tok)
n = sum(b["attention_mask"].sum().item() for b in L.make_dataloader(L.StreamingLMIterableDataset(tokens), num_workers=2))
print("tokens", n)
"""


def test_workers_finish_with_tokenizers_parallelism_true_after_the_parent_tokenized():
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", HANG_SCRIPT], env=env, cwd=C.ROOT, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tokens 279" in run.stdout  # 279,xxx real tokens of whole blocks


# 6. dependencies that keep their promise ---------------------------------------------------------------
def test_requirements_exclude_the_datasets_release_that_breaks_chained_resumes():
    from packaging.requirements import Requirement

    lines = (C.ROOT / "requirements.txt").read_text().splitlines()
    (spec,) = [Requirement(line.split("#")[0]) for line in lines if line.startswith("datasets")]
    assert "5.0.0" not in spec.specifier and "5.0.1" in spec.specifier


# 7. memory with long documents -----------------------------------------------------------------------
def test_long_documents_make_small_tokenizing_batches(tmp_path, fast_tokenizer):
    path = write_jsonl(tmp_path / "books.jsonl", [{"text": "word " * 200_000} for _ in range(3)])  # 1 MB each
    tokens = L.tokenize_stream(L.load_text_stream(data_files=str(path)), fast_tokenizer)
    assert tokens.batch_rows <= C.TOKENIZE_BATCH_CHARS // 1_000_000  # rows of 1 MB: 4
    short = L.tokenize_stream(L.load_text_stream("local"), fast_tokenizer)
    assert short.batch_rows == C.TOKENIZE_BATCH_ROWS


# 8. visible fallbacks ---------------------------------------------------------------------------------
def test_auto_says_why_it_fell_back_and_hub_fails_loudly(monkeypatch, caplog):
    with caplog.at_level("WARNING"):
        stream = L.load_text_stream("auto")
    assert stream.info.description.endswith("(auto fell back: HF_HUB_OFFLINE is set)")
    assert any("not reachable" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        L.load_text_stream("hub")
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot be reached"):
        L.load_text_stream("hub")
    assert time.perf_counter() - start < C.HUB_PROBE_SECONDS + 1


# 9. visible tails ---------------------------------------------------------------------------------------
def test_dropped_tails_are_warned_per_part_and_in_progress(caplog):
    stream, rows = unique_token_stream()
    loader = L.make_dataloader(L.StreamingLMIterableDataset(stream, 16, rank=0, world_size=2), batch_size=4)
    with caplog.at_level("WARNING"):
        read = real_tokens_sorted(loader)
    parts = L.progress_by_part(loader.state_dict())
    assert len(parts) == 1 and parts[0]["dropped"] > 0
    assert parts[0]["tokens"] == len(read)
    assert any(f"dropped the final {parts[0]['dropped']} tokens" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [None, "true"])
def test_a_loader_with_workers_leaves_the_parents_tokenizers_parallelism_as_it_was(monkeypatch, value):
    """Set to "false" only while workers start: the parent keeps its Rust thread pool afterwards."""
    if value is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
    stream, _ = unique_token_stream()
    for dataset in (L.StreamingLMIterableDataset(stream, 16), L.NaiveDataset([[1, 2, 3]] * 40, 16)):
        list(L.make_dataloader(dataset, batch_size=2, num_workers=2))
        assert os.environ.get("TOKENIZERS_PARALLELISM") == value
