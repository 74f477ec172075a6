"""The fused losses' backward allocates nothing the size of a gradient: the gradients made in the forward are
scaled in place and adopted by autograd, and the op's gradient outputs (which never receive a gradient) get
no zero-filled tensor. Such a tensor per head was one more V x H buffer at the peak (4.2 GB for 4 KL heads at
the Llama-3-8B shape)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmedusa.ops import medusa_cross_entropy, medusa_kl_divergence

ZERO_FILLS = {
    torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default,
    torch.ops.aten.full.default, torch.ops.aten.full_like.default, torch.ops.aten.zero_.default,
    torch.ops.aten.fill_.Scalar,
}  # fmt: skip


class AllocationsLog(TorchDispatchMode):
    """Bytes of every tensor an op returns while active, and of the zero-filled ones among them."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.zero_filled = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:  # a new tensor
                size = t.numel() * t.element_size()
                self.largest = max(self.largest, size)
                if func in ZERO_FILLS:
                    self.zero_filled += size
        return out


def _inputs(k=3, n=96, h=24, v=200, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(n, h, generator=g, dtype=dtype).requires_grad_() for _ in range(k)]
    ws = [(0.3 * torch.randn(v, h, generator=g, dtype=dtype)).requires_grad_() for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return hs, ws, labels


def _losses(kind, hs, ws, labels):
    shifts = list(range(1, len(hs) + 1))
    if kind == "ce":
        return medusa_cross_entropy(hs, ws, labels, shifts=shifts, impl="chunked")
    g = torch.Generator().manual_seed(1)
    th = torch.randn(labels.shape[0], hs[0].shape[1], generator=g, dtype=hs[0].dtype)
    tw = 0.3 * torch.randn(ws[0].shape, generator=g, dtype=ws[0].dtype)
    return medusa_kl_divergence(hs, ws, th, tw, labels, shifts=shifts, impl="chunked", wgrad="inplace")


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_fills_no_zero_gradient_and_copies_none(kind, dtype):
    hs, ws, labels = _inputs(dtype=dtype)
    losses = _losses(kind, hs, ws, labels)
    with AllocationsLog() as log:
        losses.sum().backward()
    weight_bytes = ws[0].numel() * ws[0].element_size()
    assert log.zero_filled == 0
    assert log.largest < weight_bytes  # nothing the size of a head's weight gradient is made in the backward
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in ws)


def test_rows_op_backward_through_the_log_sum_exp_alone_gives_no_gradient():
    from fastmedusa.ops.fused import linear_ce_rows_op

    hs, ws, labels = _inputs(k=1)
    loss_rows, lse = linear_ce_rows_op(hs[0], ws[0], labels, -100, "chunked", 0, "auto")
    lse.sum().backward()  # the log-sum-exp carries no gradient by design
    assert hs[0].grad is None and ws[0].grad is None
    assert loss_rows.shape == labels.shape
