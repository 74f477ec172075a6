"""Helpers every benchmark shares: the environment record, CUDA-event timing, the matmul ceiling, JSON."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastmedusa.environment import PACKAGES, environment, package_versions  # noqa: F401 - re-exported
from fastmedusa.files import parse_json


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


def checked(convert: Callable[[str], object], accept: Callable, requirement: str, name: str) -> Callable:
    """An argparse `type=`: `convert(text)`, refused unless `accept(value)`; the usage error names the value and
    the `requirement` ("an integer of 1 or more")."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r}: pass {requirement}")
        return value

    parse.__name__ = name
    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer of 1 or more", "positive_int")  # sizes and counts
nonnegative_int = checked(int, lambda v: v >= 0, "an integer of 0 or more", "nonnegative_int")  # warm-up calls
positive_float = checked(  # a scale: NaN and inf refused
    float, lambda v: v > 0 and math.isfinite(v), "a finite number above 0, e.g. 3.0", "positive_float"
)
temperature = checked(  # 0: greedy; NaN and inf refused
    float, lambda v: v >= 0 and math.isfinite(v), "0 (greedy) or a finite temperature above 0", "temperature"
)
probability = checked(float, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1], e.g. 0.98", "probability")
fraction = checked(  # a share of tokens: 1 would leave nothing to score
    float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1), e.g. 0.3", "fraction"
)


def wrapped_title(fig, text: str, fontsize: int = 10) -> None:
    """fig.suptitle broken into lines that fit the figure's width (a one-panel chart cut long titles off)."""
    import textwrap

    chars = max(40, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    fig.suptitle("\n".join(textwrap.wrap(text, chars)), fontsize=fontsize)


def read_results(path: Path, command: str, keys: Sequence[str], row_keys: Sequence[str] = ()) -> dict:
    """A results JSON written by `fastmedusa bench <command>`, or one error line saying what the file is not
    (charts and reports are redrawn from these files: `--plot`, `bench report`)."""
    path = Path(path)
    what = f"a file written by `fastmedusa bench {command}`"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file: pass {what}")
    try:
        result = parse_json(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}): pass {what}") from err
    rows = result.get("rows") if isinstance(result, dict) else None
    missing = [k for k in keys if k not in result] if isinstance(result, dict) else list(keys)
    bad_rows = not isinstance(rows, list) or any(
        not isinstance(r, dict) or any(k not in r for k in row_keys) for r in rows
    )
    if missing or bad_rows:
        lacks = ", ".join(missing) or f"rows with {'/'.join(row_keys)}"
        raise ValueError(f"{path} is not a `fastmedusa bench {command}` results file (no {lacks}): pass {what}")
    return result


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
