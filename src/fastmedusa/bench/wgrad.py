"""`fastmedusa bench wgrad`: how far each weight-gradient scheme of the linear cross-entropy lands from float64.

Schemes (bf16 inputs, mean cross-entropy over N rows, dW of the (V, H) projection):
  inplace      fastmedusa's default: dW summed chunk by chunk in bf16 (each GEMM sums its rows in fp32)
  accumulate   fastmedusa's exact option: an fp32 V x H buffer, one rounding at the end
  recompute    fastmedusa's four-pass mode: each vocab block of dW from one GEMM over all rows
  liger-style  Liger-Kernel's scheme written out here: chunks of next_pow2(N / ceil(V/H)) rows, dlogits
               scaled by 1/N and rounded to bf16, summed into a bf16 dW with addmm (its fused kernel's
               arithmetic, without needing the package or a GPU)
  bf16-rounded the float64 gradient rounded once to bf16: the floor any bf16 gradient sits on
Error = ||dW - dW_float64||_F / ||dW_float64||_F. Runs on the CPU (CPU bf16 GEMMs also sum in fp32) or CUDA.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from fastmedusa.bench.common import environment, positive_int, write_json
from fastmedusa.dtypes import parse_device
from fastmedusa.errors import CommandParser
from fastmedusa.files import check_output_file, is_benchmark_result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench wgrad", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=positive_int, nargs="+", default=[4096, 16384], help="N values (rows = B*T)")
    p.add_argument("--hidden", type=positive_int, default=128, help="hidden size H")
    p.add_argument("--vocab", type=positive_int, default=4096, help="vocabulary size V (V/H sets the chunk count)")
    p.add_argument("--logit-std", type=float, default=3.0, help="standard deviation of the logits")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--out", type=Path, default=Path("bench/results/wgrad_precision.json"), help="JSON path")
    return p.parse_args(argv)


def make_inputs(rows: int, hidden: int, vocab: int, logit_std: float, device, seed: int = 0):
    """bf16 hidden (N, H), weight (V, H) with logits of std ~logit_std, labels (N,) (a tenth ignored)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=gen) * logit_std / hidden**0.5).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.1] = -100
    return h, w, labels.to(device)


def reference_wgrad(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Float64 dW of the mean cross-entropy: ((softmax - onehot) / count)^T @ h, on the bf16 inputs."""
    h64, w64 = h.double(), w.double()
    keep = labels != -100
    probs = torch.softmax(h64[keep] @ w64.T, dim=-1)
    probs[torch.arange(int(keep.sum())), labels[keep]] -= 1.0
    return (probs / keep.sum()).T @ h64[keep]


def liger_style_wgrad(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy dW arithmetic (see the module docstring)."""
    n, hidden = h.shape
    vocab = w.shape[0]
    chunk = 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(vocab / hidden))))
    count = int((labels != -100).sum())
    grad_w = torch.zeros_like(w)
    for start in range(0, n, chunk):
        hc, yc = h[start : start + chunk], labels[start : start + chunk]
        logits = (hc @ w.T).float()
        grad = torch.softmax(logits, dim=-1)
        keep = yc != -100
        grad[keep.nonzero().squeeze(1), yc[keep]] -= 1.0
        grad[~keep] = 0.0
        grad_w.addmm_((grad / count).to(w.dtype).T, hc)
    return grad_w


def fastmedusa_wgrad(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, wgrad: str) -> torch.Tensor:
    from fastmedusa.ops import linear_cross_entropy

    weight = w.clone().requires_grad_()
    impl = "triton" if h.is_cuda else "chunked"
    linear_cross_entropy(h, weight, labels, impl=impl, wgrad=wgrad).backward()
    return weight.grad


def wgrad_errors(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error of every scheme against float64 (module docstring)."""
    ref = reference_wgrad(h, w, labels)

    def err(grad: torch.Tensor) -> float:
        return float((grad.double() - ref).norm() / ref.norm())

    errors = {
        mode: err(fastmedusa_wgrad(h, w, labels, mode)) for mode in ("inplace", "accumulate", "recompute")
    }
    errors["liger-style"] = err(liger_style_wgrad(h, w, labels))
    errors["bf16-rounded"] = err(ref.to(torch.bfloat16))
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_file(args.out, replaces=is_benchmark_result)
    device = parse_device(args.device)
    rows = []
    for n in args.rows:
        h, w, labels = make_inputs(n, args.hidden, args.vocab, args.logit_std, device, args.seed)
        errors = wgrad_errors(h, w, labels)
        rows.append({"rows": n, "hidden": args.hidden, "vocab": args.vocab, **errors})
        print(f"N={n:6d} " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    path = write_json(
        args.out, {"env": environment(device), "args": vars(args) | {"out": str(args.out)}, "rows": rows}
    )
    print(f"wrote {path}")
    return 0
