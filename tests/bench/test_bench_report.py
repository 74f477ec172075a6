"""`fastmedusa bench report` derives speed-ups and memory from the rows, skipping OOM peers."""

from fastmedusa.bench.report import markdown, ratio_rows


def _row(impl, tok_s, gb, oom=False):
    return {
        "stage": 1,
        "heads": 3,
        "seq_len": 1024,
        "impl": impl,
        "oom": oom,
        "tokens_per_s": tok_s,
        "peak_memory_gb": gb,
    }


def test_best_fitting_peer_and_liger_memory():
    result = {
        "rows": [_row("torch", 0, 0, oom=True), _row("liger", 100.0, 9.0), _row("cce", 120.0, 8.5), _row("triton", 150.0, 10.0)],
        "environment": {"device": "X", "date": "2026-11-25T00:00", "versions": {"torch": "2.11"}},
        "settings": {"batch_size": 6},
        "shape": "1b",
    }  # fmt: skip
    (row,) = ratio_rows(result)
    assert row["best_peer"] == "cce" and row["best_peer_tok_s"] == 120.0
    assert row["ours_tok_s"] == 150.0 and row["liger_gb"] == 9.0
    assert "| 1 | 3 | 1024 | 150 | 120 (cce) | 1.25x | 10.0 | 9.0 |" in markdown(result)


def test_a_point_says_why_it_has_no_speed():
    env = {"device": "X", "date": "2026-11-25T00:00", "versions": {"torch": "2.11"}}
    base = {"environment": env, "settings": {"batch_size": 6}, "shape": "1b"}
    not_run = markdown({**base, "rows": [_row("torch", 100.0, 9.0)]})  # fastmedusa's impl not in this file
    assert "| 1 | 3 | 1024 | not run | 100 (torch) | - |" in not_run
    oom = markdown({**base, "rows": [_row("torch", 100.0, 9.0), _row("triton", 0, 0, oom=True)]})
    assert "| 1 | 3 | 1024 | OOM | 100 (torch) | - |" in oom
    failed = markdown({**base, "rows": [_row("torch", 100.0, 9.0), {**_row("triton", 0, 0), "failed": True}]})
    assert "| 1 | 3 | 1024 | failed | 100 (torch) | - |" in failed
    no_peer = markdown({**base, "rows": [_row("triton", 150.0, 10.0)]})
    assert "| 1 | 3 | 1024 | 150 | not run | - |" in no_peer
    peers_oom = markdown({**base, "rows": [_row("liger", 0, 0, oom=True), _row("triton", 150.0, 10.0)]})
    assert "| 1 | 3 | 1024 | 150 | all OOM or failed | - |" in peers_oom


def test_bad_bench_inputs_are_one_clear_error(tmp_path, capsys):
    """Files of another kind and sizes below 1 end as one `error:`/usage line with rc 2, not a traceback."""
    import json

    from fastmedusa.cli import main

    (tmp_path / "strings.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "text.json").write_text("not json")
    for name in ("strings.json", "other.json"):
        assert main(["bench", "report", str(tmp_path / name)]) == 2
        assert "is not a `fastmedusa bench train` results file" in capsys.readouterr().err
    assert main(["bench", "report", str(tmp_path / "text.json")]) == 2
    assert "text.json is not JSON" in capsys.readouterr().err
    (tmp_path / "rows.json").write_text(json.dumps({"environment": {}, "settings": {}, "shape": "1b", "rows": [1]}))
    for command in ("loss", "train"):  # redrawing a chart from files of another kind
        for name, message in (("strings.json", "is not a `fastmedusa bench"), ("other.json", "(no "),
                              ("rows.json", "is not a `fastmedusa bench"), ("text.json", "is not JSON"),
                              ("missing.json", "no such results file")):  # fmt: skip
            assert main(["bench", command, "--plot", str(tmp_path / name)]) == 2, (command, name)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (command, name, err)
    common = ["--device", "cpu", "--impls", "torch", "--seq-lens", "8", "--out", str(tmp_path / "x.json")]
    for flag, value in (("--vocab", "0"), ("--hidden", "-4"), ("--heads", "0"), ("--batch", "0")):
        try:
            code = main(["bench", "loss", *common, flag, value])
        except SystemExit as exit_:  # argparse's usage error
            code = exit_.code
        assert code == 2
        assert f"argument {flag}: '{value}': pass an integer of 1 or more" in capsys.readouterr().err


def test_bench_decode_and_heads_path_flags_are_one_clear_error(tmp_path, capsys):
    import argparse

    import pytest

    from fastmedusa.bench.decode import load_prompts
    from fastmedusa.cli import main

    args = argparse.Namespace(prompts="mtbnech", max_prompt_tokens=512, num_prompts=1)
    with pytest.raises(FileNotFoundError, match="--prompts mtbnech: no such file; pass 'mt-bench', 'sharegpt' or a prompt file"):
        load_prompts(args, tokenizer=None)
    (tmp_path / "notes.txt").write_text("x")
    assert main(["bench", "heads", "--heads", str(tmp_path), "--tree-dir", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tree-dir" in err[0] and "is a file: pass a directory" in err[0]


def test_bench_decode_does_not_train_into_an_earlier_run(tmp_path):
    import argparse

    import pytest

    from fastmedusa.bench.decode import train_heads

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    args = argparse.Namespace(train_dir=str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match=r"holds an earlier run: pass its heads with --heads .*run/heads"):
        train_heads(args)


def test_bench_loss_where_nothing_runs_is_an_error(tmp_path, capsys):
    from fastmedusa.cli import main

    argv = ["bench", "loss", "--device", "cpu", "--impls", "liger", "--seq-lens", "8", "--heads", "1",
            "--batch", "1", "--hidden", "8", "--vocab", "16", "--out", str(tmp_path / "x.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no row of the grid ran" in err[0] and "pick --impls" in err[0]
    assert (tmp_path / "x.json").is_file()  # the rows saying why are kept
