"""Helpers every benchmark shares: the environment record, CUDA-event timing, the matmul ceiling, JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastmedusa.environment import PACKAGES, environment, package_versions  # noqa: F401 - re-exported


def cuda_times_ms(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def positive_int(text: str) -> int:
    """argparse `type=` for sizes and counts: an integer of 1 or more, else a usage error naming the value."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass an integer of 1 or more")
    return value


def nonnegative_int(text: str) -> int:
    """argparse `type=` for counts that may be 0 (warm-up calls): an integer of 0 or more."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass an integer of 0 or more")
    return value


def positive_float(text: str) -> float:
    """argparse `type=` for a scale: a finite number above 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: pass a finite number above 0, e.g. 3.0")
    return value


def fraction(text: str) -> float:
    """argparse `type=` for a share of tokens: a number in [0, 1) (1 would leave nothing to score)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a fraction in [0, 1), e.g. 0.3")
    return value


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def matmul_tflops(device: torch.device | str = "cuda", size: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) on random data: the ceiling that FLOP fractions refer to."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    ms = median(cuda_times_ms(lambda: a @ b, warmup=3, repeats=10))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def is_oom(err: BaseException) -> bool:
    """CUDA out-of-memory, whichever way the library reported it."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def write_json(path: str | Path, payload: dict) -> Path:
    """Write payload as indented JSON, creating the folder; returns the path."""
    from fastmedusa.files import write_text_atomic

    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
