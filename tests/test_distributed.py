"""Real torchrun jobs (gloo, CPU): 3 ranks x 2 workers on the bundled sample (2 parquet files)."""

import os
import re
import subprocess
import sys

import pytest

from streaming_lm import config as C


def torchrun(*args, nproc=3):
    script = C.ROOT / "scripts" / "check_distributed.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env, cwd=C.ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def rank_lines(stdout):
    """{rank: (tokens, batches, characters tokenized, busy workers)} from the per-rank lines."""
    pattern = (
        r"rank (\d+): ([\d,]+) tokens in (\d+) batches, ([\d,]+) characters tokenized, (\d)/2 workers busy"
    )
    return {int(m[0]): tuple(int(x.replace(",", "")) for x in m[1:]) for m in re.findall(pattern, stdout)}


@pytest.fixture(scope="module")
def sample_characters(sample_rows):
    return sum(map(len, sample_rows))


def test_three_ranks_of_two_workers_read_every_token_once_and_tokenize_only_their_share(sample_characters):
    stdout = torchrun("--num-workers", "2")
    assert "OK: world_size=3, 280,116 tokens read, 280,116 in the stream, 0 lost, 0 duplicated" in stdout
    ranks = rank_lines(stdout)
    assert sorted(ranks) == [0, 1, 2]
    chars = [ranks[r][2] for r in ranks]
    assert sum(chars) == sample_characters  # nobody tokenized text another rank keeps
    assert max(chars) / min(chars) < 1.1  # about a third each
    assert all(ranks[r][3] == 2 for r in ranks)  # every worker of every rank had pieces


@pytest.mark.slow
def test_even_steps_keep_three_ranks_in_lockstep_and_count_what_they_hold_back():
    stdout = torchrun("--num-workers", "2", "--even-steps")  # one all_reduce per step: no hang
    ranks = rank_lines(stdout)
    assert len({ranks[r][1] for r in ranks}) == 1  # the same number of steps on every rank
    (line,) = [line for line in stdout.splitlines() if line.startswith("OK")]
    lost, not_yielded = re.search(r"(\d+) lost, 0 duplicated, (\d+) not yielded", line).groups()
    assert lost == not_yielded  # every token not read is counted as held back
