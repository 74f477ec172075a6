"""The peers, for benchmarks and comparisons: Liger-Kernel's, Cut Cross-Entropy's and quack-kernels' fused
linear CE, and Liger-Kernel's fused linear distillation losses (as a forward KL) beside `medusa_kl_divergence`.

Each is called one head at a time, as a user of those libraries would. A shift: Liger takes no shift, so the
hidden states and labels are sliced (the non-contiguous slice is copied: that is its cost, N*H*2 bytes);
CCE takes its own `shift=` (versions whose `shift` is an int; older ones are sliced like Liger); quack needs
rows in multiples of 8, so it gets every row (a view) with the labels shifted and the last `shift` of each
sequence ignored. All run only on CUDA and only where installed (`pip install liger-kernel` /
`cut-cross-entropy` / `quack-kernels`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor


class PeerUnavailable(ValueError):
    """A peer that cannot run here (its package is not installed, or it needs CUDA): benchmarks record a row
    saying so, where any other error of a peer is recorded as that peer's failure."""


CE_PEERS = {"liger": "liger-kernel", "cce": "cut-cross-entropy", "quack": "quack-kernels"}


def _import_peer(impl: str):
    try:
        if impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy
        if impl == "quack":
            from quack.linear_cross_entropy import chunked_linear_cross_entropy

            return chunked_linear_cross_entropy
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy
    except ImportError as err:
        package = CE_PEERS[impl]
        raise PeerUnavailable(f"impl={impl!r} needs the {package} package: pip install {package}") from err


@functools.cache
def _cce_takes_int_shift() -> bool:
    """CCE's `shift` became `bool | int` (earlier versions: a bool, i.e. only a shift of 1)."""
    try:
        from cut_cross_entropy.cce import cce_linear_cross_entropy
    except ImportError:
        return False
    return "int" in str(inspect.signature(cce_linear_cross_entropy).parameters["shift"].annotation)


def peer_linear_cross_entropy(
    impl: str, hidden: Tensor, weight: Tensor, labels: Tensor, shift: int, ignore_index: int, reduction: str
) -> Tensor:
    """Liger, CCE or quack on one head: same contract as `linear_cross_entropy` for "mean" and "sum"."""
    from fastmedusa.ops.cross_entropy import shifted_targets

    if reduction == "none":
        raise ValueError(f"impl={impl!r} is wired for reduction 'mean' or 'sum' only: use impl='chunked'")
    if not hidden.is_cuda:
        raise PeerUnavailable(f"impl={impl!r} runs on CUDA only, but hidden is on {hidden.device}")
    fn = _import_peer(impl)
    if impl == "quack":
        target = shifted_targets(labels, shift, ignore_index)
        loss = fn(
            hidden.reshape(-1, hidden.shape[-1]), weight, target, ignore_index=ignore_index, reduction="sum"
        )
    elif impl == "cce" and _cce_takes_int_shift():
        target = labels[..., shift:]
        loss = fn(hidden, weight, labels, ignore_index=ignore_index, reduction="sum", shift=shift)
    else:
        length = hidden.shape[-2] if hidden.dim() == 3 else hidden.shape[0]
        keep = max(length - shift, 0)
        h = hidden[..., :keep, :].reshape(-1, hidden.shape[-1])
        target = labels[..., shift:].reshape(-1)
        loss = fn(h, weight, target, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (target != ignore_index).sum().clamp(min=1)


KL_PEERS = ("liger", "liger-chunked")


def _import_kl_peer(impl: str, ignore_index: int):
    """Liger's distillation losses set to the forward KL(teacher || student): beta=0 in both (Liger's
    generalised JSD is that KL at beta 0 in `LigerFusedLinearJSD` and in current `LigerFusedLinearJSDLoss`)."""
    try:
        if impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            return LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=ignore_index, temperature=1.0)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, ignore_index=ignore_index, temperature=1.0
        )
        return lambda s, w, t, tw, y: loss(s, w, t, tw, y, None, None)  # no biases
    except ImportError as err:
        raise PeerUnavailable(f"impl={impl!r} needs the liger-kernel package: pip install liger-kernel") from err


def peer_kl_divergence(
    impl: str,
    hiddens: list[Tensor],
    weights: list[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    shifts: list[int],
    ignore_index: int = -100,
) -> Tensor:
    """Liger on K heads, one call per head as its users would: the same contract as
    `medusa_kl_divergence` for (B, T, H) inputs. Each call recomputes the teacher's logits for its rows
    (4 GEMM passes a head), and the shifted rows are sliced copies."""
    if impl not in KL_PEERS:
        raise ValueError(f"impl={impl!r} is not a KL peer: pick one of {KL_PEERS}")
    if not teacher_hidden.is_cuda:
        raise PeerUnavailable(f"impl={impl!r} runs on CUDA only, but the inputs are on {teacher_hidden.device}")
    fn = _import_kl_peer(impl, ignore_index)
    seq, width = teacher_hidden.shape[-2], teacher_hidden.shape[-1]
    losses = []
    for h, w, s in zip(hiddens, weights, shifts):
        keep = max(seq - s, 0)
        student = h[..., :keep, :].reshape(-1, width)
        teacher = teacher_hidden[..., s - 1 : s - 1 + keep, :].reshape(-1, width)
        losses.append(fn(student, w, teacher.detach(), teacher_weight.detach(), labels[..., s:].reshape(-1)))
    return torch.stack(losses)
