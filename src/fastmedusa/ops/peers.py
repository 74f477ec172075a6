"""The peers, for benchmarks and comparisons: Liger-Kernel's and Cut Cross-Entropy's fused linear CE.

Each is called one head at a time, as a user of those libraries would; a shift is applied by slicing
the hidden states and labels (the peers may copy the non-contiguous slice: that is their cost).
Both run only on CUDA and only where installed (`pip install liger-kernel` / `cut-cross-entropy`).
"""

from __future__ import annotations

from torch import Tensor


def _import_peer(impl: str):
    try:
        if impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy
    except ImportError as err:
        package = "liger-kernel" if impl == "liger" else "cut-cross-entropy"
        raise ValueError(f"impl={impl!r} needs the {package} package: pip install {package}") from err


def peer_linear_cross_entropy(
    impl: str, hidden: Tensor, weight: Tensor, labels: Tensor, shift: int, ignore_index: int, reduction: str
) -> Tensor:
    """Liger or CCE on one head: same contract as `linear_cross_entropy` for "mean" and "sum"."""
    if reduction == "none":
        raise ValueError(f"impl={impl!r} is wired for reduction 'mean' or 'sum' only: use impl='chunked'")
    if not hidden.is_cuda:
        raise ValueError(f"impl={impl!r} runs on CUDA only, but hidden is on {hidden.device}")
    fn = _import_peer(impl)
    length = hidden.shape[-2] if hidden.dim() == 3 else hidden.shape[0]
    keep = max(length - shift, 0)
    h = hidden[..., :keep, :].reshape(-1, hidden.shape[-1])
    target = labels[..., shift:].reshape(-1)
    loss = fn(h, weight, target, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (target != ignore_index).sum().clamp(min=1)
