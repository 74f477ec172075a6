"""Fused LM head + greedy argmax for Medusa decoding: the logits are never written.

Why: a greedy decode step computes logits = F.linear(hidden, lm_head, bias) for M rows (batch x tree nodes,
1..4096) over V = 49152 tokens with H = 576 (bf16), then logits.argmax(-1). On an H100, cuBLAS read the 56 MB
LM head several times for M=64 (~32 us) and the argmax ran as a separate single-program reduction (8-10 us).
Here each (rows x vocab-tile) block of logits lives only in registers, and only each row's maximum and its
index leave the kernel:

  stage 1, grid (cdiv(M, BLOCK_M) * cdiv(V, BLOCK_V),), row tiles fastest (programs that run together share
      one weight tile in L2): acc (BLOCK_M, BLOCK_V) fp32 = x_tile @ w_tile^T over H in BLOCK_K chunks (the
      tail masked), + bias, rounded to x.dtype and back to fp32; each row's tile maximum and the lowest index
      attaining it go to an (M, n_vtiles) scratch (fp32, int32);
  stage 2, grid (M,): each row's n_vtiles candidates reduce to the maximum and the lowest index among the
      candidates equal to it. With a single vocab tile stage 1 writes the answer and stage 2 does not run.

Semantics (`linear_argmax_reference` is the exact rule): logits accumulated in fp32 (fp32 inputs through an
IEEE-precision dot, not TF32; fp16/bf16 through their native dot), plus the bias in fp32, then rounded to
x.dtype, as F.linear's output is, so that logits tying after that rounding tie here too; the result is the
LOWEST index of each row's maximum (torch.argmax documents first occurrence too, but ties in F.linear's
output depend on cuBLAS's summation order, so the two may differ where logits are within rounding of each
other). An overflowing fp16/bf16 logit rounds to +-inf like F.linear's, and +inf ties go to the lowest index.
NaN is unsupported: the kernel reads a NaN logit as -inf (torch.argmax returns the first NaN), which keeps
the index in range; a row of NaN gives 0.

Dispatch: `linear_argmax` runs the custom op `fastmedusa::linear_argmax` (opaque to torch.compile, no host
sync, output and scratch from torch.empty: safe under CUDA graph capture) when `fused_argmax_supported`, else
F.linear(...).argmax(-1). FASTMEDUSA_FUSED_ARGMAX (read at import): "auto" (the default: CUDA only), "off"
(always F.linear + argmax) or "on" (any device: the CPU needs TRITON_INTERPRET=1, for tests). Its GPU tests
pass on an H100 (bf16/fp16/fp32 against float64, CUDA-graph capture), where it took 20 µs off a 0.96 ms greedy
step and nothing measurable off a Medusa verify step (bench/results/step_cost_fused_argmax_h100); the decode
engine's GPU tests pass with it on (same folder, gpu_tests_decode_fused_argmax.txt).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmedusa.ops.dtypes import KERNEL_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: fused_argmax_supported is False and F.linear + argmax serve every call
    triton = tl = None

FUSED_ARGMAX_MODES = ("auto", "on", "off")
DEFAULT_MODE = "auto"
FUSED_ARGMAX = os.environ.get("FASTMEDUSA_FUSED_ARGMAX", DEFAULT_MODE)
if FUSED_ARGMAX not in FUSED_ARGMAX_MODES:
    raise ValueError(f"FASTMEDUSA_FUSED_ARGMAX={FUSED_ARGMAX!r}: use one of {FUSED_ARGMAX_MODES}")
FUSED_DTYPES = KERNEL_DTYPES  # fp32 accumulation; float64 would lose precision
NO_INDEX = 2**31 - 1  # sentinel index of padded lanes: loses every tie; V must stay below it
STAGE2_BLOCK = 1024  # at most this many candidates per stage-2 step (V=49152 at BLOCK_V=128: 384)
# (BLOCK_V, BLOCK_K) under the interpreter: few, large programs run faster (numpy per program op)
INTERPRET_BLOCK_VK = (1024, 128)
_NO_INDEX = NO_INDEX if tl is None else tl.constexpr(NO_INDEX)  # jit code reads constexpr globals only


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _linear_argmax_tile_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    val_ptr,
    idx_ptr,
    out_ptr,
    M,
    V,
    H,
    stride_xm,
    stride_wv,
    n_mtiles,
    n_vtiles,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    ROUND: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Stage 1: one (BLOCK_M rows x BLOCK_V vocab) tile of logits; per row its maximum and the lowest index
    attaining it, to column pid_v of the (M, n_vtiles) scratch, or (FINAL: one tile) int64 to out_ptr."""
    pid = tl.program_id(0)
    pid_m = pid % n_mtiles
    pid_v = pid // n_mtiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    v_ok = offs_v < V
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_k[:, None]  # (BLOCK_K, BLOCK_V): w^T
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND:  # the rounding F.linear's fp16/bf16 output gets
        acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.where((acc == acc) & v_ok[None, :], acc, float("-inf"))  # NaN (unsupported) and padding: -inf
    best = tl.max(acc, axis=1)
    hit = (acc == best[:, None]) & v_ok[None, :]
    pick = tl.min(tl.where(hit, offs_v[None, :], _NO_INDEX), axis=1)  # lowest index holding the max
    if FINAL:
        tl.store(out_ptr + offs_m, pick.to(tl.int64), mask=m_ok)
    else:
        cell = offs_m.to(tl.int64) * n_vtiles + pid_v
        tl.store(val_ptr + cell, best, mask=m_ok)
        tl.store(idx_ptr + cell, pick, mask=m_ok)


