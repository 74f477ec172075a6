"""The functional API: linear cross-entropy for one head or K Medusa heads, with an `impl=` switch.

Dtypes: the GEMMs run in the autocast dtype when autocast is on for the hidden's device (bf16 on CUDA
under `torch.autocast`), otherwise in the weight's dtype; the hidden is cast to it. Softmax, loss and
each GEMM's sums are fp32 (fp64 for fp64 inputs); by default dW sums its row chunks in the compute dtype
(wgrad="accumulate": in fp32). The loss is fp32 (fp64 for fp64); gradients are in each input's dtype.
fp64 inputs always take the chunked path (impl="triton" too: its kernels sum in fp32).
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmedusa.ops.dtypes import acc_dtype
from fastmedusa.ops.fused import DEFAULT_CHUNK_ROWS, linear_ce_op, linear_ce_rows_op, resolve_wgrad

IMPLS = ("auto", "triton", "torch", "chunked", "compile", "liger", "cce", "quack")
REDUCTIONS = ("mean", "sum", "none")


def triton_available(device: torch.device) -> bool:
    """The Triton kernel runs on CUDA devices when triton imports."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """ "auto" -> "triton" on CUDA (when triton is installed), "chunked" elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}: pick one of those")
    if impl == "auto":
        return "triton" if triton_available(device) else "chunked"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' (--impl triton) runs its kernels on CUDA, not on {device.type} (the CPU only under "
            "TRITON_INTERPRET=1, for tests): pass 'chunked' or 'auto' here"
        )
    return impl


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the hidden's device, else the weight's dtype."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def shifted_targets(labels: Tensor, shift: int, ignore_index: int) -> Tensor:
    """(N,) int64 targets: position t gets labels[..., t+shift]; the last `shift` of each sequence are ignored.

    Only the labels are shifted (B*T integers); the hidden states are never copied.
    """
    labels = labels.long()
    if shift == 0:
        return labels.reshape(-1)
    tail = labels.new_full((*labels.shape[:-1], min(shift, labels.shape[-1])), ignore_index)
    return torch.cat([labels[..., shift:], tail], dim=-1).reshape(-1)


def check_chunk_rows(chunk_rows: object) -> int:
    """`chunk_rows` as the ops take it: None (0: automatic) or a positive integer, named when it is not."""
    if chunk_rows is None:
        return 0
    try:
        rows = operator.index(chunk_rows)
    except TypeError:
        raise TypeError(f"chunk_rows={chunk_rows!r}: pass a whole number of rows, or None (automatic)") from None
    if rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be a positive number of rows (or None: automatic)")
    return rows


def kernel_impl(impl: str, dtype: torch.dtype) -> str:
    """The Triton kernels sum in fp32: fp64 inputs (exact references) take the chunked path, which keeps fp64."""
    return "chunked" if impl == "triton" and dtype == torch.float64 else impl


