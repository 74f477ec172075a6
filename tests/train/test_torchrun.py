"""`torchrun --nproc-per-node 2 -m fastmedusa train` (gloo, CPU) equals one process on the same global batch.

Every conversation here has the same tokens in another order, so every row holds the same number of
trained tokens: the mean of the two processes' losses is then exactly the one-process loss and the
heads must agree to fp32 rounding, not only "train somehow".
"""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastmedusa.model.medusa_model import HEADS_WEIGHTS_NAME

TOL = {"rtol": 1e-4, "atol": 2e-5}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _same_length_conversations(n: int) -> list[dict]:
    rng = random.Random(0)
    records = []
    for i in range(n):
        words = rng.sample(WORDS, len(WORDS))  # a permutation: same tokens per row (space-prefixed words)
        answer = "Sure:" + "".join(f" {w}" for w in words)
        turns = [{"from": "human", "value": "Say the words."}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "conversations": turns})
    return records


def _train_args(model_dir, data, out, batch_size: int) -> list[str]:
    return ["-m", "fastmedusa", "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "96", "--batch-size", str(batch_size), "--max-steps", "4",
            "--save-every", "2", "--keep-checkpoints", "2", "--eval-size", "4", "--eval-every", "2",
            "--log-every", "1", "--lr", "1e-2", "--no-progress", "--no-plot", "--device", "cpu",
            "--dtype", "fp32"]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _heads(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "heads" / HEADS_WEIGHTS_NAME))


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A 2-process torchrun run and a 1-process run with twice the batch, side by side."""
    tmp = tmp_path_factory.mktemp("torchrun")
    data = tmp / "sharegpt.json"
    data.write_text(json.dumps(_same_length_conversations(20)))
    w2, w1 = tmp / "w2", tmp / "w1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    procs = {
        "w2": subprocess.Popen(torchrun + _train_args(tiny_model_dir, data, w2, 2), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "w1": subprocess.Popen([sys.executable] + _train_args(tiny_model_dir, data, w1, 4), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }  # fmt: skip
    outputs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{stderr[-4000:]}"
        outputs[name] = stdout
    return {"data": data, "w2": w2, "w1": w1, "stdout": outputs, "tmp": tmp}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(runs):
    got, expected = _heads(runs["w2"]), _heads(runs["w1"])
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    losses = {
        name: [r["loss"] for r in _records(runs[name]) if r["kind"] == "train"] for name in ("w1", "w2")
    }
    assert len(losses["w2"]) == 4 and all(math.isfinite(x) for x in losses["w2"])
    torch.testing.assert_close(torch.tensor(losses["w2"]), torch.tensor(losses["w1"]), **TOL)
    evals = {name: [r for r in _records(runs[name]) if r["kind"] == "eval"] for name in ("w1", "w2")}
    assert [r["positions"] for r in evals["w2"]] == [r["positions"] for r in evals["w1"]]
    torch.testing.assert_close(
        torch.tensor([r["head_loss"] for r in evals["w2"]]), torch.tensor([r["head_loss"] for r in evals["w1"]]),
        **TOL,
    )  # fmt: skip


@pytest.mark.slow
def test_only_the_main_process_logs_and_the_log_records_its_environment(runs):
    assert runs["stdout"]["w2"].count("done in") == 1  # rank 1 printed nothing
    env = _records(runs["w2"])[0]
    assert env["kind"] == "environment" and env["world_size"] == 2 and env["fsdp"] is True
    assert env["device"] and env["date"] and "torch" in env["versions"]
    assert _records(runs["w1"])[0]["world_size"] == 1
    assert "x 2 processes (FSDP2)" in runs["stdout"]["w2"]


@pytest.mark.slow
def test_exported_heads_load(runs, tiny_model_dir):
    from fastmedusa.model import MedusaModel

    model = MedusaModel.from_pretrained(tiny_model_dir, heads=runs["w2"] / "heads")
    for name, value in model.medusa_heads.state_dict().items():
        assert torch.equal(value, _heads(runs["w2"])[name.removeprefix("medusa_head.")]), name
    assert (runs["w2"] / "heads" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_world_size_2_checkpoint_resumes_on_one_process(runs, tiny_model_dir):
    """Step 2 of the torchrun run, continued by one process with --batch-size 4, ends as the 1-process run."""
    resumed = runs["tmp"] / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["w2"] / "checkpoint-0000002", resumed / "checkpoint-0000002")
    argv = [sys.executable] + _train_args(tiny_model_dir, runs["data"], resumed, 4) + ["--resume"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stdout and "at step 2/4" in done.stdout
    got, expected = _heads(resumed), _heads(runs["w1"])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_fsdp_flag_on_one_process_matches_the_plain_run(runs, tiny_model_dir):
    """--fsdp without a launcher: a process group of one, FSDP2-wrapped, no eval cache; same heads."""
    out = runs["tmp"] / "fsdp1"
    argv = [sys.executable] + _train_args(tiny_model_dir, runs["data"], out, 4) + ["--fsdp"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert _records(out)[0]["fsdp"] is True
    got, expected = _heads(out), _heads(runs["w1"])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_two_processes_fall_back_from_a_corrupt_checkpoint(runs, tiny_model_dir):
    """A flipped shard that the second process hashes: both learn it, both resume from the older one."""
    out = runs["tmp"] / "corrupt"
    shutil.copytree(runs["w2"], out)
    shard = out / "checkpoint-0000004" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[100:4196] = bytes(b ^ 0xFF for b in raw[100:4196])
    shard.write_bytes(bytes(raw))
    older = {p.name: p.read_bytes() for p in (out / "checkpoint-0000002").iterdir()}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv = torchrun + _train_args(tiny_model_dir, runs["data"], out, 2) + ["--resume"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{shard} does not match its sha256" in done.stderr
    assert f"resumed from {out / 'checkpoint-0000002'} at step 2/4" in done.stdout
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-0000002").iterdir()} == older
    got, expected = _heads(out), _heads(runs["w2"])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
