"""KL self-distillation of K Medusa heads toward a teacher projection (the base LM head), without N x V logits.

Head k with shift s at position t is trained toward the teacher's distribution for the same token:
    KL(softmax(teacher_hidden[t+s-1] @ teacher_weight.T) || softmax(hiddens[k][t] @ weights[k].T)),
averaged over the positions whose label labels[t+s] is not ignored. Which positions count depends only on
labels[t'+1] for teacher row t' = t+s-1, the same test for every head, so the op walks chunks of scored
*teacher* rows: each chunk of teacher logits is computed once and serves all K heads (head k reads it at
student rows t' - (s-1) of the same sequence). GEMM passes: 1 (teacher logits) + 3 per head (student logits,
dH, dW) = 1 + 3K, against 4K for K calls of a single-head distillation loss.

Gradients are formed in the forward, as in `fused.py`: d KL / d student logits = softmax(student) - p_teacher
is known there up to the scalar the backward brings. The teacher gets no gradient (it is detached).

Memory math (Llama-3-8B: V=128256, H=4096, bf16, B6 T4096 N=24576, chunk C=1536 rows):
  teacher + student chunk logits   2*C*V*2      = 0.79 GB   the only large temporaries (KL_LOGITS_BUDGET_BYTES)
  dW, wgrad="accumulate"           V*H*4 a head = 2.1 GB    fp32 sums; the default only where all of them fit
                                                            WGRAD_BUDGET_BYTES (SmolLM2: 0.11 GB a head)
  dW, wgrad="inplace"              0                        summed chunk by chunk into the gradient itself in
                                                            the weight's dtype: each chunk's GEMM accumulates
                                                            in fp32, one rounding per chunk (N/C = 16 here)
  dH                               N*H*2 a head             the hidden's gradient itself (not extra)
Rows whose label is ignored are skipped (no GEMM work).

The per-chunk steps are pluggable like the cross-entropy's: `teacher_lse_ref`/`kl_step_ref` (pure PyTorch,
fp32 temporaries) for impl="chunked", the Triton kernels of `triton_kl.py` for impl="triton". impl="torch"
(`medusa_kl_divergence_ref`) materialises all logits and shares no code with the fused path.

fp16 inputs: the logits buffers are fp32 (fp16 logits overflow past 65504), dlogits go back to fp16.

The teacher's vocabulary is the students' (V rows each). Heads over a draft vocabulary pass the teacher's
rows of those tokens (`MedusaHeads.kl_divergence`): the teacher renormalised over the draft tokens.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmedusa.ops.cross_entropy import (
    check_chunk_rows,
    check_tensor,
    compute_dtype,
    kernel_impl,
    shifted_targets,
    triton_available,
)
from fastmedusa.ops.dtypes import acc_dtype
from fastmedusa.ops.fused import _addmm_acc, saved_gradients

KL_IMPLS = ("auto", "triton", "torch", "chunked")
KL_WGRAD_MODES = ("auto", "accumulate", "inplace")
KL_LOGITS_BUDGET_BYTES = 3 << 28  # 768 MiB for the teacher and the student chunk together (2-byte logits)
WGRAD_BUDGET_BYTES = 1 << 30  # wgrad="auto" keeps fp32 dW sums while all heads' fit in this


# -- per-chunk steps ---------------------------------------------------------------------------------------
# teacher_lse(teacher (C, V)) -> (C,) fp32.
# kl_step(student (Ck, V), teacher (C, V), teacher_rows (Ck,) | None, teacher_lse (C,), grad_scale)
#   -> (KL per student row (Ck,), student lse (Ck,)); student row i pairs with teacher row teacher_rows[i]
#   (i when None). grad_scale None: loss only; else student is overwritten with (q - p) * grad_scale.
TeacherStep = Callable[[Tensor], Tensor]
KLStep = Callable[[Tensor, Tensor, Tensor | None, Tensor, float | None], tuple[Tensor, Tensor]]


def teacher_lse_ref(teacher: Tensor) -> Tensor:
    """Pure-PyTorch teacher step (reference of `triton_kl.teacher_lse_triton`)."""
    return torch.logsumexp(teacher.to(acc_dtype(teacher.dtype)), dim=-1)


def kl_step_ref(
    student: Tensor,
    teacher: Tensor,
    teacher_rows: Tensor | None,
    teacher_lse: Tensor,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch KL step (reference of `triton_kl.kl_step_triton`): loss, student lse, dlogits in place."""
    fdt = acc_dtype(student.dtype)
    zs = student.to(fdt)
    zt = (teacher if teacher_rows is None else teacher[teacher_rows]).to(fdt)
    lse_t = teacher_lse if teacher_rows is None else teacher_lse[teacher_rows]
    p = torch.exp(zt - lse_t[:, None])
    lse_s = torch.logsumexp(zs, dim=-1)
    # sum_v p (log p - log q) = sum_v p (zt - zs) - lse_t + lse_s, since sum_v p = 1
    loss = (p * (zt - zs)).sum(-1) - lse_t + lse_s
    if grad_scale is not None:
        grad = torch.exp(zs - lse_s[:, None]).sub_(p)
        if grad_scale != 1.0:
            grad.mul_(grad_scale)
        student.copy_(grad)
    return loss, lse_s


