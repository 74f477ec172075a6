"""fastmedusa.ops.medusa_kl_divergence against a float64 reference written here (explicit slicing per sequence,
none of the op's helpers): the error of each impl is bounded by about twice the error of the same reference
run in the same dtype, plus a small absolute floor. The Triton kernels run under TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from fastmedusa.ops import medusa_kl_divergence

IMPLS = ["chunked", "triton"]
DTYPES = [torch.float32, torch.float16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _reference(hiddens, weights, teacher_hidden, teacher_weight, labels, shifts, dtype, ignore_index=-100):
    """Mean KL per head: logits rounded to `dtype` (as a GEMM in that dtype leaves them), softmax in fp64 for
    the fp64 ground truth and in fp32 otherwise (what plain PyTorch with upcast logits does)."""
    soft = torch.float64 if dtype == torch.float64 else torch.float32
    batch, seq = labels.shape
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    losses = []
    for h, w, s in zip(hiddens, weights, shifts):
        total, count = torch.zeros((), dtype=soft), 0
        for b in range(batch):
            for t in range(seq - s):
                if labels[b, t + s] == ignore_index:
                    continue
                zt = (teacher_hidden[b, t + s - 1].to(dtype) @ teacher_weight.to(dtype).T).to(soft)
                zs = (h[b, t].to(dtype) @ w.to(dtype).T).to(soft)
                logp, logq = zt.log_softmax(-1), zs.log_softmax(-1)
                total = total + (logp.exp() * (logp - logq)).sum()
                count += 1
        losses.append(total / max(count, 1))
    return torch.stack(losses)


def _inputs(batch, seq, width, vocab, heads, ignore_frac, seed):
    """fp64 hiddens, weights and a teacher with logits of std ~3 (a trained LM's), labels with ignored ones.

    Each head's hidden is the teacher's plus noise, so head and teacher agree in part (a KL far from its
    maximum, like a real head's)."""
    gen = torch.Generator().manual_seed(seed)
    teacher_hidden = torch.randn(batch, seq, width, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64) * 3 / width**0.5
    hs = [teacher_hidden + torch.randn(teacher_hidden.shape, generator=gen, dtype=torch.float64)
          for _ in range(heads)]  # fmt: skip
    ws = [teacher_weight + 0.3 * torch.randn(vocab, width, generator=gen, dtype=torch.float64) / width**0.5
          for _ in range(heads)]  # fmt: skip
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_frac] = -100
    return hs, ws, teacher_hidden, teacher_weight, labels


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "NaN or inf in the result"
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _run(fn, dtype, hs, ws, th, tw, labels, shifts, grad_seed=0):
    """Losses and the gradients of hiddens and weights (fp64) for a random upstream gradient; checks that
    the teacher, which requires grad here, gets none."""
    hs = [h.detach().to(dtype).requires_grad_() for h in hs]
    ws = [w.detach().to(dtype).requires_grad_() for w in ws]
    th, tw = th.detach().to(dtype).requires_grad_(), tw.detach().to(dtype).requires_grad_()
    loss = fn(hs, ws, th, tw, labels, shifts)
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.device)
    (loss.double() * upstream).sum().backward()
    assert th.grad is None and tw.grad is None, "the teacher must not get a gradient"
    return [loss.detach()] + [h.grad for h in hs] + [w.grad for w in ws]


def _reference_fn(dtype):
    return lambda hs, ws, th, tw, labels, shifts: _reference(hs, ws, th, tw, labels, shifts, dtype)


def _op_fn(impl, chunk_rows=5, wgrad="auto"):
    def fn(hs, ws, th, tw, labels, shifts):
        return medusa_kl_divergence(
            hs, ws, th, tw, labels, shifts=shifts, impl=impl, chunk_rows=chunk_rows, wgrad=wgrad
        )

    return fn


def _check(impl, dtype, inputs, shifts, **kw):
    truth = _run(_reference_fn(torch.float64), torch.float64, *inputs, shifts)
    plain = _run(_reference_fn(dtype), dtype, *inputs, shifts)
    got = _run(_op_fn(impl, **kw), dtype, *inputs, shifts)
    k = len(shifts)
    names = ["loss"] + [f"d_hidden{i}" for i in range(k)] + [f"d_weight{i}" for i in range(k)]
    for name, g, p, t in zip(names, got, plain, truth):
        assert g.shape == t.shape, name
        if name != "loss":
            assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected the input's {dtype}"
        err, base = _rel_err(g, t), _rel_err(p, t)
        assert err <= 2 * base + FLOOR[dtype], f"{name}: {impl} error {err:.3g} vs plain {dtype} {base:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [1, 2, 3, 4, 5])
