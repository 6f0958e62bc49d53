"""Training on the stream: document positions, EOS targets, and scripts/train.py surviving SIGKILL."""

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lab2_helpers as L
from streaming_lm import config as C

EOS = L.EOS_TOKEN_ID
TRAIN = [sys.executable, str(C.ROOT / "scripts" / "train.py")]
SMALL = ["--block-size", "64", "--batch-size", "4", "--backend", "tiktoken"]  # fast steps on 2 cores


def test_position_ids_restart_at_each_document_start():
    block = {
        "input_ids": np.array([5, 6, EOS, 7, 8, EOS, 9, EOS]),
        "attention_mask": np.array([1, 1, 1, 1, 1, 1, 1, 0]),
    }
    batch = L.collate_fn([block, block], position_ids=True)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]] * 2
    assert set(L.collate_fn([block])) == {"input_ids", "attention_mask", "labels"}  # off by default


def test_loader_position_ids_count_tokens_since_the_last_eos(fast_tokenizer):
    tokens = L.tokenize_stream(L.load_text_stream("local"), fast_tokenizer)
    batch = next(iter(L.make_dataloader(L.StreamingLMIterableDataset(tokens), position_ids=True)))
    ids, positions = batch["input_ids"], batch["position_ids"]
    starts = (ids == EOS).nonzero().tolist()
    assert len(starts) > 0  # the batch holds document starts: the test is not vacuous
    for row, col in starts:
        assert positions[row, col] == 0
    restarts = (positions[:, 1:] != positions[:, :-1] + 1).nonzero()
    assert all(ids[r, c + 1] == EOS for r, c in restarts.tolist())  # positions only restart at an EOS


