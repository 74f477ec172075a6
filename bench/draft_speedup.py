"""Draft-vocabulary heads against full-vocabulary peers, from two `fastmedusa bench train` result files.

Peers (torch, Liger-Kernel, Cut Cross-Entropy) train full-vocabulary heads: none of them has a draft
vocabulary. This puts fastmedusa's draft-vocabulary row next to every implementation's full-vocabulary row
at each (stage, heads, T), as tokens/s and peak memory, and writes JSON + PNG.

    python bench/draft_speedup.py --full train_1b_stage1_full_h100.json \
        --draft train_1b_stage1_draft32k_h100.json --out draft_speedup_1b_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("torch", "liger", "cce", "triton")
SHAPE_NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3-8B"}  # `fastmedusa bench train --shape`


def _ok(row: dict | None) -> bool:
    return row is not None and not row.get("oom") and not row.get("failed") and "tokens_per_s" in row


def peer_status(row: dict | None) -> str:
    """What became of a peer at a grid point: "ok", "oom", "failed" (its error is in its own file) or "not run"."""
    if row is None:
        return "not run"
    return "ok" if _ok(row) else "oom" if row.get("oom") else "failed"


def grid_key(row: dict) -> tuple:
    """A grid point: rows compare only at equal stage, heads, T and batch size."""
    return row["stage"], row["heads"], row["seq_len"], row.get("batch_size")


def compare(full: dict, draft: dict, ours: str = "triton") -> list[dict]:
    """One row per grid point of the draft run: our draft row against each full-vocabulary row there."""
    points: dict[tuple, dict[str, dict]] = {}
    for row in full["rows"]:
        points.setdefault(grid_key(row), {})[row["impl"]] = row
    out = []
    for row in draft["rows"]:
        if row["impl"] != ours or not _ok(row):
            continue
        key = grid_key(row)
        peers = points.get(key, {})
        point = {"stage": key[0], "heads": key[1], "seq_len": key[2], "batch_size": key[3],
                 "draft_vocab": row["draft_vocab"], "draft_tok_s": row["tokens_per_s"],
                 "draft_gb": row["peak_memory_gb"]}  # fmt: skip
        for name in PEERS:
            peer = peers.get(name)
            point[f"{name}_full_status"] = peer_status(peer)
            point[f"{name}_full_tok_s"] = peer["tokens_per_s"] if _ok(peer) else None
            point[f"{name}_full_gb"] = peer["peak_memory_gb"] if _ok(peer) else None
            point[f"speedup_vs_{name}_full"] = row["tokens_per_s"] / peer["tokens_per_s"] if _ok(peer) else None
        out.append(point)
    return out


def markdown(points: list[dict]) -> str:
    lines = ["| stage, heads, T | draft tokens/s (GB) | " + " | ".join(f"{p} full tokens/s (GB)" for p in PEERS) + " |",
             "|---" * (2 + len(PEERS)) + "|"]  # fmt: skip
    for p in points:
        cells = []
        for name in PEERS:
            tok, gb, ratio = p[f"{name}_full_tok_s"], p[f"{name}_full_gb"], p[f"speedup_vs_{name}_full"]
            status = p.get(f"{name}_full_status", "ok" if tok is not None else "oom")
            cells.append(f"{tok / 1e3:.1f}k ({gb:.1f}); draft {ratio:.2f}x" if tok is not None else status.upper()
                         if status == "oom" else status)  # fmt: skip
        lines.append(f"| {p['stage']}, {p['heads']}, {p['seq_len']} | {p['draft_tok_s'] / 1e3:.1f}k "
                     f"({p['draft_gb']:.1f}) | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(points: list[dict], path: Path, env: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from fastmedusa.bench.heads import save_figure

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    seq = [p["seq_len"] for p in points]
    speed.plot(seq, [p["draft_tok_s"] for p in points], marker="*", markersize=12, label="fastmedusa, draft vocab")
    memory.plot(seq, [p["draft_gb"] for p in points], marker="*", markersize=12, label="fastmedusa, draft vocab")
    for name in PEERS:
        label = f"{'fastmedusa' if name == 'triton' else name}, full vocab"
        statuses = {p.get(f"{name}_full_status", "ok") for p in points}
        if "ok" not in statuses:  # no point to draw: say why in the legend
            label += f" ({'OOM' if statuses == {'oom'} else '/'.join(sorted(statuses))})"
        speed.plot(seq, [p[f"{name}_full_tok_s"] or float("nan") for p in points], marker="o", label=label)
        memory.plot(seq, [p[f"{name}_full_gb"] or float("nan") for p in points], marker="o", label=label)
    speed.set(xlabel="sequence length T", ylabel="training tokens/s", xscale="log")
    memory.set(xlabel="sequence length T", ylabel="peak memory (GB)", xscale="log")
    for ax in (speed, memory):
        ax.set_xticks(seq, [str(s) for s in seq])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, env, title)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", type=Path, nargs="+", required=True,
                   help="bench train JSON, full vocabulary (several: their rows together, e.g. peers run apart)")
    p.add_argument("--draft", type=Path, required=True, help="bench train JSON, --draft-vocab N")
    p.add_argument("--out", type=Path, required=True, help="JSON path (PNG beside)")
    args = p.parse_args(argv)
    full = {"rows": [row for path in args.full for row in json.loads(path.read_text())["rows"]]}
    draft = json.loads(args.draft.read_text())
    points = compare(full, draft)
    env = draft.get("environment", {})
    full_names = [path.name for path in args.full]
    payload = {"environment": env, "full": full_names[0] if len(full_names) == 1 else full_names,
               "draft": args.draft.name, "points": points}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    settings = draft.get("settings", {})
    shape = SHAPE_NAMES.get(settings.get("shape", ""), settings.get("shape", "?"))
    stages = "/".join(str(s) for s in sorted({p["stage"] for p in points}))  # the stages that have rows
    batches = sorted({p["batch_size"] for p in points if p.get("batch_size")})
    batch = f", batch {'/'.join(map(str, batches))}" if batches else ""
    title = f"{shape} shape, stage {stages}{batch}: draft-vocabulary heads vs full-vocabulary peers"
    plot(points, args.out.with_suffix(".png"), env, title)
    print(markdown(points))


if __name__ == "__main__":
    main()