def test_each_shift_matches_reference(impl, dtype, shift):
    # T=7, H=33, V=261: odd sizes, no power-of-two tile fits; chunks of 5 rows cut sequences mid-way
    inputs = _inputs(2, 7, 33, 261, heads=1, ignore_frac=0.2, seed=shift)
    _check(impl, dtype, inputs, [shift])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_five_heads_share_the_teacher_chunk(impl, dtype):
    inputs = _inputs(3, 9, 17, 131, heads=5, ignore_frac=0.3, seed=11)
    _check(impl, dtype, inputs, [1, 2, 3, 4, 5])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wgrad", ["accumulate", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradient_modes_match_reference(impl, wgrad, dtype):
    inputs = _inputs(2, 8, 24, 300, heads=2, ignore_frac=0.25, seed=5)
    _check(impl, dtype, inputs, [2, 3], chunk_rows=4, wgrad=wgrad)


def test_torch_impl_matches_reference():
    inputs = _inputs(2, 6, 12, 70, heads=3, ignore_frac=0.3, seed=2)
    _check("torch", torch.float32, inputs, [1, 3, 5])


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_rows_and_whole_ignored_sequences(impl):
    hs, ws, th, tw, labels = _inputs(3, 6, 10, 40, heads=2, ignore_frac=0.1, seed=4)
    labels[1] = -100  # a whole sequence ignored
    _check(impl, torch.float32, (hs, ws, th, tw, labels), [1, 2])
    flat = ([h[0] for h in hs], ws, th[0], tw, labels[0])  # (N, H): one sequence
    got = _run(_op_fn(impl), torch.float32, *flat, [1, 2])  # the Triton kernel computes in fp32
    want = _run(_reference_fn(torch.float64), torch.float64, [h[None] for h in flat[0]], ws, th[:1], tw,
                labels[:1], [1, 2])  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.reshape(g.shape), rtol=1e-4, atol=1e-6)


def test_gemm_work_is_one_teacher_pass_and_three_per_head_over_scored_rows_only():
    """GEMM FLOPs (aten mm/addmm, from the profiler) = 2*H*V*(M + 3*sum_k n_k): the teacher's logits once for
    its M scored rows, then logits, dH and dW for each head's n_k rows; ignored rows cost nothing."""
    from torch.profiler import ProfilerActivity, profile

    batch, seq, width, vocab = 3, 10, 8, 40
    hs, ws, th, tw, labels = _inputs(batch, seq, width, vocab, heads=3, ignore_frac=0.0, seed=14)
    labels[0, :5] = -100
    labels[2] = -100
    hs = [h.float().requires_grad_() for h in hs]
    ws = [w.float().requires_grad_() for w in ws]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = medusa_kl_divergence(hs, ws, th.float(), tw.float(), labels, shifts=[1, 2, 3], chunk_rows=4)
        loss.sum().backward()
    flops = 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            a, b = event.input_shapes[:2] if event.name == "aten::mm" else event.input_shapes[1:3]
            flops += 2 * a[0] * a[1] * b[1]
    scored = [(b, t) for b in range(batch) for t in range(seq - 1) if labels[b, t + 1] != -100]
    per_head = [sum(1 for _, t in scored if t >= s - 1) for s in (1, 2, 3)]
    assert flops == 2 * width * vocab * (len(scored) + 3 * sum(per_head))


@pytest.mark.parametrize("impl", ["torch", *IMPLS])
def test_fp16_logits_beyond_its_range_stay_finite(impl):
    """Logits past fp16's 65504 (large hidden norms) are computed in fp32: no inf, no NaN."""
    hs, ws, th, tw, labels = _inputs(2, 6, 16, 50, heads=2, ignore_frac=0.1, seed=13)
    ws, tw = [w * 1e4 for w in ws], tw * 1e4  # weights within fp16, logits of std ~3e4 (max ~1e5)
    rounded = [[h.half().double() for h in hs], [w.half().double() for w in ws], th.half().double(),
               tw.half().double(), labels]  # fmt: skip
    got = _run(_op_fn(impl), torch.float16, *rounded, [1, 2])
    truth = _run(_reference_fn(torch.float64), torch.float64, *rounded, [1, 2])
    assert (got[0] > 1e3).all()  # confident, disagreeing distributions: a large but finite KL
    for g, t in zip(got, truth):
        assert _rel_err(g, t) < 1e-2


