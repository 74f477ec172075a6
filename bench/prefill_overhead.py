"""What a `generate` call costs besides its steps: the prompt's pass through the cache, eager or in chunks.

Each `generate` call first writes the prompt's K/V into the cache. Eagerly, one forward over the whole prompt
launches every op of every layer from Python (thousands of kernel launches for a 30-layer model); in chunks
(`FASTMEDUSA_PREFILL_CHUNK`, default 64), the prompt is left-padded to a multiple of the chunk and each chunk
is one replay of a compiled, captured step. This times, per prompt length and chunk setting, a call that
makes one token (`max_new_tokens=1`: the prefill and the first token) and a call of `--new-tokens` tokens,
wall clock, after warm-up calls that compile and capture. One engine (fixed `max_len`) serves every call.

Default model: a random Llama of SmolLM2-135M-Instruct's shape (30 layers, hidden 576, 9/3 heads, vocabulary
49,152), which times like the real one; or `--model` (a local path or hub id). Writes JSON and a PNG.

    PYTHONPATH=src python bench/prefill_overhead.py --out bench/results/prefill_h100/prefill.json
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import torch

from fastmedusa.bench.common import environment, median, write_json
from fastmedusa.bench.decode import synced_seconds
from fastmedusa.bench.heads import save_figure
from fastmedusa.decode import generate

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip


def random_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=dtype).eval()


def call_ms(model, prompt: torch.Tensor, new_tokens: int, max_len: int, repeats: int) -> list[float]:
    """Wall milliseconds of each of `repeats` generate calls (the device drained before and after each)."""
    run = functools.partial(
        generate, model, prompt, max_new_tokens=new_tokens, medusa=False, max_len=max_len, max_batch_size=1
    )
    return [1e3 * synced_seconds(run, prompt.device)[1] for _ in range(repeats)]


def measure(model, args, device) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in args.prompt_lens}
    for chunk in args.chunks:
        os.environ["FASTMEDUSA_PREFILL_CHUNK"] = str(chunk)
        for n, prompt in prompts.items():
            call_ms(model, prompt, args.new_tokens, args.max_len, args.warmup)  # compile, capture
            first = call_ms(model, prompt, 1, args.max_len, args.repeats)
            full = call_ms(model, prompt, args.new_tokens, args.max_len, args.repeats)
            row = {
                "prefill_chunk": chunk,
                "prompt_tokens": n,
                "one_token_call_ms": median(first),
                "call_ms": median(full),
                "new_tokens": args.new_tokens,
            }
            # a step's time from the two calls: what the longer call adds per token after the first
            row["step_ms"] = (row["call_ms"] - row["one_token_call_ms"]) / (args.new_tokens - 1)
            rows.append(row)
            print(
                f"chunk {chunk:4d}  prompt {n:5d}: 1-token call {row['one_token_call_ms']:8.2f} ms, "
                f"{args.new_tokens}-token call {row['call_ms']:8.2f} ms, step {row['step_ms']:.3f} ms",
                flush=True,
            )
    return rows


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for chunk in sorted({r["prefill_chunk"] for r in payload["rows"]}):
        rows = [r for r in payload["rows"] if r["prefill_chunk"] == chunk]
        label = "eager, whole prompt" if chunk == 0 else f"chunks of {chunk}, compiled + CUDA graph"
        ax.plot([r["prompt_tokens"] for r in rows], [r["one_token_call_ms"] for r in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms per generate call of 1 token")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, payload["env"], title="Prompt through the cache: " + payload["model"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local path or hub id (default: random SmolLM2-135M shape)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64], help="0: the eager whole-prompt pass")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048, help="cache slots (one engine for every call)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)  # tests: a smaller random model
    parser.add_argument("--out", default="bench/results/prefill_overhead.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the step time comes from the difference of two calls)")
    for chunk in args.chunks:  # room for each chunk's padding, or generate would quietly run one forward
        padded = -(-max(args.prompt_lens) // chunk) * chunk if chunk > 0 else max(args.prompt_lens)
        if padded + args.new_tokens > args.max_len:
            parser.error(f"--max-len {args.max_len} is too small for prompts of {max(args.prompt_lens)} tokens "
                         f"in chunks of {chunk} plus {args.new_tokens} new tokens")  # fmt: skip
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device).eval()
        name = args.model
    else:
        shape = dict(SMOLLM2_135M, **(eval_free_shape(args.shape) if args.shape else {}))
        model, name = random_model(shape, device, dtype), "random SmolLM2-135M shape"
    saved = os.environ.get("FASTMEDUSA_PREFILL_CHUNK")
    try:
        rows = measure(model, args, device)
    finally:
        if saved is None:
            os.environ.pop("FASTMEDUSA_PREFILL_CHUNK", None)
        else:
            os.environ["FASTMEDUSA_PREFILL_CHUNK"] = saved
    payload = {"env": environment(device), "model": name, "dtype": args.dtype, "args": vars(args), "rows": rows}
    path = write_json(args.out, payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def eval_free_shape(text: str) -> dict:
    """'hidden_size=64,num_hidden_layers=2' -> a dict of ints (no eval)."""
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


if __name__ == "__main__":
    main()
