"""`fastmedusa bench decode`: generation speed, HF generate vs fastmedusa's engine (plain and Medusa).

Heads are trained in the same run (stage 1 via `fastmedusa.train`) unless `--heads` is given; prompts are
the first user turns of the conversations training held out, chat-templated, batch 1. Rows: HF generate
(dynamic cache), HF generate (static cache), own plain greedy, and Medusa greedy + typical acceptance for
each tree (`auto:N` = a tree of N nodes built from head accuracies measured on other held-out prompts).
Every row generates exactly `--new-tokens` tokens (EOS ignored, so rows do equal work) unless
`--stop-at-eos`. Each row is warmed up (compilation, CUDA graphs) on the first prompt, then timed over all
prompts: tokens/s = tokens / wall seconds, tokens/step = tokens / model forwards. Medusa greedy rows
report how many prompts match own greedy token for token. Writes JSON (after every row) + PNG.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastmedusa.bench.common import environment, is_oom, write_json
from fastmedusa.bench.heads import add_model_arguments, held_out_prompts, measure_rank_accuracies, save_figure
from fastmedusa.decode import build_tree, expected_accept_length, generate, resolve_tree

ROWS = ("hf-dynamic", "hf-static", "greedy", "medusa", "typical")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastmedusa bench decode", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--heads", default=None, help="trained heads directory (default: train them in this run)")
    p.add_argument("--num-heads", type=int, default=3, help="heads to train when --heads is not given")
    p.add_argument("--train-steps", type=int, default=400, help="stage-1 steps when training in this run")
    p.add_argument("--train-batch-size", type=int, default=8, help="rows per training step")
    p.add_argument("--train-seq-len", type=int, default=512, help="tokens per training row")
    p.add_argument("--train-dir", default="runs/bench_decode", help="where the run's heads are written")
    p.add_argument("--prompts", type=int, default=16, help="timed held-out prompts")
    p.add_argument(
        "--calibration-prompts", type=int, default=16, help="other held-out prompts for auto trees"
    )
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument(
        "--trees", nargs="+", default=["auto:16", "auto:32", "auto:64"], help="auto:N, presets or JSON files"
    )
    p.add_argument(
        "--temperature", type=float, default=0.7, help="temperature of the typical-acceptance rows"
    )
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="which kinds of rows to run")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (rows then do unequal work)")
    p.add_argument(
        "--out", type=Path, default=Path("bench/results/decode.json"), help="JSON path (PNG beside)"
    )
    return p.parse_args(argv)


def train_heads(args: argparse.Namespace) -> tuple[str, dict]:
    """Stage-1 heads on the same data split the prompts are held out from."""
    from fastmedusa.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        data=args.data,
        max_conversations=args.max_conversations,
        eval_size=args.eval_size,
        seed=args.seed,
        num_heads=args.num_heads,
        max_steps=args.train_steps,
        batch_size=args.train_batch_size,
        seq_len=args.train_seq_len,
        output_dir=args.train_dir,
        eval_every=0,
        save_every=0,
        device=args.device or "auto",
    )
    summary = train(config)
    keep = ("seconds", "tokens_per_s", "steps", "first_eval", "final_eval", "heads_dir")
    return summary["heads_dir"], {k: summary[k] for k in keep if k in summary} | {"config": config.to_dict()}


def resolve_trees(args, model, calibration, eos) -> tuple[list[tuple[str, list]], dict]:
    """(label, paths) per --trees entry; `auto:N` trees from rank accuracies on the calibration prompts."""
    num_heads = model.medusa_heads.num_heads
    info: dict = {}
    trees = []
    for spec in args.trees:
        if spec.startswith("auto:"):
            if "rank_accuracies" not in info:
                acc, counts = measure_rank_accuracies(model, calibration, 128, 10, eos)
                info = {"rank_accuracies": acc.tolist(), "positions_scored": counts.tolist()}
            acc = torch.tensor(info["rank_accuracies"])
            paths = build_tree(acc, int(spec[len("auto:") :]))
            info[spec] = {"expected_tokens_per_step": expected_accept_length(paths, acc), "paths": paths}
            trees.append((spec, paths))
        else:
            trees.append((spec, [list(p) for p in resolve_tree(spec, num_heads)]))
    return trees, info


def hf_generate(base, ids, new_tokens: int, static: bool, eos, pad_id):
    extra = {"cache_implementation": "static"} if static else {}
    if eos is None:
        extra["min_new_tokens"] = new_tokens
    out = base.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id, **extra
    )
    return out[0, ids.shape[1] :]


def timed(fn, device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def run_row(name: str, fn, prompts: list[torch.Tensor], device: torch.device) -> dict:
    """Warm up on the first prompt, then time every prompt. fn(ids) -> (new token ids, steps)."""
    fn(prompts[0])
    fn(prompts[0])
    tokens, steps, seconds, outputs = 0, 0, 0.0, []
    for ids in tqdm(prompts, desc=name, leave=False):
        (new, n_steps), secs = timed(lambda ids=ids: fn(ids), device)
        tokens, steps, seconds = tokens + new.numel(), steps + n_steps, seconds + secs
        outputs.append(new.cpu())
    return {
        "row": name,
        "tokens": tokens,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": tokens / steps,
        "outputs": outputs,
    }


def row_functions(args, model, trees, eos, pad_id, max_len):
    """name -> fn(ids) -> (new ids, steps), in --rows order."""
    base, n = model.base, args.new_tokens
    own = dict(max_new_tokens=n, eos_token_id=eos, max_len=max_len)

    def engine(**kw):
        def fn(ids):
            out = generate(model, ids.to(args.device_obj), **own, **kw)
            return out.new_token_ids, out.steps

        return fn

    def hf(static):
        return lambda ids: (
            (new := hf_generate(base, ids.to(args.device_obj), n, static, eos, pad_id)),
            new.numel(),
        )

    rows = {}
    for kind in args.rows:
        if kind in ("hf-dynamic", "hf-static"):
            rows[kind] = hf(kind == "hf-static")
        elif kind == "greedy":
            rows["greedy"] = engine(medusa=False)
        else:
            for label, paths in trees:
                temp = args.temperature if kind == "typical" else 0.0
                rows[f"{kind} {label} ({len(paths)} nodes)"] = engine(tree=paths, temperature=temp)
    return rows


def agreement(row: dict, reference: dict | None) -> dict:
    """How many prompts a greedy row reproduces token for token, and the mean matching prefix fraction."""
    if reference is None:
        return {}
    same, prefix = 0, 0.0
    for a, b in zip(row["outputs"], reference["outputs"]):
        n = min(a.numel(), b.numel())
        diff = (a[:n] != b[:n]).nonzero()
        common = n if diff.numel() == 0 else int(diff[0])
        same += int(common == n and a.numel() == b.numel())
        prefix += common / max(b.numel(), 1)
    return {
        "matches_greedy": f"{same}/{len(row['outputs'])}",
        "greedy_prefix_fraction": prefix / len(row["outputs"]),
    }


def add_speedups(rows: list[dict]) -> None:
    by_name = {r["row"]: r for r in rows if "tokens_per_s" in r}
    for ref in ("greedy", "hf-static"):
        if ref in by_name:
            for r in by_name.values():
                r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / by_name[ref]["tokens_per_s"]


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    names = [r["row"] for r in rows][::-1]
    speeds = [r["tokens_per_s"] for r in rows][::-1]
    bars = ax.barh(names, speeds, color=["tab:gray" if n.startswith("hf") else "tab:blue" for n in names])
    for bar, r in zip(bars, rows[::-1]):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {r['tokens_per_step']:.2f} tok/step",
            va="center",
            fontsize=8,
        )
    env = payload["env"]
    ax.set(
        xlabel="tokens / s (batch 1)",
        title=f"decode: {payload['model']}, {payload['args']['new_tokens']} new tokens, {payload['dtype']}",
    )
    save_figure(fig, path, env)


def main(argv: list[str] | None = None) -> int:
    from fastmedusa.decode.cli import eos_token_ids, resolve_device_dtype
    from fastmedusa.model import MedusaModel, load_tokenizer

    args = parse_args(argv)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.device_obj = device
    payload = {"env": environment(device), "args": {k: v for k, v in vars(args).items() if k != "device_obj"}}
    payload.update(
        model=args.model or "embedded SmolLM2-135M-Instruct", dtype=str(dtype).replace("torch.", "")
    )
    heads_dir = args.heads
    if heads_dir is None:
        heads_dir, payload["training"] = train_heads(args)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    tokenizer = load_tokenizer(args.model)
    model = MedusaModel.from_pretrained(args.model, heads=heads_dir, dtype=dtype, device=device).eval()
    prompts = held_out_prompts(args, tokenizer)
    timed_prompts = prompts[: args.prompts]
    calibration = prompts[args.prompts : args.prompts + args.calibration_prompts] or timed_prompts
    payload["calibration_overlaps_timed_prompts"] = calibration is timed_prompts
    eos = None if not args.stop_at_eos else eos_token_ids(tokenizer, model.base)
    trees, payload["trees"] = resolve_trees(args, model, calibration, eos_token_ids(tokenizer, model.base))
    longest = max(p.shape[1] for p in timed_prompts) + args.new_tokens + max(len(p) for _, p in trees) + 2
    max_len = -(-longest // 256) * 256  # one engine (one set of compiled steps) for every prompt
    payload.update(
        prompts=len(timed_prompts), prompt_tokens=[p.shape[1] for p in timed_prompts], max_len=max_len
    )
    payload["rows"] = rows = []
    reference = None
    for name, fn in row_functions(args, model, trees, eos, tokenizer.pad_token_id, max_len).items():
        try:
            row = run_row(name, fn, timed_prompts, device)
        except Exception as err:  # one failing row (OOM, compile error) must not lose the others
            if device.type == "cuda" and is_oom(err):
                torch.cuda.empty_cache()
            rows.append({"row": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(f"{name}: FAILED {rows[-1]['error']}")
            continue
        if name == "greedy":
            reference = row
        if name.startswith("medusa") or name.startswith("hf"):
            row.update(agreement(row, reference))
        rows.append(row)
        add_speedups(rows)
        print_row(row)
        write_json(args.out, strip_outputs(payload))
    write_json(args.out, strip_outputs(payload))
    plot(strip_outputs(payload), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def strip_outputs(payload: dict) -> dict:
    return payload | {"rows": [{k: v for k, v in r.items() if k != "outputs"} for r in payload["rows"]]}


def print_row(row: dict) -> None:
    extra = "".join(f", {k} {row[k]:.2f}x" for k in ("speedup_vs_greedy", "speedup_vs_hf-static") if k in row)
    match = f", matches greedy {row['matches_greedy']}" if "matches_greedy" in row else ""
    print(
        f"{row['row']:>34}: {row['tokens_per_s']:8.1f} tok/s, {row['tokens_per_step']:.2f} tok/step{extra}{match}"
    )
