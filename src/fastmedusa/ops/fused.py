"""Fused linear cross-entropy: logits a chunk of rows at a time, gradients computed during the forward.

Why gradients in the forward: the loss is the last op, so d(loss)/d(logits) is known up to the scalar
`grad_output` that the backward will bring. Computing dH = dlogits @ W and dW = dlogits^T @ h while the
chunk's logits are at hand makes three GEMM-sized passes (logits, dH, dW: 6*N*H*V FLOPs per head, the
bound) instead of four (a backward would recompute the logits). The backward only scales the stored
gradients. `reduction="none"` cannot do this (one grad_output per row weighs each row of dW differently),
so it saves the log-sum-exp and recomputes the logits in its backward (8*N*H*V FLOPs).

Memory math (N rows, hidden H, vocab V, 2-byte compute dtype; Llama-3 V=128256 H=4096, B6 T4096 N=24576):
  all logits          N*V*2   = 6.3 GB      never made
  one chunk of logits C*V*2   = 394 MB      the only large temporary, overwritten in place by dlogits;
                                            wgrad="inplace" (the default): C = 2*N*H/V rows (1536 here),
                                            twice the hidden's bytes at most, or 512 rows
                                            (see `resolve_chunk_rows`)
  dW, "inplace"       0                     summed chunk by chunk into the gradient itself (V*H*2, not
                                            extra): each chunk's GEMM sums its rows in fp32 (cuBLAS, and
                                            the CPU's bf16 GEMM), only the N/C ~ V/(2H) = 16 per-chunk adds
                                            round to bf16
  dW, "accumulate"    V*H*4   = 2.1 GB      an fp32 buffer, the exact option (fp32 sums of the chunks;
                                            chunks up to LOGITS_BUDGET_BYTES, 1 GiB); the default for fp16,
                                            whose unscaled sums could overflow
  dH                  N*H*2                 the hidden's gradient itself (not extra)
Against Liger-Kernel (bf16 dW sums too): its chunk is next_pow2(N / ceil(V/H)) >= N*H/V rows, i.e. at least
the hidden's bytes, and a shifted head's hidden is a slice it must copy (N*H*2 more), so its extra memory is
at least 2*N*H*2 bytes, the most our chunk may take, except where that would be fewer than 512 rows (a small
N*H): there the chunk holds 512 rows, whose dW GEMM is no longer memory-bound, and the extra memory (512*V*2
bytes, 131 MB for Llama-3) can exceed Liger-Kernel's. Its bf16 sums round once per chunk as ours do, over as
many or more chunks (`tests/ops/test_wgrad_precision.py` measures both against float64).
Rows whose target is ignored are skipped (no GEMM work): SFT masks often ignore a third of the tokens.

The per-chunk "softmax step" is pluggable: `softmax_grad_ref` (pure PyTorch, fp32 temporaries) for
impl="chunked", the fused Triton kernel (`triton_softmax.py`) for impl="triton".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastmedusa.ops.dtypes import acc_dtype

DEFAULT_CHUNK_ROWS = 1024  # for callers that need a fixed chunk (topk_correct)
LOGITS_BUDGET_BYTES = 1 << 30  # chunk_rows=0 (auto): the fewest balanced chunks whose logits fit this
HIDDEN_MULTIPLE = 2  # wgrad="inplace": a chunk's logits hold at most this many times the hidden's elements
MIN_LEAN_CHUNK_ROWS = 512  # ...or this many rows, whichever is more: below it the dW GEMM is memory-bound
WGRAD_MODES = ("auto", "inplace", "accumulate", "recompute")


def resolve_chunk_rows(
    chunk_rows: int, rows: int, vocab: int, hidden_elems: int | None = None, granule: int = 128
) -> int:
    """chunk_rows, or for 0 the fewest balanced chunks (multiples of 128 rows) within LOGITS_BUDGET_BYTES
    and, given `hidden_elems` (N*H, the hidden's size), within HIDDEN_MULTIPLE * N*H logits elements or
    MIN_LEAN_CHUNK_ROWS rows, whichever is more.

    Large chunks matter on the GPU: each dW accumulation GEMM reads and writes the V x H sums (4.2 GB a
    chunk in fp32 for Llama-3, 2.1 GB in bf16), so the fp32 one ran at 406 TFLOP/s at 1024 rows and at 744
    at 4096 (H100). The hidden-size bound keeps the extra memory at or under Liger-Kernel's (module
    docstring) and fixes the number of chunks near V / (2H) whatever N. The row floor: a chunk's dW GEMM does
    2*C FLOPs per 4 bytes of bf16 sums it reads and writes, so below ~470 rows (an H100's 700 TFLOP/s over
    3 TB/s) it is memory-bound. Measured on an H100 at the Llama-3.2-1B shape (5 heads, B 6, T 1024, the
    hidden bound alone gave 128-row chunks, 48 per head): 242 ms at 128 rows, 96 ms at 512 (Liger-Kernel,
    whose chunks are 128 rows too: 237 ms; torch 127 ms). The floor costs 512 rows of logits (131 MB at
    V = 128k) where the hidden is small: more than Liger-Kernel's extra memory there (0.14 against 0.06 GB).
    """
    if chunk_rows > 0:
        return chunk_rows
    cap = LOGITS_BUDGET_BYTES // (2 * vocab)
    if hidden_elems is not None:
        cap = min(cap, max(MIN_LEAN_CHUNK_ROWS, HIDDEN_MULTIPLE * hidden_elems // vocab))
    if cap < granule:  # few rows: smaller chunks (multiples of 16) rather than more memory
        granule = 16
    cap = max(granule, cap // granule * granule)
    chunks = max(1, math.ceil(rows / cap))
    return max(granule, math.ceil(math.ceil(rows / chunks) / granule) * granule)


# step(logits (C, W), targets (C,), lse (C,) | None, grad_scale) -> (loss (C,) | None, lse (C,)).
# lse None: the rows are whole (W = V); computes lse and the loss. lse given: the columns may be a vocab
# block, targets are then relative to its first column (outside [0, W): no one-hot there), and no loss.
# grad_scale None: loss only. Otherwise logits are overwritten in place with (softmax - onehot) * grad_scale
# (a float, or a (C,) per-row tensor).
SoftmaxStep = Callable[[Tensor, Tensor, Tensor | None, Tensor | float | None], tuple[Tensor | None, Tensor]]


def softmax_grad_ref(
    logits: Tensor, targets: Tensor, lse: Tensor | None, grad_scale: Tensor | float | None
) -> tuple[Tensor | None, Tensor]:
    """Pure-PyTorch softmax step (reference of the Triton kernel): loss, lse, and dlogits in place."""
    z = logits.to(acc_dtype(logits.dtype))
    loss = None
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
        loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    if grad_scale is not None:
        grad = torch.exp(z - lse[:, None])
        hit = (targets >= 0) & (targets < z.shape[1])
        grad[hit.nonzero().squeeze(1), targets[hit]] -= 1.0
        if isinstance(grad_scale, Tensor):
            grad.mul_(grad_scale[:, None])
        elif grad_scale != 1.0:
            grad.mul_(grad_scale)
        logits.copy_(grad)
    return loss, lse


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc (fp32 or fp64) += a @ b, accumulating in acc's dtype without an fp32 copy of a or b on CUDA."""
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda:
        if first:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
        else:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    elif first:
        torch.mm(a.to(acc.dtype), b.to(acc.dtype), out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """h @ weight.T; fp32 for fp16 inputs: logits past fp16's 65504 (large hidden norms, e.g. a model's
    outlier dimensions) would be inf and the loss NaN. bf16 has fp32's range and keeps the bf16 GEMM."""
    if h.dtype != torch.float16:
        return h @ weight.T
    if h.is_cuda:  # fp16 GEMM with fp32 output: no fp32 copy of the weight
        return torch.ops.aten.mm.dtype(h, weight.T, torch.float32)
    return h.float() @ weight.float().T


def resolve_wgrad(wgrad: str, dtype: torch.dtype | None = None) -> str:
    """How dW is formed. "inplace" (the default): three GEMM passes, dW summed chunk by chunk in the
    weight's dtype, no V x H buffer, chunks sized to the hidden (module docstring). "accumulate": fp32 sums
    in a V x H buffer (the exact option, and the default for fp16, whose sums could overflow).
    "recompute": four passes (H100, B6 T4096 V128256: ~150 vs ~110 ms a head), each block of dW written
    once from a GEMM over all rows, no buffer and no per-chunk rounding."""
    if wgrad not in WGRAD_MODES:
        raise ValueError(f"wgrad={wgrad!r} is not one of {WGRAD_MODES}")
    if wgrad == "auto":
        return "accumulate" if dtype == torch.float16 else "inplace"
    return wgrad


def chunk_loop(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    rows: Tensor | None,
    lse: Tensor | None,
    grad_scale: Tensor | float | None,
    *,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    step: SoftmaxStep,
    chunk_rows: int,
    wgrad: str = "inplace",
    out_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss, lse and gradients over chunks of the rows `rows` (None = all rows, contiguous slices).

    hidden (N, H) and weight (V, H) in the compute dtype, targets (N,) int64 valid on `rows`,
    lse (N,) or None, grad_scale: dlogits multiplier (a float, an (N,) tensor, or None = loss only).
    wgrad "inplace": dW summed chunk by chunk into the gradient itself, in the weight's dtype (three GEMM
    passes); "accumulate": into an fp32 (V, H) buffer (three passes); "recompute": a second pass over vocab blocks recomputes the logits and writes each block of dW
    from one GEMM over all rows (four passes, no fp32 buffer, the GEMMs' own fp32 accumulation).
    Gradients are multiplied by out_scale. Returns per-row loss (N,), lse (N,), grad_hidden (N, H) or
    empty, grad_weight (V, H) or empty.
    """
    n = hidden.shape[0]
    count = n if rows is None else rows.numel()
    lean = wgrad != "accumulate" or not need_weight_grad  # no V x H buffer: keep the chunk as lean too
    chunk_rows = resolve_chunk_rows(chunk_rows, count, weight.shape[0], hidden.numel() if lean else None)
    fdt = acc_dtype(hidden.dtype)
    loss_rows = hidden.new_zeros(n, dtype=fdt)
    lse_rows = hidden.new_zeros(n, dtype=fdt)
    grad_h = hidden.new_empty(0)
    if need_hidden_grad:
        grad_h = torch.empty_like(hidden) if count == n else torch.zeros_like(hidden)
    accumulate = need_weight_grad and wgrad in ("accumulate", "inplace")
    acc = None
    if accumulate and wgrad == "accumulate":
        acc = weight.new_zeros(weight.shape, dtype=fdt)
    elif accumulate:  # the first chunk's GEMM writes it (zeros only when there is no chunk)
        acc = torch.empty_like(weight) if count else torch.zeros_like(weight)
    rows_pass = lse is None or need_hidden_grad or accumulate
    if not rows_pass:
        lse_rows = lse
    for i, start in enumerate(range(0, count if rows_pass else 0, chunk_rows)):
        end = min(start + chunk_rows, count)
        idx = slice(start, end) if rows is None else rows[start:end]
        h = hidden[idx]  # (C, H): a view on contiguous rows, a gather otherwise
        logits = chunk_logits(h, weight)  # (C, V)
        gs = grad_scale[idx] if isinstance(grad_scale, Tensor) else grad_scale
        if not (need_hidden_grad or accumulate):
            gs = None
        loss_c, lse_c = step(logits, targets[idx], None if lse is None else lse[idx], gs)
        if loss_c is not None:
            loss_rows[idx] = loss_c
        lse_rows[idx] = lse_c
        logits = logits.to(weight.dtype)  # fp16: dlogits are O(1) (grad_scale 1), fp16 holds them
        if need_hidden_grad:
            if rows is None:
                torch.mm(logits, weight, out=grad_h[idx])
            else:
                grad_h.index_copy_(0, idx, logits @ weight)
        if accumulate:
            _addmm_acc(acc, logits.T, h, first=i == 0)
        del logits  # free this chunk's buffer before the next is allocated
    if out_scale != 1.0:
        grad_h.mul_(out_scale)
        if acc is not None:
            acc.mul_(out_scale)
    grad_w = weight.new_empty(0)
    if acc is not None:
        grad_w = acc.to(weight.dtype)  # "inplace": acc is the gradient already, no copy
    elif need_weight_grad:
        h_rows = hidden if rows is None else hidden[rows]
        t_rows = targets if rows is None else targets[rows]
        lse_v = lse_rows if rows is None else lse_rows[rows]
        if isinstance(grad_scale, Tensor):
            gs_rows = (grad_scale if rows is None else grad_scale[rows]) * out_scale
        else:
            gs_rows = grad_scale * out_scale
        grad_w = _weight_grad_by_vocab_blocks(h_rows, weight, t_rows, lse_v, gs_rows, step, chunk_rows)
    return loss_rows, lse_rows, grad_h, grad_w


def _weight_grad_by_vocab_blocks(
    hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, grad_scale: Tensor | float, step, chunk_rows
) -> Tensor:
    """dW one vocab block at a time: logits (M, Vb) for every scored row, dlogits in place, then
    dW[block] = dlogits^T @ hidden, a GEMM with K = M (all rows) written once in the weight's dtype.

    The block width keeps the logits buffer at chunk_rows * V elements, the size of a row chunk.
    """
    m, vocab = hidden.shape[0], weight.shape[0]
    grad_w = torch.empty_like(weight)
    if m == 0:
        return grad_w.zero_()
    block = min(vocab, max(256, chunk_rows * vocab // m // 256 * 256))
    for v0 in range(0, vocab, block):
        logits = chunk_logits(hidden, weight[v0 : v0 + block])  # (M, Vb)
        step(logits, targets - v0, lse, grad_scale)
        logits = logits.to(weight.dtype)
        torch.mm(logits.T, hidden, out=grad_w[v0 : v0 + block])
        del logits
    return grad_w


def _valid_rows(targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor | None, int]:
    """Boolean mask of scored rows, their indices (None when every row is scored) and their count."""
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    count = rows.numel()
    return valid, (None if count == len(targets) else rows), count


def _step_for(impl: str) -> SoftmaxStep:
    if impl == "triton":
        from fastmedusa.ops.triton_softmax import softmax_grad_triton

        return softmax_grad_triton
    return softmax_grad_ref


def fused_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    reduction: str,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    impl: str,
    chunk_rows: int,
    wgrad: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss ("mean" or "sum"), and when asked its gradients for grad_output = 1, each to be multiplied by
    the returned 0-dim `grad_scale` (1/count for "mean").

    The 1/count factor is left to the backward, which multiplies by grad_output anyway: one pass over
    dW fewer, and dlogits stay O(1) (with 1/count folded in, fp16 dlogits would underflow). fp16 gradients
    are scaled here instead, since unscaled sums over many rows could overflow fp16.
    """
    valid, rows, count = _valid_rows(targets, ignore_index)
    need_grad = need_hidden_grad or need_weight_grad
    denom = max(count, 1) if reduction == "mean" else 1
    loss_rows, _, grad_h, grad_w = chunk_loop(
        hidden,
        weight,
        targets.clamp(0, weight.shape[0] - 1),  # ignored rows (any ignore_index) are never read
        rows,
        None,
        1.0 if need_grad else None,
        need_hidden_grad=need_hidden_grad,
        need_weight_grad=need_weight_grad,
        step=_step_for(impl),
        chunk_rows=chunk_rows,
        wgrad=resolve_wgrad(wgrad, hidden.dtype),
        out_scale=1.0 / denom if hidden.dtype == torch.float16 else 1.0,
    )
    fdt = acc_dtype(hidden.dtype)
    loss = (loss_rows * valid).sum() / denom
    grad_scale = hidden.new_full((), 1.0 if hidden.dtype == torch.float16 else 1.0 / denom, dtype=fdt)
    return loss, grad_h, grad_w, grad_scale


@torch.library.custom_op("fastmedusa::linear_ce", mutates_args=())
def linear_ce_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    reduction: str,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    impl: str,
    chunk_rows: int,
    wgrad: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Opaque to torch.compile (a custom op), differentiable through `_linear_ce_backward`."""
    return fused_forward(
        hidden,
        weight,
        targets,
        ignore_index,
        reduction,
        need_hidden_grad,
        need_weight_grad,
        impl,
        chunk_rows,
        wgrad,
    )


@linear_ce_op.register_fake
def _(
    hidden,
    weight,
    targets,
    ignore_index,
    reduction,
    need_hidden_grad,
    need_weight_grad,
    impl,
    chunk_rows,
    wgrad,
):
    loss = hidden.new_empty((), dtype=acc_dtype(hidden.dtype))
    grad_h = hidden.new_empty(hidden.shape) if need_hidden_grad else hidden.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    return loss, grad_h, grad_w, hidden.new_empty((), dtype=acc_dtype(hidden.dtype))


SECOND_BACKWARD = (
    "a second backward through a fused fastmedusa loss (impl 'chunked' or 'triton'): its gradients are formed in "
    "the forward and scaled in place by the one backward, so retain_graph=True cannot reuse them; compute the "
    "loss again for each backward, or use impl='torch'"
)


def saved_gradients(ctx) -> tuple[Tensor, ...]:
    """The gradients a fused forward saved; after the one backward scaled them in place, a second backward
    gets `SECOND_BACKWARD`, not autograd's version-counter message."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "inplace operation" not in str(err):
            raise
        raise RuntimeError(SECOND_BACKWARD) from None


def _linear_ce_setup(ctx, inputs, output) -> None:
    # the gradient outputs never receive a gradient: without this, autograd would fill a zero tensor for each
    # of them before the backward runs, one more V x H (and N x H) buffer at the peak
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2], output[3])
    ctx.need = (inputs[5], inputs[6])


