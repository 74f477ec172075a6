"""Our exports through the loading rules of TGI, TensorRT-LLM's converter and FasterDecoding/Medusa's own
`MedusaModel.from_pretrained`, re-implemented here from their sources (none of them is installed here):

- TGI (server/text_generation_server/layers/speculative.py, `SpeculativeHead.load`): a speculator config.json
  without `architectures` loads as Medusa (`medusa_lm_head.safetensors`); with it, any architecture but
  MLPSpeculator's gives no speculator at all. models/__init__.py reads `medusa_num_heads`,
  `medusa_num_layers` and `base_model_name_or_path`.
- FasterDecoding/Medusa (medusa/model/medusa_model.py): `from_pretrained` torch.loads `medusa_lm_head.pt` only,
  into `nn.Sequential(*([ResBlock(h)] * medusa_num_layers), nn.Linear(h, vocab, bias=False))` per head (one
  ResBlock module repeated), 5 heads on GitHub (`medusa_num_heads` in the PyPI release medusa-llm 0.1),
  `load_state_dict(strict=False)`. bench/interop_fasterdecoding.sh runs the PyPI release itself.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastmedusa.cli import main
from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.export import HEADS_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, export_heads, read_heads

TOKEN_MAP = torch.tensor([3, 1, 4, 15, 92, 65, 35, 89, 79, 32, 38, 46])


def _heads(make_llama, tmp_path, num_heads=2, num_layers=1, shared=False, draft=False) -> MedusaModel:
    config = MedusaConfig(
        num_heads=num_heads, num_layers=num_layers, shared_lm_head=shared,
        draft_vocab_size=len(TOKEN_MAP) if draft else None,
    )  # fmt: skip
    model = MedusaModel.from_base(make_llama(), config, token_map=TOKEN_MAP if draft else None)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_heads(tmp_path / "heads")
    return model


def tgi_speculator_kind(directory) -> str | None:
    """What TGI's SpeculativeHead.load makes of a speculator directory: "medusa", "mlp" or None (no speculator)."""
    config = json.loads((directory / "config.json").read_text())
    try:
        architecture = config["architectures"][0]
    except KeyError:
        return "medusa"
    return "mlp" if architecture == "MLPSpeculatorPreTrainedModel" else None


def test_tgi_loads_the_medusa_layout_as_medusa(make_llama, tmp_path):
    _heads(make_llama, tmp_path)
    out = export_heads(tmp_path / "heads", tmp_path / "out", "medusa")
    for directory in (tmp_path / "heads", out):  # what train writes, and an export
        assert tgi_speculator_kind(directory) == "medusa"
        config = json.loads((directory / "config.json").read_text())
        assert {k: config[k] for k in ("medusa_num_heads", "medusa_num_layers")} == {
            "medusa_num_heads": 2, "medusa_num_layers": 1,
        }  # fmt: skip
        assert "base_model_name_or_path" in config and (directory / HEADS_WEIGHTS_NAME).is_file()
    card = (out / "README.md").read_text()
    assert "text-generation-launcher --model-id out --speculate 2" in card
    assert "--num_medusa_heads 2 --num_medusa_layers 1" in card  # TensorRT-LLM's converter ignores config.json


class _ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_from_pretrained(directory, hidden: int, vocab: int) -> tuple[nn.ModuleList, set[str]]:
    """FasterDecoding's head loading: 5 heads of [ResBlock] * L, medusa_lm_head.pt, strict=False; returns the
    heads and the names of their parameters that the file filled."""
    config = json.loads((directory / "config.json").read_text())
    heads = nn.ModuleList(
        nn.Sequential(*([_ResBlock(hidden)] * config["medusa_num_layers"]), nn.Linear(hidden, vocab, bias=False))
        for _ in range(5)
    )
    state = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    result = heads.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    filled = {name for name, _ in heads.named_parameters()} - set(result.missing_keys)
    return heads, filled


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("num_layers", [0, 1])
def test_legacy_pt_loads_in_fasterdecodings_loader_and_agrees(make_llama, tmp_path, shared, num_layers):
    model = _heads(make_llama, tmp_path, num_heads=5, num_layers=num_layers, shared=shared)
    out = export_heads(tmp_path / "heads", tmp_path / "out", "medusa", legacy_pt=True)
    heads, filled = fasterdecoding_from_pretrained(out, 32, 256)
    assert filled == {name for name, _ in heads.named_parameters()}, "a parameter kept its random init"
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = torch.stack([h(hidden) for h in heads])
        ours = model.medusa_heads.head_logits(hidden)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert set(load_file(str(out / HEADS_WEIGHTS_NAME))) == set(
        torch.load(out / LEGACY_WEIGHTS_NAME, weights_only=True)
    )
    assert "MedusaModel.from_pretrained('out'" in (out / "README.md").read_text()
    (out / HEADS_WEIGHTS_NAME).unlink()  # fastmedusa reads the .pt alone too
    assert read_heads(out).layout == "medusa-pt"
    export_heads(tmp_path / "heads", out, "medusa")  # a re-export without the flag leaves no stale .pt
    assert not (out / LEGACY_WEIGHTS_NAME).exists()


def test_legacy_pt_with_fewer_than_five_heads_says_what_fasterdecoding_does(make_llama, tmp_path, capsys):
    _heads(make_llama, tmp_path, num_heads=3)
    out = export_heads(tmp_path / "heads", tmp_path / "out", "medusa", legacy_pt=True)
    _, filled = fasterdecoding_from_pretrained(out, 32, 256)
    assert not any(name.startswith(("3.", "4.")) for name in filled)  # FasterDecoding's two extra heads
    assert "its extra heads keep random weights" in (out / "README.md").read_text()
    assert main(["export", str(tmp_path / "heads"), "--output", str(tmp_path / "cli"), "--legacy-pt"]) == 0
    assert "note: FasterDecoding/Medusa's MedusaModel.from_pretrained on GitHub builds 5 heads" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, layout, says",
    [
        ({"num_layers": 2}, "medusa", "repeats one ResBlock module"),
        ({"draft": True}, "medusa", "draft vocabulary, which FasterDecoding/Medusa cannot load"),
        ({}, "vllm", "use it with --format medusa"),
    ],
)
def test_legacy_pt_refuses_heads_fasterdecoding_would_load_wrong(make_llama, tmp_path, kwargs, layout, says):
    _heads(make_llama, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=says):
        export_heads(tmp_path / "heads", tmp_path / "out", layout, legacy_pt=True)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("shared", [False, True])
def test_draft_vocabulary_heads_say_which_engines_can_use_them(make_llama, tmp_path, shared, capsys):
    _heads(make_llama, tmp_path, shared=shared, draft=True)
    assert main(["export", str(tmp_path / "heads"), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    readers = "fastmedusa and vLLM can use" if shared else "only fastmedusa can use"
    assert f"note: a draft vocabulary of 12 tokens: {readers} these heads" in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "text-generation-launcher" not in card and "convert_checkpoint.py" not in card
    assert ("speculative_config" in card) == shared  # vLLM maps a token_map onto one shared projection only
    assert ("model_loader_extra_config={'enable_weights_track': False}" in card) == shared  # vLLM 0.32's bug
    assert readers in card
