"""`--loss kl`: heads trained toward the base model's own distribution (its LM head as teacher)."""

import json
import os

import pytest
import torch

from fastmedusa.cli import main
from fastmedusa.train import TrainConfig, Trainer, random_batch


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(num_heads=2, max_steps=10, lr=1e-2, warmup_steps=0, output_dir=str(tmp_path), device="cpu",
                progress=False, plot=False, log_every=1, loss="kl", lr_schedule="constant")  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _batches(n: int, vocab: int, rows: int = 2, seq: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [random_batch(rows, seq, vocab, g) for _ in range(n)]


def _peaked(model, scale: float = 10.0):
    """A random tiny Llama's LM head gives near-uniform distributions (a KL near 0 from the start); scaling
    it (and the heads' copies of it) makes the teacher confident, like a trained model."""
    with torch.no_grad():
        model.base.get_output_embeddings().weight.mul_(scale)
        for w in model.medusa_heads.projection_weights():
            w.mul_(scale)
    return model


def test_kl_training_lowers_the_kl(tiny_medusa, tmp_path):
    vocab = 256
    train = _batches(2, vocab)
    trainer = Trainer(_peaked(tiny_medusa(vocab_size=vocab)), _config(tmp_path), eval_batches=train)
    before = trainer.evaluate()
    assert before["head_kl"] == pytest.approx(before["head_loss"])  # with --loss kl the loss is the KL
    assert all(x > 0.1 for x in before["head_kl"])
    for step in range(12):
        metrics = trainer.train_step(train[step % 2], with_metrics=True)
    assert metrics["head_kl"] == metrics["head_loss"] and len(metrics["top1"]) == 2
    after = trainer.evaluate()
    assert all(b < 0.7 * a for a, b in zip(before["head_kl"], after["head_kl"])), (before, after)


def test_ce_evaluation_reports_the_same_kl(tiny_medusa, tmp_path):
    vocab = 256
    model = _peaked(tiny_medusa(vocab_size=vocab))
    evals = _batches(2, vocab, seed=3)
    kl_run = Trainer(model, _config(tmp_path / "kl"), eval_batches=evals).evaluate()
    ce_run = Trainer(model, _config(tmp_path / "ce", loss="ce"), eval_batches=evals).evaluate()
    assert ce_run["head_kl"] == pytest.approx(kl_run["head_kl"], rel=1e-5)
    assert ce_run["head_loss"] != pytest.approx(kl_run["head_loss"])


def test_stage_2_teacher_is_detached(tiny_medusa):
    """Stage 2 with --loss kl: the LM loss is the base model's CE; the KL sends no gradient into the teacher
    (the LM head), only through the heads' own inputs into the backbone."""
    vocab = 256
    model = _peaked(tiny_medusa(vocab_size=vocab))
    model.set_stage(2)
    [batch] = _batches(1, vocab)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], lm_loss_weight=0.0, loss="kl")
    out.loss.backward()
    assert model.base.get_output_embeddings().weight.grad is None
    assert model.base.get_decoder().layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], loss="kl")
    assert out.lm_loss is not None and out.head_losses.shape == (2,)
    out.loss.backward()
    assert model.base.get_output_embeddings().weight.grad.abs().sum() > 0  # from the LM loss alone


def test_cli_trains_with_kl(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--loss", "kl", "--model", str(tiny_model_dir), "--data", str(sharegpt_file),
            "--output-dir", str(out), "--num-heads", "2", "--seq-len", "48", "--batch-size", "4",
            "--max-steps", "6", "--lr", "1e-2", "--eval-size", "8", "--eval-every", "0", "--save-every", "0",
            "--no-progress", "--no-plot", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 6] and all(len(r["head_kl"]) == 2 for r in evals)
    assert all(r["head_kl"] == r["head_loss"] for r in trains)
    assert "KL to the base model" in capsys.readouterr().out


def test_kl_with_a_cross_entropy_peer_is_one_clear_line(capsys):
    assert main(["train", "--loss", "kl", "--impl", "liger"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --impl liger is a cross-entropy peer") and len(err.splitlines()) == 1


def test_unknown_loss_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--loss", "mse"])
    assert exit_info.value.code == 2 and "invalid choice: 'mse'" in capsys.readouterr().err


def test_kl_under_a_draft_vocabulary_renormalises_the_teacher(tiny_medusa):
    from fastmedusa.ops import medusa_kl_divergence

    vocab = 256
    model = _peaked(tiny_medusa(vocab_size=vocab, draft_vocab_size=64))
    heads = model.medusa_heads
    [batch] = _batches(1, vocab)
    hidden = model.backbone_hidden_states(batch["input_ids"])
    got = heads.kl_divergence(hidden, batch["labels"], impl="chunked")
    teacher = model.base.get_output_embeddings().weight[heads.token_map]  # the draft tokens' rows
    want = medusa_kl_divergence(heads.head_hidden_states(hidden), heads.projection_weights(), hidden, teacher,
                                batch["labels"], shifts=[2, 3], impl="torch")  # fmt: skip
    torch.testing.assert_close(got, want)
    _, losses = heads(hidden, batch["labels"], loss="kl")
    losses.sum().backward()
    assert all(w.grad.shape == (64, 32) for w in heads.projection_weights())


@pytest.mark.slow
def test_fsdp_on_one_process_trains_kl_heads_like_the_plain_run(tiny_model_dir, sharegpt_file, tmp_path):
    """--fsdp --loss kl: the heads unit and the root (with the teacher, the LM head) are gathered while the
    heads' forward runs; the trained heads equal those of the plain process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fastmedusa.model.medusa_model import HEADS_WEIGHTS_NAME

    def argv(out):
        return [sys.executable, "-m", "fastmedusa", "train", "--loss", "kl", "--model", str(tiny_model_dir),
                "--data", str(sharegpt_file), "--output-dir", str(out), "--num-heads", "2", "--seq-len", "48",
                "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--eval-size", "4", "--eval-every", "0",
                "--save-every", "0", "--no-progress", "--no-plot", "--device", "cpu", "--dtype", "fp32"]  # fmt: skip

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    procs = [subprocess.Popen(argv(plain), env=env, stderr=subprocess.PIPE, text=True),
             subprocess.Popen(argv(sharded) + ["--fsdp"], env=env, stderr=subprocess.PIPE, text=True)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert json.loads((sharded / "metrics.jsonl").read_text().splitlines()[0])["fsdp"] is True
    got = load_file(str(sharded / "heads" / HEADS_WEIGHTS_NAME))
    want = load_file(str(plain / "heads" / HEADS_WEIGHTS_NAME))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5)
