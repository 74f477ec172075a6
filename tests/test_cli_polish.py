"""The command line as a new user meets it: --version, help texts, one dtype vocabulary, progress output off a
terminal, quiet model loading, file modes."""

import argparse
import io
import os
import stat

import pytest

from fastmedusa.cli import BENCHMARKS, build_parser, main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    from fastmedusa import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fastmedusa {__version__}"


def _actions(parser: argparse.ArgumentParser, command: str) -> list[argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.help and a.dest != "help"]


@pytest.mark.parametrize("command", ["train", "generate", "eval", "export", "distill"])
def test_every_flag_states_at_most_one_default(command):
    for action in _actions(build_parser(command), command):
        text = action.help % {"default": action.default, "prog": "x"} if "%(" in action.help else action.help
        assert text.count("(default") + text.count("default:") <= 1 or text.count("(default:") == 1, (
            action.option_strings,
            text,
        )
        assert text.count("(default:") <= 1, (action.option_strings, text)


def test_train_help_has_one_default_for_model_data_and_eval_batch_size(capsys):
    text = _help(capsys, "train")
    for flag, default in (("--model MODEL", "the embedded SmolLM2-135M-Instruct"),
                          ("--data DATA", "the embedded ShareGPT V3"),
                          ("--eval-batch-size EVAL_BATCH_SIZE", "--batch-size")):  # fmt: skip
        start = text.index("  " + flag)
        chunk = " ".join(text[start : text.index("\n  -", start + 1)].split())
        assert chunk.count("(default:") == 1 and f"(default: {default})" in chunk, chunk


def test_generate_help_shows_the_typical_acceptance_defaults(capsys):
    text = " ".join(_help(capsys, "generate").split())
    assert "epsilon (default: 0.09)" in text and "delta (default: 0.3)" in text
    assert "--dtype {bf16,fp16,fp32}" in text


def test_bench_help_says_a_word_on_each_benchmark(capsys):
    text = _help(capsys, "bench")
    for name, (_module, words) in BENCHMARKS.items():
        assert f"  {name}" in text and words.split(":")[0][:30] in " ".join(text.split())


@pytest.mark.parametrize("flag", ["--dtype", "--param-dtype"])
@pytest.mark.parametrize("given, expected", [("bf16", "bf16"), ("bfloat16", "bf16"), ("float32", "fp32")])
def test_one_dtype_vocabulary_with_long_aliases(flag, given, expected):
    from fastmedusa.train.cli import config_from_args

    parser = build_parser("train")
    args = parser.parse_args(["train", flag, given])
    assert getattr(config_from_args(args), flag[2:].replace("-", "_")) == expected
    first = {"generate": ["--prompt", "x"], "eval": ["HEADS"], "distill": ["--output", "o.jsonl"]}
    for command, needed in first.items():
        args = build_parser(command).parse_args([command, *needed, "--dtype", given])
        assert args.dtype == expected


def test_a_bad_dtype_names_the_vocabulary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "unknown dtype 'float8': pass one of bf16, fp16, fp32" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal():
    from fastmedusa.progress import Progress

    out = io.StringIO()
    bar = Progress(total=4, desc="stage 1", unit="step", stream=out, interval=0.0)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix("loss per head 2.000 3.000")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[-1].startswith("stage 1: 4/4 step (100%), ") and lines[-1].endswith(
        "loss per head 2.000 3.000"
    )
    quiet = io.StringIO()
    slow = Progress(range(3), desc="encoding", unit="conv", stream=quiet)  # 30 s interval: only the end
    assert (
        list(slow) == [0, 1, 2]
        and quiet.getvalue().count("\n") == 1
        and "3/3 conv (100%)" in quiet.getvalue()
    )
    off = io.StringIO()
    Progress(total=2, stream=off, enabled=False, interval=0.0).update(2)
    assert off.getvalue() == ""


