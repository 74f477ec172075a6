"""fastmedusa.ops against a float64 reference: the error of each impl is bounded by about twice the error of
plain PyTorch in the same dtype (Cut Cross-Entropy's style), plus a small absolute floor.

On the CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from fastmedusa.ops import linear_cross_entropy, medusa_cross_entropy, topk_correct
from fastmedusa.ops.fused import fused_forward

IMPLS = ["chunked", "triton", "torch"]
WGRADS = ["inplace", "accumulate", "recompute"]
DTYPES = [torch.float32, torch.float16]
# absolute floor on the relative error: rounding of an O(1) value in the dtype
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "NaN or inf in the result"
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _inputs(batch, seq, hidden_size, vocab, heads, ignore_frac, seed, device="cpu"):
    """fp64 hiddens and weights with logits of std ~3 (like a trained LM), labels with ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(batch, seq, hidden_size, generator=gen, dtype=torch.float64) for _ in range(heads)]
    ws = [torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 3 / hidden_size**0.5]
    ws += [torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 3 / hidden_size**0.5
           for _ in range(heads - 1)]  # fmt: skip
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < ignore_frac] = -100
    move = lambda ts: [t.to(device) for t in ts]
    return move(hs), move(ws), labels.to(device)


def _run(
    impl,
    dtype,
    hs,
    ws,
    labels,
    shifts,
    reduction="mean",
    grad_seed=0,
    share=False,
    chunk_rows=5,
    wgrad="auto",
):
    """Loss and gradients of hiddens and weights (in fp64) for a random upstream gradient."""
    hs = [h.detach().to(dtype).requires_grad_() for h in hs]
    ws = [w.detach().to(dtype).requires_grad_() for w in ws]
    head_ws = [ws[0]] * len(hs) if share else ws
    if len(hs) == 1:
        loss = linear_cross_entropy(
            hs[0],
            head_ws[0],
            labels,
            shift=shifts[0],
            reduction=reduction,
            impl=impl,
            chunk_rows=chunk_rows,
            wgrad=wgrad,
        )
    else:
        loss = medusa_cross_entropy(
            hs, head_ws, labels, shifts=shifts, impl=impl, chunk_rows=chunk_rows, wgrad=wgrad
        )
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.device) + 0.5
    (loss.double() * upstream).sum().backward()
    grads = [h.grad for h in hs] + [w.grad for w in (ws[:1] if share else ws)]
    return [loss.detach()] + grads


def _run_sliced(dtype, hs, ws, labels, shifts, reduction="mean", grad_seed=0, share=False, **_):
    """The reference `_run` is checked against, built without the library: head k scores hidden[:, :T-s]
    against labels[:, s:] (slicing, not `shifted_targets`), logits in fp32 (fp64 for fp64) as HF upcasts."""
    hs = [h.detach().to(dtype).requires_grad_() for h in hs]
    ws = [w.detach().to(dtype).requires_grad_() for w in ws]
    head_ws = [ws[0]] * len(hs) if share else ws
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    losses = []
    rows = labels if labels.dim() == 2 else labels[None]  # (N,) positions are one sequence
    for h, w, s in zip(hs, head_ws, shifts):
        h = h if labels.dim() == 2 else h[None]
        seq = rows.shape[1]
        kept = max(seq - s, 0)
        logits = h[:, :kept].to(acc) @ w.to(acc).T  # (B, T-s, V)
        target = rows[:, s:]
        per = torch.nn.functional.cross_entropy(
            logits.reshape(-1, w.shape[0]), target.reshape(-1), ignore_index=-100, reduction="none"
        ).reshape(target.shape)
        if reduction == "none":
            losses.append(
                torch.cat([per, per.new_zeros(rows.shape[0], seq - kept)], dim=1).reshape(labels.shape)
            )
        elif reduction == "sum":
            losses.append(per.sum())
        else:
            losses.append(per.sum() / (target != -100).sum().clamp(min=1))
    loss = losses[0] if len(hs) == 1 else torch.stack(losses)
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.device) + 0.5
    (loss.double() * upstream).sum().backward()
    grads = [h.grad for h in hs] + [w.grad for w in (ws[:1] if share else ws)]
    return [loss.detach()] + grads


