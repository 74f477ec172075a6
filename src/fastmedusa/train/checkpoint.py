"""Checkpoint directories written atomically, and the RNG states that make `--resume` exact.

A checkpoint is `output_dir/checkpoint-{step:07d}/`. It is written under a temporary name, every file
and the directory fsynced, then renamed into place: a run killed at any moment leaves either the
previous complete checkpoint or the new one, never half of one. Older ones are deleted only after the
new one is complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{PREFIX}{step:07d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def tmp_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before `commit` renames it into place."""
    return output_dir / f".tmp-{checkpoint_dir(output_dir, step).name}"


def begin(output_dir: Path, step: int) -> Path:
    """Create an empty temporary directory for the checkpoint of `step` (main process only)."""
    tmp = tmp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a run killed mid-write
    tmp.mkdir(parents=True)
    return tmp


def commit(output_dir: Path, step: int, keep: int = 1) -> Path:
    """Mark the temporary directory complete, fsync it, rename it into place; keep the newest `keep`."""
    tmp, final = tmp_dir(output_dir, step), checkpoint_dir(output_dir, step)
    (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
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


def remove_checkpoints(output_dir: Path) -> int:
    """Delete every checkpoint (complete or not) in `output_dir`: a fresh run must not resume an old one."""
    paths = [p for p in output_dir.glob(f"{PREFIX}*")] + list(output_dir.glob(f".tmp-{PREFIX}*"))
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return len(paths)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