def _linear_ce_backward(ctx, grad_loss, _grad_h, _grad_w, _grad_scale):
    """Scales the gradients made in the forward. In place outside torch.compile: a copy would be one
    more V x H buffer per head at the peak. The saved tensors are released before AccumulateGrad runs, so
    it adopts them without a copy. A second backward through the graph then fails autograd's version check
    (retain_graph=True is not supported here: use impl="torch")."""
    grad_h, grad_w, grad_scale = saved_gradients(ctx)
    if grad_loss is None:  # the loss took no part in what was differentiated
        return None, None, None, None, None, None, None, None, None, None
    g = grad_loss * grad_scale  # fp32 scalar
    scale = torch.mul if torch.compiler.is_compiling() else torch.Tensor.mul_
    gh = scale(grad_h, g.to(grad_h.dtype)) if ctx.need[0] else None
    gw = scale(grad_w, g.to(grad_w.dtype)) if ctx.need[1] else None
    return gh, gw, None, None, None, None, None, None, None, None


linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


@torch.library.custom_op("fastmedusa::linear_ce_rows", mutates_args=())
def linear_ce_rows_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, impl: str, chunk_rows: int, wgrad: str
) -> tuple[Tensor, Tensor]:
    """Per-row losses (0 where ignored) and log-sum-exp: reduction="none"."""
    valid, rows, _ = _valid_rows(targets, ignore_index)
    loss_rows, lse, _, _ = chunk_loop(
        hidden,
        weight,
        targets.clamp(0, weight.shape[0] - 1),
        rows,
        None,
        None,
        need_hidden_grad=False,
        need_weight_grad=False,
        step=_step_for(impl),
        chunk_rows=chunk_rows,
    )
    return loss_rows, lse