def _check_against_reference(impl, dtype, hs, ws, labels, shifts, wgrad="auto", **kw):
    truth = _run_sliced(torch.float64, hs, ws, labels, shifts, **kw)
    plain = _run_sliced(dtype, hs, ws, labels, shifts, **kw)
    got = _run(impl, dtype, hs, ws, labels, shifts, wgrad=wgrad, **kw)
    names = (
        ["loss"]
        + [f"d_hidden{i}" for i in range(len(hs))]
        + [f"d_weight{i}" for i in range(len(got) - 1 - len(hs))]
    )
    for name, g, p, t in zip(names, got, plain, truth):
        assert g.shape == t.shape, name
        assert g.dtype in (dtype, torch.float32) or name == "loss", name
        err, base = _rel_err(g, t), _rel_err(p, t)
        assert err <= 2 * base + FLOOR[dtype], f"{name}: {impl} error {err:.3g} vs torch {base:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [0, 1, 2, 3, 4])
def test_shifts_match_reference(impl, dtype, shift):
    hs, ws, labels = _inputs(2, 7, 33, 261, heads=1, ignore_frac=0.2, seed=shift)
    _check_against_reference(impl, dtype, hs, ws, labels, [shift], wgrad=WGRADS[shift % 2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wgrad", WGRADS)
def test_reductions_match_reference(impl, dtype, reduction, wgrad):
    # V=1031: not a multiple of any power-of-two tile; H=17 odd
    hs, ws, labels = _inputs(3, 5, 17, 1031, heads=1, ignore_frac=0.3, seed=11)
    _check_against_reference(impl, dtype, hs, ws, labels, [1], reduction=reduction, wgrad=wgrad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row(impl, dtype):
    hs, ws, labels = _inputs(1, 1, 9, 70, heads=1, ignore_frac=0.0, seed=3)
    flat_h, flat_l = [hs[0].reshape(1, 9)], labels.reshape(1)
    _check_against_reference(impl, dtype, flat_h, ws, flat_l, [0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("wgrad", WGRADS)
def test_medusa_heads_match_reference(impl, share, wgrad):
    hs, ws, labels = _inputs(2, 9, 24, 300, heads=3, ignore_frac=0.25, seed=5)
    _check_against_reference(impl, torch.float32, hs, ws, labels, [1, 2, 3], share=share, wgrad=wgrad)


@pytest.mark.parametrize("impl", ["torch", *IMPLS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wgrad", WGRADS)
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, reduction, wgrad):
    hs, ws, labels = _inputs(2, 4, 8, 50, heads=1, ignore_frac=1.0, seed=7)
    h = hs[0].float().requires_grad_()
    w = ws[0].float().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, shift=1, reduction=reduction, impl=impl, wgrad=wgrad)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_shift_beyond_sequence_ignores_everything():
    hs, ws, labels = _inputs(2, 3, 8, 50, heads=1, ignore_frac=0.0, seed=8)
    loss = linear_cross_entropy(hs[0], ws[0], labels, shift=5, impl="chunked")
    assert loss.item() == 0.0


def test_none_reduction_is_shaped_like_positions_and_zero_where_ignored():
    hs, ws, labels = _inputs(2, 6, 8, 50, heads=1, ignore_frac=0.3, seed=9)
    loss = linear_cross_entropy(hs[0], ws[0], labels, shift=2, reduction="none", impl="chunked")
    assert loss.shape == (2, 6)
    scored = torch.cat([labels[:, 2:], torch.full((2, 2), -100)], dim=1) != -100
    assert (loss[~scored] == 0).all() and (loss[scored] > 0).all()


def test_frozen_weight_and_hidden_skip_their_gradient_gemms():
    hs, ws, labels = _inputs(2, 5, 8, 40, heads=1, ignore_frac=0.0, seed=10)
    h, w = hs[0].reshape(10, 8).float(), ws[0].float()
    targets = labels.reshape(-1)
    for wgrad in WGRADS:
        _, gh, gw, _ = fused_forward(h, w, targets, -100, "mean", True, False, "chunked", 4, wgrad)
        assert gh.shape == h.shape and gw.numel() == 0
        _, gh, gw, _ = fused_forward(h, w, targets, -100, "mean", False, True, "chunked", 4, wgrad)
        assert gh.numel() == 0 and gw.shape == w.shape
    frozen = w.clone()  # requires_grad False: only the hidden gets a gradient
    hg = h.clone().requires_grad_()
    linear_cross_entropy(hg, frozen, targets, impl="chunked").backward()
    assert hg.grad is not None and frozen.grad is None


def test_no_grad_mode_returns_loss_only():
    hs, ws, labels = _inputs(2, 5, 8, 40, heads=1, ignore_frac=0.0, seed=12)
    h, w = hs[0].float().requires_grad_(), ws[0].float().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, shift=1, impl="chunked")
    assert not loss.requires_grad
    ref = linear_cross_entropy(h.detach(), w.detach(), labels, shift=1, impl="torch")
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"impl": "fast"}, "impl='fast'"),
        ({"reduction": "avg"}, "reduction='avg'"),
        ({"shift": -1}, "shift=-1"),
        ({"chunk_rows": 0}, "chunk_rows=0"),
        ({"wgrad": "lazy"}, "wgrad='lazy'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hs[0], ws[0], labels, **kwargs)


def test_mismatched_shapes_raise_value_error():
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(ValueError, match="labels have shape"):
        linear_cross_entropy(hs[0], ws[0], labels[:, :3])
    with pytest.raises(ValueError, match="weight has shape"):
        linear_cross_entropy(hs[0], ws[0][:, :5], labels)
    with pytest.raises(ValueError, match="pass one of each per head"):
        medusa_cross_entropy(hs, ws, labels, shifts=[1, 2])


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("bad", [20, 57, -1, -7])
def test_labels_outside_the_vocabulary_are_named_not_read(impl, bad):
    """V=20: a label of 20 or more, or a negative one other than ignore_index, would be read past the logits
    (the fused kernels gave a wrong loss): every impl refuses it before any work."""
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.2, seed=0)
    labels[0, 2] = bad
    with pytest.raises(ValueError, match=f"label {bad} is outside \\[0, 20\\) and is not ignore_index: use -100"):
        linear_cross_entropy(hs[0], ws[0], labels, impl=impl)
    with pytest.raises(ValueError, match=f"label {bad} is outside"):
        medusa_cross_entropy(hs, ws, labels, shifts=[1], impl=impl)
    labels[0, 2] = 3  # the ignore_index itself, and ids inside, pass
    linear_cross_entropy(hs[0], ws[0], labels, impl=impl, ignore_index=-100)


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("pad", [20, 1000, -1])
def test_an_ignore_index_outside_the_vocabulary_is_ignored(impl, pad):
    """A pad id at or past V (or another negative) as ignore_index: those positions are not scored, and the
    loss and gradients are those of the same positions marked -100."""
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.3, seed=1)
    padded = torch.where(labels == -100, pad, labels)
    grads = []
    for lab, ignore in ((labels, -100), (padded, pad)):
        h, w = hs[0].clone().requires_grad_(), ws[0].clone().requires_grad_()
        loss = linear_cross_entropy(h, w, lab, impl=impl, ignore_index=ignore, shift=1)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_more_argument_kinds_are_named():
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    for rows in (1.5, "8"):
        with pytest.raises(TypeError, match=f"chunk_rows={rows!r}: pass a whole number of rows"):
            linear_cross_entropy(hs[0], ws[0], labels, chunk_rows=rows)
    with pytest.raises(TypeError, match=r"shifts=\[2.0\]: pass integers, one per head"):
        medusa_cross_entropy(hs, ws, labels, shifts=[2.0])
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got ndarray"):
        linear_cross_entropy(hs[0].numpy(), ws[0], labels)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
        linear_cross_entropy(hs[0], None, labels)
    with pytest.raises(ValueError, match=r"weight has shape \(0, 8\): a vocabulary and a hidden size of 1 or more"):
        linear_cross_entropy(hs[0], ws[0][:0], labels.clamp(max=-100))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_inputs_stay_float64_exact_with_impl_triton(reduction):
    """The Triton kernels sum in fp32: fp64 inputs (exact references) take the chunked path, whatever impl says."""
    hs, ws, labels = _inputs(2, 5, 7, 23, heads=1, ignore_frac=0.2, seed=4)
    out = {}
    for impl in ("chunked", "triton"):
        h, w = hs[0].clone().requires_grad_(), ws[0].clone().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, impl=impl, shift=1, reduction=reduction)
        loss.sum().backward()
        out[impl] = (loss.detach(), h.grad, w.grad)
    assert out["triton"][0].dtype == torch.float64
    for got, want in zip(out["triton"], out["chunked"]):
        assert torch.equal(got, want)


