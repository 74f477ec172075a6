"""The decode attention kernel's tiling and cache splits at the shapes of real decode steps (GPU sweep).

`bench/tree_attention_tiles.py` chose the tiles at 400 visible slots of a 512-slot cache. A decode step of
SmolLM2 at batch 1 sees fewer (a 128-token prompt and up to a few hundred new tokens) in a larger cache (the
engine's `max_len`), and the cache splits (`_splits`) are chosen from the cache's size. This sweep times
every (BLOCK_M, BLOCK_N, warps, stages, splits) for one token (a plain step) and 64 tokens (a 63-node tree
plus its root; $TOKENS), at several visible lengths ($VISIBLE) of a 1024-slot cache ($SLOTS), kernel alone under CUDA graphs, each
checked against the float64 reference; and the engine's own rule (`launch_tree_attention` without
overrides) beside them. Writes JSON ($OUT/tree_attention_splits.json): every timing, and per (tokens,
visible) the best tiling and the rule's.

Run on a GPU: PYTHONPATH=src OUT=. python bench/tree_attention_splits.py
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from fastmedusa.environment import environment
from fastmedusa.ops.tree_attention import launch_tree_attention, tree_attention_reference, visible_end

SLOTS = int(os.environ.get("SLOTS", 1024))
TOKENS = [int(t) for t in os.environ.get("TOKENS", "1 64").split()]
VISIBLE = [int(v) for v in os.environ.get("VISIBLE", "160 400").split()]
TILINGS = list(itertools.product((16, 32), (32, 64, 128), (2, 4), (2, 3), (1, 2, 4, 8)))


def case(tokens: int, visible: int, slots: int = SLOTS, heads: int = 9, kv_heads: int = 3, hd: int = 64):
    """SmolLM2's attention shapes: a causal prefix of visible - tokens slots, then the step's tokens, causal
    among themselves (a chain: as many visible slots per token as in a tree of that depth or more)."""
    q = torch.randn(1, tokens, heads, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, slots, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(1, tokens, slots, dtype=torch.bool, device="cuda")
    mask[:, :, : visible - tokens] = True
    mask[:, :, visible - tokens : visible] = torch.tril(
        torch.ones(tokens, tokens, dtype=torch.bool, device="cuda")
    )
    return q, k, v, mask


def time_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1000


def sweep_case(tokens: int, visible: int) -> dict:
    q, k, v, mask = case(tokens, visible)
    end = visible_end(mask)
    out = torch.empty_like(q)
    ref = tree_attention_reference(q, k, v, mask)
    rule = functools.partial(launch_tree_attention, q, k, v, mask, end, out)
    rule()
    rows = [
        {"tiling": "engine rule", "us": time_us(rule), "max_err": (out.double() - ref).abs().max().item()}
    ]
    for bm, bn, warps, stages, splits in TILINGS:
        if bm > 16 and tokens == 1:
            continue
        run = functools.partial(
            launch_tree_attention, q, k, v, mask, end, out, tiles=(bm, bn, warps, stages), splits=splits
        )
        try:
            run()
            err = (out.double() - ref).abs().max().item()
            rows.append({"tiling": [bm, bn, warps, stages, splits], "us": time_us(run), "max_err": err})
        except Exception as e:  # a tiling that does not compile or fit: recorded, the sweep goes on
            rows.append({"tiling": [bm, bn, warps, stages, splits], "error": str(e)[:200]})
    timed = sorted((r for r in rows if "us" in r and r["tiling"] != "engine rule"), key=lambda r: r["us"])
    return {"tokens": tokens, "visible": visible, "engine_rule": rows[0], "best": timed[:5], "all": rows}


def main() -> None:
    torch.manual_seed(0)
    started = time.time()
    cases = []
    for tokens, visible in itertools.product(TOKENS, VISIBLE):
        result = sweep_case(tokens, visible)
        cases.append(result)
        best = result["best"][0]
        print(
            f"T={tokens} visible={visible}: rule {result['engine_rule']['us']:.2f} us, best {best['us']:.2f} us "
            f"{best['tiling']} (BM, BN, warps, stages, splits), err {best['max_err']:.1e}",
            flush=True,
        )
    out = Path(os.environ.get("OUT", ".")) / "tree_attention_splits.json"
    out.write_text(json.dumps({
        "benchmark": "tree_attention_splits", "environment": environment("cuda"), "slots": SLOTS,
        "triton": triton.__version__, "seconds": round(time.time() - started, 1), "cases": cases,
    }, indent=1))  # fmt: skip
    print("wrote", out)


if __name__ == "__main__":
    main()
