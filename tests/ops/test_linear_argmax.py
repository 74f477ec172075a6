"""The fused LM head + argmax against a float64 reference (logits rounded to x.dtype, ties to the lowest index).

Most inputs are multiples of 1/4 in [-1, 1]: every partial sum of the dot products is then a multiple of 1/16
that fp32 holds exactly, so the kernel's fp32 accumulation and the reference's float64 one give the same
logits in any summation order, and the indices must match exactly, ties (after rounding to fp16) included.
Gaussian inputs are checked up to the accumulation error. On the CPU the kernels run under TRITON_INTERPRET=1
(tests/conftest.py); its bf16 loads are wrong, so bf16 is checked on the GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmedusa.ops import linear_argmax as la
from fastmedusa.ops.linear_argmax import (
    fused_argmax_supported,
    linear_argmax,
    linear_argmax_op,
    linear_argmax_reference,
    linear_argmax_triton,
)

DTYPES = [torch.float32, torch.float16]
# (M, H, V): odd sizes; under the interpreter's default blocks V <= 1024 is one vocab tile (stage 1 only)
SHAPES = [(1, 576, 777), (3, 37, 1000), (17, 64, 5000), (65, 96, 3001)]
SMALL = (16, 64, 32, 4, 1)  # many vocab tiles and K chunks for small shapes


@pytest.fixture(autouse=True)
def _fused_on_cuda(request, monkeypatch):
    """GPU tests run the fused path on CUDA whatever the default mode ("auto")."""
    if request.node.get_closest_marker("gpu"):
        monkeypatch.setattr(la, "FUSED_ARGMAX", "auto")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _grid(shape, gen, dtype=torch.float32, device="cpu"):
    """Multiples of 1/4 in [-1, 1]: exact in fp16/bf16, and their dot products exact in fp32."""
    return (torch.randint(-4, 5, shape, generator=gen) / 4).to(dtype).to(device)


def _inputs(m, h, v, gen, dtype=torch.float32, bias=True, device="cpu"):
    x = _grid((m, h), gen, dtype, device)
    w = _grid((v, h), gen, dtype, device)
    b = _grid((v,), gen, dtype, device) if bias else None
    return x, w, b


def _check(x, w, b=None, block=None):
    got = linear_argmax_triton(x, w, b, block)
    want = linear_argmax_reference(x, w, b)
    assert got.dtype == torch.long and got.shape == x.shape[:-1]
    assert torch.equal(got.cpu(), want.cpu()), (got, want)
    return got


def _check_close(got, x, w, b=None):
    """Gaussian inputs: the chosen logit is the row's maximum up to fp32 accumulation (plus one rounding to
    x.dtype), and rows whose runner-up is farther than that match the reference exactly."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    logits = exact.to(x.dtype).double()
    scale = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    tol = (x.shape[-1] * torch.finfo(torch.float32).eps + 2 * torch.finfo(x.dtype).eps) * scale.amax(-1)
    top2 = logits.topk(2, dim=-1).values
    picked = logits.gather(-1, got[..., None])[..., 0]
    assert (picked >= top2[..., 0] - tol).all()
    clear = top2[..., 0] - top2[..., 1] > tol
    assert clear.any()
    want = linear_argmax_reference(x, w, b)
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, bias, gen):
    _check(*_inputs(*shape, gen, dtype, bias))


def test_full_vocab(gen):
    """The decode shape's V = 49152 (48 vocab tiles under the interpreter) with H = 576."""
    _check(*_inputs(4, 576, 49152, gen, torch.float16))


@pytest.mark.parametrize(
    "block",
    [(16, 16, 16, 1, 1), SMALL, (32, 128, 16, 4, 2), (64, 256, 128, 8, 3)],
)
def test_block_overrides(block, gen):
    """Tails in every direction: 37 = 2*16 + 5 of H, 65 rows, 1000 = 62*16 + 8 of V."""
    x, w, b = _inputs(65, 37, 1000, gen, torch.float16)
    _check(x, w, b, block)
    _check(x[:3], w, None, block)