def test_argument_kinds_are_named():
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    with pytest.raises(TypeError, match="shifts=2: pass one shift per head"):
        medusa_cross_entropy(hs, ws, labels, shifts=2)
    two, _, two_labels = _inputs(2, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)  # batch 2: not a K=1 stack
    with pytest.raises(ValueError, match=r"hiddens is one \(2, 4, 8\) tensor: pass a list of per-head tensors"):
        medusa_cross_entropy(two[0], ws, two_labels, shifts=[2])
    assert torch.equal(  # integer kinds of shifts: numpy and 0-d tensors
        medusa_cross_entropy(hs, ws, labels, shifts=torch.tensor([1])), medusa_cross_entropy(hs, ws, labels, shifts=[1])
    )
    with pytest.raises(TypeError, match="shift=1.5: pass an integer"):
        linear_cross_entropy(hs[0], ws[0], labels, shift=1.5)
    with pytest.raises(TypeError, match="labels must be a tensor"):
        linear_cross_entropy(hs[0], ws[0], labels.tolist())
    with pytest.raises(ValueError, match="labels have dtype torch.bool"):
        linear_cross_entropy(hs[0], ws[0], labels > 3)


def test_peers_raise_clear_errors_off_cuda():
    hs, ws, labels = _inputs(1, 4, 8, 20, heads=1, ignore_frac=0.0, seed=0)
    for impl in ("liger", "cce", "quack"):
        with pytest.raises(ValueError, match=impl):
            linear_cross_entropy(hs[0], ws[0], labels, impl=impl)


