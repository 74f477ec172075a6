"""`--resume` after a real `kill -9` ends with exactly the heads of an uninterrupted run (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fastmedusa.model.medusa_model import HEADS_WEIGHTS_NAME
from fastmedusa.train.checkpoint import list_checkpoints


def _argv(model_dir, data, out) -> list[str]:
    return [sys.executable, "-m", "fastmedusa", "train", "--model", str(model_dir), "--data", str(data),
            "--output-dir", str(out), "--num-heads", "2", "--seq-len", "48", "--batch-size", "2",
            "--max-steps", "40", "--save-every", "4", "--eval-size", "4", "--eval-every", "10",
            "--log-every", "1", "--lr", "1e-2", "--warmup-steps", "3", "--no-progress", "--no-plot",
            "--device", "cpu", "--dtype", "fp32"]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model_dir, sharegpt_file, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _argv(tiny_model_dir, sharegpt_file, straight), env=_env(), check=True, capture_output=True
    )

    proc = subprocess.Popen(_argv(tiny_model_dir, sharegpt_file, killed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not after it finished
    steps = [s for s, _ in list_checkpoints(killed)]
    assert steps and steps[-1] < 40 and not (killed / "heads").exists()

    resumed = subprocess.run(_argv(tiny_model_dir, sharegpt_file, killed) + ["--resume"], env=_env(),
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {killed}/checkpoint-{steps[-1]:07d} at step {steps[-1]}/40" in resumed.stdout

    a = load_file(str(straight / "heads" / HEADS_WEIGHTS_NAME))
    b = load_file(str(killed / "heads" / HEADS_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the heads moved: the equality is not that of two untouched copies of the LM head
    lm_head = load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"]
    assert not torch.allclose(a["0.1.weight"], lm_head, atol=1e-4)
