"""The fused Triton top-k against a float64 stable-sort reference (descending, ties to the lowest index).

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); its bf16 loads are wrong, so bf16
is checked on the GPU only.
"""

from __future__ import annotations

import pytest
import torch

from fastmedusa.model.heads import topk_token_ids
from fastmedusa.ops import triton_topk
from fastmedusa.ops.triton_topk import (
    MAX_FUSED_TOPK,
    fused_topk_supported,
    topk_indices,
    topk_indices_op,
    topk_indices_reference,
    topk_indices_triton,
)

DTYPES = [torch.float32, torch.float16]
# (rows, V): few rows for a large V keep the interpreter quick
SHAPES = [(1, 1), (3, 7), (20, 777), (3, 5000), (1, 49152)]
CASES = [(shape, k) for shape in SHAPES for k in (1, 2, 5, 10) if k <= shape[1]]


def _check(x: torch.Tensor, k: int, chunk: int | None = None) -> None:
    got = topk_indices_triton(x, k, chunk)
    want = topk_indices_reference(x, k)
    assert got.dtype == torch.long and got.shape == (*x.shape[:-1], k)
    assert torch.equal(got.cpu(), want.cpu()), (got, want)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), CASES)
def test_matches_reference(shape, k, dtype, gen):
    _check((torch.randn(shape, generator=gen) * 4).to(dtype), k)


@pytest.mark.parametrize("k", [5, 10, MAX_FUSED_TOPK])
def test_small_chunks_merge_exactly(k, gen):
    """13 chunks, the last holding 9 real lanes (fewer than k): stage 1 writes sentinel candidates."""
    _check(torch.randn(3, 777, generator=gen), k, chunk=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("vocab", "chunk"), [(777, 64), (5000, None)])
def test_many_exact_ties_go_to_the_lowest_index(vocab, chunk, dtype, gen):
    x = torch.randint(-3, 4, (4, vocab), generator=gen).to(dtype)
    for k in (2, 10, MAX_FUSED_TOPK):
        _check(x, k, chunk)


@pytest.mark.parametrize("chunk", [16, None])
def test_negative_infinity_entries(chunk, gen):
    """Real -inf values rank below every finite value, among themselves by index, and are still chosen
    before padded or already taken lanes (rows with fewer finite values than k, or none)."""
    x = torch.randn(5, 100, generator=gen)
    x[torch.rand(5, 100, generator=gen) < 0.5] = float("-inf")
    x[1, 3:] = float("-inf")  # 3 finite values
    x[2] = float("-inf")  # none
    x[3, 90:] = float("-inf")  # -inf in the last, partial chunk
    for k in (1, 5, 20):
        _check(x, k, chunk)
        _check(x.half(), k, chunk)


def test_positive_infinity_and_extremes():
    x = torch.tensor([[0.0, float("inf"), -3e38, 3e38, float("inf"), -0.0, float("-inf"), 1.0]])
    _check(x, 8)


def test_leading_dims_and_strided_input(gen):
    x = torch.randn(2, 3, 300, generator=gen)
    _check(x, 7, chunk=32)
    _check(x.transpose(0, 1), 7, chunk=32)  # rows not in memory order
    _check(x[..., ::2], 7)  # last dim not contiguous: copied


def test_nan_gives_distinct_indices_in_range():
    """NaN is unsupported (read as -inf), but every index stays valid and distinct."""
    x = torch.full((2, 40), float("nan"))
    x[0, 5] = 1.0
    got = topk_indices_triton(x, 10, chunk=16)
    assert ((got >= 0) & (got < 40)).all()
    assert all(len(set(r.tolist())) == 10 for r in got)
    assert got[0, 0] == 5


