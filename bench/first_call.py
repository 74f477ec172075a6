"""What a first call costs: each decode mode's first `generate` call on a cold machine, and the prompt's pass.

A SmolLM2-135M-shaped Llama with random weights and 4 fresh heads, bf16, CUDA graphs (step time and compile time
do not depend on weight values). Each variant runs in a fresh Python process with empty TorchInductor and Triton
caches, as on a machine that never ran fastmedusa: its first call (greedy unless `--first`) builds every Triton
kernel and compiles its own step (and the prompt's chunk step, where the variant compiles that on first use);
the other modes' first calls then compile their own steps.
After that, warm calls time the prompt's pass alone (`max_new_tokens=1`, median of 9 calls) for prompts of
16-1024 tokens, and a 64-token generation from a 100-token prompt, greedy and Medusa. Fresh heads start as
copies of the LM head and the random model's output repeats, so Medusa accepts several tokens per step here:
its row times the machinery, not a speed-up heads would give on real text.

Variants (`--variants`, default all): `default`, the library's defaults (FASTMEDUSA_PREFILL_COMPILE=auto: the
prompt's chunk step runs eagerly, captured in a CUDA graph, until 4,096 chunks have run, then compiles);
`compiled`, the chunk step compiled on first use like the decode steps (=1); `captured`, the chunk step never
compiled (=0); `eager`,
`generate(compile=False)`: no step compiled, each one eager and captured in a CUDA graph; `autotuned`, compiled
with inductor's autotuning of pointwise kernels on (FASTMEDUSA_COMPILE_AUTOTUNE=1). `--baseline-src DIR`
adds a variant that imports fastmedusa from DIR (an earlier checkout's src/) for a before/after.

    PYTHONPATH=src python3 bench/first_call.py --out first_call_h100.json
    PYTHONPATH=src python3 bench/first_call.py --plot first_call_h100.json     # the chart again
    PYTHONPATH=src python3 bench/first_call.py --batch 16 --variants compiled shared --out first_call_b16.json

`--batch B` (B > 1): each mode's first call at batch B with 256 new tokens (Medusa rows end apart, so the batch
compacts), then warm calls of the same size; variant `shared` compiles one dynamic-batch step for the full batch
and its compacted sizes (FASTMEDUSA_BATCH_COMPILE=shared) instead of a static one plus a dynamic one.

Modes: plain greedy, Medusa greedy, typical acceptance, plain sampling and exact acceptance (the last three at
temperature 0.7).

`--first MODE [MODE ...]` (greedy, medusa, typical, sampled, exact; default greedy): the mode whose call comes first in each
process, so that it pays every compile a cold machine needs for it; one process per variant and first mode.

Writes the JSON and a PNG beside it. Without CUDA it runs a 2-layer fp32 model as a smoke test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

VARIANTS = {
    "default": {},  # FASTMEDUSA_PREFILL_COMPILE unset: auto
    "compiled": {"FASTMEDUSA_PREFILL_COMPILE": "1"},
    "captured": {"FASTMEDUSA_PREFILL_COMPILE": "0"},
    "eager": {"FIRST_CALL_COMPILE": "0"},
    "shared": {"FASTMEDUSA_BATCH_COMPILE": "shared"},  # with --batch: one dynamic-batch compile for every size
    "autotuned": {"FASTMEDUSA_COMPILE_AUTOTUNE": "1"},  # inductor benchmarks each pointwise kernel's configs
}
SETTINGS = {name for variant in VARIANTS.values() for name in variant}  # set per variant, never inherited
PROMPT_LENGTHS = (16, 64, 128, 256, 512, 1024)
# each mode's first call, in this order: plain greedy, Medusa greedy, typical acceptance (T 0.7), plain
# sampling (T 0.7), exact acceptance (T 0.7)
MODE_LABELS = {"greedy": "greedy", "medusa": "Medusa", "typical": "typical", "sampled": "sampled", "exact": "exact"}
MAX_LEN = 2048  # one engine for every call: no call rebuilds the cache or recompiles for a longer prompt


def child() -> dict:
    """Run in a fresh process: the first calls of each mode, then warm timings. Prints one JSON line."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastmedusa.decode import generate
    from fastmedusa.model import MedusaConfig, MedusaModel

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30 if cuda else 2,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).to(dtype).to(dev).eval()
    model = MedusaModel.from_base(base, MedusaConfig(num_heads=4)).to(device=dev, dtype=dtype).eval()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    compile = None if os.environ.get("FIRST_CALL_COMPILE", "1") == "1" else False
    batch = int(os.environ.get("FIRST_CALL_BATCH", "1"))
    if batch > 1:
        return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                **batch_calls(model, batch, dev, compile, timed)}  # fmt: skip
    ids = torch.randint(1, 49152, (1, 100), device=dev)
    kw = dict(max_new_tokens=64, max_len=MAX_LEN, seed=0, compile=compile)
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    calls = {
        "greedy": partial(generate, model, ids, medusa=False, **kw),
        "medusa": partial(generate, model, ids, tree="mc_sim_7b_63", **kw),
        "typical": partial(generate, model, ids, tree="mc_sim_7b_63", temperature=0.7, **kw),
        "sampled": partial(generate, model, ids, medusa=False, temperature=0.7, **kw),
        "exact": partial(generate, model, ids, tree="mc_sim_7b_63", temperature=0.7, acceptance="exact", **kw),
    }
    # an older checkout (--baseline-src) may lack a mode's arguments: its row leaves that mode out
    if "acceptance" not in inspect.signature(generate).parameters:
        result["modes_left_out"] = ["exact"]
        del calls["exact"]
    result["first_mode"] = first_mode()
    for mode in mode_order(list(calls)):
        result[f"first_{mode}_s"] = timed(calls[mode])
    result["second_greedy_s"] = timed(calls["greedy"])
    prefill = {}
    for length in PROMPT_LENGTHS:
        prompt = torch.randint(1, 49152, (1, length), device=dev)
        one = dict(medusa=False, max_new_tokens=1, max_len=MAX_LEN, compile=compile)
        generate(model, prompt, **one)  # warm
        times = sorted(timed(partial(generate, model, prompt, **one)) for _ in range(9))
        prefill[str(length)] = round(times[len(times) // 2] * 1e3, 3)
    result["prefill_ms"] = prefill
    for name, extra in (("greedy", dict(medusa=False)), ("medusa", dict(tree="mc_sim_7b_63"))):
        gen = sorted(timed(partial(generate, model, ids, **extra, **kw)) for _ in range(9))
        result[f"{name}_64_tokens_ms"] = round(gen[len(gen) // 2] * 1e3, 3)
    for key in [k for k in result if k.endswith("_s")]:
        result[key] = round(result[key], 2)
    return result


def first_mode() -> str:
    return os.environ.get("FIRST_CALL_FIRST", "greedy")


def mode_order(modes: list[str]) -> list[str]:
    """`modes` with the process's first mode (`--first`) moved to the front."""
    first = first_mode()
    return sorted(modes, key=lambda mode: mode != first)  # stable: the rest keep their order


def batch_calls(model, batch: int, dev: str, compile, timed) -> dict:
    """At batch > 1: each mode's first call (256 new tokens, so that Medusa rows end apart and the batch
    compacts), then warm calls of the same size (median of 3), and which step shapes ran."""
    import torch

    from fastmedusa.decode import generate

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49152, (batch, 100), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=256, max_len=MAX_LEN, seed=0, compile=compile)
    modes = {"greedy": dict(medusa=False), "medusa": dict(tree="mc_sim_7b_63")}
    out: dict = {"batch": batch, "first_mode": first_mode()}
    for name in mode_order(list(modes)):
        out[f"first_{name}_s"] = round(timed(partial(generate, model, ids, **modes[name], **kw)), 2)
    for name, extra in modes.items():
        calls = sorted(timed(partial(generate, model, ids, **extra, **kw)) for _ in range(3))
        out[f"{name}_256_tokens_ms"] = round(calls[1] * 1e3, 2)
    result = generate(model, ids, **modes["medusa"], **kw)
    out["medusa_tokens_per_step"] = round(float(result.tokens_per_step), 3)
    from fastmedusa.decode.engine import cached_engine

    runners = [r for r in cached_engine(model.base).compiled.values() if hasattr(r, "states")]
    out["step_shapes"] = sorted({f"{size}{' dynamic' if dyn else ''}" for r in runners for size, dyn in r.states})
    return out


def run_variant(name: str, env_extra: dict, src: str | None, first: str = "greedy") -> dict:
    """One variant in a fresh process with empty compile caches (TorchInductor's and Triton's), its first
    call in mode `first`."""
    with tempfile.TemporaryDirectory() as tmp:
        inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS}  # only the variant's own settings
        env = dict(
            inherited,
            **env_extra,
            FIRST_CALL_FIRST=first,
            TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
            TRITON_CACHE_DIR=f"{tmp}/triton",
        )
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
            )
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {
            "variant": name,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
        }
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if first != "greedy":
        name = f"{name}, {first} first"
    return {"variant": name, **env_extra, "src": src, "process_s": round(wall, 1), **row}


def plot(result: dict, path: Path) -> None:
    """Left: each mode's first call per variant; right: the prompt's pass against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmedusa.bench.heads import save_figure

    rows = [r for r in result["rows"] if "error" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    batch = result.get("batch", 1)
    if batch > 1:
        _plot_batch(rows, left, right)
        env = {"device": result["device"], "date": result["date"], "versions": {"torch": result["torch"]}}
        save_figure(fig, path, env, title=f"first calls and warm calls, SmolLM2-135M shape, bf16, batch {batch}")
        return
    modes = [(f"first_{mode}_s", label) for mode, label in MODE_LABELS.items() if all(f"first_{mode}_s" in r for r in rows)]
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(modes))]
        bars = left.bar(xs, [r[k] for k, _ in modes], width, label=r["variant"])
        left.bar_label(bars, fmt="%.1f", fontsize=7)
        lengths = sorted(int(k) for k in r["prefill_ms"])
        right.plot(lengths, [r["prefill_ms"][str(n)] for n in lengths], "o-", label=r["variant"])
    left.axhline(30, color="gray", lw=0.8, ls="--")
    left.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(modes))], [m for _, m in modes])
    left.set_ylabel("first call, cold caches (s)")
    left.legend(fontsize=8)
    right.set_xscale("log", base=2)
    right.set_xlabel("prompt tokens")
    right.set_ylabel("prompt's pass + first token (ms, median of 9)")
    right.legend(fontsize=8)
    env = {"device": result["device"], "date": result["date"], "versions": {"torch": result["torch"]}}
    save_figure(fig, path, env, title="first calls and the prompt's pass, SmolLM2-135M shape, bf16, batch 1")


def _plot_batch(rows: list[dict], left, right) -> None:
    """Left: first calls per mode and variant; right: warm 256-token calls of the same batch."""
    width = 0.8 / max(len(rows), 1)
    for axis, keys, label in (
        (left, ("first_greedy_s", "first_medusa_s"), "first call, cold caches (s)"),
        (right, ("greedy_256_tokens_ms", "medusa_256_tokens_ms"), "warm call, 256 new tokens (ms, median of 3)"),
    ):
        for i, r in enumerate(rows):
            bars = axis.bar([j + i * width for j in range(len(keys))], [r[k] for k in keys], width, label=r["variant"])
            axis.bar_label(bars, fmt="%.1f", fontsize=7)
        axis.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], ["greedy", "Medusa"])
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    left.axhline(30, color="gray", lw=0.8, ls="--")


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(child()), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument(
        "--baseline-src", default=None, help="also run fastmedusa imported from this src/ directory"
    )
    p.add_argument(
        "--first", nargs="+", choices=list(MODE_LABELS), default=["greedy"],
        help="the mode called first in each process (one process per variant and mode)",
    )
    p.add_argument("--batch", type=int, default=1, help="rows per call (above 1: first and warm batch calls)")
    p.add_argument("--out", type=Path, default=Path("first_call.json"))
    p.add_argument("--plot", type=Path, default=None, help="only redraw the chart of this JSON file")
    args = p.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.batch > 1 and set(args.first) - {"greedy", "medusa"}:
        p.error("--batch above 1 times greedy and Medusa calls only: pass --first greedy or medusa")
    rows = []
    os.environ["FIRST_CALL_BATCH"] = str(args.batch)
    if args.baseline_src:
        rows.append(run_variant("previous code", {}, args.baseline_src))
        print(rows[-1], flush=True)
    for first in args.first:
        for name in args.variants:
            rows.append(run_variant(name, VARIANTS[name], None, first))
            print(rows[-1], flush=True)
    good = [r for r in rows if "error" not in r]
    result = dict(
        device=good[0]["device"] if good else "unknown", torch=good[0]["torch"] if good else None,
        date=time.strftime("%Y-%m-%d"), prompt_lengths=list(PROMPT_LENGTHS), batch=args.batch, rows=rows,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if good:
        plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