@pytest.mark.parametrize("impl", ["torch", *IMPLS])
def test_all_ignored_gives_zero_loss_and_zero_grads(impl):
    hs, ws, th, tw, labels = _inputs(2, 5, 8, 30, heads=2, ignore_frac=1.0, seed=7)
    hs = [h.float().requires_grad_() for h in hs]
    ws = [w.float().requires_grad_() for w in ws]
    loss = medusa_kl_divergence(hs, ws, th.float(), tw.float(), labels, shifts=[1, 2], impl=impl)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(2))
    for p in hs + ws:
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_shift_beyond_the_sequence_scores_nothing():
    hs, ws, th, tw, labels = _inputs(2, 3, 8, 30, heads=2, ignore_frac=0.0, seed=8)
    loss = medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1, 4], impl="chunked")
    assert loss[0] > 0 and loss[1] == 0


def test_identical_student_and_teacher_give_zero():
    _, _, th, tw, labels = _inputs(2, 6, 8, 30, heads=1, ignore_frac=0.2, seed=9)
    # a student at t equal to the teacher at t+s-1 (the row it is compared with) has KL 0 and zero gradient
    h = torch.cat([th[:, 1:], th[:, :1]], dim=1).requires_grad_()
    loss = medusa_kl_divergence([h], [tw], th, tw, labels, shifts=[2], impl="chunked")
    loss.sum().backward()
    assert abs(loss.item()) < 1e-12 and h.grad.abs().max() < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_weight_and_hidden_sum_their_gradients(impl):
    hs, ws, th, tw, labels = _inputs(2, 7, 12, 60, heads=1, ignore_frac=0.2, seed=10)
    h, w = hs[0].float().requires_grad_(), ws[0].float().requires_grad_()
    loss = medusa_kl_divergence([h, h, h], [w, w, w], th.float(), tw.float(), labels, shifts=[1, 2, 3],
                                impl=impl, chunk_rows=3)  # fmt: skip
    loss.sum().backward()
    h64, w64 = hs[0].clone().requires_grad_(), ws[0].clone().requires_grad_()
    _reference([h64] * 3, [w64] * 3, th, tw, labels, [1, 2, 3], torch.float64).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_frozen_weights_and_no_grad_mode():
    hs, ws, th, tw, labels = _inputs(2, 5, 8, 40, heads=2, ignore_frac=0.0, seed=12)
    h0, h1 = hs[0].float().requires_grad_(), hs[1].float()
    w0, w1 = ws[0].float(), ws[1].float().requires_grad_()
    medusa_kl_divergence([h0, h1], [w0, w1], th.float(), tw.float(), labels, shifts=[1, 2]).sum().backward()
    assert h0.grad is not None and w1.grad is not None and w0.grad is None
    with torch.no_grad():
        loss = medusa_kl_divergence([h0, h1], [w0, w1], th.float(), tw.float(), labels, shifts=[1, 2])
    assert not loss.requires_grad
    want = _reference([h0.detach(), h1], [w0, w1.detach()], th, tw, labels, [1, 2], torch.float32)
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"impl": "liger"}, "impl='liger'"),
        ({"shifts": [0]}, "shift=0"),
        ({"shifts": [1, 2]}, "2 shifts"),
        ({"chunk_rows": 0}, "chunk_rows=0"),
        ({"wgrad": "lazy"}, "wgrad='lazy'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    args = {"shifts": [1], **kwargs}
    with pytest.raises(ValueError, match=match):
        medusa_kl_divergence(hs, ws, th, tw, labels, **args)


def test_mismatched_shapes_raise_value_error():
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(ValueError, match="hiddens\\[0\\] has shape"):
        medusa_kl_divergence([hs[0][:, :3]], ws, th, tw, labels, shifts=[1])
    with pytest.raises(ValueError, match="weights\\[0\\] has shape"):
        medusa_kl_divergence(hs, [ws[0][:10]], th, tw, labels, shifts=[1])
    with pytest.raises(ValueError, match="labels have shape"):
        medusa_kl_divergence(hs, ws, th, tw, labels[:, :3], shifts=[1])


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_an_empty_batch_gives_zero_losses(impl):
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=2, ignore_frac=0.0, seed=0)
    empty = ([h[:0] for h in hs], ws, th[:0], tw, labels[:0])
    losses = medusa_kl_divergence(*empty, shifts=[1, 2], impl=impl)
    assert losses.shape == (2,) and torch.equal(losses, torch.zeros(2))


