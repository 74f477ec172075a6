"""Tables and a chart from what `bench/recipe_smollm2.sh` wrote: the heads of every run (loss x data),
scored against the base model's own greedy tokens, and the measured MT-Bench decode rows.

For each run, `train` measured each head's per-rank accuracy on held-out first turns against the model's
own greedy continuation and wrote tree.json (copied here as tree_RUN.json). In stage 1 the heads are
independent models on a frozen backbone, so the first k heads of a run stand for a k-head run: their
expected tokens/step is that of the default-size tree (`train`'s tree.json size) built from the first k heads'
accuracies.

    python bench/recipe_report.py bench/results/recipe_smollm2_h100
writes ablation.json and ablation.png there and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmedusa.decode import expected_by_heads
from fastmedusa.decode.trees import info_chains


def read_runs(directory: Path) -> list[dict]:
    runs = []
    for path in sorted(directory.glob("tree_*.json")):
        tree = json.loads(path.read_text())
        name = path.stem.removeprefix("tree_")
        loss, data = name.split("-")[:2]
        acc = tree["rank_accuracies"]
        runs.append({
            "run": name, "loss": loss, "data": data, "heads": len(acc),
            "top1_vs_own_greedy": [round(a[0], 4) for a in acc],
            "top5_vs_own_greedy": [round(sum(a[:5]), 4) for a in acc],
            "positions_scored": tree.get("positions_scored"), "prompts": tree.get("prompts"),
            "prefixes": expected_by_heads(acc, chains=info_chains(tree)),
        })  # fmt: skip
    return runs


def read_decode(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("decode_*.json")):
        payload = json.loads(path.read_text())
        for r in payload["rows"]:
            if "tokens_per_s" in r:
                keep = ("row", "batch_size", "tokens_per_s", "tokens_per_step", "step_ms", "first_call_s",
                        "speedup_vs_greedy", "matches_greedy", "tree_nodes")  # fmt: skip
                rows.append({k: r[k] for k in keep if k in r} | {"file": path.name, "heads": payload["args"]["heads"]})
    return rows


def markdown(runs: list[dict], decode: list[dict]) -> str:
    lines = ["| heads trained with | top-1 vs own greedy, heads 1..K | expected tokens/step with the first 1..K heads |",
             "|---|---|---|"]  # fmt: skip
    for r in runs:
        top1 = " / ".join(f"{100 * a:.1f}" for a in r["top1_vs_own_greedy"])
        expected = " / ".join(f"{p['expected_tokens_per_step']:.2f}" for p in r["prefixes"])
        lines.append(f"| {r['loss'].upper()} on {r['data']} ({r['heads']} heads) | {top1}% | {expected} |")
    lines += ["", "| batch | row | tokens/s | tokens/step | ms/step | vs own greedy |", "|---|---|---|---|---|---|"]
    for d in decode:
        lines.append(f"| {d['batch_size']} | {d['row']} | {d['tokens_per_s']:.0f} | {d['tokens_per_step']:.2f} | "
                     f"{d['step_ms']:.2f} | {d.get('speedup_vs_greedy', 1.0):.2f}x |")  # fmt: skip
    return "\n".join(lines)


def plot(runs: list[dict], decode: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        label = f"{r['loss'].upper()} on {r['data']}"
        left.plot(range(1, r["heads"] + 1), [100 * a for a in r["top1_vs_own_greedy"]], marker="o", label=label)
        mid.plot([p["heads"] for p in r["prefixes"]], [p["expected_tokens_per_step"] for p in r["prefixes"]],
                 marker="o", label=label)  # fmt: skip
    left.set(xlabel="head (predicts t+k+1)", ylabel="held-out top-1 vs own greedy (%)")
    nodes = max((p["tree_nodes"] for r in runs for p in r["prefixes"]), default=0)  # the size these rows used
    mid.set(xlabel="heads used", ylabel=f"expected tokens/step ({nodes}-node tree)")
    labels = [f"b{d['batch_size']} {d['row']}" for d in decode]
    bars = right.bar(labels, [d["tokens_per_s"] for d in decode], color="tab:gray")
    for bar, d in zip(bars, decode):
        right.annotate(f"{d['tokens_per_step']:.2f} tok/step", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom", fontsize=8)  # fmt: skip
    right.set(ylabel="tokens/s, MT-Bench first turns", yscale="log")
    right.tick_params(axis="x", rotation=30)
    for ax in (left, mid):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--title", default="SmolLM2-135M-Instruct Medusa heads")
    args = p.parse_args(argv)
    runs, decode = read_runs(args.directory), read_decode(args.directory)
    (args.directory / "ablation.json").write_text(json.dumps({"runs": runs, "decode": decode}, indent=1) + "\n")
    plot(runs, decode, args.directory / "ablation.png", args.title)
    print(markdown(runs, decode))


if __name__ == "__main__":
    main()
