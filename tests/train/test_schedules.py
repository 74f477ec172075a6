"""Loss weighting and learning-rate schedules: pure functions, and the weights reaching the model's loss."""

import math

import pytest
import torch

from fastmedusa.train import TrainConfig, Trainer, head_weights, heads_ramp, lr_factor, random_batch


def test_heads_ramp_shapes():
    assert [heads_ramp("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [heads_ramp("linear", s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    sine = [heads_ramp("sine", s, 10) for s in range(11)]
    assert sine[0] == 0.0 and sine[-1] == pytest.approx(1.0)
    assert sine[5] == pytest.approx(math.sin(math.pi / 4))
    assert all(b > a for a, b in zip(sine, sine[1:]))  # rising
    assert sine[5] > heads_ramp("linear", 5, 10)  # concave: ahead of linear
    with pytest.raises(ValueError, match="constant, linear or sine"):
        heads_ramp("cosine", 1, 10)


def test_head_weights_decay_with_one_based_k():
    assert head_weights(3, 0.5, 0.8, ramp=0.5) == pytest.approx([0.25 * 0.8, 0.25 * 0.64, 0.25 * 0.512])
    assert head_weights(2, 1.0, 1.0) == [1.0, 1.0]


def test_lr_warmup_then_cosine():
    lrs = [lr_factor(s, total_steps=20, warmup_steps=4) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_factor(20, 20, 4) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(20, 20, 4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(12, 20, 4, schedule="constant") == 1.0


def test_trainer_loss_is_the_weighted_sum(tiny_medusa, tmp_path):
    """stage 2: loss = lm_loss + coefficient * ramp(step) * sum_k decay**k * CE_k, at the step's ramp."""
    model = tiny_medusa(num_heads=3)
    cfg = TrainConfig(
        stage=2, num_heads=3, heads_coefficient=0.2, heads_decay=0.8, heads_schedule="linear", max_steps=4,
        lr=1e-9, output_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    trainer = Trainer(model, cfg)
    batch = random_batch(2, 16, 49152, torch.Generator().manual_seed(0))
    trainer.train_step(batch)  # step 0: ramp 0, the heads do not count
    m = trainer.train_step(batch)  # step 1: ramp 1/4
    expected = [0.2 * 0.25 * 0.8**k for k in (1, 2, 3)]
    assert m["head_weights"] == pytest.approx(expected)
    total = m["lm_loss"] + sum(w * ce for w, ce in zip(expected, m["head_loss"]))
    assert m["loss"] == pytest.approx(total, rel=1e-5)
