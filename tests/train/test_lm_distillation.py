"""`--lm-loss kl`: stage 2's LM loss as KL from a frozen copy of the original model (the Medusa paper's
self-distillation loss), which keeps the model where it was."""

import copy

import pytest
import torch

from fastmedusa.train import TrainConfig, Trainer, random_batch


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(num_heads=2, max_steps=10, lr=1e-2, warmup_steps=0, output_dir=str(tmp_path), device="cpu",
                progress=False, plot=False, log_every=1, stage=2, lm_loss="kl", lr_schedule="constant",
                save_every=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _batch(vocab: int, seed: int = 0) -> dict:
    batch = random_batch(2, 16, vocab, torch.Generator().manual_seed(seed))
    batch["labels"][0, :5] = -100  # a prompt: not scored
    return batch


def _reference_kl(model, reference, batch) -> torch.Tensor:
    """float64: mean over positions t whose label t+1 is scored of KL(reference(t) || model(t)), from the
    two HF models' own logits (no fastmedusa loss code)."""
    with torch.no_grad():
        p = reference.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        q = model.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["labels"][:, 1:] != -100
    logp, logq = p[:, :-1].log_softmax(-1), q[:, :-1].log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl[scored].mean()


def test_lm_kl_matches_a_float64_reference_and_trains_backbone_and_lm_head(tiny_medusa):
    vocab = 256
    model = tiny_medusa(vocab_size=vocab)
    reference = copy.deepcopy(model.base)
    with torch.no_grad():  # the model drifts away from its reference
        for p in model.base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(vocab)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_hidden = reference.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    out = model(ids, mask, batch["labels"], lm_loss_weight=1.0, impl="torch",
                lm_teacher=(ref_hidden, reference.get_output_embeddings().weight))  # fmt: skip
    expected = _reference_kl(copy.deepcopy(model.base), copy.deepcopy(reference), batch)
    assert out.lm_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    out.lm_loss.backward()
    assert model.base.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.base.get_decoder().layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in reference.parameters())


def test_the_reference_is_frozen_and_the_original(tiny_medusa, tmp_path):
    vocab = 256
    model = tiny_medusa(vocab_size=vocab)
    original = {k: v.clone() for k, v in model.base.state_dict().items()}
    trainer = Trainer(model, _config(tmp_path))
    first = trainer.train_step(_batch(vocab))
    assert first["lm_loss"] == pytest.approx(0.0, abs=1e-6)  # at step 0 the model is its reference
    for step in range(3):
        metrics = trainer.train_step(_batch(vocab, seed=step + 1))
    assert metrics["lm_loss"] > 1e-6  # it moved, and the KL says how far
    assert all(torch.equal(v, original[k]) for k, v in trainer.reference.state_dict().items())
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    assert not torch.equal(model.base.get_decoder().layers[0].mlp.up_proj.weight, original["model.layers.0.mlp.up_proj.weight"])


def test_kl_anchor_moves_the_model_less_than_cross_entropy(tiny_medusa, tmp_path):
    """Same steps, same heads pulling on the backbone: the anchored run stays closer to the original."""
    vocab = 256
    drift = {}
    for lm_loss in ("ce", "kl"):
        torch.manual_seed(0)
        model = tiny_medusa(vocab_size=vocab)
        reference = copy.deepcopy(model.base)
        trainer = Trainer(model, _config(tmp_path / lm_loss, lm_loss=lm_loss, lr=3e-2))
        for step in range(8):
            trainer.train_step(_batch(vocab, seed=step))
        drift[lm_loss] = _reference_kl(copy.deepcopy(model.base), reference, _batch(vocab, seed=99)).item()
    assert drift["kl"] < 0.5 * drift["ce"], drift


def test_bad_lm_loss_settings_fail_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="--lm-loss kl is stage 2's LM loss"):
        _config(tmp_path, stage=1)
    with pytest.raises(ValueError, match="--lm-loss"):
        _config(tmp_path, lm_loss="mse")
    with pytest.raises(ValueError, match="no KL divergence: with --lm-loss kl"):
        _config(tmp_path, impl="liger", loss="ce")
    with pytest.raises(ValueError, match="not sharded under FSDP yet"):
        _config(tmp_path, fsdp=True)