def test_merge_loops_over_many_candidates(monkeypatch, gen):
    """Stage 2 in several steps: 63 vocab tiles merged 16 candidates at a time."""
    monkeypatch.setattr(la, "STAGE2_BLOCK", 16)
    _check(*_inputs(5, 20, 1000, gen), block=(16, 16, 32, 4, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_inputs(dtype, gen):
    x = torch.randn(17, 64, generator=gen).to(dtype)
    w = torch.randn(3001, 64, generator=gen).to(dtype)
    b = torch.randn(3001, generator=gen).to(dtype)
    _check_close(linear_argmax_triton(x, w, b), x, w, b)
    _check_close(linear_argmax_triton(x, w, None, SMALL), x, w)


def test_leading_dims_and_strided_inputs(gen):
    x, w, b = _inputs(10, 48, 700, gen)
    x3 = x.view(2, 5, 48)
    got = _check(x3, w, b)
    assert got.shape == (2, 5)
    _check(x3.transpose(0, 1), w, b, SMALL)  # rows not in memory order: reshape copies
    wide = _grid((10, 96), gen)
    _check(wide[:, ::2], w, b)  # last dim not unit-stride: copied
    big = _grid((700, 80), gen)
    _check(x, big[:, 16:64], b, SMALL)  # weight rows 80 apart: read in place
    _check(x, _grid((48, 700), gen).T, None)  # column-major weight: copied
    _check(x, w, _grid((1400,), gen)[::2])  # strided bias


@pytest.mark.parametrize("block", [SMALL, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicate_rows_tie_to_the_lowest_index(block, dtype, gen):
    """Exact duplicates of the best weight row in several vocab tiles (64 wide for SMALL): the lowest wins,
    wherever the later copies lie."""
    v = 1000
    x = (torch.randint(1, 5, (6, 40), generator=gen) / 4).to(dtype)  # positive: the all-ones row is best
    w = _grid((v, 40), gen, dtype)
    w[(w == 1).all(-1)] = 0.75  # no accidental all-ones row
    for dups, first in [([5, 70, 71, 130, v - 1], 5), ([130, 70, v - 1, 71], 70), ([v - 1, 999 - 64], 935)]:
        wd = w.clone()
        wd[dups] = 1.0
        got = _check(x, wd, None, block)
        assert (got == first).all(), (dups, got)


def test_max_in_the_last_partial_tile(gen):
    """V = 1000 over 64-wide tiles: the last tile holds 40 real lanes and 24 padded ones."""
    x = (torch.randint(1, 5, (3, 40), generator=gen) / 4).to(torch.float16)
    w = _grid((1000, 40), gen, torch.float16)
    w[(w == 1).all(-1)] = 0.5
    w[-1] = 1.0
    assert (_check(x, w, None, SMALL) == 999).all()
    b = torch.zeros(1000, dtype=torch.float16)
    b[-2] = 1.0
    w[-2] = 1.0  # the same logit plus the bias, one lane earlier
    assert (_check(x, w, b, SMALL) == 998).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_logits_give_index_zero(dtype, gen):
    x = _grid((4, 30), gen, dtype)
    w = torch.zeros(500, 30, dtype=dtype)
    assert (_check(x, w, None, SMALL) == 0).all()
    assert (_check(x, w, torch.full((500,), -2.5, dtype=dtype), SMALL) == 0).all()


def test_ties_after_rounding_to_fp16():
    """2048 (column 0) and 2049 (column 5) differ in fp32 but both round to 2048 in fp16, as F.linear's fp16
    output would: column 0. In fp32 column 5 wins."""
    w = torch.zeros(40, 16)
    w[0] = 128.0
    w[5] = 128.0
    w[5, 3] = 129.0
    x = torch.ones(2, 16)
    assert (_check(x.half(), w.half(), None, SMALL) == 0).all()
    assert (_check(x, w, None, SMALL) == 5).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy
def test_fp16_overflow_ties_at_infinity():
    """Logits beyond fp16's range round to +inf; +inf ties go to the lowest index."""
    w = torch.zeros(100, 16, dtype=torch.float16)
    w[70] = 300.0
    w[30] = 256.0  # 16 * 256 * 256 = 2**20: +inf in fp16, like 70's
    x = torch.full((2, 16), 256.0, dtype=torch.float16)
    assert (_check(x, w, None, SMALL) == 30).all()


def test_nan_reads_as_negative_infinity(gen):
    """NaN is unsupported, but reads as -inf: a NaN logit never wins, and a row of NaN gives 0."""
    x, w, _ = _inputs(3, 20, 300, gen)
    w[7] = float("nan")
    x[2, 4] = float("nan")
    got = _check(x, w, None, SMALL)
    assert got[2] == 0 and (got[:2] != 7).all()


def test_empty_rows_and_hidden():
    w = torch.randn(50, 8)
    assert linear_argmax_triton(torch.randn(0, 8), w).shape == (0,)
    assert linear_argmax_triton(torch.randn(2, 0, 8), w).shape == (2, 0)
    b = torch.zeros(50)
    b[17] = 1.0
    assert (_check(torch.randn(3, 0), torch.randn(50, 0), b) == 17).all()  # H = 0: the bias alone


def test_bad_inputs_raise():
    x, w = torch.randn(3, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="expected 2-D"):
        linear_argmax_triton(x, w[0])
    with pytest.raises(ValueError, match="last dim must be H = 8"):
        linear_argmax_triton(torch.randn(3, 9), w)
    with pytest.raises(ValueError, match=r"bias of shape \(49,\)"):
        linear_argmax_triton(x, w, torch.randn(49))
    with pytest.raises(ValueError, match="V = 0"):
        linear_argmax_triton(x, w[:0])
    with pytest.raises(ValueError, match="dtypes"):
        linear_argmax_triton(x, w.half())
    with pytest.raises(ValueError, match="dtypes"):
        linear_argmax_triton(x.double(), w.double())
    with pytest.raises(ValueError, match="dtypes"):
        linear_argmax_triton(x, w, torch.randn(50).half())
    with pytest.raises(ValueError, match="BLOCK_V=48"):
        linear_argmax_triton(x, w, None, (16, 48, 16, 4, 1))
    with pytest.raises(ValueError, match="BLOCK_K=8"):
        linear_argmax_triton(x, w, None, (16, 64, 8, 4, 1))
    with pytest.raises(ValueError, match="num_warps=3"):
        linear_argmax_triton(x, w, None, (16, 64, 16, 3, 1))


def test_custom_op_passes_opcheck(gen):
    x, w, b = _inputs(6, 24, 100, gen)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(linear_argmax_op, (x.view(2, 3, 24), w, b), test_utils=checks)
    torch.library.opcheck(linear_argmax_op, (x, w, None), test_utils=checks)


def test_dispatch_rule(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(50, 8)
    assert not fused_argmax_supported(x, w)  # the default ("off"), and "auto" on the CPU
    monkeypatch.setattr(la, "FUSED_ARGMAX", "auto")
    assert not fused_argmax_supported(x, w)  # "auto": CUDA only
    monkeypatch.setattr(la, "FUSED_ARGMAX", "on")
    assert fused_argmax_supported(x, w)
    assert fused_argmax_supported(x.half(), w.half()) and fused_argmax_supported(x.bfloat16(), w.bfloat16())
    assert not fused_argmax_supported(x, w.half())  # F.linear raises its own error
    assert not fused_argmax_supported(x.double(), w.double())  # fp32 accumulation would round float64
    monkeypatch.setattr(la, "FUSED_ARGMAX", "off")
    assert not fused_argmax_supported(x, w)
    monkeypatch.setattr(la, "triton", None)
    monkeypatch.setattr(la, "FUSED_ARGMAX", "on")
    assert not fused_argmax_supported(x, w)


@pytest.mark.parametrize("mode", ["off", "auto", "on"])
def test_linear_argmax_paths(mode, monkeypatch, gen):
    """Mode "off" (and "auto" on the CPU) is F.linear + argmax, "on" the fused op; all agree here."""
    monkeypatch.setattr(la, "FUSED_ARGMAX", mode)
    x, w, b = _inputs(2 * 3, 40, 300, gen)
    x = x.view(2, 3, 40)
    got = linear_argmax(x, w, b)
    if mode != "on":
        assert torch.equal(got, F.linear(x, w, b).argmax(-1))
    assert torch.equal(got, linear_argmax_reference(x, w, b))


@pytest.mark.parametrize("mode", ["off", "on"])
def test_compiles_without_graph_break(mode, monkeypatch, gen):
    """fullgraph torch.compile (aot_eager: tracing with the fake impl) gives what eager gives, through
    F.linear + argmax ("off") or the custom op ("on")."""
    monkeypatch.setattr(la, "FUSED_ARGMAX", mode)
    torch._dynamo.reset()
    x, w, b = _inputs(6, 32, 200, gen)
    x = x.view(3, 2, 32)

    def step(h):
        return linear_argmax(h * 2.0, w, b) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))
    assert torch.equal(compiled(x), linear_argmax_reference(x * 2.0, w, b) + 1)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 17, 64, 300, 1024, 4096])
def test_gpu_matches_reference(m, dtype):
    gen = torch.Generator().manual_seed(m)
    x, w, b = _inputs(m, 576, 49152, gen, dtype, device="cuda")
    assert fused_argmax_supported(x, w)
    _check(x, w, b)
    _check(x, w, None)
    x = (torch.randint(1, 5, (m, 576), generator=gen) / 4).to(dtype).cuda()  # positive: all-ones row best
    w[(w == 1).all(-1)] = 0.75
    w[[49151, 200, 4999, 200 + 128]] = 1.0  # exact duplicates in four vocab tiles
    assert (_check(x, w, None) == 200).all()
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 576, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(49152, 576, device="cuda", generator=gen) * 0.05).to(dtype)
    _check_close(linear_argmax(x, w), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(16, 64, 32, 4, 2), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3)])
def test_gpu_block_overrides(block):
    gen = torch.Generator().manual_seed(2)
    _check(*_inputs(1000, 100, 30001, gen, torch.bfloat16, device="cuda"), block=block)


@pytest.mark.gpu
def test_gpu_runs_under_cuda_graph_capture():
    gen = torch.Generator().manual_seed(3)
    x, w, b = _inputs(64, 576, 49152, gen, torch.bfloat16, device="cuda")
    out = linear_argmax(x, w, b)  # warm-up: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_argmax(x, w, b)
    x.copy_(_grid(tuple(x.shape), gen, torch.bfloat16, "cuda"))
    graph.replay()
    assert torch.equal(out, linear_argmax_reference(x, w, b))
