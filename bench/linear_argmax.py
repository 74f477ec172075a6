"""Greedy decoding's last op, argmax(hidden @ lm_head^T), as cuBLAS + argmax against the fused Triton kernel.

Kernel alone under CUDA graphs (triton.testing.do_bench_cudagraph), bf16, for the rows of a greedy step
(batch x tokens per verify pass: 1 for a plain step at batch 1, 64 for a 63-node tree, up to 64 x 64):
- "torch": F.linear then argmax, what the decode step ran before (cuBLAS GEMM, logits written, then read);
- "fused": `fastmedusa.ops.linear_argmax` with its default tiles;
- a sweep of tiles (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages) per row count, from which the defaults come.
Each fused result is compared with torch's argmax of the same bf16 logits: they may differ only where two
logits are within rounding of each other (the summation order differs), so the JSON records how many rows
agree. Shapes: SmolLM2-135M (V 49,152, H 576) and Llama-3-8B (V 128,256, H 4,096).

    PYTHONPATH=src python bench/linear_argmax.py [--out DIR]
    PYTHONPATH=src python bench/linear_argmax.py --plot DIR/linear_argmax.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"smollm2-135m": (49152, 576), "llama3-8b": (128256, 4096)}
ROWS = {"smollm2-135m": (1, 4, 16, 64, 256, 1024, 4096), "llama3-8b": (1, 16, 64, 256)}
SWEEP = list(itertools.product((16, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4)))
SWEEP_AT = {("smollm2-135m", 1), ("smollm2-135m", 64), ("smollm2-135m", 1024)}  # (shape, rows) swept


def time_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return 1e3 * do_bench_cudagraph(fn, rep=40)


def torch_argmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w).argmax(-1)


def measure(shape: str, m: int, sweep: bool) -> dict:
    from fastmedusa.ops.linear_argmax import _default_block, linear_argmax_triton

    vocab, hidden = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) / hidden**0.5).contiguous()
    want = torch_argmax(x, w)
    row = {"shape": shape, "vocab": vocab, "hidden": hidden, "rows": m,
           "default_block": list(_default_block(m, x.device)),
           "torch_us": round(time_us(functools.partial(torch_argmax, x, w)), 2)}  # fmt: skip
    got = linear_argmax_triton(x, w)
    row["fused_us"] = round(time_us(functools.partial(linear_argmax_triton, x, w)), 2)
    row["agree_rows"], row["checked_rows"] = int((got == want).sum()), m
    if sweep:
        tried = []
        for block in SWEEP:
            if block[0] > max(16, 2 * m):  # row tiles far larger than the rows: same work, wasted lanes
                continue
            try:
                fn = functools.partial(linear_argmax_triton, x, w, None, block)
                agree = int((fn() == want).sum())
                tried.append({"block": list(block), "us": round(time_us(fn), 2), "agree_rows": agree})
            except Exception as e:  # a tiling that does not compile or fit in shared memory: recorded
                tried.append({"block": list(block), "error": str(e)[:200]})
        ok = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
        row["sweep_best"] = ok[:5]
        row["sweep_failed"] = sum("error" in t for t in tried)
    print(json.dumps({k: v for k, v in row.items() if k != "sweep_best"}), row.get("sweep_best", [])[:2], flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmedusa.bench.heads import save_figure

    shapes = sorted({r["shape"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.0 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = sorted((r for r in result["rows"] if r["shape"] == shape), key=lambda r: r["rows"])
        ms = [r["rows"] for r in rows]
        ax.plot(ms, [r["torch_us"] for r in rows], "o-", label="F.linear + argmax (cuBLAS)")
        ax.plot(ms, [r["fused_us"] for r in rows], "s-", label="fused linear_argmax (default tiles)")
        swept = [r for r in rows if r.get("sweep_best")]
        if swept:
            ax.plot([r["rows"] for r in swept], [r["sweep_best"][0]["us"] for r in swept], "x", ms=9,
                    label="fused, best tiles of the sweep")
        for r in rows:
            ax.annotate(f"{r['torch_us'] / r['fused_us']:.2f}x", (r["rows"], r["fused_us"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (batch x tokens per verify pass)")
        ax.set_ylabel("µs per call (CUDA graph)")
        ax.set_title(f"{shape}: V {rows[0]['vocab']:,}, H {rows[0]['hidden']:,}, bf16", fontsize=9)
        ax.legend(fontsize=8)
    env = {"device": result["device"], "date": result["date"], "versions": {"torch": result["torch"]}}
    save_figure(fig, path, env, title="greedy tokens from hidden states: argmax(h W^T)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for linear_argmax.json/.png")
    parser.add_argument("--no-sweep", action="store_true", help="default tiles only")
    parser.add_argument("--plot", type=Path, help="redraw the chart of a results JSON and exit")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/linear_argmax.py times CUDA kernels: run it on a GPU")
    import triton

    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "triton": triton.__version__, "rows": []}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "linear_argmax.json"
    for shape in SHAPES:
        for m in ROWS[shape]:
            result["rows"].append(measure(shape, m, not args.no_sweep and (shape, m) in SWEEP_AT))
            path.write_text(json.dumps(result, indent=1))  # row by row: a run cut short keeps what it measured
    plot(result, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
