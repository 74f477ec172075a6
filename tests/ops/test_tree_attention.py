"""The decode/verify attention kernel against a float64 head-by-head reference (Triton's interpreter on the CPU)."""

import math

import pytest
import torch

from fastmedusa.ops.tree_attention import (
    check_tree_attention,
    launch_tree_attention,
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
@pytest.mark.parametrize("shape", SHAPES + [(16, 65, 32, 8, 600, 128)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference_on_gpu(shape, dtype):
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
