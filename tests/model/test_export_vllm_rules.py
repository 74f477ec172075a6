"""Our exports through vLLM's Medusa loading rules, re-implemented here from vllm/model_executor/models/medusa.py
and vllm/transformers_utils/configs/medusa.py (vLLM itself is not imported: it pins its own torch).

The rules: config keys holding "num" and "heads" become `num_heads`, "num" and "layers" `num_hidden_layers`;
`truncated_vocab_size` defaults to `vocab_size`; ResBlock linears have a bias only when `medusa_fc_bias`;
weight names lose a `medusa_heads.` prefix and FasterDecoding's `{h}.{l}.linear.*` / `{h}.{N}.weight` become
`blocks.{h}.layers.{l}.*` / `lm_heads.{h}.weight`; a name that is not a parameter is silently dropped;
`token_map` is kept only when truncated_vocab_size < vocab_size, and then lm_head rows are gathered by it;
`original_lm_head` means one `lm_head` loaded from `lm_heads.0.weight`; logits outside the draft vocabulary
are -inf.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fastmedusa.model import MedusaConfig, MedusaModel

REPO = Path(__file__).resolve().parents[2]


def vllm_config(directory: Path) -> dict:
    raw = json.loads((directory / "config.json").read_text())
    assert raw["model_type"] == "medusa", "vLLM picks its Medusa config class by model_type"
    config = {}
    for key, value in raw.items():
        if "num" in key and "heads" in key:
            config["num_heads"] = value
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = value
        else:
            config[key] = value
    if config.get("truncated_vocab_size") is None:
        config["truncated_vocab_size"] = config["vocab_size"]
    return config


class VllmMedusa(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        bias = c.get("medusa_fc_bias", False)
        self.blocks = nn.ModuleList(nn.Module() for _ in range(c["num_heads"]))
        for block in self.blocks:
            block.layers = nn.ModuleList(
                nn.Linear(c["hidden_size"], c["hidden_size"], bias=bias)
                for _ in range(c["num_hidden_layers"])
            )
        self.original = c.get("original_lm_head", False)
        self.vocab, self.truncated = c["vocab_size"], c["truncated_vocab_size"]
        if self.original:
            self.lm_head = nn.Linear(c["hidden_size"], self.truncated, bias=False)
        else:
            self.lm_heads = nn.ModuleList(
                nn.Linear(c["hidden_size"], c["vocab_size"], bias=False) for _ in range(c["num_heads"])
            )
        self.token_map = None

    def load(self, weights: dict[str, torch.Tensor]) -> set[str]:
        params = dict(self.named_parameters())
        staged = {}
        for name, value in weights.items():
            name = name.replace("medusa_heads.", "")
            parts = name.split(".")
            if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
                rest = parts[2:]
                if "linear" in rest:
                    name = f"blocks.{parts[0]}.layers.{parts[1]}." + ".".join(
                        rest[rest.index("linear") + 1 :]
                    )
                else:
                    name = f"lm_heads.{parts[0]}." + ".".join(rest)
            if name == "token_map":
                if self.truncated < self.vocab:
                    self.token_map = value
            elif name in params:
                staged[name] = value
            elif self.original and name == "lm_heads.0.weight":
                staged["lm_head.weight"] = value
        for name, value in staged.items():
            if "lm_head" in name and self.token_map is not None and value.shape[0] > self.token_map.shape[0]:
                value = value[self.token_map]
            assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
            with torch.no_grad():
                params[name].copy_(value)
        assert self.truncated == self.vocab or self.token_map is not None
        return set(staged)

    def logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        out = []
        heads = [self.lm_head] * len(self.blocks) if self.original else self.lm_heads
        for block, head in zip(self.blocks, heads):
            x = hidden
            for layer in block.layers:
                x = x + F.silu(layer(x))
            logits = head(x)[..., : self.truncated]
            if self.token_map is not None:
                full = torch.full((*logits.shape[:-1], self.vocab), -torch.inf)
                full[..., self.token_map] = logits
                logits = full
            out.append(logits)
        return out


def load_like_vllm(directory: Path) -> tuple[VllmMedusa, set[str]]:
    config = vllm_config(directory)
    model = VllmMedusa(config)
    weights = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    loaded = model.load(weights)
    return model, loaded


@pytest.mark.parametrize("layout", ["vllm", "medusa"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_vllm_rules_load_every_tensor_and_agree(make_llama, tmp_path, layout, shared, num_layers):
    model = MedusaModel.from_base(
        make_llama(), MedusaConfig(num_heads=3, num_layers=num_layers, shared_lm_head=shared)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_heads(tmp_path, layout=layout)
    theirs, loaded = load_like_vllm(tmp_path)
    assert loaded == {n for n, _ in theirs.named_parameters()}, "a parameter kept its random init"
    hidden = torch.randn(4, 32, generator=g)
    with torch.no_grad():
        ours = model.medusa_heads.head_logits(hidden)
        for k, logits in enumerate(theirs.logits(hidden)):
            torch.testing.assert_close(logits, ours[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["vllm", "medusa"])
def test_vllm_rules_with_a_token_map(make_llama, tmp_path, layout):
    """A shared head with a draft vocabulary: vLLM keeps N of the LM head's rows and sets the rest to -inf (the
    medusa layout's K copies of those rows load as its one original_lm_head)."""
    token_map = torch.tensor([3, 1, 4, 15, 92, 65, 35, 89, 79, 32, 38, 46])
    config = MedusaConfig(num_heads=2, num_layers=1, shared_lm_head=True, draft_vocab_size=len(token_map))
    model = MedusaModel.from_base(make_llama(), config, token_map=token_map)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
    model.save_heads(tmp_path, layout=layout)
    theirs, loaded = load_like_vllm(tmp_path)
    assert loaded == {n for n, _ in theirs.named_parameters()}, "a parameter kept its random init"
    assert torch.equal(theirs.token_map, token_map)
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    draft = model.medusa_heads.head_logits(hidden).detach()  # (K, 4, N) over the draft rows
    outside = torch.ones(256, dtype=torch.bool)
    outside[token_map] = False
    for k, logits in enumerate(theirs.logits(hidden)):
        torch.testing.assert_close(logits[:, token_map], draft[k], rtol=1e-6, atol=1e-6)
        assert torch.isinf(logits[:, outside]).all()
    assert torch.equal(  # vLLM drafts the argmax over the full vocabulary: the same token ids as ours
        torch.stack([x.argmax(-1) for x in theirs.logits(hidden)]),
        model.medusa_heads.draft_topk(hidden, 1)[..., 0],
    )


@pytest.mark.slow
def test_real_vllm_generates_the_same_text_with_our_heads(tmp_path):
    """bench/interop_vllm.sh against an installed vLLM (VLLM_PYTHON, default /tmp/vllm-venv); skipped without."""
    import os

    vllm_python = os.environ.get("VLLM_PYTHON", "/tmp/vllm-venv/bin/python")
    if not Path(vllm_python).exists() or subprocess.run([vllm_python, "-c", "import vllm"],
                                                         capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip(f"vLLM is not installed at {vllm_python} (see bench/interop_vllm.sh)")
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHON": sys.executable, "VLLM_PYTHON": vllm_python}
    proc = subprocess.run(["bash", str(REPO / "bench/interop_vllm.sh"), str(tmp_path / "work"), str(result)],
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(result.read_text())["runs"]
    assert all(r["equal_to_no_speculation"] for n, r in runs.items() if n != "no_speculation")
