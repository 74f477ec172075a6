"""One dtype vocabulary for every command: `bf16`, `fp16`, `fp32` (the long torch names are accepted too),
and one reading of `--device`."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
DTYPE_METAVAR = "{" + ",".join(DTYPES) + "}"


def dtype_name(text: str) -> str:
    """The short name of a dtype given as `bf16`/`bfloat16`, `fp16`/`float16`/`half`, `fp32`/`float32`."""
    name = ALIASES.get(str(text).lower(), str(text).lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}: pass one of {', '.join(DTYPES)}")
    return name


def parse_dtype(text: str) -> torch.dtype:
    return DTYPES[dtype_name(text)]


def dtype_or_auto_arg(text: str) -> str:
    """argparse `type=` for flags that also take `auto` (the device decides)."""
    return "auto" if text == "auto" else dtype_arg(text)


def dtype_arg(text: str) -> str:
    """argparse `type=`: the short name, or a usage error naming the choices."""
    try:
        return dtype_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_device_arguments(parser: argparse.ArgumentParser, dtype_help: str = "weights dtype") -> None:
    """--device and --dtype with the defaults every command shares: CUDA + bf16 when a GPU exists, else CPU + fp32."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        metavar=DTYPE_METAVAR,
        help=f"{dtype_help}; bfloat16/float16/float32 also work (default: bf16 on CUDA, fp32 on the CPU)",
    )


def parse_device(text: str) -> torch.device:
    """`--device TEXT` as a torch.device; a malformed name or an absent CUDA is a one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device {text}: not a device name; pass cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: fastmedusa runs on cpu or cuda; pass cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here; pass --device cpu")
    return device
