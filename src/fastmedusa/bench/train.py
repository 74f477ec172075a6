"""`fastmedusa bench train`: the seed's memory/throughput grid on one GPU.

Random-weight Llama models of real shapes (memory and speed do not depend on weight values), the real
`fastmedusa.train` step (bf16 params, fused AdamW, gradient checkpointing), stage 1 and 2, 3 and 5 heads,
T in {1024, 2048, 4096, 8192}, batch 6, the heads' loss by impl = torch | compile | liger | cce | quack |
triton. One JSON row per run (OOM is a result, and so is a peer that fails to run) and PNG charts laid out
like the seed's.

--draft-vocab N: heads over a draft vocabulary of N tokens (`MedusaConfig(draft_vocab_size=N)`); for speed
the token map is the first N ids (which ids does not change the work) and the synthetic tokens fall inside
it with probability --draft-coverage (a 32k map covers ~98% of chat tokens; the rest are not scored).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from fastmedusa.bench.common import (
    checked,
    environment,
    fraction,
    nonnegative_int,
    positive_int,
    probability,
    read_results,
    wrapped_title,
    write_json,
)
from fastmedusa.dtypes import parse_device
from fastmedusa.errors import CommandParser
from fastmedusa.files import check_output_file, is_benchmark_result
from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.train.config import DTYPES
from fastmedusa.train.metrics import PEAK_BF16_TFLOPS, peak_tflops, synchronize, train_flops_per_token

# Public hyper-parameters (config.json of meta-llama/Meta-Llama-3-8B and Llama-3.2-1B).
SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # A few-MB model of the same family, so the harness itself is tested on the CPU.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
}


IMPLS = ["torch", "compile", "chunked", "liger", "cce", "quack", "triton"]
FUSED_IMPLS = ("chunked", "triton")  # fastmedusa's own losses: --loss-chunk-rows applies to these
EXTERNAL = ("liger", "cce", "quack")  # peers from other packages: a failure is recorded, not raised


def build_random_llama(shape: str, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM of a real shape with random weights, built directly on the GPU in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in dtype: no fp32 copy of 8B parameters
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def synthetic_batch(
    batch_size: int,
    seq_len: int,
    vocab: int,
    device: torch.device,
    masked_frac: float = 0.0,
    seed: int = 0,
    draft_vocab: int = 0,
    draft_coverage: float = 1.0,
) -> dict:
    """Full-length rows. masked_frac = 0: every position labelled (the seed's setting); otherwise the
    first masked_frac of each row is a prompt with label -100, as in SFT data (ShareGPT with assistant-only
    labels, SmolLM2 template, T 1024-4096: 23-27% of tokens are not labelled)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    if draft_vocab:  # tokens of the map (the first draft_vocab ids) with probability draft_coverage
        inside = torch.randint(0, draft_vocab, ids.shape, generator=gen)
        outside = torch.randint(min(draft_vocab, vocab - 1), vocab, ids.shape, generator=gen)
        ids = torch.where(torch.rand(ids.shape, generator=gen) < draft_coverage, inside, outside)
    ids = ids.to(device)
    labels = ids.clone()
    labels[:, : int(masked_frac * seq_len)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_trainer(model: MedusaModel, stage: int, impl: str, args) -> object:
    """The real `fastmedusa.train.Trainer`, configured like the seed: bf16 params, fused AdamW,
    gradient checkpointing (a no-op in stage 1, where the frozen backbone runs without grad)."""
    from fastmedusa.train import TrainConfig, Trainer

    config = TrainConfig(
        stage=stage, num_heads=model.medusa_config.num_heads, num_layers=model.medusa_config.num_layers,
        batch_size=args.batch_size, seq_len=max(args.seq_lens), max_steps=1000, lr=1e-5,
        param_dtype=args.dtype, dtype=args.dtype, gradient_checkpointing=stage == 2, impl=impl, device=args.device,
        progress=False, plot=False, output_dir=str(args.scratch), log_every=10**9, save_every=0, eval_every=0,
        loss_chunk_rows=args.loss_chunk_rows if impl in FUSED_IMPLS else 0,
    )  # fmt: skip
    return Trainer(model, config, total_steps=1000)


def time_steps(trainer, batch: dict, warmup: int, steps: int) -> list[float]:
    """Seconds per optimisation step (train_step syncs once per step to check the loss, so wall time is exact)."""
    for _ in range(warmup):
        trainer.train_step(batch)
    times = []
    for _ in range(steps):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.train_step(batch)
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def profile_step(trainer, batch: dict, stage: int, impl: str) -> dict:
    """Where a step's time goes: the heads' loss (forward + backward), the optimizer, and the rest
    (the backbone: forward, plus backward and recomputation in stage 2). Each part timed on its own."""
    model = trainer.model
    with torch.no_grad(), trainer._autocast():
        hidden = model.backbone_hidden_states(batch["input_ids"], batch["attention_mask"])
    hidden = hidden.detach().requires_grad_(stage == 2)

    def heads_loss():
        with trainer._autocast():
            lm, heads = model.medusa_heads(hidden, batch["labels"], with_lm_loss=stage == 2, impl=impl)
        (heads.sum() + (lm if lm is not None else 0)).backward()

    def optimizer_step():
        trainer.optimizer.step()

    heads_s = statistics.median(_wall(heads_loss, 3, trainer.device))
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    opt_s = statistics.median(_wall(optimizer_step, 3, trainer.device))
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"heads_loss_s": heads_s, "optimizer_s": opt_s}


def _wall(fn, repeats: int, device: torch.device) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def run_point(base, shape: str, stage: int, heads: int, seq_len: int, impl: str, args) -> dict:
    """One grid point; an OOM is recorded as a result."""
    from fastmedusa.bench.common import is_oom

    row = {"shape": shape, "stage": stage, "heads": heads, "seq_len": seq_len, "impl": impl,
           "batch_size": args.batch_size, "masked_frac": args.masked_frac, "draft_vocab": args.draft_vocab or None,
           "loss_chunk_rows": (args.loss_chunk_rows or None) if impl in FUSED_IMPLS else None}  # fmt: skip
    model = trainer = batch = None
    try:
        config = MedusaConfig(num_heads=heads, num_layers=1, draft_vocab_size=args.draft_vocab or None)
        model = MedusaModel.from_base(base, config)  # a draft token map defaults to the first N ids
        trainer = make_trainer(model, stage, impl, args)
        device = torch.device(args.device)
        batch = synthetic_batch(
            args.batch_size, seq_len, base.config.vocab_size, device, args.masked_frac,
            draft_vocab=args.draft_vocab, draft_coverage=args.draft_coverage,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(trainer, batch, args.warmup, args.steps)
        step_s = statistics.median(times)
        tokens = args.batch_size * seq_len
        row.update(
            step_s=step_s, step_times_s=times, tokens_per_s=tokens / step_s,
            peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            mfu=tokens * train_flops_per_token(model, seq_len, stage) / step_s / ((peak_tflops(device) or float("nan")) * 1e12),
            oom=False,
        )  # fmt: skip
        if args.profile:
            row["profile"] = profile_step(trainer, batch, stage, impl)
    except Exception as err:  # noqa: BLE001 - an OOM is a result, so is a peer's failure; else re-raised
        if is_oom(err):
            row.update(oom=True, error=str(err).splitlines()[0][:200])
        elif impl in EXTERNAL:
            row.update(oom=False, failed=True, error=f"{type(err).__name__}: {err}"[:400])
        else:
            raise
    finally:
        del model, trainer, batch
        base.zero_grad(set_to_none=True)
        free_cuda()
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="Llama-3.2-1B or Llama-3-8B shape")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                   help="1: backbone frozen, heads train; 2: both train (gradient checkpointing)")
    p.add_argument("--heads", type=positive_int, nargs="+", default=[3, 5], help="numbers of Medusa heads")
    p.add_argument("--seq-lens", type=sequence_length, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="tokens per row, one grid point each")
    p.add_argument("--impls", nargs="+", default=["torch", "compile", "liger", "cce", "quack", "triton"],
                   choices=IMPLS, help="heads' loss implementations")  # fmt: skip
    p.add_argument("--draft-vocab", type=nonnegative_int, default=0,
                   help="heads over a draft vocabulary of N tokens (token map: the first N ids); 0 = full")  # fmt: skip
    p.add_argument("--draft-coverage", type=probability, default=0.98,
                   help="with --draft-vocab: probability that a token is inside the draft vocabulary")  # fmt: skip
    p.add_argument("--loss-chunk-rows", type=nonnegative_int, default=0,
                   help="rows of logits per chunk of fastmedusa's loss (0: the library's automatic size)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=6, help="rows per step (no accumulation)")
    p.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the harness)"
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="parameter and autocast dtype")
    p.add_argument("--masked-frac", type=fraction, default=0.0,
                   help="fraction of each row labelled -100 (a prompt); 0 = every token trained, as the seed")  # fmt: skip
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps per point")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per point (median reported)")
    p.add_argument("--profile", action="store_true", help="also time the heads' loss and optimizer alone")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (PNG beside); default bench/results/train_<shape>_<device>.json",
    )
    p.add_argument("--plot", type=Path, nargs="+", default=None, help="only merge these JSON files and plot")
    p.add_argument(
        "--scratch", type=Path, default=Path("/tmp/fastmedusa-bench-train"), help="trainer output dir"
    )
    return p.parse_args(argv)


