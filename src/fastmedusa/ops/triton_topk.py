"""Fused top-k indices for Medusa decoding: two Triton kernels where torch.topk launches about ten.

Why: a decode step drafts each head's top-k tokens from (K heads, rows, V) logits. On an H100, torch.topk
of (K, 1, V=49152) bf16 logits with k~10 ran as ~10 kernels (radix-select passes, a bitonic sort, scans),
~28 us plus the gaps between launches, inside a CUDA-graph-captured step. Here it is two kernels, one where
a row fits one chunk:

  stage 1, grid (R rows, S splits): each program loads a CHUNK-element slice of its row (a power of two) in
      fp32 and takes its top-k by k rounds of (max; the lowest index attaining it; remove that lane), writing
      k (value, index) candidates to an (R, S*k) scratch;
  stage 2, grid (R,): the same k rounds over the row's S*k candidates, writing the k indices best first.

Order: descending value, ties broken by the lowest index (torch.topk leaves the order of ties unspecified;
`topk_indices_reference` is the exact rule). Removed and out-of-range lanes carry the sentinel index
2**31 - 1, and every round takes the lowest index among the lanes holding the maximum, so a real -inf at any
index is still chosen before a removed or padded lane. The top-k under this total order of a row lies in the
union of its chunks' top-k, so the merge is exact. NaN inputs are unsupported: the kernels read NaN as -inf
(torch.topk ranks NaN first), which keeps every returned index in range and distinct.

Dispatch: `topk_indices` runs the custom op `fastmedusa::topk_indices` (opaque to torch.compile, no host sync,
outputs and scratch from torch.empty: safe under CUDA graph capture) when `fused_topk_supported`, else
torch.topk. FASTMEDUSA_FUSED_TOPK (read at import): "auto" (default: CUDA only), "on" (any device: the CPU
needs TRITON_INTERPRET=1, for tests) or "off" (always torch.topk).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastmedusa.ops.dtypes import KERNEL_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: fused_topk_supported is False and torch.topk serves every call
    triton = tl = None

MAX_FUSED_TOPK = 32  # k above this: torch.topk (k rounds per program grow linearly)
FUSED_TOPK_MODES = ("auto", "on", "off")
FUSED_TOPK = os.environ.get("FASTMEDUSA_FUSED_TOPK", "auto")
if FUSED_TOPK not in FUSED_TOPK_MODES:
    raise ValueError(f"FASTMEDUSA_FUSED_TOPK={FUSED_TOPK!r}: use one of {FUSED_TOPK_MODES}")
FUSED_DTYPES = KERNEL_DTYPES  # read exactly in fp32 (not float64)
NO_INDEX = 2**31 - 1  # sentinel index of removed and out-of-range lanes: loses every tie
CUDA_CHUNK = 2048  # stage-1 slice on the GPU: V=49152 gives 24 splits
INTERPRET_CHUNK = 4096  # under the interpreter fewer, larger programs run faster
_NO_INDEX = NO_INDEX if tl is None else tl.constexpr(NO_INDEX)  # jit code reads constexpr globals only


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _topk_kernel(
    vals_ptr,
    idx_ptr,
    stride_in,
    n,
    out_vals_ptr,
    out_idx_ptr,
    stride_out,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Top-K of one BLOCK slice of a row: values from vals_ptr, indices from idx_ptr (HAS_IDX, stage 2) or
    the lane's column (stage 1). FINAL: K int64 indices to out_idx_ptr; else K (value, int32 index) pairs at
    column split*K of the scratch rows."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs = split * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(vals_ptr + row * stride_in + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))  # NaN (unsupported) reads as -inf
    if HAS_IDX:
        idx = tl.load(idx_ptr + row * stride_in + offs, mask=valid, other=_NO_INDEX)
    else:
        idx = tl.where(valid, offs, _NO_INDEX)
    lanes = tl.arange(0, K_PAD)
    top_idx = tl.full([K_PAD], _NO_INDEX, tl.int32)
    top_val = tl.full([K_PAD], float("-inf"), tl.float32)
    for j in range(K):
        best = tl.max(x, axis=0)
        pick = tl.min(tl.where(x == best, idx, _NO_INDEX), axis=0)  # lowest index holding the max
        top_idx = tl.where(lanes == j, pick, top_idx)
        top_val = tl.where(lanes == j, best, top_val)
        taken = idx == pick  # a no-op when pick is NO_INDEX (no real lane left)
        x = tl.where(taken, float("-inf"), x)
        idx = tl.where(taken, _NO_INDEX, idx)
    keep = lanes < K
    if FINAL:
        tl.store(out_idx_ptr + row * stride_out + lanes, top_idx.to(tl.int64), mask=keep)
    else:
        base = row * stride_out + split * K + lanes
        tl.store(out_vals_ptr + base, top_val, mask=keep)
        tl.store(out_idx_ptr + base, top_idx, mask=keep)


def _block(n: int) -> int:
    """Power-of-two lanes covering n elements (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _default_chunk(device: torch.device) -> int:
    return CUDA_CHUNK if device.type == "cuda" else INTERPRET_CHUNK


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 512))


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k={k!r}: pass an integer number of top values")
    if not 0 <= k <= vocab:
        raise ValueError(f"top-{k} of {vocab} values: k must be in [0, {vocab}]")


