"""Checkpoints are never lost, never execute code, and every bad one is one clear line.

Each test starts from a copy of one tiny real run (checkpoints at steps 2 and 4), damages it the way
a user or an attacker would (new run without --resume, crafted pickle, flipped bytes, truncation, a full
disk mid-save, a torn log line, changed settings or inputs) and checks the exit code, the message, and
that every checkpoint that was there is byte-identical afterwards.
"""

import contextlib
import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from fastmedusa.cli import main
from fastmedusa.train.checkpoint import MANIFEST, fingerprint, list_checkpoints, write_manifest

STEPS = 4


def _argv(model_dir, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--num-heads", "2", "--seq-len", "48", "--batch-size", "2", "--max-steps", str(STEPS),
            "--save-every", "2", "--keep-checkpoints", "2", "--max-conversations", "12", "--eval-size", "2",
            "--eval-every", "0", "--log-every", "1", "--no-progress", "--no-plot", "--device", "cpu",
            "--dtype", "fp32", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, sharegpt_records):
    """A complete tiny run (checkpoint-0000002, checkpoint-0000004, metrics.jsonl, heads/) and a pristine copy."""
    root = tmp_path_factory.mktemp("run")
    data = root / "sharegpt.json"
    data.write_text(json.dumps(sharegpt_records(40)))
    out = root / "out"
    assert main(_argv(tiny_model_dir, data, out)) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    pristine = tmp_path_factory.mktemp("pristine")
    shutil.copy(data, pristine / data.name)
    shutil.copytree(out, pristine / out.name)
    return data, out, pristine


@pytest.fixture
def run(finished_run):
    """The finished run restored at its own paths (a checkpoint records them): (data file, output dir)."""
    data, out, pristine = finished_run
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pristine / out.name, out)
    shutil.copy(pristine / data.name, data)
    return data, out


def _snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file of every checkpoint directory."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("checkpoint-*/**/*"))
        if p.is_file()
    }


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- never delete state implicitly ---------------------------------------------------------------------
def test_a_new_run_refuses_an_output_dir_holding_checkpoints(run, tiny_model_dir, capsys):
    data, out = run
    before = _snapshot(out)
    log = (out / "metrics.jsonl").read_bytes()
    assert main(_argv(tiny_model_dir, data, out)) == 2
    line = _error_line(capsys)
    assert f"--output-dir {out} holds an earlier run" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before and (out / "metrics.jsonl").read_bytes() == log


def test_overwrite_deletes_only_after_the_inputs_load(run, tiny_model_dir, tmp_path, capsys):
    data, out = run
    before = _snapshot(out)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"conversations": []}] * 3))  # no usable conversation: fails in build_data
    assert main(_argv(tiny_model_dir, empty, out, "--overwrite")) == 2
    assert "no usable conversation" in _error_line(capsys)
    assert _snapshot(out) == before  # nothing was deleted for a run that could not start

    assert main(_argv(tiny_model_dir, data, out, "--overwrite", "--max-steps", "2")) == 0
    assert "--overwrite: removed" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(out)] == [2]  # the new run's only checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the earlier run's log went with it


def test_checkpoints_without_a_manifest_are_named_and_not_resumed(run, tiny_model_dir, capsys):
    """A checkpoint of a version that wrote no manifest (or a save cut short) cannot be verified: --resume
    names it and points to --overwrite; a new run does not suggest --resume, which could not work."""
    data, out = run
    for path, _ in [(p, s) for s, p in list_checkpoints(out)]:
        (path / "manifest.json").unlink()
    before = _snapshot(out)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 2
    line = _error_line(capsys)
    assert "has no manifest.json" in line and "--overwrite" in line and "checkpoint-" in line
    assert main(_argv(tiny_model_dir, data, out)) == 2
    line = _error_line(capsys)
    assert "none of its checkpoints can be resumed" in line and "pass --resume" not in line
    assert _snapshot(out) == before


def test_overwrite_refuses_inputs_that_it_would_delete(run, tiny_model_dir, capsys):
    """--init-heads (a run's heads/) or --model inside what --overwrite deletes: read once, then gone, and a
    killed run could never resume. Refused before anything is deleted."""
    data, out = run
    before = _snapshot(out)
    for flags in (["--init-heads", str(out)], ["--init-heads", str(out / "heads")]):
        assert main(_argv(tiny_model_dir, data, out, "--overwrite", *flags)) == 2
        line = _error_line(capsys)
        assert f"--init-heads {flags[1]} lies in heads/ of the earlier run" in line and "--output-dir" in line
    assert _snapshot(out) == before and (out / "heads").is_dir()


