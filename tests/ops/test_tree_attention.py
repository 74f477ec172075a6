"""The decode/verify attention kernel against a float64 head-by-head reference (Triton's interpreter on the CPU)."""

import math

import pytest
import torch

from fastmedusa.ops import tree_attention as tree_attention_module
from fastmedusa.ops.tree_attention import (
    MAX_SPLITS,
    _splits,
    check_tree_attention,
    launch_tree_attention,
    split_counters,
    tree_attention,
    tree_attention_reference,
    visible_end,
)


def _case(bsz, seq, heads, kv_heads, slots, hd, dtype, seed, device="cpu", cache_rows=None):
    """Queries as a strided view of a fused projection (as the engine has them), caches with spare rows, and
    a tree-like mask: a causal prefix of random length per row, random ancestors among the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(bsz, seq, (heads + 2 * kv_heads) * hd, generator=gen).to(device, dtype)
    q = proj[..., : heads * hd].view(bsz, seq, heads, hd)  # strided on every device, as in the engine
    rows = cache_rows or bsz + 1
    k = torch.randn(rows, kv_heads, slots, hd, generator=gen)
    v = torch.randn(rows, kv_heads, slots, hd, generator=gen)
    mask = torch.zeros(bsz, seq, slots, dtype=torch.bool)
    for b in range(bsz):
        prefix = int(torch.randint(1, slots - seq + 1, (1,), generator=gen))
        mask[b, :, :prefix] = torch.rand(prefix, generator=gen) < 0.9  # left pad / holes in the prefix
        sees = torch.rand(seq, seq, generator=gen) < 0.4
        mask[b, :, prefix : prefix + seq] = torch.tril(sees) | torch.eye(seq, dtype=torch.bool)
    return [q] + [t.to(device) for t in (k.to(dtype), v.to(dtype), mask)]


SHAPES = [  # (B, T, heads, kv_heads, slots, head_dim)
    (1, 1, 9, 3, 70, 64),  # a greedy step, SmolLM2's heads
    (1, 65, 9, 3, 150, 64),  # a 65-node tree: 195 query rows over four blocks
    (3, 7, 4, 4, 33, 16),  # plain multi-head, odd sizes
    (2, 5, 8, 1, 100, 24),  # one KV head for eight query heads, a head_dim that is not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype):
    q, k, v, mask = _case(*shape, dtype, seed=sum(shape))
    out = tree_attention(q, k, v, mask, visible_end(mask))
    ref = tree_attention_reference(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("tiles", [(16, 128, 4, 3), (64, 64, 2, 2), (32, 32, 4, 1)])
def test_any_tiling_matches_the_reference(tiles):
    """The tile sweep's overrides compute the same attention as the default rule."""
    q, k, v, mask = _case(1, 65, 9, 3, 150, 64, torch.float32, seed=11)
    out = launch_tree_attention(q, k, v, mask, visible_end(mask), torch.empty_like(q), tiles=tiles)
    torch.testing.assert_close(out.double(), tree_attention_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_slots_past_kv_end_are_never_read():
    """NaN in every slot past the visible end (stale tree nodes, unused cache) leaves the output finite."""
    q, k, v, mask = _case(2, 6, 6, 2, 90, 32, torch.float32, seed=3)
    end = visible_end(mask)
    ref = tree_attention_reference(q, k, v, mask)
    for b in range(2):
        assert int(end[b]) < k.shape[2]
        k[b, :, int(end[b]) :] = float("nan")
        v[b, :, int(end[b]) :] = float("nan")
    out = tree_attention(q, k, v, mask, end)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_mask_with_any_strides():
    """The engine's tree mask is a transposed view; a broadcast mask has zero strides."""
    q, k, v, mask = _case(2, 5, 4, 2, 30, 16, torch.float32, seed=4)
    transposed = mask.transpose(1, 2).contiguous().transpose(1, 2)
    out = tree_attention(q, k, v, transposed, visible_end(mask))
    torch.testing.assert_close(out.double(), tree_attention_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)
    shared = mask[:1, :1].expand(2, 5, 30)
    out = tree_attention(q, k, v, shared, visible_end(shared))
    torch.testing.assert_close(out.double(), tree_attention_reference(q, k, v, shared), rtol=2e-5, atol=2e-5)


def test_row_that_sees_nothing_returns_zeros():
    q, k, v, mask = _case(2, 3, 4, 2, 40, 16, torch.float32, seed=5)
    mask[1] = False
    end = visible_end(mask)
    assert int(end[1]) == 0
    out = tree_attention(q, k, v, mask, end)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0].double(), tree_attention_reference(q, k, v, mask)[0], rtol=2e-5, atol=2e-5)


