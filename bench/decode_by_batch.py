"""One chart and table of Medusa against own greedy decoding across batch sizes, from several
`fastmedusa bench decode` JSON files of one model (each call may cover other batch sizes or trees).

    python bench/decode_by_batch.py --inputs b1.json b16.json b4_b64.json --out decode_by_batch.json

Writes the merged rows (with their source file) as JSON, and a PNG beside it: tokens/s per batch size, and
the Medusa rows' speed-up over the greedy row of the same file and batch size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merged_rows(payloads: dict[str, dict]) -> list[dict]:
    """Every measured row of every file, tagged with its file; speed-ups only against the same file's greedy
    row at the same batch size (rows of different calls are never compared)."""
    rows = []
    for name, payload in payloads.items():
        measured = [r for r in payload["rows"] if "tokens_per_s" in r]
        greedy = {r["batch_size"]: r for r in measured if r["row"] == "greedy"}
        for r in measured:
            base = greedy.get(r["batch_size"])
            speedup = None if base is None else r["tokens_per_s"] / base["tokens_per_s"]
            rows.append({**{k: r.get(k) for k in ("row", "batch_size", "tokens_per_s", "tokens_per_step",
                                                   "step_ms", "tree_nodes")},
                         "speedup_vs_greedy": speedup, "source": name})  # fmt: skip
    return sorted(rows, key=lambda r: (r["batch_size"], r["row"] != "greedy", r["row"]))


def table(rows: list[dict]) -> str:
    lines = ["| batch | row | tree nodes | tokens/s | tokens/step | ms/step | vs own greedy | file |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        speed = "" if r["speedup_vs_greedy"] is None else f"{r['speedup_vs_greedy']:.2f}x"
        lines.append(f"| {r['batch_size']} | {r['row']} | {r['tree_nodes'] or ''} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_step']:.2f} | {r['step_ms']:.2f} | {speed} | {r['source']} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], env: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmedusa.bench.heads import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, color in (("greedy", "tab:blue"), ("medusa", "tab:green"), ("typical", "tab:orange")):
        mine = [r for r in rows if r["row"] == kind]
        if not mine:
            continue
        left.plot([r["batch_size"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", color=color, label=kind)
        if kind != "greedy":
            pts = [r for r in mine if r["speedup_vs_greedy"] is not None]
            right.plot([r["batch_size"] for r in pts], [r["speedup_vs_greedy"] for r in pts], "o-", color=color,
                       label=kind)  # fmt: skip
            for r in pts:
                right.annotate(f"{r['tokens_per_step']:.2f} tok/step\n{r['tree_nodes']} nodes",
                               (r["batch_size"], r["speedup_vs_greedy"]), fontsize=7, ha="left",
                               xytext=(8, 6 if kind == "typical" else -16), textcoords="offset points")  # fmt: skip
    sizes = sorted({r["batch_size"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    speedups = [r["speedup_vs_greedy"] for r in rows if r["row"] != "greedy" and r["speedup_vs_greedy"]]
    if speedups:
        right.set_ylim(min(0.8, min(speedups) - 0.1), max(speedups) * 1.2)
    left.set_yscale("log")
    left.set_ylabel("new tokens / s")
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    right.set_ylabel("speed-up over own greedy (same call)")
    save_figure(fig, path, env, title=title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="bench decode JSON files of one model")
    parser.add_argument("--out", required=True, help="merged JSON; the PNG goes beside it")
    parser.add_argument("--title", default=None, help="chart title (default: the first file's model and prompts)")
    args = parser.parse_args(argv)
    payloads = {Path(p).name: json.loads(Path(p).read_text()) for p in args.inputs}
    first = next(iter(payloads.values()))
    rows = merged_rows(payloads)
    out = Path(args.out)
    title = args.title or f"{first.get('model')}: {first.get('prompt_set')}, {first.get('dtype')}"
    out.write_text(json.dumps({"env": first["env"], "inputs": list(payloads), "rows": rows}, indent=1) + "\n")
    plot(rows, first["env"], title, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
