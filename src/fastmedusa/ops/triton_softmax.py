"""Triton softmax step of the fused linear cross-entropy: per row, the log-sum-exp, the loss, and
dlogits = (softmax - onehot) * scale written in place over the chunk's logits.

The GEMMs around it (logits, dH, dW) are cuBLAS (`fused.chunk_loop`); this kernel is the only
non-GEMM work per chunk: it reads the logits twice (an online max/sum pass, then the gradient
pass, which mostly hits L2: ~132 programs x 256 KB rows in flight) and writes them once, all math
in fp32. Its pure-PyTorch reference is `fused.softmax_grad_ref`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastmedusa.ops.dtypes import acc_dtype

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_grad_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    lse_in_ptr,
    scale_ptr,
    loss_ptr,
    lse_ptr,
    V,
    scale_value,
    HAS_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)  # relative to this block's first column when HAS_LSE
    if HAS_LSE:
        lse = tl.load(lse_in_ptr + row).to(tl.float32)
    else:
        # online log-sum-exp in base 2, one running max and sum per row
        m = tl.full((), -1.0e30, tl.float32)
        s = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * 1.4426950408889634
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
            m = m_new
        lse = (m + tl.log2(s)) * 0.6931471805599453
        z_target = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_target)
        tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        else:
            scale = scale_value
        lse2 = lse * 1.4426950408889634
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2(x * 1.4426950408889634 - lse2)
            p = tl.where(offs == target, p - 1.0, p) * scale
            tl.store(base + offs, p.to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_grad_triton(
    logits: Tensor, targets: Tensor, lse: Tensor | None, grad_scale: Tensor | float | None
) -> tuple[Tensor | None, Tensor]:
    """Same contract as `fused.softmax_grad_ref`: (loss (C,), lse (C,)); dlogits in place when asked."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits strides {logits.stride()}: the kernel needs contiguous rows")
    fdt = acc_dtype(logits.dtype)
    loss = logits.new_empty(rows if lse is None else 0, dtype=fdt)
    lse_out = logits.new_empty(rows, dtype=fdt) if lse is None else lse
    if rows == 0 or (lse is not None and grad_scale is None):
        return (loss if lse is None else None), lse_out
    per_row = isinstance(grad_scale, Tensor)
    block = min(8192 if logits.is_cuda else 1024, triton.next_power_of_2(vocab))
    _softmax_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        lse_out,
        grad_scale if per_row else lse_out,
        loss,
        lse_out,
        vocab,
        float(grad_scale) if grad_scale is not None and not per_row else 1.0,
        HAS_LSE=lse is not None,
        WRITE_GRAD=grad_scale is not None,
        SCALE_PER_ROW=per_row,
        BLOCK=block,
        num_warps=16 if block >= 8192 else 4,
    )
    return (loss if lse is None else None), lse_out