def check_tensor(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is a class of the weight's V rows or `ignore_index`: another id would be read past the
    logits (a wrong loss from the fused kernels, an index error elsewhere). On the CPU the check is free and
    names the value; on a GPU it is an asynchronous device assert, so training keeps no per-step host sync."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)  # a pad id past V may be ignore_index
    fix = f"use {ignore_index} (ignore_index) for positions not scored, and ids of the weight's {vocab} rows"
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad.any():
            raise ValueError(f"label {int(labels[bad][0])} is outside [0, {vocab}) and is not ignore_index: {fix}")
    else:  # traced by torch.compile too: no graph break
        torch._assert_async(~bad.any(), f"a label is outside [0, {vocab}) and is not ignore_index: {fix}")


def _check_inputs(
    hidden: Tensor, weight: Tensor, labels: Tensor, shift: int, reduction: str, ignore_index: int,
    label_values: bool = True,
) -> None:
    for name, value in (("shift", shift), ("ignore_index", ignore_index)):
        try:
            operator.index(value)
        except TypeError:
            raise TypeError(f"{name}={value!r}: pass an integer") from None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: expected (B, T, H) or (N, H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden has H={hidden.shape[-1]}: "
            "expected weight (V, H), the nn.Linear(H, V) layout"
        )
    if 0 in weight.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: a vocabulary and a hidden size of 1 or more")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)}: "
            "labels must be token-aligned with hidden's positions, (B, T) or (N,)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels have dtype {labels.dtype}: pass integer token ids (torch.long)")
    if shift < 0:
        raise ValueError(f"shift={shift} is negative: a head scores position t against t+shift, shift >= 0")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if label_values:
        check_label_values(labels, weight.shape[0], ignore_index)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    shift: int = 0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_rows: int | None = None,
    wgrad: str = "auto",
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` shifted by `shift`, without all the logits.

    hidden (B, T, H) or (N, H), weight (V, H), labels (B, T) or (N,) token-aligned (ignore_index =
    not scored). Position t is scored against labels[..., t+shift]. "mean" averages over scored
    positions (0, with zero gradients, when none is scored), "sum" sums, "none" returns fp32 losses
    shaped like labels (0 where not scored).

    Tuning (fused impls): chunk_rows bounds the logits buffer (chunk_rows x V; None: balanced chunks
    within `fused.LOGITS_BUDGET_BYTES`, 1 GiB, and for the lean modes within twice the hidden's size or
    512 rows, whichever is more);
    wgrad picks how the weight gradient is formed: "inplace" (3 GEMM passes, summed chunk by chunk in the
    weight's dtype, no extra V x H memory), "accumulate" (3 passes + an fp32 V x H buffer: exact sums),
    "recompute" (4 passes, no buffer), "auto" ("inplace"; "accumulate" for fp16: `fused.resolve_wgrad`).

    The fused impls ("chunked", "triton") with reduction "mean" or "sum" form the gradients in the forward:
    one backward per call (no retain_graph=True, no double backward); impl="torch" has no such limit.
    """
    _check_inputs(hidden, weight, labels, shift, reduction, ignore_index)
    return _linear_cross_entropy(hidden, weight, labels, shift, ignore_index, reduction, impl, chunk_rows, wgrad)


def _linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, shift: int, ignore_index: int, reduction: str, impl: str,
    chunk_rows: int | None, wgrad: str,
) -> Tensor:
    """`linear_cross_entropy` past its checks (`medusa_cross_entropy` checks the shared labels once)."""
    impl = resolve_impl(impl, hidden.device)
    if impl in ("liger", "cce", "quack"):
        from fastmedusa.ops.peers import peer_linear_cross_entropy

        return peer_linear_cross_entropy(impl, hidden, weight, labels, shift, ignore_index, reduction)
    chunk_rows = check_chunk_rows(chunk_rows)  # 0: the op sizes chunks to LOGITS_BUDGET_BYTES of logits
    resolve_wgrad(wgrad)
    dtype = compute_dtype(hidden, weight)
    impl = kernel_impl(impl, dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    targets = shifted_targets(labels, shift, ignore_index)
    if impl in ("torch", "compile"):
        ref = _compiled_reference() if impl == "compile" else linear_cross_entropy_ref
        return ref(h, w, targets, ignore_index, reduction).reshape(
            labels.shape if reduction == "none" else ()
        )
    if reduction == "none":
        loss, _ = linear_ce_rows_op(h, w, targets, ignore_index, impl, chunk_rows, wgrad)
        return loss.reshape(labels.shape)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h.requires_grad, grad_on and w.requires_grad
    loss, _, _, _ = linear_ce_op(
        h, w, targets, ignore_index, reduction, need_h, need_w, impl, chunk_rows, wgrad
    )
    return loss


def linear_cross_entropy_ref(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str
) -> Tensor:
    """impl="torch": F.linear + F.cross_entropy on fp32 logits (as HF models upcast), all N x V at once.

    fp16 inputs: the GEMM itself runs in fp32, since fp16 logits overflow past 65504 (inf, NaN loss)."""
    if hidden.dtype == torch.float16:
        hidden, weight = hidden.float(), weight.float()
    logits = F.linear(hidden, weight).to(acc_dtype(hidden.dtype))
    if reduction == "none":
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


@functools.cache
def _compiled_reference():
    """impl="compile": the reference under torch.compile (Inductor fuses the softmax, the logits stay)."""
    return torch.compile(linear_cross_entropy_ref, dynamic=True)


def medusa_cross_entropy(
    hiddens: Sequence[Tensor] | Tensor,
    weights: Sequence[Tensor] | Tensor,
    labels: Tensor,
    *,
    shifts: Sequence[int],
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_rows: int | None = None,
    wgrad: str = "auto",
) -> Tensor:
    """Mean cross-entropy of K heads in one call: a (K,) fp32 tensor.

    hiddens: K tensors (B, T, H) (or one stacked (K, B, T, H)); weights: K tensors (V, H) (or stacked
    (K, V, H)); the same weight may appear several times (a shared projection: its gradients sum).
    Head k scores position t against labels[..., t + shifts[k]]. Weights or hiddens that do not
    require grad get no gradient GEMM.
    """
    if isinstance(shifts, int) or not isinstance(shifts, Sequence | Tensor):
        raise TypeError(f"shifts={shifts!r}: pass one shift per head, e.g. [2, 3] for heads 1 and 2")
    for name, value, dims in (("hiddens", hiddens, 3), ("weights", weights, 2)):
        if isinstance(value, Tensor) and value.dim() == dims and len(shifts) != value.shape[0]:
            raise ValueError(
                f"{name} is one {tuple(value.shape)} tensor: pass a list of per-head tensors, or a stacked "
                f"({'K, B, T, H' if dims == 3 else 'K, V, H'}) tensor"
            )
    hiddens, weights = list(hiddens), list(weights)
    if not (len(hiddens) == len(weights) == len(shifts)) or not hiddens:
        raise ValueError(
            f"got {len(hiddens)} hiddens, {len(weights)} weights and {len(shifts)} shifts: "
            "pass one of each per head (K >= 1)"
        )
    try:
        shifts = [operator.index(s) for s in shifts]  # ints, numpy ints or 0-d tensors; 1.5 is no shift
    except TypeError:
        raise TypeError(f"shifts={list(shifts)!r}: pass integers, one per head") from None
    for h, w, s in zip(hiddens, weights, shifts):
        _check_inputs(h, w, labels, s, "mean", ignore_index, label_values=False)
    check_label_values(labels, min(w.shape[0] for w in weights), ignore_index)  # once, not once per head
    losses = [
        _linear_cross_entropy(h, w, labels, s, ignore_index, "mean", impl, chunk_rows, wgrad)
        for h, w, s in zip(hiddens, weights, shifts)
    ]
    return torch.stack(losses)


@torch.no_grad()
def topk_correct(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    shift: int,
    ks: Sequence[int] = (1, 5),
    ignore_index: int = -100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[Tensor, int]:
    """Top-k hits of `hidden @ weight.T` against shifted labels, a chunk of rows at a time.

    Returns (LongTensor (len(ks),) of hits on the hidden's device, number of scored positions).
    """
    _check_inputs(hidden, weight, labels, shift, "none", ignore_index)
    if not ks or min(ks) < 1 or max(ks) > weight.shape[0]:
        raise ValueError(f"ks={tuple(ks)}: each k must be in 1..V={weight.shape[0]}")
    dtype = compute_dtype(hidden, weight)
    h = hidden.reshape(-1, hidden.shape[-1])
    w = weight.to(dtype)
    targets = shifted_targets(labels, shift, ignore_index)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    hits = torch.zeros(len(ks), dtype=torch.long, device=hidden.device)
    for start in range(0, rows.numel(), chunk_rows):
        idx = rows[start : start + chunk_rows]
        top = (h[idx].to(dtype) @ w.T).topk(max(ks), dim=-1).indices  # (C, max k), best first
        match = top == targets[idx, None]
        for j, k in enumerate(ks):
            hits[j] += match[:, :k].any(dim=1).sum()
    return hits, rows.numel()