SPLIT_TILES = (16, 16, 4, 1)  # 16-slot tiles: several splits of a short cache (the interpreter is slow)


def _live_splits(end, slots, splits, block_n=16):
    """How many splits of each row have visible slots (the kernel's n_live)."""
    split_slots = _splits(slots, block_n, splits)[1]
    return [max(math.ceil(int(e) / split_slots), 1) for e in end]


def _ended_case(bsz, seq, heads, kv_heads, slots, hd, dtype, seed, ends):
    """`_case` with row b's visible slots ending at ends[b] (0: a row that sees nothing): a prefix with holes,
    then the tree's tokens in its last `seq` slots."""
    q, k, v, _ = _case(bsz, seq, heads, kv_heads, slots, hd, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(bsz, seq, slots, dtype=torch.bool)
    for b, end in enumerate(ends):
        if end:
            mask[b, :, : end - seq] = torch.rand(end - seq, generator=gen) < 0.9
            sees = torch.rand(seq, seq, generator=gen) < 0.4
            mask[b, :, end - seq : end] = torch.tril(sees) | torch.eye(seq, dtype=torch.bool)
    assert visible_end(mask).tolist() == list(ends)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=lambda s: "x".join(map(str, s)))
def test_splits_match_the_reference(shape, splits, dtype):
    """A cache cut into splits (partials merged by each tile's last split) computes the same attention."""
    bsz, slots = shape[0], shape[4]
    ends = [slots, slots // 3 + shape[1], 0][:bsz]  # all splits; a third of them (or split 0 only); nothing
    q, k, v, mask = _ended_case(*shape, dtype, seed=sum(shape) + splits, ends=ends)
    end = visible_end(mask)
    assert _live_splits(end, slots, splits)[0] == _splits(slots, 16, splits)[0] > 1  # maybe fewer than asked
    out = launch_tree_attention(q, k, v, mask, end, torch.empty_like(q), tiles=SPLIT_TILES, splits=splits)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double(), tree_attention_reference(q, k, v, mask), rtol=tol, atol=tol)


