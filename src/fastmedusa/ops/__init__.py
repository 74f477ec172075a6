"""Fused multi-head linear cross-entropy and KL divergence (Triton kernels, chunked PyTorch, references,
peers), metrics, and the fused top-k of decoding."""

from fastmedusa.ops.cross_entropy import (
    IMPLS,
    linear_cross_entropy,
    medusa_cross_entropy,
    resolve_impl,
    topk_correct,
)
from fastmedusa.ops.kl_divergence import KL_IMPLS, medusa_kl_divergence
from fastmedusa.ops.triton_topk import topk_indices

__all__ = [
    "IMPLS",
    "KL_IMPLS",
    "linear_cross_entropy",
    "medusa_cross_entropy",
    "medusa_kl_divergence",
    "resolve_impl",
    "topk_correct",
    "topk_indices",
]