def _steps_for(impl: str) -> tuple[TeacherStep, KLStep]:
    if impl == "triton":
        from fastmedusa.ops.triton_kl import kl_step_triton, teacher_lse_triton

        return teacher_lse_triton, kl_step_triton
    return teacher_lse_ref, kl_step_ref


# -- weight-gradient sums ----------------------------------------------------------------------------------
class WeightGradSum:
    """dW = sum over chunks of dlogits^T @ hidden for one (V, H) weight, in one of two layouts.

    "accumulate": an fp32 buffer (no rounding until the end; V*H*4 bytes of extra memory), cast at the end.
    "inplace": the sums go straight into the returned gradient in the weight's dtype; each chunk's GEMM
    accumulates its C rows in fp32 and rounds once (no extra memory). With an fp32 (or fp64) weight the two
    are the same thing. Kept behind this small interface so that a leaner accumulation can replace it.
    """

    def __init__(self, weight: Tensor, mode: str) -> None:
        fdt = acc_dtype(weight.dtype)
        self.out_dtype = weight.dtype
        self.inplace = mode == "inplace" or weight.dtype == fdt
        self.acc = torch.zeros_like(weight, dtype=weight.dtype if self.inplace else fdt)
        self.empty = True

    def add(self, dlogits: Tensor, hidden: Tensor, alpha: float = 1.0) -> None:
        """acc += alpha * dlogits^T @ hidden; dlogits (C, V), hidden (C, H), both in the compute dtype."""
        if self.inplace:
            beta = 0.0 if self.empty else 1.0
            torch.addmm(self.acc, dlogits.T, hidden, beta=beta, alpha=alpha, out=self.acc)
        else:
            if alpha != 1.0:
                raise ValueError("the fp32 accumulator applies its scale in result()")
            _addmm_acc(self.acc, dlogits.T, hidden, first=self.empty)
        self.empty = False

    def result(self, scale: float = 1.0) -> Tensor:
        """The gradient in the weight's dtype, times `scale` (fp32 accumulator only)."""
        if not self.inplace:
            if scale != 1.0:
                self.acc.mul_(scale)
            return self.acc.to(self.out_dtype)
        return self.acc


def resolve_kl_wgrad(wgrad: str, weights: Sequence[Tensor], need_weight_grad: Sequence[bool]) -> str:
    """ "auto": fp32 sums ("accumulate") when the fp32 buffers of all heads that need a weight gradient fit
    WGRAD_BUDGET_BYTES, else "inplace" (Llama-3: 2.1 GB a head would not)."""
    if wgrad not in KL_WGRAD_MODES:
        raise ValueError(f"wgrad={wgrad!r} is not one of {KL_WGRAD_MODES}")
    if wgrad != "auto":
        return wgrad
    buffers = sum(w.numel() * 4 for w, need in zip(weights, need_weight_grad) if need)
    return "accumulate" if buffers <= WGRAD_BUDGET_BYTES else "inplace"


