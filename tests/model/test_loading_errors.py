"""A base model that cannot be read is one clear error naming the file, not a parser's traceback."""

import pytest
import torch

from fastmedusa.model.loading import load_base_model


def test_a_corrupt_safetensors_file_is_named(make_llama, tmp_path):
    make_llama().save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(b"\xff" * 64)  # a header length no file can have
    with pytest.raises(ValueError, match=r"a \.safetensors file there cannot be read .*truncated or corrupt"):
        load_base_model(tmp_path)


def test_a_bad_pytorch_checkpoint_is_one_clear_error(make_llama, tmp_path, code_pickle):
    model = make_llama()

    def save_as_torch_checkpoint(directory):  # config.json + pytorch_model.bin, no safetensors file
        model.save_pretrained(directory)
        for weights in directory.glob("*.safetensors"):
            weights.unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")

    save_as_torch_checkpoint(tmp_path / "whole")
    assert load_base_model(tmp_path / "whole") is not None  # the format itself loads
    save_as_torch_checkpoint(tmp_path / "cut")
    weights = tmp_path / "cut" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="a PyTorch checkpoint there cannot be read .*truncated or corrupt"):
        load_base_model(tmp_path / "cut")
    save_as_torch_checkpoint(tmp_path / "code")
    runs_code, marker = code_pickle
    torch.save({"state": runs_code}, tmp_path / "code" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds Python objects besides tensors, so it was refused unread") as err:
        load_base_model(tmp_path / "code")
    assert "weights_only" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("tail", [b"\x03\x00\x00\x00", b"\x03\x00\x00\x00" + b"\x01" * 11])
def test_a_truncated_gguf_file_is_named(tmp_path, tail):
    pytest.importorskip("gguf")
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF" + tail)  # the magic and a version, then the file ends inside its header
    with pytest.raises(ValueError, match=r"the GGUF file cut\.gguf cannot be read .*truncated or not a GGUF file"):
        load_base_model(path)


def test_triton_loss_on_the_cpu_without_the_interpreter_says_what_to_pass(monkeypatch):
    from fastmedusa.ops.cross_entropy import resolve_impl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs its kernels on CUDA, not on cpu.*pass 'chunked' or 'auto'"):
        resolve_impl("triton", torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tests' way to run the kernels on the CPU
    assert resolve_impl("triton", torch.device("cpu")) == "triton"


@pytest.mark.parametrize(
    "field, value, match",
    [("medusa_num_heads", 0, r"num_heads \(medusa_num_heads in a heads config.json.*must be an integer >= 1, got 0"), ("draft_vocab_size", 5, "draft_vocab_size=5")],
)
def test_a_bad_value_in_a_heads_config_names_the_file(make_llama, tmp_path, field, value, match):
    import json

    from fastmedusa.model import MedusaConfig, MedusaModel
    from fastmedusa.model.export import read_heads

    MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2)).save_heads(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    for read in (read_heads, MedusaConfig.from_pretrained):
        with pytest.raises(ValueError, match=f"config.json: {match}.*fix it or re-export the heads"):
            read(tmp_path)


def test_a_broken_model_config_is_named_not_blamed_on_the_tokenizer(make_llama, tmp_path):
    from fastmedusa.model import load_tokenizer

    make_llama().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # cut off
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*restore the model's config.json"):
        load_tokenizer(str(tmp_path))