@linear_ce_rows_op.register_fake
def _(hidden, weight, targets, ignore_index, impl, chunk_rows, wgrad):
    n = hidden.shape[0]
    fdt = acc_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=fdt), hidden.new_empty(n, dtype=fdt)


@torch.library.custom_op("fastmedusa::linear_ce_rows_backward", mutates_args=())
def linear_ce_rows_backward_op(
    grad_rows: Tensor,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    ignore_index: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    impl: str,
    chunk_rows: int,
    wgrad: str,
) -> tuple[Tensor, Tensor]:
    """Recomputes each chunk's logits with the saved lse; dlogits rows weighted by grad_rows."""
    valid, rows, _ = _valid_rows(targets, ignore_index)
    _, _, grad_h, grad_w = chunk_loop(
        hidden,
        weight,
        targets.clamp(0, weight.shape[0] - 1),
        rows,
        lse,
        grad_rows.to(acc_dtype(hidden.dtype)) * valid,
        need_hidden_grad=need_hidden_grad,
        need_weight_grad=need_weight_grad,
        step=_step_for(impl),
        chunk_rows=chunk_rows,
        wgrad=resolve_wgrad(wgrad, hidden.dtype),
    )
    return grad_h, grad_w


@linear_ce_rows_backward_op.register_fake
def _(
    grad_rows,
    hidden,
    weight,
    targets,
    lse,
    ignore_index,
    need_hidden_grad,
    need_weight_grad,
    impl,
    chunk_rows,
    wgrad,
):
    grad_h = hidden.new_empty(hidden.shape) if need_hidden_grad else hidden.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    return grad_h, grad_w


def _rows_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # the log-sum-exp output gets no gradient: no zero tensor for it
    hidden, weight, targets, ignore_index, impl, chunk_rows, wgrad = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.args = (ignore_index, impl, chunk_rows, wgrad)


def _rows_backward(ctx, grad_rows, _grad_lse):
    if grad_rows is None:  # only the log-sum-exp was used: it carries no gradient
        return None, None, None, None, None, None, None
    hidden, weight, targets, lse = ctx.saved_tensors
    ignore_index, impl, chunk_rows, wgrad = ctx.args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h, grad_w = linear_ce_rows_backward_op(
        grad_rows, hidden, weight, targets, lse, ignore_index, need_h, need_w, impl, chunk_rows, wgrad
    )
    return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None, None, None


linear_ce_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)