# -- the chunk loop ----------------------------------------------------------------------------------------
def kl_chunk_rows(chunk_rows: int, rows: int, vocab: int) -> int:
    """chunk_rows, or for 0 the fewest balanced chunks (multiples of 128 rows) whose teacher and student
    logits (2 buffers x 2 bytes x V a row) fit KL_LOGITS_BUDGET_BYTES; Llama-3's V: 1536 rows."""
    if chunk_rows > 0:
        return chunk_rows
    cap = max(128, KL_LOGITS_BUDGET_BYTES // (4 * vocab) // 128 * 128)
    chunks = max(1, math.ceil(rows / cap))
    return max(128, math.ceil(math.ceil(rows / chunks) / 128) * 128)


HeadRows = tuple[Tensor, Tensor | None]  # student rows (Ck,), their teacher rows' positions in the chunk


def _chunk_plan(
    labels: Tensor,
    shifts: Sequence[int],
    ignore_index: int,
    chunk_rows: int,
    vocab: int,
    device: torch.device,
) -> tuple[list[tuple[Tensor, list[HeadRows | None]]], list[int]]:
    """Which rows each chunk and head touch, worked out on the host up front: no device sync in the loop.

    Returns the chunks, each (teacher rows (C,), per head None (no scored row here) or (student rows (Ck,),
    positions of their teacher rows in the chunk (Ck,), None when all C)), and the scored rows per head.
    """
    seq_len = labels.shape[-1]
    # teacher row t' is scored when labels[t'+1] is (the last row of each sequence never is)
    scored = shifted_targets(labels.cpu(), 1, ignore_index) != ignore_index
    rows = scored.nonzero().squeeze(1)
    pos = rows % seq_len  # t' within its sequence: head with shift s uses student row t' - (s-1) >= 0
    counts = [int((pos >= s - 1).sum()) for s in shifts]
    size = kl_chunk_rows(chunk_rows, rows.numel(), vocab)
    pieces: list[Tensor] = []  # every index tensor, moved to the device in one copy

    def add(t: Tensor) -> int:
        pieces.append(t)
        return len(pieces) - 1

    layout = []
    for start in range(0, rows.numel(), size):
        idx, p = rows[start : start + size], pos[start : start + size]
        heads: list[tuple[int, int | None] | None] = []
        for s in shifts:
            keep = (p >= s - 1).nonzero().squeeze(1)
            if keep.numel() == 0:
                heads.append(None)
            elif keep.numel() == idx.numel():
                heads.append((add(idx - (s - 1)), None))
            else:
                heads.append((add(idx[keep] - (s - 1)), add(keep)))
        layout.append((add(idx), heads))
    if not pieces:
        return [], counts
    flat = torch.cat(pieces)
    if device.type == "cuda":
        flat = flat.pin_memory()
    views = torch.split(flat.to(device, non_blocking=True), [t.numel() for t in pieces])
    plan = [
        (
            views[i],
            [None if h is None else (views[h[0]], None if h[1] is None else views[h[1]]) for h in heads],
        )
        for i, heads in layout
    ]
    return plan, counts


def _logits(h: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out = h @ weight.T in out's dtype: the compute dtype, or fp32 for fp16 inputs (a fp16 GEMM with fp32
    output on CUDA, no fp32 copy of the weight)."""
    if out.dtype == h.dtype:
        return torch.mm(h, weight.T, out=out)
    if h.is_cuda:
        return torch.ops.aten.mm.dtype_out(h, weight.T, out.dtype, out=out)
    return torch.mm(h.to(out.dtype), weight.T.to(out.dtype), out=out)


@torch.library.custom_op("fastmedusa::medusa_kl", mutates_args=())
def medusa_kl_op(
    hiddens: list[Tensor],
    weights: list[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    shifts: list[int],
    ignore_index: int,
    need_hidden_grad: list[bool],
    need_weight_grad: list[bool],
    impl: str,
    chunk_rows: int,
    wgrad: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """A custom op (opaque to torch.compile, differentiable through `_medusa_kl_backward`).

    Mean KL per head (K,), gradients for grad_output = 1 (hiddens (N, H), weights (V, H); empty where not
    needed), and per-head scales (K,) the backward multiplies them by (1/count, or 1 for fp16, whose
    gradients are scaled here so that O(1) dlogits do not underflow).
    """
    k_heads = len(hiddens)
    vocab = teacher_weight.shape[0]
    fdt = acc_dtype(teacher_hidden.dtype)
    plan, counts = _chunk_plan(labels, shifts, ignore_index, chunk_rows, vocab, teacher_hidden.device)
    fp16 = teacher_hidden.dtype == torch.float16
    out_scale = [1.0 / max(c, 1) if fp16 else 1.0 for c in counts]
    teacher_step, kl_step = _steps_for(impl)
    mode = resolve_kl_wgrad(wgrad, weights, need_weight_grad)
    grad_hs = [torch.zeros_like(h) if need else h.new_empty(0) for h, need in zip(hiddens, need_hidden_grad)]
    sums = [WeightGradSum(w, mode) if need else None for w, need in zip(weights, need_weight_grad)]
    loss_sums = teacher_hidden.new_zeros(k_heads, dtype=fdt)
    size = max((idx.numel() for idx, _ in plan), default=0)
    logits_dtype = torch.float32 if fp16 else teacher_hidden.dtype  # fp16 logits overflow past 65504
    teacher_buf = teacher_hidden.new_empty(size, vocab, dtype=logits_dtype)
    student_buf = teacher_hidden.new_empty(size, vocab, dtype=logits_dtype)
    for idx, per_head in plan:
        c = idx.numel()
        teacher = _logits(teacher_hidden[idx], teacher_weight, teacher_buf[:c])  # (C, V), once for all heads
        teacher_lse = teacher_step(teacher)
        for k, rows in enumerate(per_head):
            if rows is None:
                continue
            student_rows, teacher_rows = rows
            h = hiddens[k][student_rows]  # (Ck, H)
            student = _logits(h, weights[k], student_buf[: student_rows.numel()])  # (Ck, V)
            wants = need_hidden_grad[k] or need_weight_grad[k]
            loss_rows, _ = kl_step(student, teacher, teacher_rows, teacher_lse, 1.0 if wants else None)
            loss_sums[k] += loss_rows.sum()
            student = student.to(h.dtype)  # fp16: dlogits are O(1) (scale 1), fp16 holds them
            if need_hidden_grad[k]:
                grad_hs[k].index_copy_(0, student_rows, student @ weights[k])
            if need_weight_grad[k]:
                inplace = sums[k].inplace
                sums[k].add(student, h, alpha=out_scale[k] if inplace else 1.0)
    for k in range(k_heads):
        if out_scale[k] != 1.0 and need_hidden_grad[k]:
            grad_hs[k].mul_(out_scale[k])
    grad_ws = [
        weights[k].new_empty(0) if s is None else s.result(1.0 if s.inplace else out_scale[k])
        for k, s in enumerate(sums)
    ]
    denom = torch.tensor([max(c, 1) for c in counts], dtype=fdt).to(teacher_hidden.device, non_blocking=True)
    losses = loss_sums / denom
    grad_scales = torch.ones_like(losses) if fp16 else 1.0 / denom
    return losses, grad_hs, grad_ws, grad_scales


@medusa_kl_op.register_fake
def _(hiddens, weights, teacher_hidden, teacher_weight, labels, shifts, ignore_index, need_h, need_w, *_):
    fdt = acc_dtype(teacher_hidden.dtype)
    k = len(hiddens)
    grad_hs = [h.new_empty(h.shape) if need else h.new_empty(0) for h, need in zip(hiddens, need_h)]
    grad_ws = [w.new_empty(w.shape) if need else w.new_empty(0) for w, need in zip(weights, need_w)]
    return teacher_hidden.new_empty(k, dtype=fdt), grad_hs, grad_ws, teacher_hidden.new_empty(k, dtype=fdt)


def _medusa_kl_setup(ctx, inputs, output) -> None:
    # the gradient outputs never receive a gradient: without this, autograd would fill a zero tensor for each
    # of them before the backward runs, a second copy of every head's V x H and N x H gradient at the peak
    # (4.2 GB for 4 heads at the Llama-3-8B shape)
    ctx.set_materialize_grads(False)
    _, grad_hs, grad_ws, grad_scales = output
    ctx.save_for_backward(grad_scales, *grad_hs, *grad_ws)
    ctx.need = (inputs[7], inputs[8])


def _medusa_kl_backward(ctx, grad_losses, _grad_hs, _grad_ws, _grad_scales):
    """Scales the gradients made in the forward, in place outside torch.compile (see `fused._linear_ce_backward`:
    a copy would be one more V x H buffer per head; a second backward is not supported, use impl="torch")."""
    grad_scales, *saved = saved_gradients(ctx)
    need_h, need_w = ctx.need
    k = len(need_h)
    if grad_losses is None:  # the losses took no part in what was differentiated
        return [None] * k, [None] * k, None, None, None, None, None, None, None, None, None, None
    g = grad_losses * grad_scales  # (K,) fp32
    scale = torch.mul if torch.compiler.is_compiling() else torch.Tensor.mul_
    gh = [scale(saved[i], g[i].to(saved[i].dtype)) if need_h[i] else None for i in range(k)]
    gw = [scale(saved[k + i], g[i].to(saved[k + i].dtype)) if need_w[i] else None for i in range(k)]
    return gh, gw, None, None, None, None, None, None, None, None, None, None


medusa_kl_op.register_autograd(_medusa_kl_backward, setup_context=_medusa_kl_setup)


# -- the functional API ------------------------------------------------------------------------------------
def resolve_kl_impl(impl: str, device: torch.device) -> str:
    """ "auto" -> "triton" on CUDA (when triton is installed), "chunked" elsewhere."""
    if impl not in KL_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {KL_IMPLS} for the KL divergence: pick one of those")
    if impl == "auto":
        return "triton" if triton_available(device) else "chunked"
    return impl


def _check_kl_inputs(hiddens, weights, teacher_hidden, teacher_weight, labels, shifts) -> None:
    if not (len(hiddens) == len(weights) == len(shifts)) or not hiddens:
        raise ValueError(
            f"got {len(hiddens)} hiddens, {len(weights)} weights and {len(shifts)} shifts: "
            "pass one of each per head (K >= 1)"
        )
    for name, value in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("labels", labels), *((f"hiddens[{i}]", h) for i, h in enumerate(hiddens)),
                        *((f"weights[{i}]", w) for i, w in enumerate(weights))):  # fmt: skip
        check_tensor(value, name)
    if teacher_hidden.dim() not in (2, 3):
        raise ValueError(
            f"teacher_hidden has shape {tuple(teacher_hidden.shape)}: expected (B, T, H) or (N, H)"
        )
    for i, (h, w) in enumerate(zip(hiddens, weights)):
        if tuple(h.shape) != tuple(teacher_hidden.shape):
            raise ValueError(
                f"hiddens[{i}] has shape {tuple(h.shape)} but teacher_hidden {tuple(teacher_hidden.shape)}: "
                "each head's hidden states must be position-aligned with the teacher's"
            )
        if w.dim() != 2 or tuple(w.shape) != tuple(teacher_weight.shape):
            raise ValueError(
                f"weights[{i}] has shape {tuple(w.shape)} but teacher_weight {tuple(teacher_weight.shape)}: "
                "expected (V, H) over the teacher's vocabulary, the nn.Linear(H, V) layout"
            )
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"teacher_weight has shape {tuple(teacher_weight.shape)} but teacher_hidden has "
            f"H={teacher_hidden.shape[-1]}: expected (V, H)"
        )
    if tuple(labels.shape) != tuple(teacher_hidden.shape[:-1]):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the hidden states {tuple(teacher_hidden.shape)}: "
            "labels must be token-aligned with the positions, (B, T) or (N,)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels have dtype {labels.dtype}: pass integer token ids (torch.long)")
    for s in shifts:
        if int(s) < 1:
            raise ValueError(
                f"shift={s}: head k at position t learns the teacher's row t+shift-1, so shift >= 1"
            )


def medusa_kl_divergence(
    hiddens: Sequence[Tensor] | Tensor,
    weights: Sequence[Tensor] | Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    shifts: Sequence[int],
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_rows: int | None = None,
    wgrad: str = "auto",
) -> Tensor:
    """Mean KL(teacher || head) of K heads in one call: a (K,) fp32 tensor (fp64 for fp64 inputs).

    hiddens: K tensors (B, T, H) (or one stacked (K, B, T, H)); weights: K tensors (V, H) (or stacked
    (K, V, H)); teacher_hidden (B, T, H) and teacher_weight (V, H), detached here (no gradient reaches them);
    labels (B, T) or (N,) token-aligned, ignore_index = not scored. Head k with shift s at position t is
    scored when labels[..., t+s] is not ignored (and t+s lies in the same row), against the teacher at
    t+s-1. A head with no scored position gives 0 and zero gradients.

    Dtypes as `medusa_cross_entropy`: GEMMs in the autocast dtype (or the weights' dtype), softmax and KL
    in fp32. Tuning: chunk_rows bounds the logits buffers (None: automatic within KL_LOGITS_BUDGET_BYTES);
    wgrad: "accumulate" (fp32 dW sums), "inplace" (sums in the weight's dtype, no extra memory), "auto".
    The fused impls form the gradients in the forward: one backward per call (no retain_graph=True).
    """
    if isinstance(shifts, int) or not isinstance(shifts, Sequence | Tensor):
        raise TypeError(f"shifts={shifts!r}: pass one shift per head, e.g. [2, 3] for heads 1 and 2")
    try:
        shifts = [operator.index(s) for s in shifts]  # ints, numpy ints or 0-d tensors; 1.5 is no shift
    except TypeError:
        raise TypeError(f"shifts={list(shifts)!r}: pass integers, one per head") from None
    hiddens, weights = list(hiddens), list(weights)
    _check_kl_inputs(hiddens, weights, teacher_hidden, teacher_weight, labels, shifts)
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index={ignore_index!r}: pass an integer") from None
    impl = resolve_kl_impl(impl, teacher_hidden.device)
    chunk_rows = check_chunk_rows(chunk_rows)
    if wgrad not in KL_WGRAD_MODES:
        raise ValueError(f"wgrad={wgrad!r} is not one of {KL_WGRAD_MODES}")
    dtype = compute_dtype(hiddens[0], weights[0])
    impl = kernel_impl(impl, dtype)
    width = teacher_hidden.shape[-1]
    cast: dict[int, Tensor] = {}  # one cast per distinct weight: a shared projection is not copied K times
    ws = [cast.setdefault(id(w), w.to(dtype)) for w in weights]
    hs = [h.reshape(-1, width).to(dtype) for h in hiddens]
    th = teacher_hidden.detach().reshape(-1, width).to(dtype)
    tw = teacher_weight.detach().to(dtype)
    if impl == "torch":
        return medusa_kl_divergence_ref(
            hs, ws, th, tw, labels.reshape(-1, labels.shape[-1]), shifts, ignore_index
        )
    grad_on = torch.is_grad_enabled()
    need_h = [grad_on and h.requires_grad for h in hs]
    need_w = [grad_on and w.requires_grad for w in ws]
    losses, _, _, _ = medusa_kl_op(
        hs, ws, th, tw, labels, shifts, ignore_index, need_h, need_w, impl, chunk_rows, wgrad
    )
    return losses


def medusa_kl_divergence_ref(
    hiddens: list[Tensor],
    weights: list[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    shifts: list[int],
    ignore_index: int,
) -> Tensor:
    """impl="torch": every logit materialised in fp32 (rows (B*T, H), labels (B, T)), autograd for the rest.

    fp16 inputs: the GEMMs themselves run in fp32, since fp16 logits overflow past 65504."""
    batch, seq = labels.shape
    fdt = acc_dtype(teacher_hidden.dtype)
    if teacher_hidden.dtype == torch.float16:
        hiddens, weights = [h.float() for h in hiddens], [w.float() for w in weights]
        teacher_hidden, teacher_weight = teacher_hidden.float(), teacher_weight.float()
    with torch.no_grad():
        teacher_logp = F.log_softmax(F.linear(teacher_hidden, teacher_weight).to(fdt), dim=-1)
    teacher_logp = teacher_logp.reshape(batch, seq, teacher_weight.shape[0])  # explicit V: an empty batch too
    losses = []
    for h, w, s in zip(hiddens, weights, shifts):
        student_logp = F.log_softmax(F.linear(h, w).to(fdt), dim=-1).reshape(batch, seq, w.shape[0])
        target = teacher_logp[:, s - 1 : seq - 1]  # (B, T-s, V): the teacher at t+s-1 for t < T-s
        kl = (target.exp() * (target - student_logp[:, : max(seq - s, 0)])).sum(-1)
        mask = labels[:, s:] != ignore_index
        losses.append((kl * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(losses)
