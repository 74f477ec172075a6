"""Checkpoint directories: one atomic write path, a manifest that guards every read, RNG states as JSON.

A checkpoint is `output_dir/checkpoint-{step:07d}/`. It is written under `.tmp-checkpoint-*`, every file
and the directory fsynced, then renamed into place: a run killed at any moment leaves either the previous
complete checkpoint or the new one, never half of one; a write that fails (a full disk) removes the
temporary directory and leaves the older checkpoints as they were. Older ones are deleted only after the
new one is complete.

`manifest.json` (size and sha256 of every other file) is written last and marks the checkpoint complete.
A resume checks it before anything is parsed: torch.distributed.checkpoint's `.metadata` is a pickle,
and a flipped byte in a tensor shard would otherwise train on silently. Nothing on the load path
unpickles arbitrary objects: tensors are read by DCP with torch's weights-only loader, the metadata with
an allowlist unpickler (`fastmedusa.train.distributed`), everything else is JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from fastmedusa.errors import UserError
from fastmedusa.files import json_object_keys, parse_json
from fastmedusa.model.export import BACKBONE_NAME

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAIN_CONFIG = "train_config.json"
RUN_INFO = "checkpoint.json"  # step, world size, model shape, input fingerprints: checked before tensors load
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_HASH_BLOCK = 1 << 20


class CheckpointError(UserError):
    """A checkpoint cannot be written or read (full disk, corrupt or truncated file, none usable)."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:07d}"


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder in `output_dir` (complete or not), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)))


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a manifest) in `output_dir`, oldest first."""
    return [(step, path) for step, path in _checkpoint_dirs(output_dir) if (path / MANIFEST).is_file()]


def checkpoints_without_manifest(output_dir: Path) -> list[Path]:
    """Checkpoint folders that cannot be verified (no manifest: a save cut short, or an older format)."""
    return [path for _, path in _checkpoint_dirs(output_dir) if not (path / MANIFEST).is_file()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def earlier_run_files(output_dir: Path) -> list[Path]:
    """What an earlier run left in `output_dir`: checkpoints (complete or not), its metrics log, its heads and
    (stage 2) its backbone."""
    output_dir = Path(output_dir)
    found = [path for _, path in _checkpoint_dirs(output_dir)]
    earlier = [output_dir / "metrics.jsonl", output_dir / "heads"]
    if is_trained_backbone(output_dir / BACKBONE_NAME):  # never a model directory fastmedusa did not write
        earlier.append(output_dir / BACKBONE_NAME)
    return found + [p for p in earlier if p.exists()]



RUN_CONFIG_KEYS = ("stage", "num_heads", "output_dir")  # what every train_config.json a run wrote holds


def is_run_config(path: Path) -> bool:
    """Whether `path` is a train_config.json that `fastmedusa train` wrote (a JSON object with its keys)."""
    return set(RUN_CONFIG_KEYS) <= json_object_keys(path)


def foreign_run_files(output_dir: Path) -> list[Path]:
    """Files where a run writes (its settings, its chart, its heads/) that no run of fastmedusa wrote: a run
    would write over them, and --overwrite would delete them. A run's train_config.json makes the rest its own."""
    output_dir = Path(output_dir)
    if is_run_config(output_dir / TRAIN_CONFIG):
        return []
    found = [p for p in (output_dir / TRAIN_CONFIG, output_dir / "curves.png") if p.exists()]
    heads = output_dir / "heads"
    if heads.is_dir() and any(heads.iterdir()) and not (heads / "config.json").is_file():
        found.append(heads)
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists() and not is_metrics_log(metrics):
        found.append(metrics)
    for _, path in _checkpoint_dirs(output_dir):  # ours: empty, or holding a checkpoint's files (complete or not)
        ours = (path / MANIFEST).exists() or (path / RUN_INFO).exists()
        if not path.is_dir() or any(path.iterdir()) and not ours:
            found.append(path)
    return found


def is_metrics_log(path: Path) -> bool:
    """Whether `path` is a run's metrics.jsonl: empty, or its first record a JSON object with a step."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        return first is None or isinstance(record := parse_json(first), dict) and "step" in record
    except (OSError, ValueError):
        return False


def is_trained_backbone(path: Path) -> bool:
    """Whether `path` is a backbone directory that `fastmedusa train --stage 2` wrote (it holds the marker)."""
    from fastmedusa.model.loading import TRAINED_BACKBONE_MARKER

    return (Path(path) / TRAINED_BACKBONE_MARKER).is_file()


def tmp_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before `commit` renames it into place."""
    return Path(output_dir) / f"{TMP_PREFIX}{checkpoint_dir(output_dir, step).name}"


def remove_stale_tmp(output_dir: Path) -> int:
    """Delete `.tmp-checkpoint-*` directories of saves that never completed (a kill, a full disk), and what a
    killed write of the stage-2 backbone left (`.model.*.tmp`, `.model.old`)."""
    from fastmedusa.files import stale_directory_temporaries

    stale = list(Path(output_dir).glob(f"{TMP_PREFIX}{PREFIX}*"))
    stale += stale_directory_temporaries(Path(output_dir) / BACKBONE_NAME)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def remove_checkpoints(output_dir: Path) -> int:
    """Delete every checkpoint (complete or not), the metrics log and the heads: only for --overwrite."""
    paths = earlier_run_files(output_dir)
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(paths) + remove_stale_tmp(output_dir)