def test_compile_impl_matches_reference():
    hs, ws, labels = _inputs(2, 7, 8, 30, heads=1, ignore_frac=0.3, seed=3)
    h, w = hs[0].double().requires_grad_(), ws[0].double().requires_grad_()
    got = linear_cross_entropy(h, w, labels, shift=2, impl="compile")
    got.backward()
    h2, w2 = hs[0].double().requires_grad_(), ws[0].double().requires_grad_()
    want = linear_cross_entropy(h2, w2, labels, shift=2, impl="torch")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w.grad, w2.grad)


def test_topk_correct_counts_match_full_logits():
    hs, ws, labels = _inputs(2, 11, 8, 30, heads=1, ignore_frac=0.3, seed=13)
    hits, count = topk_correct(hs[0], ws[0], labels, shift=2, ks=(1, 3, 5), chunk_rows=4)
    logits = hs[0][:, :-2] @ ws[0].T
    target = labels[:, 2:]
    scored = target != -100
    top = logits.topk(5, dim=-1).indices
    expected = [((top[..., :k] == target[..., None]).any(-1) & scored).sum().item() for k in (1, 3, 5)]
    assert hits.tolist() == expected and count == scored.sum().item()


def test_compiles_without_graph_break():
    """The custom ops keep torch.compile(fullgraph=True) whole; aot_eager checks tracing and autograd."""
    hs, ws, labels = _inputs(2, 6, 8, 40, heads=2, ignore_frac=0.2, seed=14)
    hs = [h.float().requires_grad_() for h in hs]
    ws = [w.float().requires_grad_() for w in ws]

    def step(h0, h1, w0, w1):
        return medusa_cross_entropy([h0, h1], [w0, w1], labels, shifts=[1, 2], impl="chunked").sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*hs, *ws), [*hs, *ws])
    ref = torch.autograd.grad(step(*hs, *ws), [*hs, *ws])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("wgrad", WGRADS)
