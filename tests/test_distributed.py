"""A real 2-process torchrun (gloo, CPU): ranks x workers read the bundled sample exactly once."""

import os
import subprocess
import sys

from streaming_lm import config as C


def test_torchrun_two_ranks_lose_and_duplicate_nothing():
    script = C.ROOT / "scripts" / "check_distributed.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        "--num-workers",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=C.ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: world_size=2, 280,116 tokens read, 280,116 in the stream, 0 lost, 0 duplicated" in run.stdout
    assert "rank 0:" in run.stdout and "rank 1:" in run.stdout