sequence_length = checked(  # --seq-lens: a head needs a position and a later target
    int, lambda v: v >= 2, "a sequence length of 2 or more", "sequence_length"
)


def device_tag(name: str) -> str:
    return next((k.lower() for k in PEAK_BF16_TFLOPS if k in name), "cpu" if "cuda" not in name else "gpu")


def run_grid(args) -> dict:
    """Every (stage, heads, T, impl) point on one model, written to JSON after each point."""
    device = parse_device(args.device)
    env = environment(device)
    out = args.out or Path(f"bench/results/train_{args.shape}_{device_tag(env['device'])}.json")
    check_output_file(out, replaces=is_benchmark_result, beside=(".png",))  # before minutes of model building
    base = build_random_llama(args.shape, device, DTYPES[args.dtype])
    result = {"benchmark": "train", "environment": env, "shape": args.shape, "config": SHAPES[args.shape],
              "settings": {k: v for k, v in vars(args).items() if k not in ("plot", "out", "scratch")},
              "peak_tflops": peak_tflops(device), "rows": []}  # fmt: skip
    for stage in args.stages:
        for heads in args.heads:
            for seq_len in args.seq_lens:
                for impl in args.impls:
                    row = run_point(base, args.shape, stage, heads, seq_len, impl, args)
                    result["rows"].append(row)
                    print(format_row(row), flush=True)
                    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    return result


