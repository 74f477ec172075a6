"""Move accepted tree nodes' K/V into place in every layer's cache with one kernel launch.

After a verify pass the K/V of the accepted path's nodes sit at their tree slots; the next step expects them
right after the prefix. That is a copy of a few slots per row in each of the 2 x layers cache buffers. Done
with indexing, it is one kernel per buffer or pair (30 or 60 launches per step for a 30-layer model, each
~1.5 us plus its launch gap on an H100, a step of ~1.5 ms). Here one launch moves them all: the buffers'
addresses sit in a device table built once (the caches are static and never reallocated), and each program
copies one buffer's rows of one (batch row, KV head).

The pure-PyTorch reference beside it is `move_kv_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmedusa.ops.dtypes import KERNEL_DTYPES

_TL_DTYPES = dict(zip(KERNEL_DTYPES, (tl.float32, tl.float16, tl.bfloat16)))


@triton.jit
def _move_kv_kernel(
    table_ptr,
    src_ptr,
    dst_ptr,
    KV_HEADS,
    D,
    HEAD_DIM,
    stride_b,
    stride_h,
    stride_s,
    stride_src,
    stride_dst,
    DTYPE: tl.constexpr,
    D_PAD: tl.constexpr,
    HD_PAD: tl.constexpr,
):
    buffer = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // KV_HEADS
    h = bh % KV_HEADS
    base = tl.load(table_ptr + buffer).to(tl.pointer_type(DTYPE)) + b.to(tl.int64) * stride_b + h * stride_h
    i = tl.arange(0, D_PAD)
    d = tl.arange(0, HD_PAD)
    ok = (i < D)[:, None] & (d < HEAD_DIM)[None, :]
    src = tl.load(src_ptr + b * stride_src + i, mask=i < D, other=0)
    dst = tl.load(dst_ptr + b * stride_dst + i, mask=i < D, other=0)
    rows = tl.load(base + src[:, None] * stride_s + d[None, :], mask=ok)  # every row read before any write
    tl.store(base + dst[:, None] * stride_s + d[None, :], rows, mask=ok)


def check_caches(caches: list[Tensor]) -> None:
    """One kernel serves every buffer with the first one's strides and dtype: they must all agree."""
    first = caches[0]
    for c in caches:
        if c.shape != first.shape or c.stride() != first.stride() or c.dtype != first.dtype:
            raise ValueError("the KV cache buffers must share shape, strides and dtype to be moved together")
        if c.device != first.device or c.stride(-1) != 1:
            raise ValueError("the KV cache buffers must sit on one device with a unit last stride")
    if first.dtype not in KERNEL_DTYPES:
        raise ValueError(f"move_kv supports {list(KERNEL_DTYPES)} caches, not {first.dtype}")


_tables: dict[tuple[int, ...], Tensor] = {}


def cache_table(caches: list[Tensor]) -> Tensor:
    """The address table of these buffers, looked up by their current addresses (so never stale), built at
    first use. Building copies from the host, which CUDA-graph capture forbids: the first call for a set of
    buffers must run outside capture (decoding runs real steps before it captures). Tables are a few hundred
    bytes each and are kept."""
    key = tuple(c.data_ptr() for c in caches)
    entry = _tables.get(key)
    if entry is None:
        if caches[0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "move_kv: the first call for these cache buffers runs under CUDA-graph capture, which cannot "
                "copy their address table to the GPU: run one call outside capture first"
            )
        entry = _tables[key] = torch.tensor(key, dtype=torch.int64, device=caches[0].device)
    return entry


def launch_move_kv(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """caches: buffers (rows, kv_heads, slots, hd); src, dst (B, D) slot indices: in every buffer, row b's
    slots src[b, i] are copied to dst[b, i] (all reads of a (buffer, row, head) before its writes)."""
    first = caches[0]
    bsz, d = src.shape
    kv_heads, hd = first.shape[1], first.shape[3]
    src, dst = src.contiguous(), dst.contiguous()
    grid = (len(caches), bsz * kv_heads)
    _move_kv_kernel[grid](
        cache_table(caches), src, dst, kv_heads, d, hd,
        first.stride(0), first.stride(1), first.stride(2), src.stride(0), dst.stride(0),
        DTYPE=_TL_DTYPES[first.dtype], D_PAD=triton.next_power_of_2(d), HD_PAD=triton.next_power_of_2(hd),
        num_warps=1,
    )  # fmt: skip


@torch.library.custom_op("fastmedusa::move_kv", mutates_args=("caches",))
def move_kv(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """In every cache buffer (rows, kv_heads, slots, hd) of `caches`, copy row b's slots src[b, i] to
    dst[b, i] (src, dst (B, D) int64, B <= rows); one kernel launch for all buffers. A dst slot that is also a
    later src slot reads its value from before the call."""
    if not caches:
        return
    if src.shape != dst.shape or src.dim() != 2 or src.shape[0] > caches[0].shape[0]:
        raise ValueError(
            f"move_kv needs src and dst of one shape (B, D) with B <= {caches[0].shape[0]} cache rows, "
            f"got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    check_caches(caches)
    launch_move_kv(caches, src, dst)


@move_kv.register_fake
def _(caches, src, dst):
    return None


def move_kv_reference(caches: list[Tensor], src: Tensor, dst: Tensor) -> list[Tensor]:
    """New tensors: each buffer with row b's slots src[b, i] copied to dst[b, i], slot by slot in a loop."""
    out = []
    for cache in caches:
        moved = cache.clone()
        for b in range(src.shape[0]):
            for i in range(src.shape[1]):
                moved[b, :, int(dst[b, i])] = cache[b, :, int(src[b, i])]
        out.append(moved)
    return out