def test_triton_training_follows_torch_loss_curve(wgrad):
    """Three heads (a linear tower each) trained 30 SGD steps: the triton and torch loss curves agree."""
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 8, 16, 64
    features = torch.randn(batch, seq, hidden_size)
    labels = torch.randint(0, vocab, (batch, seq))
    init = [
        (torch.randn(hidden_size, hidden_size) * 0.1, torch.randn(vocab, hidden_size) * 0.3) for _ in range(3)
    ]
    curves = {}
    for impl in ("torch", "triton"):
        params = [(a.clone().requires_grad_(), w.clone().requires_grad_()) for a, w in init]
        opt = torch.optim.SGD([p for pair in params for p in pair], lr=0.5)
        curve = []
        for _ in range(30):
            hiddens = [features + torch.tanh(features @ a.T) for a, _ in params]
            losses = medusa_cross_entropy(
                hiddens, [w for _, w in params], labels, shifts=[2, 3, 4], impl=impl
            )
            opt.zero_grad()
            (losses * torch.tensor([1.0, 0.8, 0.64])).sum().backward()
            opt.step()
            curve.append(losses.detach())
        curves[impl] = torch.stack(curve)
    assert curves["torch"][-1].sum() < 0.5 * curves["torch"][0].sum()  # it did learn
    torch.testing.assert_close(curves["triton"], curves["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_bf16_on_gpu_matches_reference(impl):
    hs, ws, labels = _inputs(2, 300, 256, 5003, heads=2, ignore_frac=0.2, seed=21, device="cuda")
    _check_against_reference(impl, torch.bfloat16, hs, ws, labels, [1, 2], chunk_rows=128)


@pytest.mark.gpu
def test_bf16_autocast_on_gpu_computes_in_bf16():
    hs, ws, labels = _inputs(2, 64, 128, 1000, heads=1, ignore_frac=0.0, seed=22, device="cuda")
    h, w = hs[0].float().requires_grad_(), ws[0].float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, shift=1, impl="triton")
    loss.backward()
    ref = linear_cross_entropy(h.detach().double(), w.detach().double(), labels, shift=1, impl="torch")
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()




@pytest.mark.parametrize("wgrad", WGRADS)
def test_medusa_passes_wgrad_to_the_kernel(wgrad, monkeypatch):
    import fastmedusa.ops.fused as fused

    seen = []
    original = fused.chunk_loop
    monkeypatch.setattr(fused, "chunk_loop", lambda *a, **k: seen.append(k["wgrad"]) or original(*a, **k))
    hs, ws, labels = _inputs(1, 5, 8, 20, heads=2, ignore_frac=0.0, seed=16)
    hs = [h.float().requires_grad_() for h in hs]
    ws = [w.float().requires_grad_() for w in ws]
    medusa_cross_entropy(hs, ws, labels, shifts=[1, 2], impl="chunked", wgrad=wgrad).sum().backward()
    assert seen == [wgrad, wgrad]


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("wgrad", ["accumulate", "recompute"])
def test_fp16_logits_past_65504_give_a_finite_loss(impl, wgrad):
    """Hidden and weight fit fp16, their logits (~1e5) do not: the loss and gradients stay finite and
    match fp64 on the same fp16-rounded inputs."""
    hs, ws, labels = _inputs(2, 6, 16, 40, heads=1, ignore_frac=0.0, seed=21)
    hs, ws = [(hs[0] * 1000).half().double()], [(ws[0] * 30).half().double()]
    assert (hs[0] @ ws[0].T).abs().max() > 65504
    truth = _run_sliced(torch.float64, hs, ws, labels, [1])
    got = _run(impl, torch.float16, hs, ws, labels, [1], wgrad=wgrad)
    for name, g, t in zip(("loss", "d_hidden", "d_weight"), got, truth):
        assert _rel_err(g, t) < 2e-3, name


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_a_second_backward_through_a_fused_loss_says_what_to_do(impl):
    """Gradients are scaled in place in the backward (no extra V x H copy): a retained graph cannot be reused,
    and the error says so instead of autograd's version-counter message."""
    hs, ws, labels = _inputs(1, 6, 8, 20, heads=1, ignore_frac=0.0, seed=15)
    h, w = hs[0].float().requires_grad_(), ws[0].float().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through a fused fastmedusa loss.*impl='torch'"):
        loss.backward()