def format_row(row: dict) -> str:
    head = f"{row['shape']} stage {row['stage']} K{row['heads']} T{row['seq_len']:5d} {_variant_label(*_variant(row)):>7}"
    if row.get("oom"):
        return f"{head}: OOM"
    if row.get("failed"):
        return f"{head}: failed ({row['error']})"
    return (f"{head}: {row['tokens_per_s']:9.0f} tok/s  {row['peak_memory_gb'] or 0:6.1f} GB  MFU {row['mfu']:.2f}"
            + (f"  heads-loss {row['profile']['heads_loss_s']*1e3:.0f} ms opt {row['profile']['optimizer_s']*1e3:.0f} ms"
               f" step {row['step_s']*1e3:.0f} ms" if "profile" in row else ""))  # fmt: skip


def _variant(row: dict) -> tuple[str, int | None]:
    """A row's bar: its impl and, for fastmedusa's losses, a chunk size other than the automatic one."""
    return row["impl"], row.get("loss_chunk_rows")


def _variant_label(impl: str, chunk_rows: int | None) -> str:
    name = "fastmedusa (triton)" if impl == "triton" else impl
    return f"{name}, {chunk_rows}-row chunks" if chunk_rows else name


def plot(result: dict, path: Path) -> Path:
    """Seed layout: one panel per stage x heads; memory (top) and tokens/s (bottom) vs T, bars per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["stage"], r["heads"]) for r in rows})
    impls = sorted({_variant(r) for r in rows}, key=lambda v: (IMPLS.index(v[0]), v[1] or 0))
    seqs = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for col, (stage, heads) in enumerate(panels):
        for metric, ax in zip(("peak_memory_gb", "tokens_per_s"), axes[:, col]):
            for i, impl in enumerate(impls):
                xs, ys, ooms = [], [], []
                for j, t in enumerate(seqs):
                    r = next((r for r in rows if (r["stage"], r["heads"], r["seq_len"], _variant(r)) == (stage, heads, t, impl)), None)  # fmt: skip
                    if r is None:
                        continue
                    x = j + (i - (len(impls) - 1) / 2) * width
                    missing = r["oom"] or r.get("failed", False)
                    (ooms if missing else xs).append(x)
                    if not missing:
                        ys.append(r[metric] or 0.0)  # no peak memory on the CPU
                label = _variant_label(*impl)
                ax.bar(xs, ys, width, label=label)
                ax.scatter(ooms, [0] * len(ooms), marker="x", color="red", zorder=3)
            ax.set_xticks(range(len(seqs)), [str(t) for t in seqs])
            ax.set_title(f"{result['shape'].upper()} stage {stage}, {heads} heads", fontsize=10)
            ax.set_ylabel("peak memory (GB)" if metric == "peak_memory_gb" else "tokens/s")
            ax.set_xlabel("sequence length (x = OOM or failed)")
    handles, names = axes[0, 0].get_legend_handles_labels()  # below the panels: bars fill the axes' tops
    ncol = max(1, min(len(names), int(fig.get_figwidth() / 3)))  # ~3 inches a label
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8)
    env = result["environment"]
    masked = result["settings"].get("masked_frac", 0.0)
    labels = f"first {masked:.0%} of each row unlabelled (SFT-like)" if masked else "every token labelled"
    draft = result["settings"].get("draft_vocab")
    if draft:
        labels += f", heads over a {draft}-token draft vocabulary (first {draft} ids)"
    wrapped_title(fig, f"fastmedusa bench train: batch {result['settings']['batch_size']}, bf16, AdamW, grad ckpt, "
                  f"{labels}; {env['device']}, {env['date'][:10]}, torch {env['versions']['torch']}")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03 * -(-len(names) // ncol) + 0.01, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        from fastmedusa.bench.report import TRAIN_KEYS, TRAIN_ROW_KEYS

        results = [read_results(p, "train", TRAIN_KEYS, TRAIN_ROW_KEYS) for p in args.plot]
        merged = dict(results[0], rows=[r for res in results for r in res["rows"]])
        print(plot(merged, args.plot[0].with_suffix(".png")))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "fastmedusa bench train needs a CUDA GPU; --device cpu --shape tiny runs a smoke test"
        )
    run_grid(args)
    return 0
