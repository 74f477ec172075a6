"""bench/step_cost.py with the decode attention's tiling taken from a tree_attention_splits sweep ($SWEEP): per
token count (one token, else the tree's), the tiling with the least summed time over the sweep's visible lengths.
(As run, tidied for the linter: the same logic.)

    SWEEP=tree_attention_splits.json DRAFT_VOCABS="0 16384" OUT=best PYTHONPATH=src python3 step_patched.py
"""

import json
import os
import runpy
import sys

import fastmedusa.ops.tree_attention as ta

SWEEP = json.load(open(os.environ["SWEEP"]))


def best_for(tokens: int) -> tuple:
    """(BLOCK_M, BLOCK_N, warps, stages, splits) with the least summed time over every visible length swept."""
    totals: dict[tuple, list[float]] = {}
    for case in SWEEP["cases"]:
        if case["tokens"] == tokens:
            for row in case["all"]:
                if "us" in row and row["tiling"] != "engine rule":
                    totals.setdefault(tuple(row["tiling"]), []).append(row["us"])
    complete = max(len(v) for v in totals.values())
    return min((k for k, v in totals.items() if len(v) == complete), key=lambda k: sum(totals[k]))


ONE, TREE = best_for(1), best_for(64)
print("patched tilings (BM, BN, warps, stages, splits): one token", ONE, "tree", TREE, flush=True)
_launch = ta.launch_tree_attention


def launch_with_sweep_tiling(q, k, v, mask, end, out, tiles=None, splits=None):
    tiling = ONE if q.shape[1] == 1 else TREE
    return _launch(q, k, v, mask, end, out, tiles=tiling[:4], splits=tiling[4])


ta.launch_tree_attention = launch_with_sweep_tiling
sys.argv = ["bench/step_cost.py"]
runpy.run_path("bench/step_cost.py", run_name="__main__")