@pytest.mark.parametrize("splits", [2, 5])
def test_splits_of_a_tree(splits):
    """65 tree tokens: four row blocks per KV head, each its own tile with its own counter."""
    q, k, v, mask = _ended_case(1, 65, 9, 3, 150, 64, torch.float32, seed=12, ends=[150])
    end = visible_end(mask)
    assert _live_splits(end, 150, splits) == [splits]
    out = launch_tree_attention(q, k, v, mask, end, torch.empty_like(q), tiles=SPLIT_TILES, splits=splits)
    torch.testing.assert_close(out.double(), tree_attention_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_with_different_ends_split_by_default(dtype):
    """A 600-slot cache is cut into splits by the default rule; in one batch a row whose context ends in the
    first split (no partials), one spanning all of them, one reading part of them, and one that sees nothing;
    tokens that see nothing in some splits or in all; NaN past each row's end stays unread."""
    slots = 600
    # odd sizes: 3 query heads per KV head, head_dim 24
    q, k, v, mask = _ended_case(4, 3, 6, 2, slots, 24, dtype, seed=7, ends=[97, slots, 333, 0])
    mask[1, 0, :300] = False  # a token that sees nothing in the first split and half the second
    mask[2, 1] = False  # a token that sees nothing at all in a row with two live splits
    end = visible_end(mask)
    n_splits, split_slots = _splits(slots, 128)
    assert n_splits == 3 and _live_splits(end, slots, None, 128) == [1, 3, 2, 1]
    ref = tree_attention_reference(q, k, v, mask)
    for b in range(4):
        k[b, :, int(end[b]) :] = float("nan")
        v[b, :, int(end[b]) :] = float("nan")
    out = tree_attention(q, k, v, mask, end)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert not out[3].any() and not out[2, 1].any()


def test_slots_past_kv_end_are_never_read_with_splits():
    """NaN past each row's end, inside a live split's last tile and in the splits past the end."""
    q, k, v, mask = _ended_case(3, 4, 4, 2, 130, 16, torch.float32, seed=8, ends=[107, 45, 9])
    end = visible_end(mask)
    ref = tree_attention_reference(q, k, v, mask)
    for b in range(3):
        assert int(end[b]) % 16 and int(end[b]) < 130 - 16  # ends mid-tile, with whole tiles past them
        k[b, :, int(end[b]) :] = float("nan")
        v[b, :, int(end[b]) :] = float("nan")
    assert max(_live_splits(end, 130, 5)) > 1
    out = launch_tree_attention(q, k, v, mask, end, torch.empty_like(q), tiles=SPLIT_TILES, splits=5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_split_counters_reset_for_the_next_launch():
    """The last split of each tile zeroes its counter: all counters are zero after a launch, and a second
    launch on the same counters (into a NaN-filled output) gives the same output bit for bit."""
    q, k, v, mask = _ended_case(2, 7, 8, 2, 100, 16, torch.float32, seed=10, ends=[100, 77])
    end = visible_end(mask)
    assert min(_live_splits(end, 100, 3)) > 1
    counters = split_counters(q.device, 1)
    first = launch_tree_attention(q, k, v, mask, end, torch.empty_like(q), tiles=SPLIT_TILES, splits=3)
    assert split_counters(q.device, 1) is counters and not counters.any()
    nan = torch.full_like(q, float("nan"))
    second = launch_tree_attention(q, k, v, mask, end, nan, tiles=SPLIT_TILES, splits=3)
    assert torch.equal(first, second) and not counters.any()
    torch.testing.assert_close(first.double(), tree_attention_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_split_counters_grow_zeroed_and_keep_the_old_ones(monkeypatch):
    monkeypatch.setattr(tree_attention_module, "_counters", {})
    monkeypatch.setattr(tree_attention_module, "_retired", [])
    device = torch.device("cpu")
    small = split_counters(device, 10)
    assert small.dtype == torch.int32 and small.numel() >= 10 and not small.any()
    assert split_counters(device, small.numel()) is small
    big = split_counters(device, small.numel() + 1)
    assert big.numel() > small.numel() and not big.any() and tree_attention_module._retired == [small]


def test_default_split_rule():
    """Splits of two 128-slot tiles (two 64-slot tiles for big grids), one split for a cache that fits one,
    at most MAX_SPLITS (longer splits, whole tiles, beyond); the override rounds splits up to whole tiles."""
    assert _splits(70, 128)[0] == 1 and _splits(256, 128) == (1, 256) and _splits(257, 128) == (2, 256)
    assert _splits(4096, 128) == (16, 256) and _splits(4096, 64) == (32, 128)
    splits, split_slots = _splits(100_000, 128)
    assert splits == MAX_SPLITS and split_slots % 128 == 0
    assert (splits - 1) * split_slots < 100_000 <= splits * split_slots
    assert _splits(150, 16, splits=5) == (5, 32) and _splits(150, 128, splits=5) == (2, 128)
    assert _splits(150, 128, splits=1) == (1, 256)
    # a launch of SMALL_GRID programs or more (a batch of rows, a wide tree) is not split
    assert _splits(4096, 64, programs=192) == (1, 4096) and _splits(4096, 128, programs=131) == (16, 256)
    assert _splits(4096, 128, programs=39) == (16, 256) and _splits(600, 128, programs=39) == (3, 256)


@pytest.mark.parametrize("bsz", [1, 4], ids=["split", "wide launch"])
def test_result_does_not_depend_on_the_cache_size(bsz):
    """An engine's cache is sized by its first call, so the same context may sit in caches of any size: the
    splits start at the same slots in all of them (or there are none), and the output is bit for bit the same."""
    q, k, v, mask = _case(bsz, 65, 9, 3, 600, 16, torch.float32, seed=21)
    assert int(visible_end(mask).max()) > 256  # past one split of 256 slots (three at batch 1)
    outs = []
    for slots in (600, 1000, 2100):
        grow = slots - 600
        kk, vv = (torch.cat([t, torch.full((*t.shape[:2], grow, 16), float("nan"))], dim=2) for t in (k, v))
        mm = torch.cat([mask, torch.zeros(bsz, 65, grow, dtype=torch.bool)], dim=2)
        outs.append(launch_tree_attention(q, kk, vv, mm, visible_end(mm), torch.empty_like(q)))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0].double(), tree_attention_reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_visible_end():
    mask = torch.zeros(3, 2, 10, dtype=torch.bool)
    mask[0, 0, 3] = True
    mask[0, 1, 7] = True
    mask[1, :, :10] = True
    assert visible_end(mask).tolist() == [8, 10, 0]


def test_reference_is_plain_attention():
    """The reference itself, against SDPA with each KV head repeated for its query heads."""
    q, k, v, mask = _case(2, 4, 6, 3, 30, 16, torch.float64, seed=9)
    kk, vv = (t[:2].repeat_interleave(2, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask[:, None])
    torch.testing.assert_close(tree_attention_reference(q, k, v, mask), sdpa.transpose(1, 2))
    assert math.isclose(float(tree_attention_reference(q, k, v, mask).abs().max()), float(sdpa.abs().max()))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, m, e: (q, k[:, :1].repeat(1, 4, 1, 1), v[:, :1].repeat(1, 4, 1, 1), m, e), "divide evenly"),
        (lambda q, k, v, m, e: (q, k[:1], v[:1], m, e), "cache hold the batch"),
        (lambda q, k, v, m, e: (q, k, v, m.float(), e), "bool mask"),
        (lambda q, k, v, m, e: (q, k, v, m[:, :, :-1], e), "bool mask"),
        (lambda q, k, v, m, e: (q, k, v, m, e[:1]), "kv_end"),
        (lambda q, k, v, m, e: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v, m, e), "unit last stride"),
    ],
)
def test_bad_inputs(change, message):
    q, k, v, mask = _case(2, 3, 6, 2, 20, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=message):
        check_tree_attention(*change(q, k, v, mask, visible_end(mask)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    SHAPES + [(16, 65, 32, 8, 600, 128), (1, 65, 9, 3, 2100, 64), (1, 1, 9, 3, 2100, 64)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_float64_reference_on_gpu(shape, dtype):
    """The 2100-slot caches are cut into splits: the atomics and the merge on real concurrent programs."""
    torch._dynamo.reset()  # one lambda code object for every case: past dynamo's recompile limit fullgraph fails
    q, k, v, mask = _case(*shape, dtype, seed=sum(shape), device="cuda")
    # the engine's strided view of its QKV projection (one token of one row counts as contiguous)
    assert q.stride(2) == shape[-1] and (q.shape[0] * q.shape[1] == 1 or not q.is_contiguous())
    out = tree_attention(q, k, v, mask, visible_end(mask))
    ref = tree_attention_reference(q, k, v, mask)
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    compiled = torch.compile(lambda *a: tree_attention(*a) * 1, fullgraph=True)(q, k, v, mask, visible_end(mask))
    torch.testing.assert_close(compiled, out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 9, 3, 4096, 64), (2, 65, 9, 3, 4096, 64)], ids=lambda s: f"T{s[1]}")
def test_splits_are_race_free_on_gpu(shape):
    """Many launches of a long context on concurrent programs: every output bit for bit the first (the merge
    runs in split order, whichever split finishes last), the counters zero after them."""
    q, k, v, mask = _case(*shape, torch.bfloat16, seed=13, device="cuda")
    mask[:, :, : shape[4] - shape[1]] = True  # every row spans all splits
    end = visible_end(mask)
    first = tree_attention(q, k, v, mask, end)
    for _ in range(50):
        assert torch.equal(tree_attention(q, k, v, mask, end), first)
    assert not split_counters(q.device, 1).any()
    torch.testing.assert_close(first.double(), tree_attention_reference(q, k, v, mask), rtol=3e-2, atol=3e-2)
