"""Triton steps of the fused linear KL divergence: the teacher's log-sum-exp per row, then per student row the
KL term, the student's log-sum-exp and dlogits = (softmax(student) - softmax(teacher)) * scale in place.

The GEMMs around them are cuBLAS (`kl_divergence.medusa_kl_op`). Per head and chunk the step reads the
student logits twice and the teacher logits twice (an online max/sum pass that also forms sum p*(zt - zs),
then the gradient pass) and writes the student buffer once, all math in fp32. The teacher row of each
student row comes from an index map, so the teacher chunk is computed once and shared by every head.
Pure-PyTorch references: `kl_divergence.teacher_lse_ref` and `kl_divergence.kl_step_ref`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastmedusa.ops.dtypes import acc_dtype


@triton.jit
def _lse_kernel(x_ptr, stride_row, lse_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = tl.full((), -1.0e30, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + row, (m + tl.log2(s)) * 0.6931471805599453)


@triton.jit
def _kl_kernel(
    student_ptr,
    stride_student,
    teacher_ptr,
    stride_teacher,
    teacher_rows_ptr,
    teacher_lse_ptr,
    loss_ptr,
    lse_ptr,
    V,
    scale,
    HAS_ROWS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        trow = tl.load(teacher_rows_ptr + row).to(tl.int64)
    else:
        trow = row
    s_base = student_ptr + row * stride_student
    t_base = teacher_ptr + trow * stride_teacher
    lse_t = tl.load(teacher_lse_ptr + trow).to(tl.float32)
    lse_t2 = lse_t * 1.4426950408889634
    # pass 1: online log-sum-exp of the student (base 2) and sum_v p_v * (zt_v - zs_v)
    m = tl.full((), -1.0e30, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    dot = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        zs = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.where(mask, tl.exp2(zt * 1.4426950408889634 - lse_t2), 0.0)
        dot += tl.sum(p * (zt - zs), axis=0)
        x = tl.where(mask, zs * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
        m = m_new
    lse_s = (m + tl.log2(s)) * 0.6931471805599453
    tl.store(loss_ptr + row, dot - lse_t + lse_s)
    tl.store(lse_ptr + row, lse_s)
    if WRITE_GRAD:
        lse_s2 = lse_s * 1.4426950408889634
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            zs = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32)
            zt = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.exp2(zs * 1.4426950408889634 - lse_s2)
            p = tl.exp2(zt * 1.4426950408889634 - lse_t2)
            tl.store(s_base + offs, ((q - p) * scale).to(student_ptr.dtype.element_ty), mask=mask)


def _block(logits: Tensor) -> tuple[int, int]:
    block = min(8192 if logits.is_cuda else 1024, triton.next_power_of_2(logits.shape[1]))
    return block, 16 if block >= 8192 else 4


def _check_rows(logits: Tensor, name: str) -> None:
    if logits.stride(1) != 1:
        raise ValueError(f"{name} logits strides {logits.stride()}: the kernel needs contiguous rows")


def teacher_lse_triton(teacher: Tensor) -> Tensor:
    """Same contract as `kl_divergence.teacher_lse_ref`: the fp32 log-sum-exp of each row of teacher logits."""
    _check_rows(teacher, "teacher")
    rows, vocab = teacher.shape
    lse = teacher.new_empty(rows, dtype=acc_dtype(teacher.dtype))
    if rows:
        block, warps = _block(teacher)
        _lse_kernel[(rows,)](teacher, teacher.stride(0), lse, vocab, BLOCK=block, num_warps=warps)
    return lse


def kl_step_triton(
    student: Tensor,
    teacher: Tensor,
    teacher_rows: Tensor | None,
    teacher_lse: Tensor,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `kl_divergence.kl_step_ref`: (KL per student row, student lse); dlogits in place."""
    _check_rows(student, "student")
    _check_rows(teacher, "teacher")
    rows, vocab = student.shape
    fdt = acc_dtype(student.dtype)
    loss = student.new_empty(rows, dtype=fdt)
    lse = student.new_empty(rows, dtype=fdt)
    if rows:
        block, warps = _block(student)
        _kl_kernel[(rows,)](
            student,
            student.stride(0),
            teacher,
            teacher.stride(0),
            teacher_rows if teacher_rows is not None else teacher_lse,
            teacher_lse,
            loss,
            lse,
            vocab,
            1.0 if grad_scale is None else float(grad_scale),
            HAS_ROWS=teacher_rows is not None,
            WRITE_GRAD=grad_scale is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return loss, lse
