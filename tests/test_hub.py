"""The Hub code path against scripts/hub_standin.py on 127.0.0.1, faults included (no network)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

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


def run_checks(url, mode, tmp_path):
    """tests/hub_checks.py MODE in a fresh process pointed at the stand-in; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    run = subprocess.run([*CHECKS, mode], env=env, capture_output=True, text=True, timeout=600, cwd=C.ROOT)
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
        (tmp_path, "needs a README.md and parquet files"),
    ]:
        run = subprocess.run([*STANDIN, "--data", str(folder)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([*STANDIN, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in run.stderr
