"""The Hub code path against scripts/hub_standin.py on 127.0.0.1, faults included (no network)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming_lm import config as C

STANDIN = [sys.executable, str(C.ROOT / "scripts" / "hub_standin.py")]
CHECKS = [sys.executable, str(C.ROOT / "tests" / "hub_checks.py")]


class StandIn:
    """The stand-in in a subprocess: its URL, and the summary of what it injected once stopped."""

    def __init__(self, *flags):
        self.process = subprocess.Popen([*STANDIN, "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"the stand-in did not start: {line!r}"
        self.url, self.summary = match.group(1), ""

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.summary = self.process.communicate(timeout=30)[0].strip()
        return self.summary


@pytest.fixture
def hub():
    started = []

    def start(*flags):
        started.append(StandIn(*flags))
        return started[-1]

    yield start
    for standin in started:
        if standin.process.poll() is None:
            standin.stop()


def run_checks(url, mode, tmp_path, *args):
    """tests/hub_checks.py MODE ARGS in a fresh process pointed at the stand-in; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    run = subprocess.run(
        [*CHECKS, mode, *args], env=env, capture_output=True, text=True, timeout=600, cwd=C.ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hub_and_auto_stream_exactly_the_local_tokens(hub, tmp_path):
    standin = hub()
    result = run_checks(standin.url, "sources", tmp_path)
    assert result["hub_description"] == "hub: Salesforce/wikitext wikitext-103-v1 (train)"
    assert result["auto_description"] == result["hub_description"] and result["auto_seconds"] < 5
    assert result["hub_pieces"] == 33  # reshard() splits the 2 files by row group over HTTP too
    assert result["local_tokens"] == 280_116
    assert result["hub_equals_local"] and result["auto_equals_local"] and result["validation_equals_local"]


def test_workers_ranks_and_resume_work_on_the_hub_source(hub, tmp_path):
    result = run_checks(hub().url, "scale", tmp_path)
    assert result == {
        "corpus_tokens": 280_116,
        "two_workers_exact": True,
        "three_ranks_exact": True,
        "resume_exact": True,
    }


@pytest.mark.parametrize(
    "flags",
    [
        ["--fail-every", "3"],
        pytest.param(["--status-every", "4", "429"], marks=pytest.mark.slow),
        pytest.param(["--status-every", "3", "503"], marks=pytest.mark.slow),
        pytest.param(["--fail-every", "2", "--status-every", "5", "503"], marks=pytest.mark.slow),
    ],
)
def test_the_stream_survives_cut_bodies_and_busy_answers_with_every_token_once(hub, tmp_path, flags):
    standin = hub(*flags)
    result = run_checks(standin.url, "faults", tmp_path)
    summary = standin.stop()
    injected = sum(int(n) for n in re.findall(r"(\d+) x HTTP|(\d+) bodies", summary) for n in n if n)
    print(f"{flags}: {summary} -> {result}")  # the note quotes these
    assert injected > 0, summary  # faults happened: the test is not vacuous
    assert result == {"completed": True, "tokens": 280_116, "expected": 280_116, "equal": True}


@pytest.mark.slow
def test_a_hub_that_always_cuts_bodies_fails_loudly_not_short(hub, tmp_path):
    result = run_checks(hub("--fail-every", "1").url, "faults", tmp_path)
    assert result["completed"] is False
    assert "peer closed connection" in result["error"] or "Error" in result["error"]


def test_the_stand_in_refuses_bad_data_folders_and_a_taken_port(tmp_path):
    for folder, message in [
        (tmp_path / "nope", "does not exist"),
        (tmp_path, "needs a README.md and data files"),
    ]:
        run = subprocess.run([*STANDIN, "--data", str(folder)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([*STANDIN, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in run.stderr


# ----------------------------------------------------------------------------- several repositories
WIKI_README = """---
configs:
- config_name: wikitext-103-v1
  data_files:
  - split: train
    path: wikitext-103-v1/train-*
- config_name: wikitext-2-raw-v1
  data_files:
  - split: train
    path: wikitext-2-raw-v1/train-*
---
"""
DEFAULT_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
"""


def build_hub(folder, big_copies=0):
    """A data folder of repositories: Salesforce/wikitext (the sample as wikitext-103-v1, its
    validation split as wikitext-2-raw-v1's train), lab/speeches (the State of the Union addresses,
    their text under "speech"), and with big_copies, lab/big (the sample's train files that often)."""
    wiki = folder / "Salesforce" / "wikitext"
    for config, pattern in (("wikitext-103-v1", "train-*"), ("wikitext-2-raw-v1", "validation-*")):
        (wiki / config).mkdir(parents=True)
        for k, path in enumerate(sorted((C.SAMPLE_DIR / "wikitext-103-v1").glob(pattern))):
            shutil.copy(path, wiki / config / f"train-{k:05d}-of-00002.parquet")
    (wiki / "README.md").write_text(WIKI_README)
    speeches = folder / "lab" / "speeches"
    (speeches / "data").mkdir(parents=True)
    records = [json.loads(line) for line in C.SOTU_FILE.read_text().splitlines()]
    table = pa.table({"year": [r["year"] for r in records], "speech": [r["text"] for r in records]})
    pq.write_table(table, speeches / "data" / "train-00000-of-00001.parquet", row_group_size=4)
    (speeches / "README.md").write_text(DEFAULT_README)
    if big_copies:
        big = folder / "lab" / "big"
        (big / "data").mkdir(parents=True)
        train = sorted((C.SAMPLE_DIR / "wikitext-103-v1").glob("train-*"))
        for k in range(big_copies):
            for i, path in enumerate(train):
                shutil.copy(path, big / "data" / f"train-{2 * k + i:05d}-of-{2 * big_copies:05d}.parquet")
        (big / "README.md").write_text(DEFAULT_README)
    return folder


def test_wikitext2_text_columns_and_a_mixture_stream_over_loopback(hub, tmp_path):
    standin = hub("--data", str(build_hub(tmp_path / "hub")))
    result = run_checks(standin.url, "configs", tmp_path)
    assert "documents: wikitext (the source is WikiText)" in result["wiki2_description"]
    assert result["eos"] == result["articles"] > 0  # one EOS per article, none per paragraph
    assert result["blank_rows"] > 0 and not any("gave no tokens" in w for w in result["warnings"])
    assert "documents: rows" in result["speeches_description"]  # its text came from "speech"
    assert abs(result["shares"]["wiki"] - 0.7) < 0.02 and abs(result["shares"]["speeches"] - 0.3) < 0.02
    assert result["pieces_named"]  # file names and rows of the Hub's row groups, for errors and checks


def test_a_checkpoint_of_a_hub_source_is_refused_after_the_repository_changed(hub, tmp_path):
    folder = build_hub(tmp_path / "hub")
    state = tmp_path / "state.pkl"
    first = hub("--data", str(folder))
    saved = run_checks(first.url, "save", tmp_path, str(state))
    first.stop()
    path = folder / "Salesforce" / "wikitext" / "wikitext-103-v1" / "train-00001-of-00002.parquet"
    table = pq.read_table(path)
    texts = table["text"].to_pylist()
    texts[5] = texts[5].replace("whale", "whale!")  # a new commit: one row edited
    pq.write_table(
        table.set_column(0, "text", pa.array(texts)),
        path,
        row_group_size=pq.ParquetFile(path).metadata.row_group(0).num_rows,
    )
    second = hub("--data", str(folder))
    result = run_checks(second.url, "resume", tmp_path, str(state))
    assert result["revision"] != saved["revision"]
    assert "identity.revision" in result["refused"]
    assert saved["revision"] in result["refused"] and result["revision"] in result["refused"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_hub_that_goes_away_is_said_and_given_up_within_the_deadline(hub, tmp_path, workers):
    standin = hub("--data", str(build_hub(tmp_path / "hub", big_copies=8)))
    gone = tmp_path / "gone"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=standin.url, HF_HOME=str(tmp_path / "hf_home"), STREAMING_LM_HUB_DEADLINE="40")
    cmd = [*CHECKS, "goes_away", str(gone), str(workers)]
    process = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=C.ROOT
    )
    assert process.stdout.readline().strip() == "READY"
    standin.stop()  # the Hub goes away after 3 batches
    gone.touch()
    out, err = process.communicate(timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["error"] and "ConnectionError" in result["error"]
    assert "the Hub went away while streaming lab/big" in result["error"] and ".parquet" in result["error"]
    assert result["seconds"] < 40 + 30 + 15  # the deadline, one huggingface_hub retry cycle, start-up
    assert "the Hub did not answer reading lab/big" in err  # said at WARNING before giving up


def test_an_unknown_repository_is_named_as_unknown_not_as_a_network_failure(hub, tmp_path):
    result = run_checks(hub("--data", str(build_hub(tmp_path / "hub"))).url, "unknown", tmp_path)
    for source in ("hub", "auto"):
        assert result[source].startswith("ValueError: no dataset repository 'nobody/no-such-data' on the Hub")
        assert "answered 404" in result[source] and "cannot be reached" not in result[source]
