"""Heads layouts: save -> export -> load gives identical head outputs in every layout; files, modes, model card."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.export import (
    HEADS_WEIGHTS_NAME,
    LEGACY_WEIGHTS_NAME,
    VLLM_WEIGHTS_NAME,
    export_heads,
    read_heads,
)


def _model(make_llama, num_heads=2, num_layers=1, shared=False, seed=0, perturb=True) -> MedusaModel:
    model = MedusaModel.from_base(
        make_llama(seed=seed), MedusaConfig(num_heads=num_heads, num_layers=num_layers, shared_lm_head=shared)
    )
    if perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.medusa_heads.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _logits(model: MedusaModel) -> torch.Tensor:
    hidden = torch.randn(3, 5, model.medusa_config.hidden_size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model.medusa_heads.head_logits(hidden)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_default_layout_is_fasterdecoding_with_its_config_fields(make_llama, tmp_path, umask_022):
    model = _model(make_llama, num_heads=3, num_layers=2)
    model.save_heads(tmp_path)
    keys = set(load_file(str(tmp_path / HEADS_WEIGHTS_NAME)))
    expected = {f"{i}.{j}.linear.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    assert keys == expected | {f"{i}.2.weight" for i in range(3)}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    assert config["model_type"] == "medusa" and config["medusa_fc_bias"] is True
    assert config["hidden_size"] == 32 and config["vocab_size"] == 256
    assert "base_model_name_or_path" in config
    for name in (HEADS_WEIGHTS_NAME, "config.json"):  # published weights are readable by others
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", HEADS_WEIGHTS_NAME]  # no temp files


def _fasterdecoding_heads(config: dict, path) -> nn.ModuleList:
    """FasterDecoding/Medusa's own head module (ResBlocks then a bias-free Linear), loaded strictly."""

    class ResBlock(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.linear = nn.Linear(hidden, hidden)
            self.act = nn.SiLU()

        def forward(self, x):
            return x + self.act(self.linear(x))

    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = nn.ModuleList(
        nn.Sequential(
            *[ResBlock(hidden) for _ in range(config["medusa_num_layers"])],
            nn.Linear(hidden, vocab, bias=False),
        )  # fmt: skip
        for _ in range(config["medusa_num_heads"])
    )
    heads.load_state_dict(load_file(str(path)), strict=True)
    return heads


@pytest.mark.parametrize("shared", [False, True])
def test_fasterdecoding_module_loads_our_file_and_agrees(make_llama, tmp_path, shared):
    model = _model(make_llama, num_heads=2, num_layers=1, shared=shared)
    model.save_heads(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    heads = _fasterdecoding_heads(config, tmp_path / HEADS_WEIGHTS_NAME)
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = torch.stack([h(hidden) for h in heads])
        ours = model.medusa_heads.head_logits(hidden)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["medusa", "vllm"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_save_export_load_round_trip(make_llama, tmp_path, layout, shared, num_layers):
    model = _model(make_llama, num_heads=3, num_layers=num_layers, shared=shared)
    model.save_heads(tmp_path / "heads")
    export_heads(tmp_path / "heads", tmp_path / "out", layout)
    weights = {"medusa": HEADS_WEIGHTS_NAME, "vllm": VLLM_WEIGHTS_NAME}[layout]
    assert (tmp_path / "out" / weights).is_file() and (tmp_path / "out" / "README.md").is_file()
    assert read_heads(tmp_path / "out").layout == layout
    fresh = _model(make_llama, num_heads=3, num_layers=num_layers, shared=shared, perturb=False)
    fresh.load_heads(tmp_path / "out")
    assert torch.equal(_logits(fresh), _logits(model))
    again = MedusaModel.from_base(
        make_llama(), MedusaConfig(num_heads=3, num_layers=num_layers, shared_lm_head=shared)
    )
    again.load_heads(tmp_path / "out")  # and back: vllm -> medusa keeps everything
    export_heads(tmp_path / "out", tmp_path / "back", "medusa")
    assert read_heads(tmp_path / "back").config == read_heads(tmp_path / "heads").config


def test_vllm_layout_names_and_config(make_llama, tmp_path):
    model = _model(make_llama, num_heads=2, num_layers=1)
    model.save_heads(tmp_path / "v", layout="vllm")
    keys = set(load_file(str(tmp_path / "v" / VLLM_WEIGHTS_NAME)))
    assert keys == {f"blocks.{i}.layers.0.{p}" for i in range(2) for p in ("weight", "bias")} | {
        f"lm_heads.{i}.weight" for i in range(2)
    }
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert {k: config[k] for k in ("num_heads", "num_hidden_layers", "truncated_vocab_size", "medusa_fc_bias")} == {
        "num_heads": 2, "num_hidden_layers": 1, "truncated_vocab_size": 256, "medusa_fc_bias": True,
    }  # fmt: skip
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert not (tmp_path / "v" / HEADS_WEIGHTS_NAME).exists()


def test_shared_head_in_vllm_layout_is_one_original_lm_head(make_llama, tmp_path):
    model = _model(make_llama, num_heads=3, num_layers=1, shared=True)
    model.save_heads(tmp_path, layout="vllm")
    keys = set(load_file(str(tmp_path / VLLM_WEIGHTS_NAME)))
    assert {k for k in keys if k.startswith("lm_heads")} == {"lm_heads.0.weight"}
    assert json.loads((tmp_path / "config.json").read_text())["original_lm_head"] is True
    torch.testing.assert_close(load_file(str(tmp_path / VLLM_WEIGHTS_NAME))["lm_heads.0.weight"],
                               model.base.lm_head.weight, rtol=0, atol=0)  # fmt: skip


def test_reads_earlier_prefixed_layout_and_torch_save(make_llama, tmp_path):
    model = _model(make_llama)
    prefixed = {k: v.contiguous() for k, v in model.medusa_heads.state_dict().items()}
    assert all(k.startswith("medusa_head.") for k in prefixed)
    (tmp_path / "old").mkdir()
    save_file(prefixed, str(tmp_path / "old" / HEADS_WEIGHTS_NAME))
    (tmp_path / "old" / "config.json").write_text(
        json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1, "model_type": "fastmedusa"})
    )
    (tmp_path / "pt").mkdir()
    torch.save(model.medusa_heads.medusa_head.state_dict(), tmp_path / "pt" / LEGACY_WEIGHTS_NAME)
    (tmp_path / "pt" / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    for name, layout in (("old", "fastmedusa-prefixed"), ("pt", "medusa-pt")):
        assert read_heads(tmp_path / name).layout == layout
        fresh = _model(make_llama, perturb=False)
        fresh.load_heads(tmp_path / name)
        assert torch.equal(_logits(fresh), _logits(model)), name
        export_heads(tmp_path / name, tmp_path / f"{name}_vllm", "vllm")
        assert read_heads(tmp_path / f"{name}_vllm").layout == "vllm"


def test_bad_torch_save_heads_file_is_one_clear_error(tmp_path, code_pickle):
    runs_code, marker = code_pickle
    cases = {
        "code": ({"0.0.linear.weight": runs_code}, "holds Python objects besides tensors.*refused unread"),
        "list": ([1, 2, 3], "holds a list, not a dict of tensors"),
        "int": ({"0.0.linear.weight": 5}, "'0.0.linear.weight' is a int, not a tensor"),
    }
    for name, (payload, message) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(payload, tmp_path / name / LEGACY_WEIGHTS_NAME)
        (tmp_path / name / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
        with pytest.raises(ValueError, match=message) as err:
            read_heads(tmp_path / name)
        assert "weights_only" not in str(err.value), "torch's advice to load unsafely is not passed on"
    assert not marker.exists()
    (tmp_path / "cut").mkdir()
    data = (tmp_path / "list" / LEGACY_WEIGHTS_NAME).read_bytes()
    (tmp_path / "cut" / LEGACY_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    (tmp_path / "cut" / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_heads(tmp_path / "cut")
    (tmp_path / "noise").mkdir()  # bytes that are no pickle at all: corrupt, not "holds Python objects"
    (tmp_path / "noise" / LEGACY_WEIGHTS_NAME).write_bytes(bytes(range(256)) * 2)
    (tmp_path / "noise" / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="is truncated or corrupt: export or train the heads again") as err:
        read_heads(tmp_path / "noise")
    assert "weights_only" not in str(err.value)


TOKEN_MAP = torch.tensor([5, 0, 17, 200, 3, 9, 255, 64, 12, 100, 42, 7])


def _draft_model(make_llama, shared: bool, perturb: bool = True) -> MedusaModel:
    config = MedusaConfig(num_heads=2, num_layers=1, shared_lm_head=shared, draft_vocab_size=len(TOKEN_MAP))
    model = MedusaModel.from_base(make_llama(), config, token_map=TOKEN_MAP if perturb else None)
    if perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.medusa_heads.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("shared", [False, True])
def test_draft_vocabulary_round_trip(make_llama, tmp_path, shared):
    """Heads over a draft vocabulary: projections of N rows plus `token_map`, the N token ids they score."""
    model = _draft_model(make_llama, shared)
    model.save_heads(tmp_path / "heads")
    saved = load_file(str(tmp_path / "heads" / HEADS_WEIGHTS_NAME))
    assert torch.equal(saved["token_map"], TOKEN_MAP) and saved["0.1.weight"].shape == (12, 32)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["truncated_vocab_size"] == config["draft_vocab_size"] == 12 and config["vocab_size"] == 256
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    layouts = ("medusa", "vllm") if shared else ("medusa",)
    for layout in layouts:
        out = export_heads(tmp_path / "heads", tmp_path / layout, layout)
        assert "draft vocabulary | 12 tokens" in (out / "README.md").read_text()
        fresh = _draft_model(make_llama, shared, perturb=False)  # a placeholder map until the saved one loads
        fresh.load_heads(out)
        assert torch.equal(fresh.medusa_heads.token_map, TOKEN_MAP)
        assert torch.equal(_logits(fresh), _logits(model)), layout
        assert torch.equal(fresh.medusa_heads.draft_topk(hidden, 5), model.medusa_heads.draft_topk(hidden, 5))
    if shared:
        assert len(load_file(str(tmp_path / "vllm" / VLLM_WEIGHTS_NAME))["lm_heads.0.weight"]) == 12
    else:
        with pytest.raises(ValueError, match="token_map only to one shared LM head"):
            export_heads(tmp_path / "heads", tmp_path / "vllm", "vllm")


def test_export_from_a_training_output_dir_writes_a_model_card(make_llama, tmp_path):
    model = _model(make_llama, num_heads=2)
    heads = tmp_path / "run" / "heads"
    model.save_heads(heads)
    config = json.loads((heads / "config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config["training"] = {"stage": 1, "steps": 60, "data": "sharegpt.json",
                          "final_eval": {"top1": [0.412, 0.205], "top5": [0.7, 0.5]}}  # fmt: skip
    (heads / "config.json").write_text(json.dumps(config))
    (heads / "tree.json").write_text(
        json.dumps({"paths": [[0], [1], [0, 0]], "expected_accept_length": 1.83})
    )
    (heads / "tokenizer.json").write_text("{}")
    out = export_heads(tmp_path / "run", tmp_path / "hub", "vllm")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    for text in ("| 1 | t+2 | 41.2% | 70.0% |", "| 2 | t+3 | 20.5% | 50.0% |", "| steps | 60 |",
                 "| data | sharegpt.json |", "expected 1.83 tokens/step", "'num_speculative_tokens': 2"):  # fmt: skip
        assert text in card, text
    assert (out / "tree.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 60
    assert "Before serving them with TGI" not in card


def test_the_model_card_of_heads_on_the_embedded_model_says_what_tgi_needs(make_llama, tmp_path):
    model = _model(make_llama, num_heads=2)
    model.save_heads(tmp_path / "heads")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    (tmp_path / "heads" / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": "embedded"}))
    card = (export_heads(tmp_path / "heads", tmp_path / "hub", "medusa") / "README.md").read_text()
    assert "record their base model as `embedded`" in card
    assert "set `base_model_name_or_path` in config.json to `HuggingFaceTB/SmolLM2-135M-Instruct`" in card


@pytest.mark.parametrize(
    "name, content",
    [
        ("eval.json", {"labels": {"top1": [0.1, 0.2]}}),  # no top5
        ("eval.json", {"labels": {"top1": ["a"], "top5": [0.5]}}),
        ("eval.json", {"tree": {"name": "x"}}),
        ("tree.json", {"paths": [[0]], "expected_accept_length": "n/a"}),
        ("config.json", {"training": "abc"}),
        ("config.json", {"training": {"final_eval": {"top1": [0.5]}}}),
    ],
)
def test_measurements_out_of_shape_cost_their_card_section_not_the_export(make_llama, tmp_path, name, content):
    _model(make_llama).save_heads(tmp_path / "h")
    path = tmp_path / "h" / name
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **content}))
    out = export_heads(tmp_path / "h", tmp_path / "o", "medusa")
    card = (out / "README.md").read_text()
    assert ("Not shown:" in card) == (content != {"training": "abc"})  # a training record that is no object: none
    assert (out / HEADS_WEIGHTS_NAME).is_file()


def test_export_errors_name_the_fix(make_llama, tmp_path):
    model = _model(make_llama)
    model.save_heads(tmp_path / "h")
    with pytest.raises(ValueError, match="--format 'onnx'"):
        export_heads(tmp_path / "h", tmp_path / "o", "onnx")
    with pytest.raises(ValueError, match="is the heads directory itself"):
        export_heads(tmp_path / "h", tmp_path / "h", "vllm")
    with pytest.raises(FileNotFoundError, match="no heads directory"):
        export_heads(tmp_path / "nope", tmp_path / "o", "vllm")
    (tmp_path / "h" / "tree.json").write_text(json.dumps({"num_heads": 5, "paths": [[0]]}))
    with pytest.raises(ValueError, match="tree.json was measured for 5 Medusa heads but these heads have"):
        export_heads(tmp_path / "h", tmp_path / "o", "vllm")  # generate would refuse the copy
    assert not (tmp_path / "o").exists()
    (tmp_path / "h" / "tree.json").unlink()
    (tmp_path / "h" / HEADS_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no head weights"):
        read_heads(tmp_path / "h")
    save_file({"0.0.linear.weight": torch.zeros(2, 2), "blocks.1.layers.0.weight": torch.zeros(2, 2)},
              str(tmp_path / "h" / HEADS_WEIGHTS_NAME))  # fmt: skip
    with pytest.raises(ValueError, match="mixes key layouts"):
        read_heads(tmp_path / "h")


def test_export_never_writes_over_a_model_directory(make_llama, tmp_path):
    """A base model's directory (or any non-empty one without heads) is refused, every file kept; an earlier
    export is replaced, in either layout."""
    model = _model(make_llama)
    model.save_heads(tmp_path / "h")
    base_dir = tmp_path / "base"
    model.base.save_pretrained(base_dir)
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    with pytest.raises(ValueError, match="already holds files that are not exported heads .*config.json"):
        export_heads(tmp_path / "h", base_dir, "vllm")
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before
    export_heads(tmp_path / "h", tmp_path / "o", "vllm")
    export_heads(tmp_path / "h", tmp_path / "o", "medusa")  # a re-export replaces the earlier one
    assert read_heads(tmp_path / "o").layout == "medusa" and not (tmp_path / "o" / VLLM_WEIGHTS_NAME).exists()


def test_export_replaces_only_exports_and_drops_what_described_the_earlier_heads(make_llama, tmp_path):
    """Heads that `train` or `save_heads` wrote are refused (a run's only copy); over an earlier export, its
    tree.json and eval.json go when the new heads have none, so the model card and `generate` never describe
    or use another run's measurements."""
    model = _model(make_llama)
    model.save_heads(tmp_path / "a")
    (tmp_path / "a" / "tree.json").write_text('{"paths": [[0]]}')
    (tmp_path / "a" / "eval.json").write_text('{"heads": "a"}')
    model.save_heads(tmp_path / "b")  # no tree.json, no eval.json
    export_heads(tmp_path / "a", tmp_path / "exp", "medusa")
    assert (tmp_path / "exp" / "tree.json").exists() and (tmp_path / "exp" / "eval.json").exists()
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "exp" / "notes.txt").write_text("mine")  # not a file an export writes: kept
    export_heads(tmp_path / "a", tmp_path / "exp", "medusa")
    assert (tmp_path / "exp" / "tokenizer.json").exists() and (tmp_path / "exp" / "chat_template.jinja").exists()
    export_heads(tmp_path / "b", tmp_path / "exp", "medusa")
    assert not (tmp_path / "exp" / "tree.json").exists() and not (tmp_path / "exp" / "eval.json").exists()
    assert not (tmp_path / "exp" / "tokenizer.json").exists()  # the earlier heads' tokenizer, perhaps another's
    assert not (tmp_path / "exp" / "chat_template.jinja").exists()
    assert (tmp_path / "exp" / "notes.txt").read_text() == "mine"
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(ValueError, match="holds heads that `fastmedusa export` did not write"):
        export_heads(tmp_path / "exp", tmp_path / "b", "medusa")
    run = tmp_path / "run"
    model.save_heads(run / "heads")
    (run / "train_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is the heads directory of the training run"):
        export_heads(tmp_path / "exp", run / "heads", "medusa")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def test_save_heads_never_writes_over_a_model_or_a_file(make_llama, tmp_path, monkeypatch):
    model = _model(make_llama)
    base_dir = tmp_path / "base"
    model.base.save_pretrained(base_dir)
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    with pytest.raises(ValueError, match="holds a model's config.json .*'llama'.*pass a new or empty directory"):
        model.save_heads(base_dir)
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file: pass a directory for the heads"):
        model.save_heads(tmp_path / "afile")
    model.save_heads(tmp_path / "h")
    model.save_heads(tmp_path / "h")  # earlier heads are replaced
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    model.save_heads(tmp_path / "h")  # FasterDecoding's config.json has no model_type: still heads
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    written = model.save_heads("~/heads")
    assert written == tmp_path / "home" / "heads" and read_heads("~/heads").config.num_heads == 2


def test_a_heads_directory_given_as_the_base_model_is_named(make_llama, tmp_path):
    from fastmedusa.model import load_base_model

    _model(make_llama).save_heads(tmp_path / "h")
    with pytest.raises(ValueError, match="is a Medusa heads directory, not a base model: pass it as the heads"):
        load_base_model(tmp_path / "h")
    with pytest.raises(ValueError, match="is a Medusa heads directory"):
        MedusaModel.from_pretrained(tmp_path / "h", heads=tmp_path / "h")


def test_broken_files_are_errors_naming_the_file(make_llama, tmp_path):
    _model(make_llama).save_heads(tmp_path)
    weights = tmp_path / HEADS_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{weights} is truncated or corrupt"):
        read_heads(tmp_path)
    config = tmp_path / "config.json"
    config.write_bytes(b"{\xff")
    with pytest.raises(ValueError, match=f"{config} is not UTF-8 text"):
        read_heads(tmp_path)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds no JSON object"):
        read_heads(tmp_path)


@pytest.mark.parametrize("layout", ["medusa", "vllm"])
@pytest.mark.parametrize(
    "field, value, says",
    [("medusa_num_heads", 5, "medusa_num_heads=5 but .* holds 2 heads"),
     ("medusa_num_heads", 1, "medusa_num_heads=1 but .* holds 2 heads"),
     ("medusa_num_layers", 2, r"medusa_num_layers=2 but .* holds 1 ResBlock layer\(s\) per head"),
     ("hidden_size", 64, "hidden_size=64 but .* holds heads of hidden size 32")],
)  # fmt: skip
def test_a_config_that_disagrees_with_its_weights_names_the_field(make_llama, tmp_path, layout, field, value, says):
    """A hand-edited config.json is found when the heads are read, for export and for loading alike."""
    model = _model(make_llama)
    export_heads(model.save_heads(tmp_path / "src"), tmp_path / "h", layout)
    config = tmp_path / "h" / "config.json"
    edited = json.loads(config.read_text())
    if layout == "vllm":  # vLLM's names for the same fields
        field = {"medusa_num_heads": "num_heads", "medusa_num_layers": "num_hidden_layers"}.get(field, field)
        says = says.replace("medusa_num_heads", "num_heads").replace("medusa_num_layers", "num_hidden_layers")
    edited[field] = value
    config.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=f"{config} says {says}: set it in {config} to what the weights hold"):
        read_heads(tmp_path / "h")
    with pytest.raises(ValueError, match=says):
        export_heads(tmp_path / "h", tmp_path / "o", "medusa")
    fresh = _model(make_llama)
    with pytest.raises(ValueError, match=says):
        fresh.load_heads(tmp_path / "h")


def test_an_unfinished_run_says_how_to_finish_it(tmp_path):
    from fastmedusa.model.export import find_heads_dir

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "train_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has not written its heads/ yet .*train --resume --output-dir"):
        find_heads_dir(tmp_path / "run")


def test_heads_written_over_lose_the_old_measurements_and_a_runs_directory_means_its_heads(make_llama, tmp_path):
    """save_heads over heads with a tree.json/eval.json: those described the heads written over (`generate`
    would use another's tree by default). Heads loaded from a run's directory decode with its heads/ tree."""
    model = _model(make_llama)
    model.save_heads(tmp_path / "h")
    (tmp_path / "h" / "tree.json").write_text('{"paths": [[0]]}')
    (tmp_path / "h" / "eval.json").write_text("{}")
    model.save_heads(tmp_path / "h")
    assert not (tmp_path / "h" / "tree.json").exists() and not (tmp_path / "h" / "eval.json").exists()
    run = tmp_path / "run"
    model.save_heads(run / "heads")
    (run / "train_config.json").write_text("{}")
    model.load_heads(run)
    assert model.heads_dir == run / "heads"


def test_heads_record_a_base_model_they_can_find_again(tmp_path, monkeypatch):
    """A relative path, recorded as typed, named a hub id from any other directory; the embedded default was
    recorded as nothing (its model card said "unknown"). Hub ids stay as they are."""
    from fastmedusa.model.medusa_model import recorded_base_name

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recorded_base_name("m") == str(tmp_path / "m")
    assert recorded_base_name(None) == "embedded"
    assert recorded_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
