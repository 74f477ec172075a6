"""Tile sizes of the decode attention kernel against SDPA, kernel alone under CUDA graphs (H100 sweep).

SmolLM2-135M shapes (9 query / 3 KV heads, head_dim 64, bf16, 512-slot cache with 400 visible): one token
and a 65-node tree, batch 1 and 16; each (BLOCK_M, BLOCK_N, warps, stages) timed with
triton.testing.do_bench_cudagraph and checked against the float64 reference (max error printed). The
engine's tiling rule (`fastmedusa.ops.tree_attention._tiles`) comes from this sweep.

Run on a GPU: PYTHONPATH=src python bench/tree_attention_tiles.py
"""

import functools
import itertools

import torch
from triton.testing import do_bench_cudagraph

from fastmedusa.ops.tree_attention import launch_tree_attention, tree_attention_reference, visible_end


def case(T, S=512, used=400, B=1, H=9, KV=3, hd=64, dt=torch.bfloat16):
    """Queries, caches and a mask: a causal prefix of used - T slots, then T tree tokens (causal among them)."""
    q = torch.randn(B, T, H, hd, device="cuda", dtype=dt)
    k = torch.randn(B, KV, S, hd, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    m = torch.zeros(B, T, S, dtype=torch.bool, device="cuda")
    m[:, :, : used - T] = True
    m[:, :, used - T : used] = torch.tril(torch.ones(T, T, dtype=torch.bool, device="cuda"))
    return q, k, v, m


def run(q, k, v, m, e, o, BM, BN, W, S):
    launch_tree_attention(q, k, v, m, e, o, tiles=(BM, BN, W, S))


def main() -> None:
    torch.manual_seed(0)
    for T in (1, 65):
        for B in (1, 16):
            q, k, v, m = case(T, B=B)
            e = visible_end(m)
            o = torch.empty_like(q)
            ref = tree_attention_reference(q, k, v, m)
            res = []
            for BM, BN, W, S in itertools.product((16, 32, 64), (32, 64, 128), (2, 4), (1, 2, 3)):
                if BM > 16 and T == 1:
                    continue
                try:
                    run(q, k, v, m, e, o, BM, BN, W, S)
                    err = (o.double() - ref).abs().max().item()
                    t = do_bench_cudagraph(functools.partial(run, q, k, v, m, e, o, BM, BN, W, S), rep=30)
                    res.append((t * 1000, BM, BN, W, S, err))
                except Exception as ex:  # a tiling that does not compile or fit: report it, go on
                    print("fail", BM, BN, W, S, str(ex)[:100])
            mq = q.transpose(1, 2)
            bias = torch.zeros(m.shape, dtype=q.dtype, device="cuda").masked_fill(~m, -1e30)[:, None]
            sdpa = torch.nn.functional.scaled_dot_product_attention
            ts = do_bench_cudagraph(functools.partial(sdpa, mq, k, v, attn_mask=bias, enable_gqa=True), rep=30)
            res.sort()
            best = [f"{r[0]:.2f}us BM{r[1]} BN{r[2]} W{r[3]} S{r[4]} err{r[5]:.1e}" for r in res[:4]]
            current = [f"{r[0]:.2f}" for r in res if r[2] == 64 and r[3] == 4 and r[4] == 3 and r[1] == (16 if T == 1 else 64)]
            print(f"T={T} B={B} sdpa {ts * 1000:.2f}us; best:", best, "current(16/64,64,4,def):", current)


if __name__ == "__main__":
    main()