def test_progress_is_a_bar_on_a_terminal():
    from fastmedusa.progress import Progress

    term = _Terminal()
    bar = Progress(total=3, desc="stage 1", unit="step", stream=term, interval=0.0)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_loading_output_is_hidden_unless_verbose(monkeypatch):
    """The CLI turns transformers' loading bars and warnings off; --verbose keeps them."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from fastmedusa.model import loading

    seen = {}

    def fake_loader(source, **kwargs):
        seen["bars"] = hf_logging.is_progress_bar_enabled()
        seen["gguf_disabled"] = gguf_utils.tqdm([1, 2]).disable
        seen["verbosity"] = hf_logging.get_verbosity()
        return object()

    monkeypatch.setattr(loading, "_show_loading_output", True)
    original = gguf_utils.tqdm
    for verbose in (False, True):
        loading.show_loading_output(verbose)
        loading._from_pretrained(fake_loader, "some/model", "model")
        assert seen["bars"] is verbose and seen["gguf_disabled"] is not verbose
        assert (seen["verbosity"] == hf_logging.ERROR) is not verbose
        assert gguf_utils.tqdm is original  # restored after the load


def test_cli_sets_loading_output_from_verbose(monkeypatch):
    from fastmedusa.model import loading

    calls = []
    monkeypatch.setattr(loading, "show_loading_output", calls.append)
    for argv in (["export", "/nonexistent", "--output", "/tmp/o"], ["--verbose", "export", "/nonexistent",
                 "--output", "/tmp/o"], ["export", "/nonexistent", "--output", "/tmp/o", "--verbose"]):  # fmt: skip
        assert main(argv) == 2
    assert calls == [False, True, True]


def test_written_files_get_the_usual_mode(tmp_path):
    from fastmedusa.files import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o002)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_distill_progress_is_a_line_per_group_off_a_terminal(capsys):
    from types import SimpleNamespace

    from fastmedusa.data.distill import _Progress

    progress = _Progress(SimpleNamespace(max_conversations=4, progress=True), initial=0)
    progress.update(2, 100)
    progress.group_written(2)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "\r" not in lines[0]
    assert lines[0].startswith("distill: 2/4 conv (50%)")
    assert "100 tokens (" in lines[0] and lines[0].endswith("2 records in the file")


def test_outputs_that_cannot_be_written_name_what_is_in_the_way(tmp_path):
    """A file where a folder is needed, or a folder where a file is: the error names the path in the way, and
    nothing is left behind."""
    import pytest

    from fastmedusa.bench.common import write_json
    from fastmedusa.files import write_text_atomic

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"cannot write {blocker}/sub/out.json: {blocker} is a file"):
        write_json(blocker / "sub" / "out.json", {"a": 1})
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory: pass a file path"):
        write_text_atomic(tmp_path, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no temporary file left


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decode", "--tree", "auto:0"], "node count after 'auto:' must be an integer >= 1"),
        (["decode", "--batch-sizes", "4", "0"], "'0': pass an integer of 1 or more"),
        (["decode", "--new-tokens", "-3"], "'-3': pass an integer of 1 or more"),
        (["decode", "--train-steps", "-1"], "'-1': pass an integer of 1 or more"),
        (["loss", "--warmup", "-1"], "'-1': pass an integer of 0 or more"),
        (["loss", "--prompt-frac", "1.5"], "'1.5': pass a fraction in [0, 1)"),
        (["train", "--masked-frac", "half"], "'half': pass a fraction in [0, 1)"),
        (["train", "--steps", "0"], "'0': pass an integer of 1 or more"),
        (["train", "--warmup", "x"], "'x': pass an integer of 0 or more"),
        (["train", "--seq-lens", "1024", "1"], "'1': pass a sequence length of 2 or more"),
        (["train", "--heads", "0"], "'0': pass an integer of 1 or more"),
        (["train", "--draft-vocab", "-1"], "'-1': pass an integer of 0 or more"),
        (["loss", "--chunk-rows", "0"], "'0': pass an integer of 1 or more"),
        (["loss", "--logit-std", "nan"], "'nan': pass a finite number above 0"),
        (["heads", "--write-tree", "0"], "'0': pass an integer of 1 or more"),
        (["heads", "--temperature", "-1"], "'-1': pass 0 (greedy) or a finite temperature above 0"),
        (["heads", "--temperature", "nan"], "'nan': pass 0 (greedy) or a finite temperature above 0"),
        (["train", "--draft-coverage", "2"], "'2': pass a probability in [0, 1]"),
        (["loss", "--draft-coverage", "-0.1"], "'-0.1': pass a probability in [0, 1]"),
    ],
)
def test_bench_flags_out_of_range_are_usage_errors(capsys, argv, message):
    """A bad benchmark flag stops before any work, with argparse's one line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {next(a for a in argv if a.startswith('--'))}" in err and message in err


@pytest.mark.parametrize(
    "argv, line",
    [(["train", "--num-heads", "x"], "error: fastmedusa train: argument --num-heads: invalid int value: 'x'"),
     (["generate", "--prompt", "hi", "--nope"], "error: fastmedusa generate: unrecognized arguments: --nope"),
     (["bench", "heads", "--ranks", "0"], "error: fastmedusa bench heads: argument --ranks: '0': pass an integer"),
     (["nope"], "error: fastmedusa: argument COMMAND: invalid choice: 'nope'")],
)  # fmt: skip
def test_usage_errors_are_one_line(capsys, argv, line):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1 and "usage:" not in err
    assert err.rstrip().endswith("--help`)")


