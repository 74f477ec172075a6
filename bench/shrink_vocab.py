"""Full-vocabulary heads against the same heads cut to N tokens by `fastmedusa shrink-vocab`.

For one trained run, as a user would run it: `fastmedusa shrink-vocab RUN --draft-vocab N` for each N, then
for the full heads and every shrunk copy `fastmedusa eval` (held-out top-1 against the data and against the
model's own greedy tokens, expected tokens/step of each heads' own tree.json, all on the run's held-out split)
and `fastmedusa bench decode` (measured tokens/step on MT-Bench first turns, prompts the run never trained on;
with --profile, the Medusa step's time over a greedy step's, the number the shrink is for).

Writes OUT_DIR/shrink_vocab.json (environment, every command, every result) and shrink_vocab.png.
Results already in OUT_DIR are reused (delete a variant's files to redo it).

    python bench/shrink_vocab.py --run runs/demo --sizes 16384 8192 4096 --out-dir runs/shrink
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_heads import FASTMEDUSA, run  # noqa: E402  (one way to run the CLI and stop on failure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `fastmedusa train --output-dir` of full-vocabulary heads")
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 8192, 4096], help="draft vocabularies")
    p.add_argument("--model", default=None, help="base model (default: the run's)")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts continued greedily in eval")
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--bench-prompts", default="mt-bench", help="prompts of `bench decode` (--prompts)")
    p.add_argument("--bench-num-prompts", type=int, default=8)
    p.add_argument("--bench-new-tokens", type=int, default=96)
    p.add_argument("--bench-rows", nargs="+", default=["greedy", "medusa"])
    p.add_argument("--profile", action="store_true", help="bench decode --profile: the step-time ratio")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", required=True)
    return p.parse_args(argv)


def split_flags(run_dir: Path) -> list[str]:
    """The run's own split, passed explicitly: a shrunk copy has no train_config.json beside it."""
    config = json.loads((run_dir / "train_config.json").read_text())
    flags = ["--data", config["data"] or "embedded", "--eval-size", str(config["eval_size"])]
    flags += ["--seed", str(config["seed"]), "--seq-len", str(config["seq_len"])]
    return flags + ["--max-conversations", str(config.get("max_conversations") or "all")]


def model_flags(args: argparse.Namespace) -> list[str]:
    return (["--model", args.model] if args.model else []) + (["--device", args.device] if args.device else [])


def evaluate(args: argparse.Namespace, heads: Path, out: Path) -> dict:
    result_path = out.with_suffix(".eval.json")
    cmd = [*FASTMEDUSA, "eval", str(heads), *split_flags(Path(args.run)), *model_flags(args)]
    cmd += ["--prompts", str(args.eval_prompts), "--new-tokens", str(args.eval_new_tokens), "--output", str(result_path)]
    if not result_path.exists():
        run(cmd, out.with_suffix(".eval.log"))
    return {"command": shlex.join(cmd[2:]), **json.loads(result_path.read_text())}


def bench_decode(args: argparse.Namespace, heads: Path, out: Path) -> dict:
    result_path = out.with_suffix(".decode.json")
    cmd = [*FASTMEDUSA, "bench", "decode", "--heads", str(heads), "--prompts", args.bench_prompts, *model_flags(args)]
    cmd += ["--num-prompts", str(args.bench_num_prompts), "--batch-sizes", "1", "--rows", *args.bench_rows]
    cmd += ["--new-tokens", str(args.bench_new_tokens), "--out", str(result_path)] + (["--profile"] * args.profile)
    if not result_path.exists():
        run(cmd, out.with_suffix(".decode.log"))
    payload = json.loads(result_path.read_text())
    rows = {r["row"]: {k: r[k] for k in ("tokens_per_step", "tokens_per_s", "step_ms", "matches_greedy") if k in r}
            for r in payload["rows"] if "tokens_per_step" in r}  # fmt: skip
    profile = payload.get("profile") or {}
    ratios = {k: profile[k] for k in ("step_ratio", "timed_step_ratio") if profile.get(k) is not None}
    return {"command": shlex.join(cmd[2:]), "rows": rows, **ratios}


def variant(args: argparse.Namespace, name: str, heads: Path, out_dir: Path, size: int | None) -> dict:
    out = out_dir / name
    record = {"name": name, "draft_vocab": size, "heads": str(heads)}
    if size is not None:
        cmd = [*FASTMEDUSA, "shrink-vocab", args.run, "--draft-vocab", str(size), "--output", str(heads)]
        cmd += [*model_flags(args), "--tree-prompts", str(args.eval_prompts)]
        record["shrink_command"] = shlex.join(cmd[2:])
        if not (heads / "config.json").exists():
            record["shrink_seconds"] = run(cmd, out.with_suffix(".shrink.log"))
        record["coverage"] = json.loads((heads / "config.json").read_text())["draft_vocab_source"]
    record["eval"] = evaluate(args, heads, out)
    record["decode"] = bench_decode(args, heads, out)
    return record


def summary(record: dict) -> dict:
    """The numbers the table and the chart show."""
    evaluation, decode = record["eval"], record["decode"]
    medusa = decode["rows"].get("medusa", {})
    return {
        "greedy_top1": evaluation.get("greedy", {}).get("top1"),
        "data_top1": evaluation["labels"]["top1"],
        "expected_tokens_per_step": evaluation.get("tree", {}).get("expected_tokens_per_step"),
        "tokens_per_step": medusa.get("tokens_per_step"),
        "step_ratio": decode.get("timed_step_ratio", decode.get("step_ratio")),
    }


def plot(results: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["full" if r["draft_vocab"] is None else f"{r['draft_vocab']}" for r in results]
    sums = [summary(r) for r in results]
    panels = [("tokens_per_step", "measured tokens/step (MT-Bench)"),
              ("expected_tokens_per_step", "expected tokens/step (own tree.json)")]  # fmt: skip
    if all(s["step_ratio"] for s in sums):
        panels.append(("step_ratio", "Medusa step / greedy step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        values = [s[key] or 0.0 for s in sums]
        ax.bar(labels, values, color=["tab:gray", *["tab:blue"] * (len(values) - 1)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("draft vocabulary (tokens)")
    fig.suptitle(f"Full-vocabulary heads cut by shrink-vocab: {env.get('device', '')}, {env.get('date', '')}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from fastmedusa.bench.common import environment, write_json

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [variant(args, "full", Path(args.run) / "heads", out_dir, None)]
    for size in args.sizes:
        results.append(variant(args, f"draft{size}", out_dir / f"draft{size}", out_dir, size))
    for record in results:
        print(f"{record['name']}: " + " | ".join(f"{k} {v}" for k, v in summary(record).items()), flush=True)
    env = environment()
    write_json(out_dir / "shrink_vocab.json", {"env": env, "settings": vars(args), "runs": results})
    plot(results, env, out_dir / "shrink_vocab.png")
    print(f"results in {out_dir / 'shrink_vocab.json'} and shrink_vocab.png")


if __name__ == "__main__":
    main()