def test_shift_kinds_are_checked():
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(TypeError, match="shifts=1: pass one shift per head"):
        medusa_kl_divergence(hs, ws, th, tw, labels, shifts=1)
    with pytest.raises(TypeError, match=r"shifts=\[1.5\]: pass integers, one per head"):
        medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1.5])
    assert torch.equal(medusa_kl_divergence(hs, ws, th, tw, labels, shifts=torch.tensor([1])),
                       medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1]))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("wgrad", ["accumulate", "inplace"])
def test_bf16_triton_on_gpu_matches_reference(wgrad):
    hs, ws, th, tw, labels = _inputs(2, 64, 128, 4099, heads=3, ignore_frac=0.2, seed=3)
    cuda = ([h.cuda() for h in hs], [w.cuda() for w in ws], th.cuda(), tw.cuda(), labels.cuda())
    dtype = torch.bfloat16
    got = _run(_op_fn("triton", chunk_rows=37, wgrad=wgrad), dtype, *cuda, [1, 2, 3])
    plain = _run(_op_fn("torch"), dtype, *cuda, [1, 2, 3])
    truth = _run(_op_fn("torch"), torch.float64, *cuda, [1, 2, 3])
    for g, p, t in zip(got, plain, truth):
        err, base = _rel_err(g, t), _rel_err(p, t)
        assert err <= 2 * base + FLOOR[dtype] + (3e-3 if wgrad == "inplace" else 0.0)


@pytest.mark.gpu
def test_bf16_extra_memory_is_the_two_chunk_buffers():
    """wgrad="inplace": beyond the inputs and their gradients, the teacher and student chunk logits (plus
    O(C*H) gathers) are all the op allocates."""
    from fastmedusa.ops.kl_divergence import kl_chunk_rows

    batch, seq, width, vocab, k = 2, 512, 256, 32000, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()  # noqa: E731
    hs = [make(batch, seq, width).requires_grad_() for _ in range(k)]
    ws = [make(vocab, width, scale=3 / width**0.5).requires_grad_() for _ in range(k)]
    th, tw = make(batch, seq, width), make(vocab, width, scale=3 / width**0.5)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1, 2, 3], wgrad="inplace")
    loss.sum().backward()
    torch.cuda.synchronize()
    grads = sum(p.numel() * p.element_size() for p in hs + ws)
    rows = kl_chunk_rows(0, batch * (seq - 1), vocab)
    buffers = 2 * rows * vocab * 2
    assert torch.cuda.max_memory_allocated() - base - grads <= 1.1 * buffers + (32 << 20)


def test_argument_kinds_are_named_like_the_cross_entropy_ones():
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(ValueError, match="labels have dtype torch.bool"):
        medusa_kl_divergence(hs, ws, th, tw, labels > 3, shifts=[1])
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        medusa_kl_divergence(hs, ws, th, tw, labels.tolist(), shifts=[1])
    with pytest.raises(TypeError, match=r"ignore_index=-100.0: pass an integer"):
        medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1], ignore_index=-100.0)
    for rows in (2.5, "8"):
        with pytest.raises(TypeError, match=f"chunk_rows={rows!r}: pass a whole number of rows"):
            medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1], chunk_rows=rows)
    with pytest.raises(TypeError, match=r"hiddens\[0\] must be a torch.Tensor, got ndarray"):
        medusa_kl_divergence([hs[0].numpy()], ws, th, tw, labels, shifts=[1])


def test_float64_inputs_stay_float64_exact_with_impl_triton():
    """The Triton kernels sum in fp32: fp64 inputs (exact references) take the chunked path, whatever impl says."""
    hs, ws, th, tw, labels = _inputs(2, 5, 8, 21, heads=2, ignore_frac=0.2, seed=3)
    losses = {impl: medusa_kl_divergence(hs, ws, th, tw, labels, shifts=[1, 2], impl=impl) for impl in IMPLS}
    assert losses["triton"].dtype == torch.float64
    assert torch.equal(losses["triton"], losses["chunked"])


def test_a_second_backward_through_the_fused_kl_says_what_to_do():
    hs, ws, th, tw, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    h = hs[0].clone().requires_grad_()
    loss = medusa_kl_divergence([h], ws, th, tw, labels, shifts=[1], impl="chunked").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through a fused fastmedusa loss.*impl='torch'"):
        loss.backward()
