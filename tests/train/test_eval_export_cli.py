"""`fastmedusa eval` and `fastmedusa export` on a tiny training run: the run's own held-out split, both
accuracy measures, tokens/step, and a model card that carries them."""

import contextlib
import io
import json
import stat

import pytest
from safetensors.torch import load_file

from fastmedusa.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, sharegpt_records):
    root = tmp_path_factory.mktemp("eval-run")
    model_dir = tiny_model_dir
    data = root / "sharegpt.json"
    data.write_text(json.dumps(sharegpt_records(40)))
    out = root / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "64", "--batch-size", "4", "--max-steps", "20", "--lr", "1e-2",
            "--eval-size", "8", "--eval-every", "0", "--save-every", "0", "--no-progress", "--no-plot",
            "--device", "cpu"]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    (root / "train_output.txt").write_text(printed.getvalue())
    return out


def test_no_plot_run_prints_no_curves_path(run_dir):
    printed = (run_dir.parent / "train_output.txt").read_text()
    assert "done in" in printed and "heads in" in printed and "curves" not in printed
    assert not (run_dir / "curves.png").exists()


def test_heads_name_their_data_file_without_this_machines_directories(run_dir):
    """The heads' config.json (and so the exported model card) names the data file; the run's own
    train_config.json keeps the full path, which resuming compares."""
    training = json.loads((run_dir / "heads" / "config.json").read_text())["training"]
    assert training["data"] == "sharegpt.json"
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["data"].endswith("/sharegpt.json") and saved["data"] != "sharegpt.json"


def test_eval_uses_the_runs_split_and_agrees_with_training(run_dir, capsys):
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--prompts", "2", "--new-tokens", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run_dir / "heads" / "eval.json").read_text())
    assert result["conversations"] == 8 and result["split"]["eval_size"] == 8  # the run's, not the default 32
    trained = json.loads((run_dir / "heads" / "config.json").read_text())["training"]["final_eval"]
    for k in range(2):  # the same held-out conversations and code as training's last evaluation
        assert result["labels"]["top1"][k] == pytest.approx(trained["top1"][k], abs=0.02)
        assert 0.0 <= result["greedy"]["top1"][k] <= result["greedy"]["top5"][k] <= 1.0
    assert result["greedy"]["prompts"] == 2
    assert result["tree"]["expected_tokens_per_step"] >= 1.0 and result["tree"]["name"].endswith("tree.json")  # measured by train
    assert "head 1 (predicts t+2): data top-1" in printed and "expected tokens/step" in printed
    assert stat.S_IMODE((run_dir / "heads" / "eval.json").stat().st_mode) & 0o044 == 0o044


