"""The default weight gradient (bf16 sums chunk by chunk, no fp32 V x H buffer) against float64, beside
Liger-Kernel's bf16 scheme and the exact fp32 option; and its chunks never hold more than twice the hidden
(or 512 rows)."""

import pytest
import torch

from fastmedusa.bench.wgrad import make_inputs, wgrad_errors
from fastmedusa.ops import fused


@pytest.mark.parametrize("rows, hidden, vocab", [(2048, 64, 2048), (3000, 96, 1000)])
def test_default_wgrad_error_is_bounded_and_below_liger_style(rows, hidden, vocab):
    errors = wgrad_errors(*make_inputs(rows, hidden, vocab, logit_std=3.0, device="cpu"))
    # bf16 logits and dlogits already cost ~2.5x the rounding of the result; the per-chunk bf16 sums
    # (V/(2H) = 16 and 5 chunks here) add less than that again
    assert errors["accumulate"] < 4 * errors["bf16-rounded"]
    assert errors["recompute"] < 4 * errors["bf16-rounded"]
    assert errors["accumulate"] <= errors["inplace"] < 1.6 * errors["accumulate"]
    # no worse than Liger's bf16 scheme (as many or fewer chunks; equal counts land within noise)
    assert errors["inplace"] < 1.15 * errors["liger-style"]
    assert errors["inplace"] < 1e-2


def test_inplace_chunks_stay_within_twice_the_hidden():
    v, h = 128256, 4096  # Llama-3
    for n in (6 * 1024, 6 * 4096, 6 * 8192, 300):
        rows = fused.resolve_chunk_rows(0, n, v, n * h)
        liger_rows = 2 ** (-(-n // -(-v // h)) - 1).bit_length()  # next_pow2(ceil(N / ceil(V/H)))
        if rows > fused.MIN_LEAN_CHUNK_ROWS:  # the hidden bound, above the row floor
            assert rows * v <= 2 * n * h  # logits elements <= 2x the hidden's
            assert rows * v * 2 <= liger_rows * v * 2 + n * h * 2  # <= Liger's chunk + its shifted copy (bytes)
        else:  # a small hidden: 512 rows, so that the dW GEMM stays compute-bound (or all the rows)
            assert rows == min(fused.MIN_LEAN_CHUNK_ROWS, -(-n // 128) * 128)
    assert fused.resolve_chunk_rows(0, 6 * 1024, v, 6 * 1024 * 2048) == 512  # 1B, T=1024: was 128 rows
    assert fused.resolve_chunk_rows(0, 6 * 4096, v) == 4096  # "accumulate": the 1 GiB budget as before
    assert fused.resolve_wgrad("auto", torch.bfloat16) == "inplace"
    assert fused.resolve_wgrad("auto", torch.float16) == "accumulate"  # fp16 sums could overflow
