"""Fused multi-head linear cross-entropy (Triton kernel, chunked PyTorch, reference, peers) and metrics."""

from fastmedusa.ops.cross_entropy import (
    IMPLS,
    linear_cross_entropy,
    medusa_cross_entropy,
    resolve_impl,
    topk_correct,
)

__all__ = ["IMPLS", "linear_cross_entropy", "medusa_cross_entropy", "resolve_impl", "topk_correct"]