def test_a_real_eos_inside_a_block_keeps_its_label():
    block = {"input_ids": np.array([5, EOS, 7, EOS]), "attention_mask": np.array([1, 1, 1, 0])}
    labels = L.collate_fn([block])["labels"][0].tolist()
    assert labels == [5, EOS, 7, -100]  # the separator is a target; only padding is ignored


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def wait_for_checkpoint_step(out, step, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / "log.jsonl"
        if (
            (out / "checkpoint.pt").exists()
            and log.exists()
            and any(r["step"] >= step + 1 for r in read_log(out))
        ):
            return
        assert process.poll() is None, "the run ended before its second checkpoint"
        time.sleep(0.05)
    raise AssertionError("no second checkpoint in time")


def test_a_run_killed_after_its_second_checkpoint_resumes_to_the_uninterrupted_losses(tmp_path):
    args = ["--steps", "14", "--checkpoint-every", "4", *SMALL]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [*TRAIN, *args, "--out", str(tmp_path / "whole")],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    whole = read_log(tmp_path / "whole")
    assert [r["step"] for r in whole] == list(range(1, 15))

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        [*TRAIN, *args, "--out", str(crashed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_checkpoint_step(crashed, 8, process)  # step 9 logged: the checkpoint of step 8 is on disk
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(crashed / "checkpoint.pt", weights_only=False)["step"] == 8
    (crashed / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves
    with open(crashed / "log.jsonl", "a") as log:
        log.write('{"step": 10, "loss": 7.1')  # as a kill while a line is written leaves
    run = subprocess.run(
        [*TRAIN, *args, "--out", str(crashed), "--resume"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.stdout.count("dropped a partial last line") == 1
    resumed = read_log(crashed)
    assert [r["step"] for r in resumed] == list(range(1, 15))  # every step once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]  # exactly the uninterrupted run


@pytest.mark.slow
def test_the_default_run_loses_a_nat_within_40_steps(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [*TRAIN, "--steps", "40", "--checkpoint-every", "40", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 40 and min(losses[-5:]) < losses[0] - 1.0


def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage, not a checkpoint" * 10)
    cmd = [*TRAIN, "--steps", "2", "--checkpoint-every", "1", "--out", str(tmp_path), "--resume", *SMALL]
    run = subprocess.run(
        cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "checkpoint.pt is damaged" in line and "start afresh" in line


# ----------------------------------------------------------------------------- resume elsewhere
VALIDATION = sorted(str(f) for f in C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="validation")))
EPOCH = [
    "--data-files",
    *VALIDATION,
    "--epochs",
    "1",
    "--trace-tokens",
    "--block-size",
    "32",
    "--batch-size",
    "2",
    "--backend",
    "tiktoken",
]

TO_THE_END = ["--steps", "100000", "--checkpoint-every", "1000"]  # --epochs 1 ends the run first


def corpus_tokens():
    tokens = L.tokenize_stream(
        L.load_text_stream(data_files=VALIDATION), L.load_tokenizer(backend="tiktoken")
    )
    return collections.Counter(int(t) for row in tokens for t in row["input_ids"])


def traced(out):
    """(tokens of every step of every rank, steps per rank) from OUT/tokens-rank*.jsonl."""
    tokens, steps = collections.Counter(), {}
    for path in sorted(out.glob("tokens-rank*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        steps[path.name] = [r["step"] for r in records]
        tokens.update(t for r in records for t in r["tokens"])
    return tokens, steps


def held_back(stdout):
    return sum(int(n) for n in re.findall(r"(\d+) tokens held back", stdout))


@pytest.mark.slow
def test_resume_with_other_num_workers_reads_the_epoch_exactly_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = [
        *TRAIN,
        "--steps",
        "5",
        "--checkpoint-every",
        "5",
        "--out",
        str(tmp_path),
        "--num-workers",
        "2",
        *EPOCH,
    ]
    subprocess.run(first, check=True, env=env, capture_output=True, timeout=600)
    rest = [
        *TRAIN,
        *TO_THE_END,
        "--out",
        str(tmp_path),
        "--resume",
        "--num-workers",
        "0",
        *EPOCH,
    ]
    run = subprocess.run(rest, check=True, env=env, capture_output=True, text=True, timeout=600)
    assert "the data ran out" in run.stdout
    tokens, steps = traced(tmp_path)
    corpus = corpus_tokens()
    assert not tokens - corpus, "a token was read twice"
    assert steps["tokens-rank0.jsonl"][:6] == [1, 2, 3, 4, 5, 6]  # one step after another, across the resume
    lost = sum((corpus - tokens).values())
    assert lost < 3 * 32  # the tails of the 2 saved parts and of the new one, at most


@pytest.mark.slow
def test_torchrun_resumes_on_another_number_of_processes_exactly_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def torchrun(nproc, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        run = subprocess.run([*cmd, *TRAIN[1:], *args], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-12000:]
        return run.stdout

    window = ["--shuffle-window", "64"]  # smaller than a part (~190 blocks): the rest can feed 3 ranks
    torchrun(2, "--steps", "3", "--checkpoint-every", "3", "--out", str(tmp_path), *EPOCH, *window)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["loader"]
    assert state["layout"]["ranks"] == [0, 1]  # both ranks' parts, gathered
    out = torchrun(3, *TO_THE_END, "--out", str(tmp_path), "--resume", *EPOCH, *window)
    tokens, steps = traced(tmp_path)
    assert sorted(steps) == ["tokens-rank0.jsonl", "tokens-rank1.jsonl", "tokens-rank2.jsonl"]
    assert steps["tokens-rank0.jsonl"] == steps["tokens-rank1.jsonl"]  # in lockstep, before and after
    assert steps["tokens-rank2.jsonl"] == steps["tokens-rank0.jsonl"][3:]  # the new rank: after the resume
    assert len(steps["tokens-rank2.jsonl"]) > 10, "the 3 ranks went on with the epoch"
    corpus = corpus_tokens()
    assert not tokens - corpus, "a token was read twice"
    lost = sum((corpus - tokens).values())
    assert lost <= held_back(out) + 5 * 32  # held back by the lockstep (counted), and 5 parts' tails at most


@pytest.mark.slow
def test_one_jsonl_file_with_two_workers_shuffled_is_killed_and_resumes_exactly_once(tmp_path):
    """The first thing a user with one JSONL file meets on a GPU (2 workers share its one piece,
    shuffled): a run killed after its second checkpoint resumes and reads the epoch exactly once."""
    data = tmp_path / "mine.jsonl"
    words = ["whale", "ship", "harpoon", "sea", "captain", "sailor", "voyage", "storm"]
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(words[(i + k) % 8] for k in range(6 + i % 20))}) + "\n"
            for i in range(80)
        )
    )
    args = ["--data-files", str(data), "--num-workers", "2", "--epochs", "1", "--trace-tokens"]
    args += ["--block-size", "32", "--batch-size", "2", "--backend", "tiktoken", "--checkpoint-every", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*TRAIN, "--steps", "100000", "--out", str(tmp_path / "run"), *args], env=env)
    wait_for_checkpoint_step(tmp_path / "run", 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["step"] >= 8 and saved["loader"]["layout"]["num_workers"] == 2
    cmd = [*TRAIN, "--steps", "100000", "--out", str(tmp_path / "run"), "--resume", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    assert "the data ran out" in run.stdout
    tokens, steps = traced(tmp_path / "run")
    stream = L.tokenize_stream(L.load_text_stream(data_files=str(data)), L.load_tokenizer(backend="tiktoken"))
    corpus = collections.Counter(int(t) for row in stream for t in row["input_ids"])
    assert not tokens - corpus, "a token was read twice"
    assert steps["tokens-rank0.jsonl"] == list(range(1, len(steps["tokens-rank0.jsonl"]) + 1))
    assert sum((corpus - tokens).values()) < 2 * 32  # the 2 parts' tails at most


def process_tree(pid):
    """`pid` and every process below it (torchrun starts each worker in a session of its own)."""
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children[parent].append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children[tree[-1]]
    return tree


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_killed_after_a_checkpoint_resume_on_one_node_of_three_exactly_once(tmp_path):
    """Two torchrun launchers (two "nodes" on 127.0.0.1, a c10d rendezvous, 2 processes each) train
    on one shared --out folder, are killed after a checkpoint, and 1 node x 3 processes resumes:
    every token of the epoch at most once, and only the held-back and the parts' tails unread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "two-nodes"]
    args = ["--out", str(tmp_path), "--steps", "100000", "--checkpoint-every", "3", *EPOCH]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", *rdzv]
    nodes = [subprocess.Popen([*node, *TRAIN[1:], *args], env=env) for _ in range(2)]
    try:
        wait_for_checkpoint_step(tmp_path, 3, nodes[0])
    finally:
        for process in nodes:  # a node lost: its launcher and every process it started
            for pid in process_tree(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["loader"]["layout"]["ranks"] == [0, 1, 2, 3] and saved["step"] >= 3
    one_node = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    resume = [*one_node, *TRAIN[1:], *args[:2], *TO_THE_END, "--resume", *EPOCH]
    run = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    tokens, steps = traced(tmp_path)
    assert sorted(steps) == [f"tokens-rank{r}.jsonl" for r in range(4)]
    assert steps["tokens-rank3.jsonl"] == list(
        range(1, saved["step"] + 1)
    )  # the gone rank: to the checkpoint
    assert steps["tokens-rank0.jsonl"] == steps["tokens-rank2.jsonl"]  # in lockstep, across the resume
    assert len(steps["tokens-rank0.jsonl"]) > saved["step"] + 10, "the 3 processes went on with the epoch"
    corpus = corpus_tokens()
    assert not tokens - corpus, "a token was read twice"
    lost = sum((corpus - tokens).values())
    assert lost <= held_back(run.stdout) + 7 * 32  # held back by the lockstep (counted), 4 + 3 parts' tails