def topk_indices_triton(logits: Tensor, k: int, chunk: int | None = None) -> Tensor:
    """The Triton top-k on any device (the CPU needs TRITON_INTERPRET=1): int64 (..., k), best first, ties
    to the lowest index. `chunk`: stage-1 slice (a power of two; default by device)."""
    vocab = logits.shape[-1]
    _check_k(k, vocab)
    if vocab >= NO_INDEX:
        raise ValueError(f"{vocab} values per row: the kernel's int32 indices need fewer than 2**31 - 1")
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], k), dtype=torch.long, device=logits.device)
    if out.numel() == 0:
        return out.view(*lead, k)
    chunk = chunk or _default_chunk(logits.device)
    if chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk}: a power of two")
    splits = triton.cdiv(vocab, chunk)
    k_pad = _block(k)
    if splits == 1:
        _launch(rows, None, vocab, None, out, k, k_pad, _block(vocab), final=True)
        return out.view(*lead, k)
    cand = splits * k
    vals = torch.empty((rows.shape[0], cand), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows.shape[0], cand), dtype=torch.int32, device=logits.device)
    _launch(rows, None, vocab, vals, idx, k, k_pad, chunk, final=False, splits=splits)
    _launch(vals, idx, cand, None, out, k, k_pad, _block(cand), final=True)
    return out.view(*lead, k)


def _launch(
    vals: Tensor,
    idx: Tensor | None,
    n: int,
    out_vals: Tensor | None,
    out_idx: Tensor,
    k: int,
    k_pad: int,
    block: int,
    *,
    final: bool,
    splits: int = 1,
) -> None:
    """One `_topk_kernel` launch over (rows, splits); idx None: indices are the columns."""
    _topk_kernel[(vals.shape[0], splits)](
        vals,
        vals if idx is None else idx,
        vals.stride(0),
        n,
        out_idx if out_vals is None else out_vals,
        out_idx,
        out_idx.stride(0),
        K=k,
        K_PAD=k_pad,
        BLOCK=block,
        HAS_IDX=idx is not None,
        FINAL=final,
        num_warps=_num_warps(block),
    )


@torch.library.custom_op("fastmedusa::topk_indices", mutates_args=())
def topk_indices_op(logits: Tensor, k: int) -> Tensor:
    """Opaque to torch.compile: the Triton top-k (fresh output, no host sync)."""
    return topk_indices_triton(logits, k)


@topk_indices_op.register_fake
def _(logits, k):
    _check_k(k, logits.shape[-1])
    return logits.new_empty((*logits.shape[:-1], k), dtype=torch.long)


def fused_topk_supported(logits: Tensor, k: int) -> bool:
    """Whether `topk_indices` takes the Triton path: Triton imports, FASTMEDUSA_FUSED_TOPK is not "off",
    1 <= k <= min(MAX_FUSED_TOPK, V), fp32/fp16/bf16 logits, on CUDA (any device when "on")."""
    if triton is None or FUSED_TOPK == "off" or logits.dtype not in FUSED_DTYPES:
        return False
    if not 1 <= k <= min(MAX_FUSED_TOPK, logits.shape[-1]):
        return False
    return logits.is_cuda or FUSED_TOPK == "on"


def topk_indices(logits: Tensor, k: int) -> Tensor:
    """Indices (..., k) int64 of the k largest logits (..., V), best first: the fused op where
    `fused_topk_supported` (ties to the lowest index), else torch.topk (ties in its own order)."""
    _check_k(k, logits.shape[-1])
    if fused_topk_supported(logits, k):
        return topk_indices_op(logits, k)
    return logits.topk(k, dim=-1).indices


def topk_indices_reference(logits: Tensor, k: int) -> Tensor:
    """Pure-PyTorch reference: a stable descending sort of the float64 values (ties keep the lowest index
    first), cut to k. NaN inputs are outside the contract."""
    return torch.sort(logits.double(), dim=-1, descending=True, stable=True).indices[..., :k]