def test_eval_builds_auto_trees_from_its_own_measurement(run_dir, tmp_path, capsys):
    out = tmp_path / "auto.json"
    argv = ["eval", str(run_dir), "--prompts", "2", "--new-tokens", "8", "--device", "cpu", "--tree", "auto:5",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["tree"]["name"] == "auto:5" and result["tree"]["nodes"] == 5
    assert "auto:5 tree (5 nodes)" in capsys.readouterr().out


def test_export_of_an_evaluated_run_has_a_full_model_card(run_dir, tmp_path, capsys):
    if not (run_dir / "heads" / "eval.json").is_file():
        main(["eval", str(run_dir), "--prompts", "1", "--new-tokens", "4", "--device", "cpu"])
    assert main(["export", str(run_dir), "--format", "vllm", "--output", str(tmp_path / "hub")]) == 0
    assert "2 heads x 1 layers in the vllm layout" in capsys.readouterr().out
    card = (tmp_path / "hub" / "README.md").read_text()
    result = json.loads((run_dir / "heads" / "eval.json").read_text())
    assert f"| 1 | t+2 | {100 * result['labels']['top1'][0]:.1f}% |" in card
    assert "| steps | 20 |" in card and "Expected tokens per decoding step" in card
    assert set(load_file(str(tmp_path / "hub" / "model.safetensors"))) >= {
        "blocks.0.layers.0.bias",
        "lm_heads.1.weight",
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "/nonexistent/run"], "no heads directory at /nonexistent/run"),
        (["export", "/nonexistent/run", "--output", "RUN/new-export"], "no heads directory at /nonexistent/run"),
        (["eval", "RUN", "--eval-size", "0"], "--eval-size 0: evaluation needs held-out conversations"),
        (["eval", "RUN", "--batch-size", "0"], "--batch-size 0: pass 1 or more"),
        (["export", "RUN", "--format", "vllm", "--output", "RUN/heads"], "is the heads directory itself"),
        (["export", "RUN", "--output", "RUN"], "holds the heads being exported (a training run's directory)"),
        (["eval", "RUN", "--device", "foo"], "--device foo: not a device name; pass cpu, cuda or cuda:N"),
        (["eval", "RUN", "--seq-len", "0"], "--seq-len 0: pass at least 2"),
        (["eval", "RUN", "--max-conversations", "0"], "--max-conversations 0: pass 2 or more"),
        (["eval", "RUN", "--output", "RUN/heads/config.json"], "is a file of the heads directory (config.json)"),
        (["export", "RUN/heads", "--output", "RUN/heads/.."], "holds the heads being exported"),
        (["eval", "RUN", "--tree", "auto:0", "--prompts", "0"], "--tree auto:0 with --prompts 0: a tree's"),
        (["eval", "RUN", "--output", "RUN/../sharegpt.json"], "is the data file being evaluated on"),  # the run's
    ],
)
def test_bad_input_is_one_clear_line(run_dir, argv, message, capsys):
    argv = [a.replace("RUN", str(run_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.replace("RUN", str(run_dir)) in err[0]


def test_eval_results_never_replace_the_data_or_the_heads_files(tmp_path):
    from fastmedusa.heads_eval import check_eval_output

    heads, data = tmp_path / "heads", tmp_path / "data.json"
    heads.mkdir()
    (heads / "config.json").write_text("{}")
    data.write_text("[]")
    with pytest.raises(ValueError, match="is the data file being evaluated on"):
        check_eval_output(data, heads, str(data))
    with pytest.raises(ValueError, match=r"a file of the heads directory \(config.json\)"):
        check_eval_output(heads / "config.json", heads, None)
    check_eval_output(heads / "eval.json", heads, str(data))  # the default, replaced on every eval
    check_eval_output(tmp_path / "results.json", heads, str(data))
    # nothing else that exists: a stage-2 run's backbone beside the heads, the run's settings, any other file
    (tmp_path / "model").mkdir()
    for other in (tmp_path / "model" / "model.safetensors", tmp_path / "train_config.json", tmp_path / "notes.json"):
        other.write_text('{"lr": 1e-4}')
        with pytest.raises(ValueError, match="exists and is not an earlier `fastmedusa eval` result"):
            check_eval_output(other, heads, str(data))
    with pytest.raises(ValueError, match="is a directory"):
        check_eval_output(tmp_path / "model", heads, str(data))
    earlier = tmp_path / "earlier.json"  # an earlier result, written elsewhere: eval may replace it
    earlier.write_text(json.dumps({"heads": "h", "model": "m", "data": "d", "conversations": 3, "labels": {}}))
    check_eval_output(earlier, heads, str(data))


def test_eval_says_when_the_runs_data_is_gone(tmp_path):
    import argparse

    from fastmedusa.heads_eval import SPLIT_FIELDS, split_settings

    (tmp_path / "run" / "heads").mkdir(parents=True)
    gone = tmp_path / "moved.json"
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"data": str(gone), "eval_size": 8}))
    args = argparse.Namespace(**dict.fromkeys(SPLIT_FIELDS))
    with pytest.raises(FileNotFoundError, match=r"the run's data .*moved.json \(from .*train_config.json\) is not there"):
        split_settings(args, tmp_path / "run" / "heads")
    args.data = str(tmp_path / "other.json")  # --data given: the loader reports a missing one itself
    assert split_settings(args, tmp_path / "run" / "heads")["data"] == args.data


def test_eval_refuses_a_runs_trained_on_conversations_as_held_out(tmp_path, capsys, monkeypatch):
    import argparse

    from fastmedusa.heads_eval import SPLIT_FIELDS, split_settings

    monkeypatch.chdir(tmp_path)
    heads = tmp_path / "run" / "heads"
    heads.mkdir(parents=True)
    data = tmp_path / "d.json"
    data.write_text("[]")
    config = tmp_path / "run" / "train_config.json"
    config.write_text(json.dumps({"data": str(data), "eval_size": 0, "seed": 0, "max_conversations": 6}))
    args = argparse.Namespace(**dict.fromkeys(SPLIT_FIELDS))
    for eval_size, given in ((None, None), (2, None), (2, "d.json")):  # its own data, by any spelling of its path
        args.eval_size, args.data = eval_size, given
        with pytest.raises(ValueError, match="the run held out no conversations .* pass --data with other"):
            split_settings(args, heads)
    args.data = None
    config.write_text(json.dumps({"data": str(data), "eval_size": 4, "seed": 0, "max_conversations": 6}))
    capsys.readouterr()
    args.eval_size, args.seed = 2, 1
    split_settings(args, heads)
    assert "warning: --eval-size, --seed differ from the run's own" in capsys.readouterr().err
    args.eval_size = args.seed = None
    split_settings(args, heads)
    assert "warning" not in capsys.readouterr().err
    config.write_text(json.dumps({"data": str(data), "eval_size": 4, "seq_len": "64"}))
    with pytest.raises(ValueError, match="train_config.json: --seq-len '64': pass at least 2 .* restore it, or pass that flag"):
        split_settings(args, heads)


def test_all_conversations_read_as_the_run_recorded_them(tmp_path, capsys):
    """`--max-conversations all` is what a run records as null: no warning then, one against a counted run."""
    import argparse

    from fastmedusa.heads_eval import warn_if_split_differs

    args = argparse.Namespace(max_conversations="all", eval_size=None, seed=None, data=None)
    run = {"max_conversations": None, "eval_size": 8, "seed": 0, "data": "d.json"}
    warn_if_split_differs(args, run, tmp_path / "train_config.json")
    assert capsys.readouterr().err == ""
    warn_if_split_differs(args, {**run, "max_conversations": 300}, tmp_path / "train_config.json")
    assert "--max-conversations differs from the run's own" in capsys.readouterr().err