def test_files_no_run_wrote_are_never_written_over(tiny_model_dir, run, tmp_path, capsys):
    """An --output-dir holding a user's own train_config.json, curves.png, heads/, metrics.jsonl or a
    checkpoint-N/ folder without a checkpoint's files (no run wrote them): a new
    run would write over them and --overwrite would delete them, so both are refused and nothing changes."""
    data, _ = run
    for name, content in (("train_config.json", '{"mine": 1}'), ("curves.png", "my chart"), ("heads/notes.txt", "x"),
                          ("metrics.jsonl", "my notes\n"), ("checkpoint-0000001/notes.txt", "x")):  # fmt: skip
        out = tmp_path / name.replace("/", "_")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_text(content)
        for extra in ([], ["--overwrite"]):
            assert main(_argv(tiny_model_dir, data, out, *extra)) == 2
            line = _error_line(capsys)
            assert f"--output-dir {out} holds {name.split('/')[0]}, which no fastmedusa run wrote" in line, line
            assert (out / name).read_text() == content


def test_resume_and_overwrite_together_are_refused(run, tiny_model_dir, capsys):
    data, out = run
    assert main(_argv(tiny_model_dir, data, out, "--overwrite", "--resume")) == 2
    assert "pass one of them" in _error_line(capsys)


# -- no code from files ---------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs `Path.touch(marker)`, standing in for a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_metadata_pickle_runs_no_code(run, tiny_model_dir, tmp_path, capsys):
    data, out = run
    marker = tmp_path / "pwned"
    newest = out / "checkpoint-0000004"
    (newest / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    write_manifest(newest)  # the attacker also writes a matching manifest
    older = _snapshot(out)
    older = {k: v for k, v in older.items() if k.startswith("checkpoint-0000002")}
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert not marker.exists()
    warned = captured.err
    assert f"warning: cannot resume from {newest}" in warned
    assert "is not allowed in a checkpoint's .metadata" in warned
    assert f"resumed from {out / 'checkpoint-0000002'} at step 2/{STEPS}" in printed
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("checkpoint-0000002")} == older


def test_no_pickle_files_in_a_checkpoint(run):
    _, out = run
    for _, path in list_checkpoints(out):
        names = {p.name for p in path.iterdir()}
        assert not {n for n in names if n.endswith((".pt", ".pkl", ".bin"))}, names
        assert {"extra_rank0.json", "optimizer.json", MANIFEST, "train_config.json"} <= names


# -- corruption: one line naming the file, then the next older checkpoint ------------------------------
def test_flipped_bytes_in_a_shard_fall_back_to_the_older_checkpoint(run, tiny_model_dir, capsys):
    data, out = run
    shard = next((out / "checkpoint-0000004").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    shard.write_bytes(bytes(raw))
    older = {k: v for k, v in _snapshot(out).items() if k.startswith("checkpoint-0000002")}
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0
    captured = capsys.readouterr()
    printed, warned = captured.out, captured.err
    assert f"cannot resume from {shard.parent}" in warned and f"{shard} does not match its sha256" in warned
    assert f"resumed from {out / 'checkpoint-0000002'} at step 2/{STEPS}" in printed
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("checkpoint-0000002")} == older
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(max(r["head_loss"]) < 20 for r in evals if r["kind"] == "eval")  # not 9e27


@pytest.mark.parametrize("victim", ["*.distcp", ".metadata", "extra_rank0.json", "optimizer.json"])
def test_truncated_files_in_every_checkpoint_give_rc_2_and_touch_nothing(run, tiny_model_dir, victim, capsys):
    data, out = run
    for _, path in list_checkpoints(out):
        target = next(path.glob(victim))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = _snapshot(out)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    for _, path in list_checkpoints(out):
        assert f"warning: cannot resume from {path}: " in captured.err
        assert str(next(path.glob(victim))) in captured.err
    assert "error: --resume: no usable checkpoint in" in captured.err and "--overwrite" in captured.err
    assert _snapshot(out) == before


def test_a_truncated_metadata_with_a_matching_manifest_is_one_line_each(run, tiny_model_dir, capfd):
    """A .metadata cut short and re-listed in the manifest reaches DCP's reader: still one line per checkpoint,
    none of the tracebacks DCP logs while falling back from global to per-rank metadata."""
    data, out = run
    for _, path in list_checkpoints(out):
        metadata = path / ".metadata"
        metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
        write_manifest(path)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Global metadata is not found" not in err
    for _, path in list_checkpoints(out):
        assert f"warning: cannot resume from {path}: UnpicklingError: {path / '.metadata'} cannot be read" in err
    assert "error: --resume: no usable checkpoint in" in err


