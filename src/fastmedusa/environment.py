"""Where and when something was measured: device, date, package versions (for logs and benchmark JSON)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
from collections.abc import Sequence

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
