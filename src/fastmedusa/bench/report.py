"""`fastmedusa bench report`: markdown tables of ratios from training-benchmark JSON files.

For every grid point: fastmedusa's tokens/s against the fastest peer that fits (torch, liger, cce), and its
peak memory against Liger's, so the README's tables come from the measured rows, never typed in.
"""

from __future__ import annotations

from pathlib import Path

from fastmedusa.bench.common import read_results
from fastmedusa.errors import CommandParser

PEERS = ("torch", "liger", "cce")
TRAIN_KEYS = ("environment", "settings", "shape", "rows")  # a `bench train` results file
TRAIN_ROW_KEYS = ("stage", "heads", "seq_len", "impl")


def _fits(row: dict | None) -> bool:
    return row is not None and not row.get("oom") and not row.get("failed")


def _status(row: dict | None) -> str:
    """Why a point has no tokens/s: the impl was not run there, ran out of memory, or failed."""
    if row is None:
        return "not run"
    return "failed" if row.get("failed") else "OOM"


def ratio_rows(result: dict, ours: str = "triton") -> list[dict]:
    """One dict per (stage, heads, T): our tokens/s and memory next to the best peer's and Liger's."""
    points: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        points.setdefault((row["stage"], row["heads"], row["seq_len"]), {})[row["impl"]] = row
    out = []
    for (stage, heads, seq_len), rows in sorted(points.items()):
        mine = rows.get(ours)
        peers = {name: rows[name] for name in PEERS if _fits(rows.get(name))}
        best = max(peers, key=lambda n: peers[n]["tokens_per_s"], default=None)
        liger = rows.get("liger")
        out.append({
            "stage": stage, "heads": heads, "seq_len": seq_len,
            "ours_tok_s": mine["tokens_per_s"] if _fits(mine) else None,
            "ours_gb": mine["peak_memory_gb"] if _fits(mine) else None,
            "ours_status": None if _fits(mine) else _status(mine),
            "peers_status": "not run" if not any(n in rows for n in PEERS) else "all OOM or failed",
            "best_peer": best, "best_peer_tok_s": peers[best]["tokens_per_s"] if best else None,
            "liger_gb": liger["peak_memory_gb"] if _fits(liger) else None,
        })  # fmt: skip
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    masked = result["settings"].get("masked_frac", 0.0)
    lines = [
        f"{result['shape'].upper()} on {env['device']} ({env['date'][:10]}, torch {env['versions']['torch']}), "
        f"batch {result['settings']['batch_size']}, "
        + (f"first {masked:.0%} of each row unlabelled" if masked else "every token labelled"),
        "",
        "| stage | heads | T | fastmedusa tok/s | best peer tok/s | speed-up | fastmedusa GB | Liger GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ratio_rows(result):
        ours = f"{r['ours_tok_s']:,.0f}" if r["ours_tok_s"] else r["ours_status"]
        peer = f"{r['best_peer_tok_s']:,.0f} ({r['best_peer']})" if r["best_peer"] else r["peers_status"]
        speed = (
            f"{r['ours_tok_s'] / r['best_peer_tok_s']:.2f}x" if r["ours_tok_s"] and r["best_peer"] else "-"
        )
        gb = f"{r['ours_gb']:.1f}" if r["ours_gb"] else "-"
        liger = f"{r['liger_gb']:.1f}" if r["liger_gb"] else "-"
        lines.append(
            f"| {r['stage']} | {r['heads']} | {r['seq_len']} | {ours} | {peer} | {speed} | {gb} | {liger} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = CommandParser(prog="fastmedusa bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by `fastmedusa bench train`")
    args = p.parse_args(argv)
    for path in args.results:
        result = read_results(path, "train", TRAIN_KEYS, TRAIN_ROW_KEYS)
        print(markdown(result), end="\n\n")
    return 0
