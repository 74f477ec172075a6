"""Probe (GPU): the attention kernel's inputs inside real decode steps, and the kernel alone on copies of them.

Runs `bench/step_cost.py`'s model (SmolLM2-135M shape, random bf16 weights, heads over 16,384 tokens) with CUDA
graphs off, so that every attention launch passes through Python; records the launches' inputs; then times the
kernel alone under CUDA graphs on copies with the recorded strides and on contiguous copies. Run from the
repository root: PYTHONPATH=src python3 bench/results/step_cost_attention_inputs_h100/probe_attention_inputs.py
"""

import os
import sys

os.environ["FASTMEDUSA_CUDA_GRAPHS"] = "off"
sys.path.insert(0, "bench")

import step_cost  # noqa: E402
import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import fastmedusa.ops.tree_attention as ta  # noqa: E402
from fastmedusa.decode.generate import generate  # noqa: E402

RECORDED: list[dict] = []
LAUNCH = ta.launch_tree_attention


def same_strides(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def recording_launch(q, k, v, mask, kv_end, out, *args, **kwargs):
    if len(RECORDED) < 3000 and not torch.cuda.is_current_stream_capturing():
        RECORDED.append(dict(tokens=q.shape[1], mask_strides=mask.stride(), kv_end=int(kv_end[0]),
                             inputs=(q.clone(), k.clone(), v.clone(), same_strides(mask), kv_end.clone())))  # fmt: skip
    return LAUNCH(q, k, v, mask, kv_end, out, *args, **kwargs)


def kernel_us(q, k, v, mask, kv_end) -> float:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return do_bench_cudagraph(lambda: LAUNCH(q, k, v, mask, kv_end, out), rep=30) * 1000


def main() -> None:
    ta.launch_tree_attention = recording_launch
    model = step_cost.with_heads(step_cost.build_base(), 16384)
    ids = torch.randint(1, 49152, (1, 128), device="cuda")
    for medusa in (False, True):
        RECORDED.clear()
        generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, medusa=medusa, max_len=1024,
                 tree="mc_sim_7b_63" if medusa else None)  # fmt: skip
        steps = [r for r in RECORDED if r["tokens"] == (64 if medusa else 1) and r["kv_end"] > 128]  # no prompt
        print(f"medusa {medusa}: mask strides {steps[0]['mask_strides']}")
        for r in (steps[0], steps[len(steps) // 2], steps[-1]):
            q, k, v, mask, kv_end = r["inputs"]
            as_passed = kernel_us(q, k, v, mask, kv_end)
            contiguous = kernel_us(q.contiguous(), k, v, mask.contiguous(), kv_end)
            print(f"  kv_end {r['kv_end']}: as in step {as_passed:.2f} us, contiguous q+mask {contiguous:.2f} us")


if __name__ == "__main__":
    main()
