"""Attention of a few new tokens (a decode step, a tree verify pass) over a static KV cache, in one Triton kernel.

Why not SDPA: in a decode step of a small model every attention call is a few microseconds of latency, not of
bandwidth, and the step makes one per layer. Profiled on an H100 (SmolLM2-135M, bf16, 30 layers, 512-slot
cache): SDPA's cuDNN kernel took 7.2 us per layer for one query and 10.3 us for a 65-node tree, plus a memset
per layer for the tree, and it reads every slot of the static cache, used or not.

This kernel:
- takes the queries as they come out of the QKV projection, (B, T, heads, head_dim) with any strides, and
  writes the output in the same row layout, so no transpose is copied either way;
- runs grouped-query attention natively: one program covers a block of the (token, query head) rows that
  share one KV head, so each key/value tile is read once for all of them;
- reads the boolean mask (B, T, slots) itself (no additive mask to build) and stops at each row's last slot
  that any of its tokens may see (`kv_end`), so a 100-token context in a 4k-slot cache reads 100 slots;
- splits a long context ("flash-decoding") inside the same launch: a decode step runs only a few programs (3
  for one token at batch 1 with 3 KV heads), each looping over its whole context, so a long prompt made every
  step slow. The grid's third axis cuts the cache into splits of a few tiles (`_splits`, from the cache's
  size and the launch's width); each split with visible slots writes its partial softmax to a workspace and
  counts itself in on an atomic counter, and the tile's last one merges the partials into the output and
  resets the counter. A context within one split writes the output directly, as without splits (no
  workspace, no atomics).
One launch per layer, nothing to zero per launch. Softmax in fp32 (base 2, online), products in the input
dtype as flash attention does (fp32 inputs: exact fp32 products, no TF32).

The pure-PyTorch reference beside it is `tree_attention_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
MAX_TREE_TOKENS = 256  # longer query blocks (a prefill) go to SDPA, which skips masked tiles


@triton.jit
def _store_normalized(o_rows, acc, total, ok):
    """The output rows: the accumulated values over their softmax sum (a row with no visible slot: zeros)."""
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(o_rows, out.to(o_rows.dtype.element_ty), mask=ok)


@triton.jit
def _tree_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    end_ptr,
    o_ptr,
    work_ptr,
    counter_ptr,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mt,
    stride_ms,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    KV_HEADS,
    HEAD_DIM,
    SPLIT_SLOTS,
    scale_log2,
    GROUPS: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // KV_HEADS).to(tl.int64)
    kv_head = bh % KV_HEADS
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # (token, group) rows of this KV head
    row_ok = rows < T * GROUPS
    token = rows // GROUPS
    head = kv_head * GROUPS + rows % GROUPS
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    end = tl.load(end_ptr + b)
    if SPLIT:  # splits past the row's end have nothing to read; the last live one reads to the end
        n_live = tl.minimum(tl.maximum(tl.cdiv(end, SPLIT_SLOTS), 1), tl.num_programs(2))
        lo = split * SPLIT_SLOTS
        hi = tl.where(split == n_live - 1, end, lo + SPLIT_SLOTS)
    else:
        n_live = 1
        lo = 0
        hi = end

    if split < n_live:
        q_rows = q_ptr + b * stride_qb + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh
        mask_rows = mask_ptr + b * stride_mb + token[:, None] * stride_mt

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            slot_ok = slots < hi
            k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=slot_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (M, N), log2 units
            seen = tl.load(mask_rows + slots[None, :] * stride_ms, mask=row_ok[:, None] & slot_ok[None, :], other=0) != 0
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=slot_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        o_rows = o_ptr + b * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        if not SPLIT:  # compile-time: without splits the workspace and atomics below are not even compiled
            _store_normalized(o_rows, acc, l_i, row_ok[:, None] & d_ok[None, :])
        elif n_live == 1:  # the whole row in this program: straight to the output
            _store_normalized(o_rows, acc, l_i, row_ok[:, None] & d_ok[None, :])
        else:
            # this split's partial (acc, max, sum) to the workspace, whole tiles: (parts, BLOCK_M, D_PAD)
            # accumulators, then (parts, 2, BLOCK_M) maxima and sums, a part per (tile, split)
            tile = bh * tl.num_programs(0) + block
            splits = tl.num_programs(2)
            parts = tl.num_programs(0) * tl.num_programs(1) * splits
            r = tl.arange(0, BLOCK_M)
            acc_at = r[:, None] * D_PAD + d[None, :]
            stats_ptr = work_ptr + parts.to(tl.int64) * (BLOCK_M * D_PAD)
            part = (tile * splits + split).to(tl.int64)
            tl.store(work_ptr + part * (BLOCK_M * D_PAD) + acc_at, acc)
            tl.store(stats_ptr + part * (2 * BLOCK_M) + r, m_i)
            tl.store(stats_ptr + part * (2 * BLOCK_M) + BLOCK_M + r, l_i)
            # every thread's stores issued before the (one-thread, acq_rel, gpu-scope) count releases them
            tl.debug_barrier()
            count = tl.atomic_add(counter_ptr + tile, 1)
            if count == n_live - 1:  # the last split of this tile to finish: merge all, in split order
                m_c = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                l_c = tl.zeros((BLOCK_M,), tl.float32)
                acc_c = tl.zeros((BLOCK_M, D_PAD), tl.float32)
                for other in range(0, n_live):
                    at = (tile * splits + other).to(tl.int64)
                    # .cg: from L2, never a stale L1 line of another program's partial
                    m_s = tl.load(stats_ptr + at * (2 * BLOCK_M) + r, cache_modifier=".cg")
                    l_s = tl.load(stats_ptr + at * (2 * BLOCK_M) + BLOCK_M + r, cache_modifier=".cg")
                    acc_s = tl.load(work_ptr + at * (BLOCK_M * D_PAD) + acc_at, cache_modifier=".cg")
                    m_new = tl.maximum(m_c, m_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split has seen a slot yet
                    alpha = tl.exp2(m_c - m_safe)
                    beta = tl.exp2(m_s - m_safe)
                    l_c = l_c * alpha + l_s * beta
                    acc_c = acc_c * alpha[:, None] + acc_s * beta[:, None]
                    m_c = m_new
                _store_normalized(o_rows, acc_c, l_c, row_ok[:, None] & d_ok[None, :])
                tl.atomic_xchg(counter_ptr + tile, 0)  # zeros for the next launch


BLOCK_M = 16  # query rows per program: more programs, each a shorter serial loop over the slots
SMALL_GRID = 132  # programs: below this, 128-slot tiles (fewer loop trips), else 64-slot tiles and 2 warps
SHARED_BUDGET = 192 * 1024  # bytes of K/V tiles per block: an H100 allows 227 KB, the rest is the kernel's own


def _tiles(programs_at_16: int, row_bytes: int = 128) -> tuple[int, int, int]:
    """(slots per tile, warps, pipeline stages), from a sweep on an H100 (bf16, 9/3 heads, hd 64, 400 of 512
    slots visible; kernel alone, CUDA graphs): 65 tree tokens at batch 1 took 8.7 us with 16 x 128 tiles,
    12.8 us with 64 x 64 (SDPA/cuDNN: 12.5 us); at batch 16, 17.2 us with 16 x 64 tiles and 2 warps (SDPA:
    21.6 us); one token, 8.4 us (cuDNN 7.0 us: at 400 visible slots the serial loop is longer than its split
    kernel; in decode steps of 60-350 visible slots ours took 4.1 us per layer against 7.0).
    `row_bytes` (one key's padded head_dim in bytes) scales the tiles down where their pipeline would not fit
    an H100's 227 KB of shared memory per block: fp32 with head_dim 128 needed 279 KB at 128 x 3 (compile check
    of `tests/ops/test_compile_hopper.py`)."""
    block_n, warps, stages = (128, 4, 3) if programs_at_16 < SMALL_GRID else (64, 2, 2)

    def shared(block_n: int, stages: int) -> int:  # K and V tiles in flight, about as Triton buffers them
        return 2 * max(stages - 1, 1) * block_n * row_bytes

    while shared(block_n, stages) > SHARED_BUDGET and stages > 1:
        stages -= 1
    while shared(block_n, stages) > SHARED_BUDGET and block_n > 16:
        block_n //= 2
    return block_n, warps, stages


SPLIT_TILES = 2  # slot tiles per split of the cache: each program's serial loop is at most this long...
MAX_SPLITS = 32  # ...until the cache has more splits than this; then the splits grow instead


def _splits(slots: int, block_n: int, splits: int | None = None, programs: int = 1) -> tuple[int, int]:
    """(splits, slots per split) of a cache of `slots` slots read in `block_n`-slot tiles. In a decode step
    of a small model only a few programs run (3 for one token at batch 1), each looping over its rows' whole
    context: cut the cache into splits of SPLIT_TILES tiles, one program each, so a long context is read by
    many SMs at once, and merge the splits' partial softmaxes. Chosen from the cache's size, not from kv_end
    (the host never knows it: the kernel is captured in CUDA graphs); splits past a row's kv_end exit at once,
    so a short context costs one split, as without them. 1 where the cache fits in one split, and for a launch
    of SMALL_GRID `programs` or more (a batch, a wide tree), which keep the SMs busy already. Up to MAX_SPLITS
    splits each spans SPLIT_TILES tiles, so where the splits start, and with it the rounding, does not depend
    on the cache's size (an engine's cache is sized by its first call); past that the splits grow, a whole
    number of tiles each. `splits` overrides the count (tests)."""
    if splits is None:
        splits = 1 if programs >= SMALL_GRID else min(triton.cdiv(slots, SPLIT_TILES * block_n), MAX_SPLITS)
    split_slots = triton.cdiv(triton.cdiv(slots, max(splits, 1)), block_n) * block_n
    return max(triton.cdiv(slots, split_slots), 1), split_slots


# Split counters: one int32 per (row block, batch row x KV head) tile, counting the tile's splits that have
# written their partial; the last resets its counter, so they are all zero between launches and are zeroed
# only when allocated (no memset per launch). Kept per device, never freed (a captured graph holds their
# address). They assume that launches on one device do not run concurrently on two streams (decode runs its
# steps on one stream; two launches at once would count into the same counters).
_counters: dict[torch.device, Tensor] = {}
_retired: list[Tensor] = []  # outgrown counters, still in use by graphs captured with them


def split_counters(device: torch.device, tiles: int) -> Tensor:
    """At least `tiles` zeroed counters on `device`, allocated at first need and kept. Zeroing runs a kernel,
    which CUDA-graph capture would only record: grow them outside capture (`reserve_split_counters`; decoding
    runs real steps before it captures)."""
    if device.type == "cuda" and device.index is None:  # one key per card: "cuda" is the current one
        device = torch.device("cuda", torch.cuda.current_device())
    have = _counters.get(device)
    if have is None or have.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"tree attention: {tiles} split counters are first needed under CUDA-graph capture, which "
                "cannot zero them: run one call outside capture first (or reserve_split_counters)"
            )
        if have is not None:
            _retired.append(have)
        size = max(tiles, 2 * have.numel() if have is not None else 1024)
        have = _counters[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return have


def reserve_split_counters(device: torch.device, batch: int, heads: int, kv_heads: int) -> None:
    """Allocate the counters of the largest launch of up to MAX_TREE_TOKENS tokens now, eagerly: allocated at
    a step's first call instead, they would come from the CUDA-graph pool when torch.compile's CUDA graphs
    warm that step up, which rejects a live tensor in its pool that no graph output owns."""
    split_counters(device, triton.cdiv(MAX_TREE_TOKENS * (heads // kv_heads), BLOCK_M) * batch * kv_heads)


def launch_tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    mask: Tensor,
    kv_end: Tensor,
    out: Tensor,
    tiles: tuple[int, int, int, int] | None = None,
    splits: int | None = None,
) -> Tensor:
    """Run the kernel: q (B, T, heads, hd), caches (>= B, kv_heads, slots, hd) with unit last stride, mask
    (B, T, slots) bool with any strides, kv_end (B,) int (slots read per row), out like q. Returns out.
    `tiles` (query rows, slots, warps, stages) overrides the tiling rule (`bench/tree_attention_tiles.py`),
    `splits` the number of splits of the cache (`_splits`)."""
    bsz, seq, heads, hd = q.shape
    kv_heads = k_cache.shape[1]
    groups = heads // kv_heads
    rows = seq * groups
    block_m = BLOCK_M if tiles is None else tiles[0]
    d_pad = max(16, triton.next_power_of_2(hd))
    grid = (triton.cdiv(rows, block_m), bsz * kv_heads)
    row_bytes = d_pad * q.element_size()
    block_n, warps, stages = _tiles(grid[0] * grid[1], row_bytes) if tiles is None else tiles[1:]
    n_splits, split_slots = _splits(k_cache.shape[2], block_n, splits, programs=grid[0] * grid[1])
    if n_splits > 1:  # partials: (tiles x splits) accumulators (BLOCK_M, D_PAD), then their maxima and sums
        parts = grid[0] * grid[1] * n_splits
        work = torch.empty(parts * block_m * (d_pad + 2), dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, grid[0] * grid[1])
    else:  # not compiled into the kernel (SPLIT is off)
        work = counters = out
    _tree_attention_kernel[grid + (n_splits,)](
        q, k_cache, v_cache, mask, kv_end, out, work, counters,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mask.stride(0), mask.stride(1), mask.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq, kv_heads, hd, split_slots, LOG2E / math.sqrt(hd),
        GROUPS=groups,
        D_PAD=d_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=n_splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out


def check_tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, kv_end: Tensor) -> None:
    """Shapes, strides and dtypes the kernel needs: a clear error instead of a wrong read."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"tree attention needs q (B, T, heads, head_dim) and caches (rows, kv_heads, slots, head_dim), "
            f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    bsz, seq, heads, hd = q.shape
    rows, kv_heads, slots, cache_hd = k_cache.shape
    if cache_hd != hd or heads % kv_heads or rows < bsz:
        raise ValueError(
            f"tree attention: {heads} query heads of dim {hd} for {kv_heads} KV heads of dim {cache_hd}, "
            f"{bsz} rows for a cache of {rows}: the heads must divide evenly and the cache hold the batch"
        )
    if mask.shape != (bsz, seq, slots) or mask.dtype != torch.bool:
        raise ValueError(f"tree attention needs a bool mask of shape {(bsz, seq, slots)}, got {mask.dtype} {tuple(mask.shape)}")
    if kv_end.shape != (bsz,):
        raise ValueError(f"tree attention needs kv_end of shape ({bsz},), got {tuple(kv_end.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"tree attention needs {name} with a unit last stride (got strides {t.stride()})")


# compiled callers hand the kernel contiguous inputs, made so where they are produced (no copy)
_CONTIGUOUS = tuple(t for t in (getattr(torch.Tag, "needs_contiguous_strides", None),) if t is not None)


@torch.library.custom_op("fastmedusa::tree_attention", mutates_args=(), tags=_CONTIGUOUS)
def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, kv_end: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) where mask) v for queries q (B, T, heads, hd) over cache rows 0..B-1 of
    (rows, kv_heads, slots, hd) caches, query head h reading KV head h // (heads // kv_heads) as in HF's
    grouped-query attention; mask (B, T, slots) bool, True = may attend; only slots < kv_end[b] are read
    (every slot a row's mask allows must lie below it). Returns (B, T, heads, hd), contiguous. A custom op:
    one opaque kernel launch inside compiled steps and CUDA graphs."""
    check_tree_attention(q, k_cache, v_cache, mask, kv_end)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # int32 ends cost nothing here; callers pass them so (an int64 one is converted: one more kernel per call)
    return launch_tree_attention(q, k_cache, v_cache, mask, kv_end.to(torch.int32), out)


@tree_attention.register_fake
def _(q, k_cache, v_cache, mask, kv_end):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def visible_end(mask: Tensor) -> Tensor:
    """(B,) int32: one past the last slot any token of the row may see (0 for a row that sees nothing)."""
    slots = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=torch.int32)
    return (mask.any(dim=1) * slots).amax(dim=-1).to(torch.int32)


def tree_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor) -> Tensor:
    """Float64 reference, head by head: each query head against its KV head's whole cache, masked softmax."""
    bsz, seq, heads, hd = q.shape
    kv_heads = k_cache.shape[1]
    per_kv = heads // kv_heads
    out = torch.zeros(bsz, seq, heads, hd, dtype=torch.float64, device=q.device)
    for h in range(heads):
        k = k_cache[:bsz, h // per_kv].double()  # (B, slots, hd)
        v = v_cache[:bsz, h // per_kv].double()
        scores = torch.einsum("btd,bsd->bts", q[:, :, h].double(), k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
        out[:, :, h] = torch.einsum("bts,bsd->btd", weights, v)
    return out
