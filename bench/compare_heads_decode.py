"""Several sets of heads on one prompt set, side by side: Medusa's tokens/step, its speed-up over the same
call's own greedy row, and the Medusa step / greedy step at batch 1 (profiled, and timed where the file has
it), from `fastmedusa bench decode --profile` JSON files.

    python bench/compare_heads_decode.py --run full=b1_full.json --run "draft 16k=b1_draft16384.json" \
        --run full=b1_full_again.json --out heads_decode.json

A label may repeat (a second call with the same heads): each file stays its own point, so the spread between
calls shows. Writes the rows as JSON, a PNG beside it, and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_run(text: str) -> tuple[str, Path]:
    """LABEL=FILE -> (label, path), with a clear error for anything else."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--run wants LABEL=FILE, got {text!r}")
    return label, Path(path)


def heads_rows(label: str, name: str, payload: dict) -> list[dict]:
    """The file's tree rows (medusa, typical) with their own call's greedy row as the baseline."""
    measured = [r for r in payload["rows"] if "tokens_per_s" in r]
    greedy = {r["batch_size"]: r for r in measured if r["row"] == "greedy"}
    profile = payload.get("profile") or {}
    rows = []
    for r in measured:
        if r["row"] == "greedy" or r["batch_size"] not in greedy:
            continue
        base = greedy[r["batch_size"]]
        profiled = timed = None
        if (
            r["row"] == "medusa" and r["batch_size"] == 1
        ):  # the profile is of batch 1's Medusa and greedy steps
            profiled, timed = profile.get("step_ratio"), profile.get("timed_step_ratio")
        rows.append({"heads": label, "source": name, "row": r["row"], "batch_size": r["batch_size"],
                     "tokens_per_s": r["tokens_per_s"], "greedy_tokens_per_s": base["tokens_per_s"],
                     "speedup_vs_greedy": r["tokens_per_s"] / base["tokens_per_s"],
                     "tokens_per_step": r["tokens_per_step"], "tree_nodes": r.get("tree_nodes"),
                     "wall_step_ratio": r["step_ms"] / base["step_ms"], "profiled_step_ratio": profiled,
                     "timed_step_ratio": timed, "matches_greedy": r.get("matches_greedy")})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| heads | batch | row | tokens/step | tokens/s | own greedy tokens/s | speed-up | step ratio, wall | "
             "step ratio, profiled | step ratio, timed | same as greedy | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        profiled, timed = (
            "" if r[k] is None else f"{r[k]:.2f}x" for k in ("profiled_step_ratio", "timed_step_ratio")
        )
        lines.append(f"| {r['heads']} | {r['batch_size']} | {r['row']} | {r['tokens_per_step']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['greedy_tokens_per_s']:,.0f} | {r['speedup_vs_greedy']:.2f}x | "
                     f"{r['wall_step_ratio']:.2f}x | {profiled} | {timed} | {r['matches_greedy'] or ''} | "
                     f"{r['source']} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], env: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmedusa.bench.heads import save_figure

    labels = list(dict.fromkeys(r["heads"] for r in rows))
    # (panel, key, legend) per series: batch sizes in the first two panels, the two step ratios in the third
    medusa = [r for r in rows if r["row"] == "medusa"]
    batches = sorted({r["batch_size"] for r in medusa})
    series = [(0, "tokens_per_step", b) for b in batches] + [(1, "speedup_vs_greedy", b) for b in batches]
    names: tuple[str, ...] = ("Medusa tokens / step", "speed-up over own greedy")
    if any(r[k] is not None for r in medusa for k in ("profiled_step_ratio", "timed_step_ratio")):
        series += [(2, "profiled_step_ratio", "profiled"), (2, "timed_step_ratio", "timed, median of calls")]
        names += ("Medusa step / greedy step, batch 1",)  # only files with a batch-1 profile have this panel
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2))
    for panel, key, legend in series:
        pts = [r for r in medusa if r[key] is not None and (panel == 2 or r["batch_size"] == legend)]
        marker = (
            "osD^v"[batches.index(legend) % 5] if panel < 2 else "o" if key == "profiled_step_ratio" else "x"
        )
        if pts:
            axes[panel].plot([labels.index(r["heads"]) for r in pts], [r[key] for r in pts], marker, ls="none",
                             alpha=0.75, label=f"batch {legend}" if panel < 2 else legend)  # fmt: skip
    for ax, name in zip(axes, names):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[-1].axhline(1.0, color="gray", lw=0.8, ls="--")
    save_figure(fig, path, env, title=title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", type=parse_run, required=True, metavar="LABEL=FILE",
                        help="a bench decode JSON and the label of its heads; repeat for each file")  # fmt: skip
    parser.add_argument("--out", required=True, help="JSON of the rows; the PNG goes beside it")
    parser.add_argument(
        "--title", default=None, help="chart title (default: the first file's prompts and dtype)"
    )
    args = parser.parse_args(argv)
    rows, first = [], None
    for label, path in args.run:
        if not path.is_file():
            parser.error(f"no such file: {path}")
        payload = json.loads(path.read_text())
        first = first or payload
        rows += heads_rows(label, path.name, payload)
    if not rows:
        parser.error("no Medusa or typical row with a greedy row of the same batch size in these files")
    out = Path(args.out)
    title = args.title or f"heads compared: {first.get('prompt_set')}, {first.get('dtype')}"
    out.write_text(json.dumps({"env": first["env"], "runs": [[a, str(b)] for a, b in args.run], "rows": rows},
                              indent=1) + "\n")  # fmt: skip
    plot(rows, first["env"], title, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
