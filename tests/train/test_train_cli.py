"""`fastmedusa train`: flags map onto TrainConfig, bad input is one `error:` line, a tiny run learns and exports."""

import argparse
import json
from dataclasses import fields

import pytest
import torch

from fastmedusa.cli import main
from fastmedusa.train import TrainConfig
from fastmedusa.train.cli import HELP, add_train_arguments, config_from_args


def _parse(*argv: str) -> TrainConfig:
    return config_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


def test_every_field_has_a_documented_flag():
    parser = add_train_arguments(argparse.ArgumentParser())
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in fields(TrainConfig)} == set(HELP)
    assert all(len(a.help) > 20 for a in flags.values())
    assert _parse() == TrainConfig()  # no flag: the dataclass defaults


def test_flags_set_their_fields():
    cfg = _parse(
        "--model", "m", "--data", "d.json", "--stage", "2", "--num-heads", "5", "--seq-len", "64",
        "--batch-size", "2", "--max-steps", "7", "--output-dir", "o", "--resume", "--no-plot",
        "--max-conversations", "all", "--heads-schedule", "sine", "--lr", "3e-4",
    )  # fmt: skip
    assert (cfg.model, cfg.data, cfg.stage, cfg.num_heads, cfg.seq_len) == ("m", "d.json", 2, 5, 64)
    assert (cfg.batch_size, cfg.max_steps, cfg.output_dir, cfg.resume, cfg.plot) == (2, 7, "o", True, False)
    assert cfg.max_conversations is None and cfg.heads_schedule == "sine" and cfg.lr == 3e-4
    assert _parse("--epochs", "2").max_steps is None  # --epochs alone runs by epochs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-len", "1"], "--seq-len 1: pass at least 2"),
        (["--num-heads", "0"], "--num-heads 0: pass 1 or more"),
        (["--lr", "0"], "--lr 0.0: pass a positive learning rate"),
        (["--data", "/nonexistent/sharegpt.json"], "--data /nonexistent/sharegpt.json: no such file"),
        (["--output-dir", "/proc/version/out"], "--output-dir /proc/version/out: /proc/version is a file, not a directory"),
        (["--eval-size", "10", "--max-conversations", "10"], "leaves no training conversation"),
        (["--tree-prompts", "-1"], "--tree-prompts -1: pass 0 (no tree.json) or more"),
        (["--heads-decay", "0"], "--heads-decay 0.0: pass a number > 0"),
        (["--device", "foo"], "--device foo: not a device name; pass cpu, cuda or cuda:N"),
        (["--max-steps", "1", "--epochs", "1"], "--max-steps 1 and --epochs 1.0 both set the run's length"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_resume_without_a_checkpoint_is_an_error(tmp_path, sharegpt_file, capsys):
    assert main(["train", "--data", str(sharegpt_file), "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_named(tmp_path, sharegpt_file, smollm2_tokenizer, capsys):
    from conftest import make_tiny_llama

    small = tmp_path / "small-vocab"
    make_tiny_llama(vocab_size=1000).save_pretrained(small)
    smollm2_tokenizer.save_pretrained(small)  # 49,152 ids for a 1,000-row embedding
    argv = ["train", "--model", str(small), "--data", str(sharegpt_file), "--output-dir", str(tmp_path / "out"),
            "--num-heads", "1", "--seq-len", "64", "--batch-size", "2", "--max-steps", "1", "--eval-size", "2",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer of {small} gives token id" in err and "but the model's vocabulary has 1000 ids" in err
    assert "Traceback" not in err


def test_rows_longer_than_the_models_positions_are_refused(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(tmp_path / "run"),
            "--num-heads", "1", "--seq-len", "4096", "--pack", "--batch-size", "1", "--max-steps", "1",
            "--eval-size", "2", "--tree-prompts", "0", "--no-progress", "--no-plot", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--seq-len 4096 exceeds the 256 positions of" in err and "pass --seq-len 256 or less" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_heads_or_model_directory_is_no_output_dir(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    """`--output-dir run/heads` for `--output-dir run`: a run's files would land among the heads."""
    heads = tmp_path / "run" / "heads"
    heads.mkdir(parents=True)
    (heads / "config.json").write_text('{"medusa_num_heads": 1}')
    (tmp_path / "run" / "train_config.json").write_text("{}")
    before = sorted(p.name for p in heads.iterdir())
    for target, hint in ((heads, f"(to continue the run whose heads these are, pass {tmp_path / 'run'})"),
                         (tiny_model_dir, "pass a new directory; a run")):  # fmt: skip
        assert main(["train", "--data", str(sharegpt_file), "--output-dir", str(target), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {target} holds a config.json" in err and "a run writes its heads to OUTPUT_DIR/heads" in err
        assert hint in err
    assert sorted(p.name for p in heads.iterdir()) == before


def test_resume_into_a_missing_directory_creates_nothing(tmp_path, sharegpt_file, capsys):
    missing = tmp_path / "typo" / "run"
    assert main(["train", "--data", str(sharegpt_file), "--output-dir", str(missing), "--resume"]) == 2
    assert f"--resume: --output-dir {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_tiny_run_learns_and_exports_loadable_heads(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    from fastmedusa.model import MedusaModel

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "64", "--batch-size", "4", "--max-steps", "30", "--lr", "1e-2",
            "--eval-size", "8", "--eval-every", "0", "--save-every", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    evals = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ]
    first, last = evals[0], evals[-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert all(b > a + 0.05 for a, b in zip(first["top1"], last["top1"])), (first["top1"], last["top1"])
    printed = capsys.readouterr().out
    assert "head 1 (predicts t+2): held-out top-1" in printed and "head 2 (predicts t+3)" in printed
    heads = json.loads((out / "heads" / "config.json").read_text())
    assert heads["medusa_num_heads"] == 2 and heads["tokenizer_name_or_path"] == str(tiny_model_dir)
    model = MedusaModel.from_pretrained(tiny_model_dir, heads=out / "heads")
    # the checkpoint (DCP, the format FSDP runs write too) holds the same heads
    from fastmedusa.train.distributed import load_checkpoint

    restored = MedusaModel.from_pretrained(tiny_model_dir, config=model.medusa_config)
    restored.set_stage(1)
    load_checkpoint(next(out.glob("checkpoint-*")), restored)
    for name, p in model.named_parameters():
        if name.startswith("medusa_heads."):
            assert torch.equal(p, dict(restored.named_parameters())[name]), name
    assert (out / "curves.png").is_file() and (out / "heads" / "tokenizer.json").is_file()
    # the heads' own tree, measured against the model's greedy tokens, is what generate uses by default
    tree = json.loads((out / "heads" / "tree.json").read_text())
    assert (
        tree["num_heads"] == 2 and len(tree["rank_accuracies"]) == 2 and tree["expected_tokens_per_step"] >= 1
    )
    out_gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out_gen.tree_nodes == tree["tree_nodes"] + 1


def test_a_tokenizer_without_chat_template_is_refused_before_training(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    """tree.json is measured on held-out prompts in chat form: without a template the run would train, then
    fail; it is refused first, and --tree-prompts 0 trains."""
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    tokenizer.chat_template = None
    for name in plain.iterdir():
        if name.name.startswith("chat_template"):
            name.unlink()
    tokenizer.save_pretrained(plain)
    argv = ["train", "--model", str(plain), "--data", str(sharegpt_file), "--num-heads", "1", "--seq-len", "32",
            "--batch-size", "2", "--max-steps", "1", "--eval-size", "4", "--no-progress", "--no-plot",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--output-dir", str(tmp_path / "a"), "--tree-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no chat template" in err[0] and "--tree-prompts 0" in err[0]
    assert not (tmp_path / "a").exists()  # the refused run leaves no empty directory either
    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--tree-prompts", "0"]) == 0
    assert "has no chat template: conversations are written as 'User: ...'" in capsys.readouterr().err


def test_resuming_a_finished_run_says_there_is_nothing_left(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(tmp_path / "run"),
            "--num-heads", "1", "--seq-len", "64", "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0",
            "--no-progress", "--no-plot", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--max-steps", "1", "--resume"]) == 0
    printed = capsys.readouterr()
    assert "already at step 2 of 1: nothing left to train (raise --max-steps" in printed.out + printed.err


def test_a_diverging_run_is_one_error_line_with_exit_code_2(tiny_model_dir, sharegpt_file, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(sharegpt_file), "--output-dir", str(tmp_path / "run"),
            "--num-heads", "1", "--seq-len", "64", "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0",
            "--no-progress", "--no-plot", "--device", "cpu", "--lr", "1e30", "--max-steps", "3"]  # fmt: skip
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "the loss became non-finite" in err[0] and "Lower --lr" in err[0]


def test_a_mistyped_relative_model_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "models/smol", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --model models/smol: no such file or directory (models holds no smol)"


def test_a_relative_model_path_is_recorded_absolute(tiny_model_dir, sharegpt_file, tmp_path, monkeypatch, capsys):
    """`--model` typed relative to where a run starts is recorded absolute (train_config.json, checkpoints, the
    heads' config.json): the run resumes, and its heads find their base model, from any other directory. A
    checkpoint of an earlier version, which kept the path as typed, still resumes where it was started."""
    from fastmedusa.decode.cli import recorded_base_model
    from fastmedusa.train.checkpoint import list_checkpoints, write_manifest

    out, model = tmp_path / "run", str(tiny_model_dir.resolve())
    argv = ["train", "--data", str(sharegpt_file), "--output-dir", str(out), "--num-heads", "1", "--seq-len", "64",
            "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0", "--no-progress", "--no-plot",
            "--device", "cpu"]  # fmt: skip
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main([*argv, "--model", tiny_model_dir.name, "--max-steps", "2"]) == 0
    checkpoint = list_checkpoints(out)[-1][1]
    recorded = [json.loads((out / name).read_text()) for name in ("train_config.json", "heads/config.json")]
    saved = json.loads((checkpoint / "train_config.json").read_text())
    assert (recorded[0]["model"], recorded[1]["base_model_name_or_path"], saved["model"]) == (model, model, model)

    monkeypatch.chdir(tmp_path)
    assert recorded_base_model(str(out / "heads")) == model
    assert main([*argv, "--model", model, "--max-steps", "3", "--resume"]) == 0

    checkpoint = list_checkpoints(out)[-1][1]
    saved = json.loads((checkpoint / "train_config.json").read_text())
    (checkpoint / "train_config.json").write_text(json.dumps({**saved, "model": tiny_model_dir.name}))
    write_manifest(checkpoint)
    monkeypatch.chdir(tiny_model_dir.parent)
    capsys.readouterr()
    assert main([*argv, "--model", tiny_model_dir.name, "--max-steps", "4", "--resume"]) == 0
    assert f"resumed from {checkpoint} at step 3/4" in capsys.readouterr().out


def test_a_relative_data_path_is_recorded_absolute(tiny_model_dir, sharegpt_file, tmp_path, monkeypatch):
    """`--data` typed relative is recorded absolute too: `eval` reads it back from train_config.json, and a
    resume from another directory with the same file typed another way is the same run."""
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(out), "--num-heads", "1", "--seq-len", "64",
            "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0", "--no-progress", "--no-plot",
            "--device", "cpu"]  # fmt: skip
    monkeypatch.chdir(sharegpt_file.parent)
    assert main([*argv, "--data", sharegpt_file.name, "--max-steps", "2"]) == 0
    assert json.loads((out / "train_config.json").read_text())["data"] == str(sharegpt_file.resolve())
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--data", str(sharegpt_file.resolve()), "--max-steps", "3", "--resume"]) == 0


def test_a_moved_data_file_resumes_and_aliases_stay_names(tiny_model_dir, sharegpt_file, tmp_path, monkeypatch):
    """The recorded absolute --data does not pin a run to one directory: the same file moved and renamed (same
    content) resumes, a different file at the new path needs --allow-changed-data. Names of the embedded
    default ("", "default", ...) stay names, whatever the current directory holds."""
    import shutil

    from fastmedusa.files import input_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert (input_path("data", ""), input_path("model", ""), input_path("data", "default")) == ("", "", "default")
    assert input_path("model", "org/some-model") == "org/some-model"

    out, first = tmp_path / "run", tmp_path / "a" / "d.json"
    first.parent.mkdir()
    shutil.copy(sharegpt_file, first)
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(out), "--num-heads", "1", "--seq-len", "64",
            "--batch-size", "2", "--eval-size", "4", "--tree-prompts", "0", "--no-progress", "--no-plot",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--data", str(first), "--max-steps", "2"]) == 0
    moved = tmp_path / "b" / "renamed.json"  # moved and renamed: the same bytes
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert main([*argv, "--data", str(moved), "--max-steps", "3", "--resume"]) == 0
    records = json.loads(moved.read_text())
    records[0]["conversations"][1]["value"] += " (edited)"
    moved.write_text(json.dumps(records))
    assert main([*argv, "--data", str(moved), "--max-steps", "4", "--resume"]) == 2
    assert main([*argv, "--data", str(moved), "--max-steps", "4", "--resume", "--allow-changed-data"]) == 0


def test_a_resume_compares_hub_ids_by_name_even_with_allow_changed_data(tmp_path):
    """--allow-changed-data lets a local file lie at another path (its fingerprint is then compared), never a
    hub id change: hub ids have no fingerprint, and another same-shaped model would continue silently."""
    from pathlib import Path

    from fastmedusa.train.trainer import ResumeMismatchError, check_resumable, known_inputs, same_inputs

    saved = TrainConfig(model="org/model-a", data=str(tmp_path / "a.json")).to_dict()
    fp_a = {"a.json": {"size": 1, "sha256_first_last_mb": "x"}}
    fp_b = {"b.json": {"size": 1, "sha256_first_last_mb": "y"}}  # another file's content
    now = TrainConfig(model="org/model-b", data=str(tmp_path / "b.json"), allow_changed_data=True)
    saved_inputs, inputs = {"model": None, "data": fp_a}, {"model": None, "data": fp_b}
    assert (known_inputs(saved_inputs, inputs), same_inputs(saved_inputs, inputs)) == (["data"], [])
    with pytest.raises(ResumeMismatchError, match="model: saved 'org/model-a', now 'org/model-b'") as error:
        check_resumable(saved, now, Path("ckpt"), saved_inputs=saved_inputs, inputs=inputs)
    assert "data:" not in str(error.value) and "--allow-changed-data" not in str(error.value)
    now.model = "org/model-a"  # the same hub id, the data file at another path: accepted under the flag
    check_resumable(saved, now, Path("ckpt"), saved_inputs=saved_inputs, inputs=inputs)
    now.allow_changed_data = False  # without it, only a file whose fingerprint matches may move
    with pytest.raises(ResumeMismatchError, match=r"data: saved .*a\.json.*\(a moved model or data file"):
        check_resumable(saved, now, Path("ckpt"), saved_inputs=saved_inputs, inputs=inputs)
    assert known_inputs({"model": {}}, {"model": {}}) == []  # an empty fingerprint proves nothing
    renamed = {"data": {"c.json": fp_a["a.json"]}}  # the same bytes under another name: the same input
    assert same_inputs({"data": fp_a}, renamed) == ["data"]


def test_init_heads_errors_name_the_flag(tmp_path):
    from fastmedusa.train.run import read_init_heads

    (tmp_path / "data.json").write_text("[]")
    with pytest.raises(NotADirectoryError, match=r"^--init-heads: .*data.json is a file: pass the heads directory"):
        read_init_heads(TrainConfig(init_heads=str(tmp_path / "data.json")))


@pytest.mark.parametrize(
    "field, value, message",
    [("min_lr_ratio", None, "--min-lr-ratio None: pass a fraction in [0, 1]"),
     ("warmup_ratio", "0.1", "--warmup-ratio '0.1': pass a fraction in [0, 1)"),
     ("stage", True, "--stage True: pass 1 (heads only) or 2"),
     ("lr", True, "--lr True: pass a positive learning rate")],
)  # fmt: skip
def test_train_config_values_of_the_wrong_kind_are_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig(**{field: value})
