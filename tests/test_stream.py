"""Step 1: the text stream (bundled sample, local files, Hub/local choice)."""

import http.server
import json
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lab2_helpers as L
from streaming_lm import config as C
from streaming_lm import hub


def test_bundled_sample_has_the_wikitext_row_layout(sample_rows):
    assert len(sample_rows) > 2000
    assert all(isinstance(r, str) for r in sample_rows)
    blank = [r for r in sample_rows if r == ""]
    lines = [r for r in sample_rows if r != ""]
    assert blank and all(r.endswith("\n") and r.startswith(" ") for r in lines)
    titles = [r for r in lines if r.startswith(" = ") and not r.startswith(" = = ")]
    sections = [r for r in lines if r.startswith(" = = ")]
    assert len(titles) == 126  # one article per chapter; 12 of the 138 are held out
    assert titles[0] == " = Etymology = \n" and titles[2] == " = Chapter 1 : Loomings = \n"
    assert sections and all(r.endswith(" = = \n") for r in sections)
    # like the Hub: each heading sits between blank rows
    for i, row in enumerate(sample_rows):
        if row.startswith(" = "):
            assert sample_rows[i - 1] == "" and sample_rows[i + 1] == ""


def test_bundled_sample_is_rebuilt_identically_by_its_script(tmp_path, sample_rows):
    cmd = [sys.executable, str(C.ROOT / "scripts" / "build_sample.py"), "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True)  # the source text is vendored under data/source
    for split in ("train", "validation", "test"):
        pattern = C.SAMPLE_FILES.format(split=split)
        built = [pq.ParquetFile(f) for f in sorted(tmp_path.glob(pattern))]
        bundled = [pq.ParquetFile(f) for f in sorted(C.SAMPLE_DIR.glob(pattern))]
        assert len(built) == len(bundled) > 0
        assert [f.metadata.num_row_groups for f in built] == [f.metadata.num_row_groups for f in bundled]
        rows = [[f.read()["text"].to_pylist() for f in files] for files in (built, bundled)]
        assert rows[0] == rows[1]


def test_local_stream_yields_the_bundled_rows_in_order_from_two_files(sample_rows):
    stream = L.load_text_stream("local")
    assert stream.n_shards == 2
    assert stream.reshard().n_shards == 33  # parquet row groups of 4 articles: the pieces
    assert stream.info.description == "local: data/wikitext_sample, 2 files"
    assert [row["text"] for row in stream] == sample_rows


def test_held_out_splits_are_whole_articles_not_in_train(sample_rows):
    titles = {}
    for split in ("validation", "test"):
        rows = [row["text"] for row in L.load_text_stream("local", split=split)]
        titles[split] = {r for r in rows if L.starts_document(r)}
        assert len(titles[split]) == 6 and L.starts_document(rows[1])
    train_titles = {r for r in sample_rows if L.starts_document(r)}
    assert not (titles["validation"] | titles["test"]) & train_titles
    assert not titles["validation"] & titles["test"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_data_files_of_each_format_stream_their_text(tmp_path, suffix):
    texts = [" = Title = \n", "", " first line \n", " second line \n"]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("".join(t or "\n" for t in texts))
        expected = [t or "\n" for t in texts]  # a text file cannot hold an empty row without its newline
    elif suffix == ".parquet":
        pq.write_table(pa.table({"text": texts, "id": list(range(4))}), path)
        expected = texts
    else:
        path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
        expected = texts
    stream = L.load_text_stream("local", data_files=str(path))
    assert [row["text"] for row in stream] == expected


def test_missing_data_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        L.load_text_stream("local", data_files=[str(missing)])
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jsonl"):
        L.load_text_stream(data_files=str(tmp_path / "nothing*.jsonl"))


def test_unsupported_or_mixed_file_types_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    (tmp_path / "b.txt").write_text("hello\n")
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=".csv"):
        L.load_text_stream(data_files=str(tmp_path / "a.csv"))
    with pytest.raises(ValueError, match="suffixes"):
        L.load_text_stream(data_files=[str(tmp_path / "b.txt"), str(tmp_path / "c.parquet")])


def test_local_file_without_text_column_is_refused_naming_the_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' column.*\['body', 'id'\]"):
        L.load_text_stream(data_files=str(path))


def test_bad_source_and_split_are_refused():
    with pytest.raises(ValueError, match="auto"):
        L.load_text_stream("s3")
    with pytest.raises(ValueError, match=r"splits \['test', 'train', 'validation'\], got split='dev'"):
        L.load_text_stream("local", split="dev")


def test_offline_environment_chooses_local_without_probing(monkeypatch):
    monkeypatch.setattr(
        hub.urllib.request, "urlopen", lambda *a, **k: pytest.fail("probed the Hub while offline")
    )
    assert hub.hub_is_reachable() is False
    assert hub.choose_source("auto") == ("local", "auto fell back: HF_HUB_OFFLINE is set")
    assert L.load_text_stream("auto").info.description.startswith("local:")


class _Hub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, reachable", [(200, True), (503, False)])
def test_hub_probe_asks_the_configured_endpoint(monkeypatch, status, reachable):
    from huggingface_hub import constants

    handler = type("Hub", (_Hub,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert hub.hub_is_reachable(timeout=5) is reachable
    finally:
        server.shutdown()


def test_hub_probe_is_false_when_nothing_listens(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    assert hub.hub_is_reachable(timeout=2) is False