def test_truncated_manifest_readable_files_still_verified(run, tiny_model_dir, capsys):
    """A checkpoint whose manifest lost a file's entry is altered: refused, the older one used."""
    data, out = run
    manifest = out / "checkpoint-0000004" / MANIFEST
    entries = json.loads(manifest.read_text())
    entries["files"].pop("extra_rank0.json")
    manifest.write_text(json.dumps(entries))
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0
    assert "extra_rank0.json is not listed in manifest.json" in capsys.readouterr().err


# -- interrupted and failed saves ----------------------------------------------------------------------
def test_stale_tmp_dirs_are_removed_on_start(run, tiny_model_dir, capsys):
    data, out = run
    stale = out / ".tmp-checkpoint-0000006"  # what a kill -9 mid-save leaves
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"\0" * 1000)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0
    assert "removed 1 incomplete save(s)" in capsys.readouterr().out
    assert not stale.exists()


def test_a_full_disk_mid_save_leaves_nothing_and_keeps_the_previous_checkpoint(
    tiny_model_dir, finished_run, tmp_path, monkeypatch, capsys
):
    from torch.distributed.checkpoint.filesystem import FileSystem

    data = finished_run[0]
    out = tmp_path / "out"
    real = FileSystem.create_stream
    saves = {"n": 0}

    class FullDisk:
        """A stream that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, stream) -> None:
            self.stream, self.written = stream, 0

        def write(self, b) -> int:
            if self.written + len(b) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.stream.write(b)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            full = "w" in mode and str(path).endswith(".distcp") and saves["n"] >= 1
            yield FullDisk(stream) if full else stream
        if "w" in mode and str(path).endswith(".distcp"):
            saves["n"] += 1

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    assert main(_argv(tiny_model_dir, data, out)) == 2
    line = _error_line(capsys)
    assert f"could not write {out / 'checkpoint-0000004'}" in line and "No space left on device" in line
    assert f"{out / 'checkpoint-0000002'} is intact" in line and "--resume" in line
    assert not list(out.glob(".tmp-*"))
    assert [s for s, _ in list_checkpoints(out)] == [2]
    before = _snapshot(out)
    monkeypatch.setattr(FileSystem, "create_stream", real)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0  # space freed: the run continues
    assert {k: v for k, v in _snapshot(out).items() if k in before} == before


def test_a_torn_last_metrics_line_does_not_block_resume(run, tiny_model_dir, capsys):
    data, out = run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # killed mid-write
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "environment" or records[-1]["step"] <= STEPS


# -- resume checks before any tensor is read -----------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-heads", "3"], "num_heads: saved 2, now 3"),
        (["--num-layers", "2"], "num_layers: saved 1, now 2"),
        (["--shared-lm-head"], "shared_lm_head: saved False, now True"),
        (["--seq-len", "64"], "seq_len: saved 48, now 64"),
        (["--batch-size", "4"], "global batch (--batch-size x processes): saved 2 x 1, now 4 x 1"),
        # the optimiser's settings come back from the checkpoint: a new value would be ignored, yet recorded
        (["--lr", "1e-5"], "lr: saved 0.002, now 1e-05"),
        (["--weight-decay", "0.1"], "weight_decay: saved 0.0, now 0.1"),
        (["--loss", "kl"], "loss: saved 'ce', now 'kl'"),
    ],
)
def test_changed_settings_are_refused_before_loading(run, tiny_model_dir, flags, message, capsys):
    data, out = run
    before = _snapshot(out)
    assert main(_argv(tiny_model_dir, data, out, "--resume", *flags)) == 2
    line = _error_line(capsys)
    assert message in line and "was written by a different run" in line
    assert _snapshot(out) == before


def test_a_changed_data_file_at_the_same_path_is_refused(run, tiny_model_dir, sharegpt_records, capsys):
    data, out = run
    data.write_text(json.dumps(sharegpt_records(40, seed=1)))
    before = _snapshot(out)
    assert main(_argv(tiny_model_dir, data, out, "--resume")) == 2
    line = _error_line(capsys)
    assert f"--data {data}: the file changed since" in line and "--allow-changed-data" in line
    assert _snapshot(out) == before
    assert main(_argv(tiny_model_dir, data, out, "--resume", "--allow-changed-data")) == 0


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size"])
def test_a_changed_model_shape_is_refused_before_loading(run, tiny_model_dir, tmp_path, capsys, field):
    from transformers import LlamaConfig, LlamaForCausalLM

    data, out = run
    other = tmp_path / "model"
    shutil.copytree(tiny_model_dir, other)
    config = LlamaConfig.from_pretrained(other)
    saved_value = getattr(config, field)
    if field == "hidden_size":
        config.hidden_size, config.intermediate_size = 48, 96
    else:
        config.vocab_size += 8
    LlamaForCausalLM(config).save_pretrained(other)
    for path in out.glob("checkpoint-*"):  # the same run, moved: its --model now points at `other`
        saved = json.loads((path / "train_config.json").read_text())
        saved["model"] = str(other)
        (path / "train_config.json").write_text(json.dumps(saved))
        write_manifest(path)
    before = _snapshot(out)
    assert main(_argv(other, data, out, "--resume", "--allow-changed-data")) == 2
    line = _error_line(capsys)
    assert f"{field}: saved {saved_value}, now {getattr(config, field)}" in line and "another base model" in line
    assert _snapshot(out) == before


def test_changed_model_weights_at_the_same_path_are_refused(run, tiny_model_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    data, out = run
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for path in out.glob("checkpoint-*"):  # the run was made with this model directory
        saved = json.loads((path / "train_config.json").read_text())
        saved["model"] = str(model_dir)
        (path / "train_config.json").write_text(json.dumps(saved))
        info = json.loads((path / "checkpoint.json").read_text())
        info["inputs"]["model"] = fingerprint(model_dir)
        (path / "checkpoint.json").write_text(json.dumps(info))
        write_manifest(path)
    retrained = LlamaForCausalLM.from_pretrained(model_dir)
    retrained.model.norm.weight.data.mul_(2)  # other weights, same shapes, same path
    retrained.save_pretrained(model_dir)
    before = _snapshot(out)
    assert main(_argv(model_dir, data, out, "--resume")) == 2
    line = _error_line(capsys)
    assert f"--model {model_dir}: the file changed since" in line and "--allow-changed-data" in line
    assert _snapshot(out) == before


def test_debug_keeps_the_traceback(run, tiny_model_dir):
    data, out = run
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        main(["--debug", *_argv(tiny_model_dir, data, out)])


@pytest.mark.parametrize("fails", ["main_write", "other_write", "main_commit"])
def test_a_save_failing_on_one_process_raises_on_every_process(tmp_path, monkeypatch, fails):
    """Two processes (threads here) share the write protocol: whichever fails, and at whichever stage,
    both raise CheckpointError within the timeout instead of one waiting for the other at a barrier, and
    the checkpoint already on disk is untouched."""
    import threading

    from fastmedusa.train import checkpoint as ckpt

    out = tmp_path / "out"
    ckpt.write_checkpoint(out, 1, lambda tmp: (tmp / "part-0").write_text("one"))
    before = _snapshot(out)
    barrier = threading.Barrier(2, timeout=20)
    flags: list[bool] = []

    def any_failed(failed: bool) -> bool:  # what an all-reduce of the flags gives every process
        flags.append(failed)
        barrier.wait()
        result = any(flags)
        barrier.wait()
        if barrier.n_waiting == 0 and len(flags) == 2:
            flags.clear()
        barrier.wait()
        return result

    real_commit = ckpt.commit
    monkeypatch.setattr(
        ckpt, "commit", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))
        if fails == "main_commit" else real_commit(*a, **k),
    )  # fmt: skip
    outcome: dict[str, BaseException | None] = {}

    def process(rank: int) -> None:
        def write(tmp: Path) -> None:
            if (fails, rank) in (("main_write", 0), ("other_write", 1)):
                raise OSError(errno.ENOSPC, "No space left on device")
            (tmp / f"part-{rank}").write_text("two")

        try:
            ckpt.write_checkpoint(
                out, 2, write, main=rank == 0, barrier=lambda: barrier.wait(), any_failed=any_failed
            )
            outcome[rank] = None
        except BaseException as err:  # noqa: BLE001 - recorded for the assertions
            outcome[rank] = err

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a process was left waiting"
    assert all(isinstance(outcome[r], ckpt.CheckpointError) for r in (0, 1)), outcome
    assert "nothing of it was kept" in str(outcome[1])
    assert _snapshot(out) == before and [s for s, _ in list_checkpoints(out)] == [1]


def test_overwrite_refuses_a_model_that_is_the_earlier_runs_backbone(tmp_path):
    """Stage 2 continued from the backbone an earlier stage-2 run wrote into the same --output-dir."""
    from fastmedusa.train.config import TrainConfig
    from fastmedusa.train.run import check_overwrite_keeps_inputs

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    config = TrainConfig(model=str(out / "model"), output_dir=str(out), overwrite=True)
    with pytest.raises(ValueError, match=r"--model .*model lies in model/ of the earlier run .*--overwrite deletes"):
        check_overwrite_keeps_inputs(config, [out / "heads", out / "model"])
    check_overwrite_keeps_inputs(config, [out / "heads"])  # a model elsewhere, or not among the run's files
