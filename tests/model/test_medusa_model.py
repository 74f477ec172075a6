"""MedusaModel: heads start as the base model's predictions, save/load round trips, stages, mismatches."""

import pytest
import torch
from safetensors.torch import load_file

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.medusa_model import HEADS_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME


def _ids(vocab: int, shape=(2, 12), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_fresh_heads_predict_what_the_lm_head_predicts(make_llama, num_layers, tie):
    base = make_llama(tie=tie)
    model = MedusaModel.from_base(base, MedusaConfig(num_heads=3, num_layers=num_layers))
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        lm_logits = base(ids).logits
        hidden = model.backbone_hidden_states(ids)
        head_logits = model.medusa_heads.head_logits(hidden)
    assert head_logits.shape == (3, *lm_logits.shape)
    for k in range(3):
        torch.testing.assert_close(head_logits[k], lm_logits, rtol=1e-5, atol=1e-5)


def _perturb(model: MedusaModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_save_load_round_trip_uses_fasterdecoding_names(tiny_llama, make_llama, tmp_path):
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2, num_layers=1))
    _perturb(model)
    model.save_heads(tmp_path)
    keys = set(load_file(str(tmp_path / HEADS_WEIGHTS_NAME)))
    assert keys == {f"{i}.{name}" for i in range(2) for name in ("0.linear.weight", "0.linear.bias", "1.weight")}
    fresh = MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2, num_layers=1))
    fresh.load_heads(tmp_path)
    for (name, a), b in zip(
        model.medusa_heads.state_dict().items(), fresh.medusa_heads.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_loads_fasterdecoding_torch_save_format(tiny_llama, make_llama, tmp_path):
    """FasterDecoding/Medusa saves `medusa_head.state_dict()` (keys `0.0.linear.weight`) with torch.save."""
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2, num_layers=1))
    _perturb(model)
    MedusaConfig(num_heads=2, num_layers=1).save_pretrained(tmp_path)
    torch.save(model.medusa_heads.medusa_head.state_dict(), tmp_path / LEGACY_WEIGHTS_NAME)
    fresh = MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2, num_layers=1))
    fresh.load_heads(tmp_path)
    for a, b in zip(model.medusa_heads.parameters(), fresh.medusa_heads.parameters()):
        assert torch.equal(a, b)


def test_mismatched_heads_are_a_clear_error(tiny_llama, make_llama, tmp_path):
    MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2)).save_heads(tmp_path / "two")
    three = MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=3))
    with pytest.raises(ValueError, match="num_heads=2, model has 3"):
        three.load_heads(tmp_path / "two")
    other_vocab = MedusaModel.from_base(make_llama(vocab_size=128), MedusaConfig(num_heads=2))
    with pytest.raises(ValueError, match="another base model"):
        other_vocab.load_heads(tmp_path / "two")
    with pytest.raises(FileNotFoundError, match="no heads directory"):
        three.load_heads(tmp_path / "missing")


@pytest.mark.parametrize("draft_vocab", [None, 16])
def test_shared_lm_head_heads_of_another_vocabulary_are_refused(make_llama, tmp_path, draft_vocab):
    """Shared-LM-head heads hold no projection whose shape would show another base model (and a draft map's ids
    fit a larger vocabulary too): load_heads checks the vocabulary their config states, as from_pretrained does."""

    def config() -> MedusaConfig:
        return MedusaConfig(num_heads=2, shared_lm_head=True, draft_vocab_size=draft_vocab)

    MedusaModel.from_base(make_llama(vocab_size=256), config()).save_heads(tmp_path / "heads")
    make_llama(vocab_size=320).save_pretrained(tmp_path / "other")
    message = r"\(vocab 256, hidden 32\) does not match the base model's lm_head \(vocab 320, hidden 32\).*load them on"
    with pytest.raises(ValueError, match=message):
        MedusaModel.from_base(make_llama(vocab_size=320), config()).load_heads(tmp_path / "heads")
    with pytest.raises(ValueError, match=message):
        MedusaModel.from_pretrained(tmp_path / "other", heads=tmp_path / "heads")


def _train_one_step(model: MedusaModel, stage: int) -> None:
    model.set_stage(stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids(model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()


def test_stage_1_freezes_the_backbone(tiny_llama):
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2))
    before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    heads_before = [p.detach().clone() for p in model.medusa_heads.parameters()]
    _train_one_step(model, stage=1)
    for name, p in model.base.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.medusa_heads.parameters()))


def test_stage_2_moves_the_backbone(tiny_llama):
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2))
    before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    _train_one_step(model, stage=2)
    moved = [n for n, p in model.base.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every backbone tensor got a gradient and an update


def test_wrong_kinds_of_arguments_are_named(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="config must be a MedusaConfig, got dict"):
        MedusaModel.from_base(tiny_llama, {"num_heads": 2})
    with pytest.raises(TypeError, match="from_base takes a loaded Hugging Face causal LM, got str"):
        MedusaModel.from_base("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(TypeError, match="shared_lm_head='false': pass True or False"):
        MedusaConfig(shared_lm_head="false")
    with pytest.raises(TypeError, match="num_heads=True: pass an integer"):
        MedusaConfig(num_heads=True)
    with pytest.raises(TypeError, match="hidden_size=64.0: pass an integer"):
        MedusaConfig(hidden_size=64.0)
    assert MedusaConfig(num_heads=torch.tensor(3).item()).num_heads == 3
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2))
    model.save_heads(tmp_path / "h")
    with pytest.raises(ValueError, match="config=num_heads=5 but the heads in .* have 2: heads bring their own"):
        MedusaModel.from_pretrained(tmp_path / "base", heads=tmp_path / "h", config=MedusaConfig(num_heads=5))
    from fastmedusa.model import load_base_model

    with pytest.raises(ValueError, match="dtype='randn': pass a torch dtype or one of bf16, fp16, fp32"):
        load_base_model(tmp_path / "base", dtype="randn")
    tiny_llama.save_pretrained(tmp_path / "base")
    assert next(load_base_model(tmp_path / "base", dtype="float64").parameters()).dtype == torch.float64
    same = MedusaModel.from_pretrained(tmp_path / "base", heads=tmp_path / "h", config=MedusaConfig(num_heads=2))
    assert same.medusa_config.num_heads == 2  # a config that agrees with the heads' own is accepted


def test_forward_checks_shapes_and_dtypes(tiny_llama):
    model = MedusaModel.from_base(tiny_llama, MedusaConfig(num_heads=2))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\) integer token ids, got torch.int64 of shape \(6,\)"):
        model(ids[0], labels=ids[0])
    with pytest.raises(ValueError, match="input_ids must be .* got torch.float32"):
        model(ids.float(), labels=ids)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) must equal input_ids shape \(1, 6\)"):
        model(ids, attention_mask=torch.ones(1, 3), labels=ids)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="label 9999 is outside"):
        model(ids, labels=torch.full_like(ids, 9999))


def test_recorded_base_name_keeps_names_of_the_embedded_model(tmp_path, monkeypatch):
    """Heads record "embedded" for any name of the embedded model, even where the current directory holds a
    folder of that name (the loader loads the embedded model for it); a local path absolute, a hub id as it is."""
    from fastmedusa.model.medusa_model import recorded_base_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    (tmp_path / "mine").mkdir()
    assert [recorded_base_name(n) for n in (None, "", "default", "SmolLM2")] == ["embedded"] * 4
    assert recorded_base_name("mine") == str((tmp_path / "mine").resolve())
    assert recorded_base_name("org/some-model") == "org/some-model"