@_jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Stage 2: row program_id(0)'s n (value, index) candidates -> the lowest index among those holding the
    maximum, int64 to out_ptr."""
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], _NO_INDEX, tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + lanes
        ok = offs < n
        v = tl.load(val_ptr + row * n + offs, mask=ok, other=float("-inf"))
        i = tl.load(idx_ptr + row * n + offs, mask=ok, other=_NO_INDEX)
        take = (v > best_v) | ((v == best_v) & (i < best_i))
        best_v = tl.where(take, v, best_v)
        best_i = tl.where(take, i, best_i)
    top = tl.max(best_v, axis=0)
    pick = tl.min(tl.where(best_v == top, best_i, _NO_INDEX), axis=0)
    tl.store(out_ptr + row, pick.to(tl.int64))


def _default_block(m: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) for m rows: BLOCK_M grows with m (16, 32, then
    64); on CUDA over 128-wide vocab tiles, under the interpreter over few, large ones."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if device.type != "cuda":
        return block_m, *INTERPRET_BLOCK_VK, 4, 1
    return block_m, 128, 64, 4, 3


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: expected 2-D (V, H)")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} against weight {tuple(weight.shape)}: x's last dim must be H = "
            f"{weight.shape[1]}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight has no rows (V = 0): argmax over an empty vocabulary")
    if weight.shape[0] >= NO_INDEX:
        raise ValueError(f"V = {weight.shape[0]}: the kernel's int32 indices need V < 2**31 - 1")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias of shape {tuple(bias.shape)}: expected (V,) = ({weight.shape[0]},)")


def _check_block(block: tuple[int, int, int, int, int]) -> None:
    if len(block) != 5:
        raise ValueError(f"block={block}: expected (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages)")
    block_m, block_v, block_k, warps, stages = block
    for name, size in (("BLOCK_M", block_m), ("BLOCK_V", block_v), ("BLOCK_K", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}: a power of two >= 16 (tl.dot's smallest tile)")
    if warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(f"num_warps={warps}, num_stages={stages}: a power of two and at least 1")


def linear_argmax_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    block: tuple[int, int, int, int, int] | None = None,
) -> Tensor:
    """The fused kernels on any device (the CPU needs TRITON_INTERPRET=1): int64 (...,) = the lowest index
    of each row's maximum logit, x (..., H), weight (V, H), bias (V,) or None, all one fp32/fp16/bf16 dtype.
    `block`: (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages), default by row count and device."""
    _check_shapes(x, weight, bias)
    if x.dtype not in FUSED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        raise ValueError(f"dtypes (x, weight, bias) = {dtypes}: one of {FUSED_DTYPES} for all")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"x on {x.device}, weight on {weight.device}: all on one device")
    vocab, hidden = weight.shape
    lead = x.shape[:-1]
    rows = x.reshape(lead.numel(), hidden)  # a view where the strides allow, else a copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()  # a full copy of the LM head: pass it row-major
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, dtype=torch.long, device=x.device)
    if m == 0:
        return out.view(lead)
    block = block or _default_block(m, x.device)
    _check_block(block)
    block_m, block_v, block_k, warps, stages = block
    n_mtiles = triton.cdiv(m, block_m)
    n_vtiles = triton.cdiv(vocab, block_v)
    final = n_vtiles == 1
    if final:
        vals = idx = out  # unused
    else:
        vals = torch.empty((m, n_vtiles), dtype=torch.float32, device=x.device)
        idx = torch.empty((m, n_vtiles), dtype=torch.int32, device=x.device)
    _linear_argmax_tile_kernel[(n_mtiles * n_vtiles,)](
        rows,
        weight,
        weight if bias is None else bias,
        vals,
        idx,
        out,
        m,
        vocab,
        hidden,
        rows.stride(0),
        weight.stride(0),
        n_mtiles,
        n_vtiles,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        ROUND=x.dtype != torch.float32,
        FINAL=final,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    if not final:
        merge = min(STAGE2_BLOCK, max(16, triton.next_power_of_2(n_vtiles)))
        _argmax_merge_kernel[(m,)](
            vals, idx, out, n_vtiles, BLOCK=merge, num_warps=max(1, min(4, merge // 128))
        )
    return out.view(lead)


@torch.library.custom_op("fastmedusa::linear_argmax", mutates_args=())
def linear_argmax_op(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Opaque to torch.compile: the fused LM head + argmax (fresh output, no host sync)."""
    return linear_argmax_triton(x, weight, bias)