def test_empty_shapes_and_bad_k():
    assert topk_indices_triton(torch.randn(0, 10), 3).shape == (0, 3)
    assert topk_indices_triton(torch.randn(2, 4, 10), 0).shape == (2, 4, 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_indices_triton(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="power of two"):
        topk_indices_triton(torch.randn(2, 10), 3, chunk=48)
    for k in (11, -1):  # the torch.topk path (CPU, FASTMEDUSA_FUSED_TOPK auto) says the same
        with pytest.raises(ValueError, match=f"top-{k} of 10 values: k must be"):
            topk_indices(torch.randn(2, 10), k)
    with pytest.raises(TypeError, match="k=1.5: pass an integer"):
        topk_indices(torch.randn(2, 10), 1.5)


def test_custom_op_passes_opcheck(gen):
    x = torch.randn(2, 3, 50, generator=gen)
    torch.library.opcheck(topk_indices_op, (x, 4), test_utils=("test_schema", "test_faketensor"))


def test_dispatch_rule(monkeypatch):
    cpu = torch.randn(2, 50)
    assert not fused_topk_supported(cpu, 5)  # "auto": CUDA only
    monkeypatch.setattr(triton_topk, "FUSED_TOPK", "on")
    assert fused_topk_supported(cpu, 5)
    assert fused_topk_supported(cpu.half(), MAX_FUSED_TOPK) and fused_topk_supported(cpu.bfloat16(), 1)
    assert not fused_topk_supported(cpu, MAX_FUSED_TOPK + 1)
    assert not fused_topk_supported(cpu, 0)
    assert not fused_topk_supported(cpu[:, :4], 5)  # k > V: torch.topk raises its own error
    assert not fused_topk_supported(cpu.double(), 5)  # fp32 reading would round float64
    monkeypatch.setattr(triton_topk, "FUSED_TOPK", "off")
    assert not fused_topk_supported(cpu, 5)
    monkeypatch.setattr(triton_topk, "triton", None)
    monkeypatch.setattr(triton_topk, "FUSED_TOPK", "on")
    assert not fused_topk_supported(cpu, 5)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_topk_token_ids_maps_through_token_map(mode, monkeypatch, gen):
    """Both paths (torch.topk on the CPU in "auto", the fused op in "on") give the draft rows' token ids."""
    monkeypatch.setattr(triton_topk, "FUSED_TOPK", mode)
    logits = torch.randn(2, 3, 60, generator=gen)
    token_map = torch.randperm(1000, generator=gen)[:60]
    want = topk_indices_reference(logits, 4)
    assert torch.equal(topk_token_ids(logits, 4, token_map), token_map[want])
    assert torch.equal(topk_token_ids(logits, 4, None), want)
    assert torch.equal(topk_indices(logits, 4), want)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_compiles_without_graph_break(mode, monkeypatch, gen):
    """fullgraph torch.compile (aot_eager: tracing with the fake impl) gives what eager gives, through
    torch.topk ("auto" on the CPU) or the custom op ("on")."""
    monkeypatch.setattr(triton_topk, "FUSED_TOPK", mode)
    torch._dynamo.reset()
    logits = torch.randn(3, 2, 90, generator=gen)
    token_map = torch.randperm(500, generator=gen)[:90]

    def draft(x):
        return topk_token_ids(x * 2.0, 5, token_map)

    compiled = torch.compile(draft, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits), draft(logits))
    assert torch.equal(compiled(logits), token_map[topk_indices_reference(logits, 5)])
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (5, 49152), (320, 49152), (5, 128256), (7, 262144)])
def test_gpu_matches_reference(rows, vocab, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, vocab, device="cuda", generator=gen).to(dtype)
    if vocab > 3:
        x[:, ::7] = x[:, 3:4]  # exact ties across chunks
    assert fused_topk_supported(x, min(10, vocab))
    for k in (1, 10, MAX_FUSED_TOPK):
        if k <= vocab:
            got = topk_indices(x, k)
            assert torch.equal(got, topk_indices_reference(x, k)), (rows, vocab, k)


@pytest.mark.gpu
def test_gpu_runs_under_cuda_graph_capture():
    x = torch.randn(5, 1, 49152, device="cuda", dtype=torch.bfloat16)
    out = topk_indices(x, 10)  # warm-up: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_indices(x, 10)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, topk_indices_reference(x, 10))
