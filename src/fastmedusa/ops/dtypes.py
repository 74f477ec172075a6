"""Dtype rules shared by the fused ops and their Triton kernels (a leaf module: it imports neither)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit compute dtypes, float64 stays float64 (exact references)."""
    return torch.promote_types(dtype, torch.float32)


# dtypes the decode kernels (attention, K/V move, top-k) take: loaded as is, or exactly widened to fp32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