def write_checkpoint(
    output_dir: Path,
    step: int,
    write: Callable[[Path], None],
    *,
    keep: int = 2,
    main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    any_failed: Callable[[bool], bool] = lambda failed: failed,
) -> Path:
    """The one write path: `write(tmp)` on every process, then the main one commits (manifest, fsync, rename).

    A failure in `write` (e.g. ENOSPC) removes the temporary directory and raises `CheckpointError`;
    the checkpoints already on disk are not touched. `any_failed` (collective: whether any process
    failed) tells every process the outcome of the writes and of the commit, so a process that fails
    alone raises together with the others instead of leaving them waiting at a barrier."""
    output_dir = Path(output_dir)
    tmp = tmp_dir(output_dir, step)
    try:
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over by a save killed mid-write
            tmp.mkdir(parents=True)
        barrier()
        _together(lambda: write(tmp), any_failed, "another process could not write its part")
        _together(lambda: commit(output_dir, step, keep=keep) if main else None, any_failed,
                  "the main process could not commit it")  # fmt: skip
    except (OSError, CheckpointException) as err:  # DCP wraps a process's OSError in a CheckpointException
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"could not write {checkpoint_dir(output_dir, step)} ({describe(err)}); nothing of it was kept"
            + (f" and {kept} is intact: free space and continue with --resume" if kept else "")
        ) from err
    return checkpoint_dir(output_dir, step)


def _together(action: Callable[[], object], any_failed: Callable[[bool], bool], others: str) -> None:
    """Run `action` here; if it failed on any process, raise on every one (its own error where it failed,
    else an OSError saying `others`), so no process is left waiting at the next collective."""
    error: Exception | None = None
    try:
        action()
    except Exception as err:  # noqa: BLE001 - shared first, then raised
        error = err
    if any_failed(error is not None):
        raise error or OSError(others)


def describe(err: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException is unwrapped to the first process's error."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    cause = err  # torch.save turns a failed write into "unexpected pos": the OSError is its context
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        err = cause
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def commit(output_dir: Path, step: int, keep: int = 2) -> Path:
    """Write the manifest (last), fsync, rename the temporary directory into place; keep the newest `keep`."""
    output_dir = Path(output_dir)
    tmp, final = tmp_dir(output_dir, step), checkpoint_dir(output_dir, step)
    write_manifest(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_path(path)
    _fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. a finished run resumed)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(output_dir)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- manifest ----------------------------------------------------------------------------------------------
def _files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """`manifest.json`: size and sha256 of every file in `directory` (written last: it marks completion)."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }
    path = directory / MANIFEST
    path.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    return path


def verify_manifest(directory: Path, part: int = 0, parts: int = 1) -> None:
    """Raise `CheckpointError` naming the first file that is missing, extra, truncated or altered.

    With `parts` processes each hashes every `parts`-th file (from `part`) instead of all of them: a
    stage-2 checkpoint of an 8B model is ~48 GB, read once in all rather than once per process."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    try:
        files = parse_json(manifest.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError as err:
        raise CheckpointError(f"{manifest} is missing: the checkpoint is incomplete") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest} is unreadable ({err})") from err
    present = {p.relative_to(directory).as_posix() for p in _files(directory)}
    if missing := sorted(set(files) - present):
        raise CheckpointError(f"{directory / missing[0]} is missing (listed in {MANIFEST})")
    if extra := sorted(present - set(files)):
        raise CheckpointError(
            f"{directory / extra[0]} is not listed in {MANIFEST}: the checkpoint was altered"
        )
    for name, entry in sorted(files.items())[part::parts]:
        path = directory / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise CheckpointError(f"{manifest} has no size for {name}: the manifest is corrupt")
        if (size := path.stat().st_size) != entry["size"]:
            change = "truncated" if size < entry["size"] else "grown: the file was altered"
            raise CheckpointError(f"{path} has {size} bytes, {MANIFEST} says {entry['size']}: {change}")
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt")


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file; anything else is a `CheckpointError` naming the file."""
    try:
        value = parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def write_json(path: Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")


# -- RNG states as JSON ------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, JSON-serialisable (byte states in base64)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (a malformed state raises `CheckpointError`)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the saved RNG state is malformed ({err})") from err


# -- input fingerprints ------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def fingerprint(path: str | os.PathLike) -> dict | None:
    """Size and sha256 of the first and last MB of a file (or of each weights file of a directory).

    Enough to notice a file replaced at the same path without reading gigabytes; None for what is not a
    local path (a hub id)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    else:
        return None
    out = {}
    for p in files:
        size = p.stat().st_size
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            digest.update(f.read(_HASH_BLOCK))
            if size > _HASH_BLOCK:
                f.seek(max(_HASH_BLOCK, size - _HASH_BLOCK))
                digest.update(f.read(_HASH_BLOCK))
        out[p.name] = {"size": size, "sha256_first_last_mb": digest.hexdigest()}
    return out


def same_content(a: dict | None, b: dict | None) -> bool:
    """Two known, non-empty fingerprints of the same bytes, whatever the files are named (a renamed or moved
    file is the same input)."""
    if not a or not b:
        return False

    def contents(fp: dict) -> list:
        return sorted((e["size"], e["sha256_first_last_mb"]) for e in fp.values())

    return contents(a) == contents(b)
