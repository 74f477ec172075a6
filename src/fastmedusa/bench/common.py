"""Helpers every benchmark shares: the environment record, CUDA-event timing, the matmul ceiling, JSON."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "fastmedusa")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when missing)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device | str | None = None, packages: Sequence[str] = PACKAGES) -> dict:
    """Where and when a result was measured: device name and memory, date (UTC), versions."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch_cuda": torch.version.cuda,
        "versions": package_versions(packages),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["device_memory_gb"] = round(props.total_memory / 1e9, 1)
        env["sm_count"] = props.multi_processor_count
    return env


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