@linear_argmax_op.register_fake
def _(x, weight, bias=None):
    _check_shapes(x, weight, bias)
    return x.new_empty(x.shape[:-1], dtype=torch.long)


def fused_argmax_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear_argmax` takes the fused path: Triton imports, FASTMEDUSA_FUSED_ARGMAX is not "off",
    x and weight share one fp32/fp16/bf16 dtype, on CUDA (any device when "on")."""
    if triton is None or FUSED_ARGMAX == "off":
        return False
    if x.dtype not in FUSED_DTYPES or weight.dtype != x.dtype:
        return False
    return x.is_cuda or FUSED_ARGMAX == "on"


def linear_argmax(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """int64 (...,) argmax over V of F.linear(x, weight, bias): the fused op where `fused_argmax_supported`
    (logits never written; ties to the lowest index), else F.linear(...).argmax(-1)."""
    if fused_argmax_supported(x, weight):
        return linear_argmax_op(x, weight, bias)
    return F.linear(x, weight, bias).argmax(-1)


def linear_argmax_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-PyTorch reference: float64 logits rounded to x.dtype (the rounding F.linear's output gets), NaN
    read as -inf, then per row the FIRST index holding the maximum: the smallest column among those equal
    to the row's max (all -inf: column 0)."""
    logits = x.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    vals = logits.to(x.dtype).double()
    vals = torch.where(vals.isnan(), float("-inf"), vals)
    top = vals.amax(-1, keepdim=True)
    cols = torch.arange(vals.shape[-1], device=vals.device).expand_as(vals)
    return torch.where(vals == top, cols, vals.shape[-1]).amin(-1)
