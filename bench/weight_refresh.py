"""What the decode engine's per-call weight refresh costs: `DecodeEngine.sync_weights`, run at the start of every
`generate` call, copies each layer's q/k/v and gate/up weights into the engine's fused matrices again (fused
optimizers and writes through `.data` change weights without a version count, so nothing cheaper is reliable).

For random-weight bf16 Llamas of real shapes (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B): the copy's time (CUDA
events, median of 10 after 2 warm-up calls), the bytes it reads and writes, and the rate that makes. Without
CUDA it runs the SmolLM2 shape in fp32 on the CPU as a smoke test.

    PYTHONPATH=src python bench/weight_refresh.py --out weight_refresh.json
    PYTHONPATH=src python bench/weight_refresh.py --plot weight_refresh.json   # the chart again
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastmedusa.bench.common import (
    cuda_times_ms,
    environment,
    median,
    read_results,
    wrapped_title,
    write_json,
)
from fastmedusa.decode.engine import get_engine

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048)  # fmt: skip
    with device:
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def fused_bytes(engine) -> int:
    """Bytes of the fused copies (read once from the model's weights and written once)."""
    names = ("wqkv", "bqkv", "wgate_up", "bgate_up")
    return sum(t.numel() * t.element_size() for w in engine.layers for n in names if (t := getattr(w, n)) is not None)


def measure(shape: str, device: torch.device, dtype: torch.dtype) -> dict:
    model = build(shape, device, dtype)
    engine = get_engine(model, min_len=256)
    refresh = functools.partial(engine.sync_weights, model)
    if device.type == "cuda":
        times = cuda_times_ms(refresh, warmup=2, repeats=10)
    else:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            refresh()
            times.append(1e3 * (time.perf_counter() - start))
    size = fused_bytes(engine)
    ms = median(times)
    row = dict(shape=shape, dtype=str(dtype).removeprefix("torch."), fused_copy_bytes=size, refresh_ms=ms,
               refresh_ms_runs=times, read_write_gb_per_s=2 * size / (ms * 1e-3) / 1e9)  # fmt: skip
    del refresh, engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar([r["shape"] for r in rows], [r["refresh_ms"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        moved = 2 * r["fused_copy_bytes"] / 1e9
        label = f"{r['refresh_ms']:.2f} ms\n{moved:.2f} GB moved, {r['read_write_gb_per_s']:.0f} GB/s"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("per-call weight refresh (ms)")
    ax.set_yscale("log")
    ax.margins(y=0.35)
    env = result["environment"]
    wrapped_title(fig, f"decode engine: fused q/k/v + gate/up copied at each generate call, "
                       f"{env['device']} · {env['date'][:10]} · torch {env['versions'].get('torch')}")  # fmt: skip
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=130)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("weight_refresh.json"))
    p.add_argument("--plot", type=Path, help="redraw the chart of this results file, run nothing")
    args = p.parse_args(argv)
    if args.plot:
        result = read_results(args.plot, "weight_refresh", ["environment", "rows"], ["shape", "refresh_ms"])
        print(plot(result, args.plot))
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = list(SHAPES) if cuda else ["smollm2-135m"]
    result = {"benchmark": "weight_refresh", "environment": environment(), "rows": []}
    for shape in shapes:
        row = measure(shape, device, dtype)
        result["rows"].append(row)
        print(f"{shape:14s} {row['refresh_ms']:8.3f} ms  {2 * row['fused_copy_bytes'] / 1e9:6.2f} GB moved  "
              f"{row['read_write_gb_per_s']:7.0f} GB/s")  # fmt: skip
    write_json(args.out, result)
    print(plot(result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
