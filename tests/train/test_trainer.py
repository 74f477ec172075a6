"""Trainer: the step learns, accumulation matches one big batch, evaluation, NaN stops with the checkpoint kept."""

import json

import pytest
import torch

from fastmedusa.train import NonFiniteLossError, TrainConfig, Trainer, random_batch
from fastmedusa.train.checkpoint import latest_checkpoint, list_checkpoints


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(num_heads=2, max_steps=10, lr=1e-2, warmup_steps=0, output_dir=str(tmp_path), device="cpu",
                progress=False, plot=False, log_every=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _batches(n: int, rows: int = 2, seq: int = 16, vocab: int = 49152, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [random_batch(rows, seq, vocab, g) for _ in range(n)]


def test_train_step_reduces_the_heads_loss(tiny_medusa, tmp_path):
    trainer = Trainer(tiny_medusa(), _config(tmp_path, lr_schedule="constant"))
    [batch] = _batches(1)
    first = trainer.train_step(batch, with_metrics=True)
    for _ in range(8):
        last = trainer.train_step(batch, with_metrics=True)
    assert all(b < a for a, b in zip(first["head_loss"], last["head_loss"]))
    assert all(b >= a for a, b in zip(first["top1"], last["top1"]))  # memorising one batch
    assert first["tokens"] == first["padded_tokens"] == 32 and trainer.step == 9
    assert first["lm_loss"] is None and first["grad_norm"] > 0


def test_grad_accumulation_equals_one_big_batch(tiny_medusa, tmp_path):
    """Two micro-batches of 2 rows (all tokens labelled) give the same update as one batch of 4."""
    a, b = _batches(2)
    big = {k: torch.cat([a[k], b[k]]) for k in a}
    one = Trainer(tiny_medusa(), _config(tmp_path))
    two = Trainer(tiny_medusa(), _config(tmp_path, grad_accum=2))
    m1, m2 = one.train_step(big), two.train_step([a, b])
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    for p, q in zip(one.model.medusa_heads.parameters(), two.model.medusa_heads.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_loss_chunk_rows_reach_every_fused_loss_and_keep_the_step(tiny_medusa, tmp_path, monkeypatch, loss):
    """--loss-chunk-rows sizes the chunks of the heads' loss and the stage-2 LM loss (16-row chunks here, of
    32 rows); the update equals the automatic chunking's, which takes all 32 rows at once (a 128-row chunk)."""
    from fastmedusa.ops import fused, kl_divergence

    seen = []
    for module, name in ((fused, "resolve_chunk_rows"), (kl_divergence, "kl_chunk_rows")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda rows, *a, _real=real: seen.append(_real(rows, *a)) or seen[-1])
    [batch] = _batches(1)
    runs = {}
    for chunk in (0, 16):
        seen.clear()
        trainer = Trainer(tiny_medusa(), _config(tmp_path, stage=2, loss=loss, loss_chunk_rows=chunk))
        runs[chunk] = trainer.train_step(batch), trainer.model
        assert len(seen) >= 2 and all(size == 16 if chunk else size >= 32 for size in seen), seen
    (auto, auto_model), (small, small_model) = runs[0], runs[16]
    assert small["loss"] == pytest.approx(auto["loss"], rel=1e-5) and small["lm_loss"] is not None
    for p, q in zip(auto_model.parameters(), small_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"loss_chunk_rows": -1}, r"--loss-chunk-rows -1: pass 0 \(automatic\) or a number of rows"),
        ({"loss_chunk_rows": 128, "impl": "liger"}, "--loss-chunk-rows sizes fastmedusa's fused losses; --impl liger"),
        ({"impl": "bogus"}, "--impl 'bogus': pass one of auto, triton"),
        ({"impl": "cce"}, "--impl cce runs on CUDA only and this run is on the CPU"),
    ],
)
def test_bad_loss_chunk_rows_and_impl_before_anything_loads(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kw)


def test_stage_2_gives_the_heads_a_multiplied_lr(tiny_medusa, tmp_path):
    trainer = Trainer(
        tiny_medusa(), _config(tmp_path, stage=2, lr=1e-3, heads_lr_multiplier=4.0, weight_decay=0.1)
    )
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert lrs["heads"] == (pytest.approx(4e-3), 0.1) and lrs["backbone"] == (pytest.approx(1e-3), 0.1)
    assert lrs["backbone_no_decay"][1] == 0.0  # norm gains and biases are not decayed
    stage1 = Trainer(tiny_medusa(), _config(tmp_path, stage=1, heads_lr_multiplier=4.0))
    assert {g["name"] for g in stage1.optimizer.param_groups} == {"heads", "heads_no_decay"}


def test_evaluate_matches_with_and_without_the_stage_1_cache(tiny_medusa, tmp_path):
    evals = _batches(3, seed=5)
    trainer = Trainer(tiny_medusa(), _config(tmp_path), eval_batches=evals)
    first = trainer.evaluate()  # fills the hidden-state cache
    assert len(trainer.eval_cache) == 3
    cached = trainer.evaluate()
    trainer.eval_cache = None
    trainer.config.stage = 2  # the uncached path: the full model forward
    uncached = trainer.evaluate()
    for key in ("head_loss", "top1", "top5"):
        assert cached[key] == pytest.approx(first[key])
        assert uncached[key] == pytest.approx(first[key], rel=1e-5)
    assert all(0.0 <= x <= 1.0 for x in first["top1"] + first["top5"])
    assert first["positions"] == [3 * 2 * (16 - 2), 3 * 2 * (16 - 3)]  # head k scores t against t+k+1


def test_fit_logs_evaluates_checkpoints_and_plots(tiny_medusa, tmp_path):
    cfg = _config(tmp_path, max_steps=6, eval_every=3, save_every=2, keep_checkpoints=2, plot=True)
    trainer = Trainer(tiny_medusa(), cfg, _batches(4), _batches(2, seed=9))
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3, 6]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and len(r["top1"]) == 2 for r in records if r["kind"] == "train")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]  # the two newest, complete
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert summary["steps"] == 6 and summary["first_eval"]["step"] == 0


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_medusa, tmp_path):
    model = tiny_medusa()
    cfg = _config(tmp_path, max_steps=10, save_every=3)
    trainer = Trainer(model, cfg, _batches(4))

    def poison(module, inputs, output):  # from the 5th step on, head 1 outputs NaN
        return output * float("nan") if trainer.step >= 4 else output

    model.medusa_heads.medusa_head[0][0].register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*last good checkpoint is .*checkpoint-0000003"):
        trainer.fit()
    assert trainer.step == 4
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000003"
    assert all(
        torch.isfinite(p).all() for p in model.medusa_heads.parameters()
    )  # the NaN step was not applied


def test_fit_makes_an_output_dir_that_does_not_exist_yet(tiny_medusa, tmp_path):
    out = tmp_path / "new" / "run"  # a Trainer built in Python, not through `fastmedusa train`
    Trainer(tiny_medusa(), _config(out, max_steps=2, eval_every=0), train_batches=_batches(2)).fit()
    assert (out / "metrics.jsonl").is_file() and latest_checkpoint(out) is not None


@pytest.mark.parametrize("batch", [[], [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], "abc"])
def test_train_step_names_what_a_batch_is(tiny_medusa, tmp_path, batch):
    trainer = Trainer(tiny_medusa(), _config(tmp_path))
    with pytest.raises(ValueError, match="train_step takes a batch \\(a dict with 'input_ids' and 'labels'"):
        trainer.train_step(batch)
    assert trainer.step == 0
