"""Held-out evaluation: the stage-1 hidden-state cache is keyed by batch, whatever its budget."""

import pytest
import torch

from fastmedusa.train import TrainConfig, Trainer, random_batch
from fastmedusa.train.evaluate import HiddenCache


def _trainer(tiny_medusa, tmp_path, eval_batches) -> Trainer:
    cfg = TrainConfig(
        num_heads=2, max_steps=1, output_dir=str(tmp_path), device="cpu", progress=False, plot=False
    )
    return Trainer(tiny_medusa(), cfg, eval_batches=eval_batches)


def test_a_cache_budget_that_skips_a_batch_gives_the_uncached_result(tiny_medusa, tmp_path):
    """A big batch that does not fit, then a small one that does: the small one must not take the big one's slot."""
    g = torch.Generator().manual_seed(3)
    big, small = random_batch(4, 16, 49152, g), random_batch(1, 16, 49152, g)
    trainer = _trainer(tiny_medusa, tmp_path, [big, small])
    reference = _trainer(tiny_medusa, tmp_path, [big, small])
    reference.eval_cache = None  # the backbone runs for every batch
    expected = reference.evaluate()
    small_bytes = 1 * 16 * 32 * 4  # (rows, T, H) fp32
    trainer.eval_cache = HiddenCache(budget_bytes=small_bytes)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert list(trainer.eval_cache.entries) == [1] and trainer.eval_cache.nbytes == small_bytes
    for result in (first, second):
        for key in ("head_loss", "top1", "top5", "positions"):
            assert result[key] == pytest.approx(expected[key], rel=1e-5), key


def test_cache_put_respects_the_budget_and_the_key():
    cache = HiddenCache(budget_bytes=100)
    assert cache.put(3, torch.zeros(10))  # 40 bytes
    assert not cache.put(3, torch.zeros(1))  # a key is filled once
    assert not cache.put(0, torch.zeros(16))  # 64 more bytes would pass 100
    assert cache.put(1, torch.zeros(15))
    assert cache.get(0) is None and cache.get(3).shape == (10,) and len(cache) == 2