def test_outputs_in_the_way_stop_a_command_before_its_work(tmp_path, capsys):
    """bench decode / bench heads --out and export --output are checked before any model loads: a benchmark
    that ran for minutes must not fail at its last write."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["bench", "decode", "--out", str(tmp_path)], f"--out {tmp_path} is a directory: pass a file path"),
        (["bench", "heads", "--heads", str(tmp_path), "--out", str(blocker / "h.json")], f"{blocker} is a file, not a directory"),
        (["export", str(tmp_path), "--output", str(blocker / "sub")], f"{blocker} is a file, not a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_model_directory_without_a_tokenizer_says_so(tmp_path):
    """A directory holding config.json and weights but no tokenizer file: one error naming what to save."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastmedusa.model import load_tokenizer

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer .*tokenizer.save_pretrained\(DIR\)"):
        load_tokenizer(tmp_path / "model")


@pytest.mark.parametrize(
    "argv",
    [["train", "--data", "/nonexistent/d.json"], ["generate", "--heads", "/nonexistent", "--prompt", "hi"],
     ["eval", "/nonexistent"], ["export", "/nonexistent", "--output", "/nonexistent/o"],
     ["distill", "--data", "/nonexistent/d.json", "--output", "/nonexistent/o.json"],
     ["bench", "heads", "--heads", "/nonexistent", "--device", "cpu"]],
    ids=lambda argv: " ".join(argv[:2]),
)  # fmt: skip
def test_debug_shows_the_traceback_before_or_after_the_command(argv, capsys):
    """Bad input is one `error:` line; --debug raises it (the full traceback), given before the command or
    after it, where a user adds it to the command line that just failed (`bench NAME` included)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/nonexistent" in err and len(err.strip().splitlines()) == 1, err
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match="/nonexistent"):
            main(debug)


def test_bench_out_replaces_only_an_earlier_result(tmp_path, capsys):
    """`bench ... --out` may write over an earlier benchmark result, never over a user's file, the prompts it
    reads, or a chart beside a file that is not a result; each refusal comes before any model loads."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    chart = tmp_path / "new.png"
    chart.write_bytes(b"a user's picture")
    cases = [
        (["bench", "decode", "--out", str(notes)], f"--out {notes} exists and is not an earlier `fastmedusa bench`"),
        (["bench", "decode", "--prompts", str(questions), "--out", str(questions)], f"--out {questions} is the input file"),
        (["bench", "decode", "--out", str(tmp_path / "new.json")], f"{chart} exists beside it and would be replaced"),
        (["bench", "heads", "--heads", str(tmp_path), "--out", str(notes)], "is not an earlier `fastmedusa bench` result"),
        (["bench", "loss", "--out", str(notes)], "is not an earlier `fastmedusa bench` result"),
        (["bench", "train", "--device", "cpu", "--out", str(notes)], "is not an earlier `fastmedusa bench` result"),
        (["bench", "wgrad", "--out", str(notes)], "is not an earlier `fastmedusa bench` result"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert notes.read_text() == "my notes" and chart.read_bytes() == b"a user's picture"
    assert questions.read_text() == '{"question_id": 1, "turns": ["hi"]}\n'
    from fastmedusa.files import check_output_file, is_benchmark_result

    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"env": {"device": "cpu"}, "rows": []}')
    earlier.with_suffix(".png").write_bytes(b"its chart")
    check_output_file(earlier, replaces=is_benchmark_result, beside=(".png",))  # an earlier result: replaced


def test_an_unwritable_place_is_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    """A read-only file system or a folder without write permission: each command names its flag and the
    folder in one line, exit code 2, before loading anything; a write that fails later names the file it
    was writing, not its temporary."""
    import errno
    import tempfile

    from fastmedusa import files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", read_only)
    cases = [
        (["bench", "decode", "--out", str(tmp_path / "b.json")], "--out"),
        (["bench", "train", "--device", "cpu", "--out", str(tmp_path / "t.json")], "--out"),
        (["export", str(tmp_path), "--output", str(tmp_path / "exp")], "--output"),
        (["distill", "--output", str(tmp_path / "d.jsonl")], "--output"),
        (["train", "--output-dir", str(tmp_path / "run")], "--output-dir"),
    ]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {flag} " in err and f"{tmp_path} is not writable (Read-only file system)" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", tempfile.NamedTemporaryFile)
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=f"cannot write {tmp_path / 'r.json'}: Read-only file system; pass"):
        files.write_json_atomic(tmp_path / "r.json", {})

    for code, text, temporary, expected in (
        (errno.EACCES, "Permission denied", ".out.json.k2j4.tmp",
         f"error: {tmp_path / 'out.json'}: Permission denied; check its permissions or pass another path"),
        (errno.ENOSPC, "No space left on device", ".heads.abc123.tmp",
         f"error: cannot write {tmp_path / 'heads'}: No space left on device; pass a location you can write to"),
    ):  # fmt: skip

        def failing_command(argv, code=code, text=text, temporary=temporary):
            raise OSError(code, text, str(tmp_path / temporary))

        monkeypatch.setattr("fastmedusa.cli.run", failing_command)
        assert main(["generate"]) == 2
        assert capsys.readouterr().err.strip() == expected
