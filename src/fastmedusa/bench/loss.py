"""`fastmedusa bench loss`: the multi-head linear cross-entropy (or, with --loss kl, the KL divergence to a
teacher projection), fastmedusa's kernel against its peers.

Forward + backward of K heads (K distinct (V, H) bf16 weights, K hiddens (B, T, H), shifts 1..K), for
each impl: median ms over CUDA-event-timed repeats, peak memory above the inputs and their gradients,
and the fraction of the FLOP bound at the bf16 matmul rate measured in the same run: 6*N*H*V*K for the
CE, (2 + 6K)*N*H*V for the KL (the teacher's logits once, then logits, dH and dW per head). With --loss kl
a teacher (B, T, H) hidden and (V, H) weight join the inputs; head k with shift s at t learns the teacher's
row t+s-1. Weights are scaled so the logits have a standard deviation of ~3 (a trained LM's, not a flat
softmax). OOM is a row, not a crash. Writes JSON (+ PNG) under bench/results/. --device cpu runs the
harness on tiny shapes (wall-clock times, no memory figures).

--draft-vocab N: the heads (and the KL's teacher) project onto N rows, as `MedusaConfig(draft_vocab_size=N)`
heads do. For speed the token map is the first N ids (which ids they are does not change the work);
labels fall inside it with probability --draft-coverage (the rest are ignored by the heads, as outside the
draft vocabulary), and are mapped to draft rows before timing. Every impl, peers included, gets the same
(N, H) weights and mapped labels.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from fastmedusa.bench.common import (
    cuda_times_ms,
    environment,
    fraction,
    is_oom,
    matmul_tflops,
    median,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    read_results,
    wrapped_title,
    write_json,
)
from fastmedusa.dtypes import parse_device
from fastmedusa.errors import CommandParser
from fastmedusa.files import check_output_file, is_benchmark_result
from fastmedusa.ops.peers import PeerUnavailable

CE_IMPLS = (
    "torch",
    "compile",
    "chunked",
    "liger",
    "cce",
    "quack",
    "triton",
    "triton-fp32acc",
    "triton-recompute",
)
# triton: the default dW sums (in the gradient's bf16 for Llama-3, no extra memory); triton-fp32acc: fp32 sums
KL_IMPLS = ("torch", "chunked", "liger", "liger-chunked", "triton", "triton-fp32acc")
IMPL_CHOICES = tuple(dict.fromkeys(CE_IMPLS + KL_IMPLS))
PEERS = {"ce": ("torch", "compile", "liger", "cce", "quack"), "kl": ("torch", "liger", "liger-chunked")}
OWN = ("chunked", "triton", "triton-fp32acc", "triton-recompute")  # fastmedusa's losses: --chunk-rows sizes them
EXTERNAL = (
    "liger",
    "liger-chunked",
    "cce",
    "quack",
)  # a failure of theirs is a row with the error, not a crash
DEFAULTS = {  # per loss: T values, head counts, output file
    "ce": ([1024, 2048, 4096, 8192], [1, 4, 6], "bench/results/loss.json"),
    "kl": ([1024, 4096], [1, 4], "bench/results/loss_kl.json"),
}
BENCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench loss", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--loss", choices=("ce", "kl"), default="ce", help="ce: cross-entropy; kl: KL divergence to a teacher"
    )
    p.add_argument(
        "--seq-lens", type=positive_int, nargs="+", default=None, help="T values (ce: 1024..8192, kl: 1024 4096)"
    )
    p.add_argument(
        "--heads", type=positive_int, nargs="+", default=None, help="numbers of heads K (ce: 1 4 6, kl: 1 4)"
    )
    p.add_argument("--batch", type=positive_int, default=6, help="batch size B")
    p.add_argument("--hidden", type=positive_int, default=4096, help="hidden size H")
    p.add_argument("--vocab", type=positive_int, default=128256, help="vocabulary size V")
    p.add_argument(
        "--draft-vocab", type=int, default=0, help="heads over a draft vocabulary of N tokens (0: the full V)"
    )
    p.add_argument(
        "--draft-coverage",
        type=probability,
        default=0.98,
        help="with --draft-vocab: fraction of labels inside the draft vocabulary (the rest are not scored)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=None,
        choices=IMPL_CHOICES,
        help=f"ce: {CE_IMPLS}; kl: {KL_IMPLS} (default: all)",
    )
    p.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the harness)"
    )
    p.add_argument("--dtype", choices=tuple(BENCH_DTYPES), default="bf16", help="dtype of inputs and weights")
    p.add_argument(
        "--chunk-rows", type=positive_int, default=None, help="fastmedusa chunk size (default: the library's)"
    )
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls per row")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per row (the median is reported)")
    p.add_argument("--logit-std", type=positive_float, default=3.0, help="standard deviation of the logits")
    p.add_argument(
        "--prompt-frac",
        type=fraction,
        default=0.0,
        help="fraction of each sequence masked as a prompt (-100), as SFT labels are; 0 = every token scored",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path, PNG beside (ce: bench/results/loss.json, kl: loss_kl.json)",
    )
    p.add_argument("--plot", type=Path, nargs="+", default=None, help="only merge these JSON files and plot")
    args = p.parse_args(argv)
    seqs, heads, out = DEFAULTS[args.loss]
    args.seq_lens, args.heads = args.seq_lens or seqs, args.heads or heads
    args.out = args.out or Path(out)
    if args.draft_vocab and not 10 <= args.draft_vocab <= args.vocab:
        raise ValueError(
            f"--draft-vocab {args.draft_vocab}: pass 10..{args.vocab} (--vocab), or 0 for the full"
        )
    allowed = CE_IMPLS if args.loss == "ce" else KL_IMPLS
    args.impls = args.impls or list(allowed)
    wrong = [i for i in args.impls if i not in allowed]
    if wrong:
        raise ValueError(
            f"--impls {' '.join(wrong)}: not an impl of --loss {args.loss}; pick from {' '.join(allowed)}"
        )
    return args


def make_inputs(batch, seq, hidden, vocab, heads, logit_std, device, prompt_frac=0.0, dtype=torch.bfloat16):
    """K hiddens N(0,1), K weights N(0, (std/sqrt(H))^2) so logits have std ~logit_std, random labels
    whose first prompt_frac of each sequence is masked."""
    gen = torch.Generator(device=device).manual_seed(seq * 10 + heads)
    hs = [
        torch.randn(batch, seq, hidden, device=device, generator=gen, dtype=dtype).requires_grad_()
        for _ in range(heads)
    ]
    ws = []
    for _ in range(heads):
        w = torch.randn(vocab, hidden, device=device, generator=gen, dtype=dtype)
        ws.append(w.mul_(logit_std / hidden**0.5).requires_grad_())
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    labels[:, : int(prompt_frac * seq)] = -100
    return hs, ws, labels


def draft_labels_for_bench(labels, vocab: int, draft_vocab: int, coverage: float, seed: int):
    """Labels with the token map = the first N ids: a `coverage` fraction of the scored ones redrawn inside
    it, the rest outside; then mapped to draft rows (outside: -100) the way the heads map them."""
    from fastmedusa.model.heads import draft_labels, inverse_token_map

    gen = torch.Generator(device=labels.device).manual_seed(seed)
    inside = torch.randint(0, draft_vocab, labels.shape, device=labels.device, generator=gen)
    outside = torch.randint(
        draft_vocab, max(vocab, draft_vocab + 1), labels.shape, device=labels.device, generator=gen
    )
    pick = torch.rand(labels.shape, device=labels.device, generator=gen) < coverage
    ids = torch.where(labels == -100, labels, torch.where(pick, inside, outside.clamp(max=vocab - 1)))
    token_map = torch.arange(draft_vocab, device=labels.device)
    return draft_labels(ids, inverse_token_map(token_map, vocab))


def make_teacher(batch, seq, hidden, vocab, logit_std, device, dtype=torch.bfloat16):
    """The KL's teacher: hidden states (B, T, H) and a (V, H) weight drawn like the heads' (no gradient)."""
    gen = torch.Generator(device=device).manual_seed(seq * 10 + 7)
    teacher_hidden = torch.randn(batch, seq, hidden, device=device, generator=gen, dtype=dtype)
    teacher_weight = torch.randn(vocab, hidden, device=device, generator=gen, dtype=dtype)
    return teacher_hidden, teacher_weight.mul_(logit_std / hidden**0.5)


def kl_loss_fn(impl: str, chunk_rows: int | None, teacher_hidden, teacher_weight):
    """(hiddens, weights, labels, shifts) -> (K,) KL divergences to the teacher for one benchmark row."""
    from fastmedusa.ops import medusa_kl_divergence

    if impl in ("liger", "liger-chunked"):
        from fastmedusa.ops.peers import peer_kl_divergence

        return lambda hs, ws, y, shifts: peer_kl_divergence(
            impl, hs, ws, teacher_hidden, teacher_weight, y, shifts
        )
    extra = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    if impl == "triton-fp32acc":  # fp32 dW sums: V*H*4 bytes more per head
        extra["wgrad"] = "accumulate"
    name = "triton" if impl == "triton-fp32acc" else impl
    return lambda hs, ws, y, shifts: medusa_kl_divergence(
        hs, ws, teacher_hidden, teacher_weight, y, shifts=shifts, impl=name, **extra
    )


def loss_fn(impl: str, chunk_rows: int | None):
    """(hiddens, weights, labels, shifts) -> (K,) losses for one benchmark row."""
    from fastmedusa.ops import medusa_cross_entropy

    extra = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    if impl == "compile":
        from fastmedusa.ops.cross_entropy import linear_cross_entropy

        head = torch.compile(
            lambda h, w, y, s: linear_cross_entropy(h, w, y, shift=s, impl="torch"), dynamic=True
        )
        return lambda hs, ws, y, shifts: torch.stack([head(h, w, y, s) for h, w, s in zip(hs, ws, shifts)])
    if impl in ("triton-recompute", "triton-fp32acc"):  # the other weight-gradient modes of the kernel:
        # four GEMM passes, no V x H buffer; or the exact fp32 V x H sums (1 GiB chunks)
        extra["wgrad"] = "recompute" if impl == "triton-recompute" else "accumulate"
        impl = "triton"
    name = impl
    return lambda hs, ws, y, shifts: medusa_cross_entropy(hs, ws, y, shifts=shifts, impl=name, **extra)


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def measure(impl, fn, hs, ws, labels, warmup, repeats) -> dict:
    """One row: median fwd+bwd ms, peak GB above inputs and their gradients, loss value."""
    params = [*hs, *ws]
    shifts = list(range(1, len(hs) + 1))
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    losses = []

    def step():
        _clear(params)
        out = fn(hs, ws, labels, shifts)
        out.sum().backward()
        losses.append(out.detach())

    cuda = hs[0].is_cuda
    _clear(params)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        times = (
            cuda_times_ms(step, warmup=warmup, repeats=repeats) if cuda else _wall_ms(step, warmup, repeats)
        )
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not is_oom(err):
            raise
        _clear(params)
        losses.clear()
        gc.collect()
        torch.cuda.empty_cache()
        return {"impl": impl, "status": "oom"}
    peak = torch.cuda.max_memory_allocated() - base - grad_bytes if cuda else None
    row = {
        "impl": impl,
        "status": "ok",
        "ms": median(times),
        "ms_all": times,
        "peak_gb_extra": None if peak is None else peak / 1e9,
        "loss_sum": float(losses[-1].sum()),
    }
    _clear(params)
    return row


def _wall_ms(fn, warmup: int, repeats: int) -> list[float]:
    """Wall-clock milliseconds of each of `repeats` calls after `warmup` (the CPU smoke test)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_grid(args) -> dict:
    device = parse_device(args.device)
    dtype = BENCH_DTYPES[args.dtype]
    peak_tflops = None
    if device.type == "cuda":
        peak_tflops = matmul_tflops(device)
        print(
            f"bf16 matmul 8192^3: {peak_tflops:.0f} TFLOP/s on {torch.cuda.get_device_name(device)}",
            flush=True,
        )
    rows, oom_at = [], {}
    result = {
        "env": environment(device),
        "loss": args.loss,
        "matmul_tflops": peak_tflops,
        "args": _jsonable(args),
        "rows": rows,
    }
    for heads in args.heads:
        for seq in args.seq_lens:
            rows_v = args.draft_vocab or args.vocab  # the heads' (and teacher's) projection rows
            hs, ws, labels = make_inputs(
                args.batch,
                seq,
                args.hidden,
                rows_v,
                heads,
                args.logit_std,
                device,
                args.prompt_frac,
                dtype,
            )
            if args.draft_vocab:
                labels = draft_labels_for_bench(
                    labels, args.vocab, args.draft_vocab, args.draft_coverage, seq
                )
            teacher = None
            if args.loss == "kl":
                teacher = make_teacher(args.batch, seq, args.hidden, rows_v, args.logit_std, device, dtype)
            passes = 6 * heads if args.loss == "ce" else 2 + 6 * heads  # 2 FLOPs per multiply-add per pass
            flops = passes * args.batch * seq * args.hidden * rows_v
            for impl in args.impls:
                shape = {
                    "heads": heads,
                    "seq_len": seq,
                    "batch": args.batch,
                    "prompt_frac": args.prompt_frac,
                    "draft_vocab": args.draft_vocab or None,
                    "flops": flops,
                }
                if oom_at.get((impl, heads), 1 << 30) < seq:
                    rows.append(
                        {**shape, "impl": impl, "status": "oom", "note": "skipped: OOM at a shorter T"}
                    )
                    continue
                try:
                    fn = (
                        loss_fn(impl, args.chunk_rows)
                        if teacher is None
                        else kl_loss_fn(impl, args.chunk_rows, *teacher)
                    )
                    row = measure(impl, fn, hs, ws, labels, args.warmup, args.repeats)
                except (ImportError, PeerUnavailable) as err:
                    row = {"impl": impl, "status": "missing", "note": str(err)}
                except Exception as err:  # noqa: BLE001 - a peer that fails to run is a row saying how
                    if impl not in EXTERNAL and not isinstance(err, ValueError):
                        raise
                    # fastmedusa's own ValueError: no such loss for this impl; a peer's: it failed to run
                    status = "missing" if impl not in EXTERNAL else "error"
                    row = {"impl": impl, "status": status, "note": f"{type(err).__name__}: {err}"[:400]}
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                row.update(shape, chunk_rows=args.chunk_rows if impl in OWN else None)
                if row["status"] == "oom":
                    oom_at[(impl, heads)] = seq
                if row["status"] == "ok":
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["bound_fraction"] = row["tflops"] / peak_tflops if peak_tflops else None
                rows.append(row)
                write_json(args.out, result)  # partial results survive a killed run
                print(_format_row(row), flush=True)
            del hs, ws, labels, teacher
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def _jsonable(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _format_row(row: dict) -> str:
    head = f"K={row['heads']} T={row['seq_len']:5d} {variant(row):18s}"
    if row["status"] != "ok":
        return f"{head} {row['status']} {row.get('note', '')}"
    memory = "" if row["peak_gb_extra"] is None else f"{row['peak_gb_extra']:6.2f} GB  "
    bound = "" if row["bound_fraction"] is None else f"{row['bound_fraction'] * 100:5.1f}% of bound  "
    return f"{head} {row['ms']:9.1f} ms  {memory}{bound}loss {row['loss_sum']:.4f}"


def variant(row: dict) -> str:
    """A row's name in the chart and the summary: its impl, with its chunk size where one was given."""
    return f"{row['impl']} ({row['chunk_rows']}-row chunks)" if row.get("chunk_rows") else row["impl"]


def _variant_order(name: str) -> tuple[int, int]:
    impl, _, chunk = name.partition(" (")
    return IMPL_CHOICES.index(impl), int(chunk.split("-")[0]) if chunk else 0


def summary(rows: list[dict], loss: str = "ce") -> list[str]:
    """Per shape and fastmedusa triton row (each chunk size apart): against the fastest peer that fits (ce:
    liger, cce, torch, compile; kl: torch, liger, liger-chunked)."""
    lines = []
    shapes = sorted({(r["heads"], r["seq_len"]) for r in rows})
    gb = lambda r: "" if r["peak_gb_extra"] is None else f" / {r['peak_gb_extra']:.2f} GB"  # noqa: E731
    for heads, seq in shapes:
        ok = {variant(r): r for r in rows if (r["heads"], r["seq_len"]) == (heads, seq) and r["status"] == "ok"}
        peers = [r for r in ok.values() if r["impl"] in PEERS[loss]]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["ms"])
        for name in sorted((n for n, r in ok.items() if r["impl"] == "triton"), key=_variant_order):
            ours = ok[name]
            lines.append(
                f"K={heads} T={seq}: {name} {ours['ms']:.1f} ms{gb(ours)}, "
                f"fastest peer {best['impl']} {best['ms']:.1f} ms{gb(best)}: {best['ms'] / ours['ms']:.2f}x"
            )
    return lines


def plot(result: dict, path: Path) -> Path:
    """Two rows of panels (time, memory), one column per head count; bars per impl over T; OOM marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    heads = sorted({r["heads"] for r in rows})
    seqs = sorted({r["seq_len"] for r in rows})
    impls = sorted({variant(r) for r in rows}, key=_variant_order)
    fig, axes = plt.subplots(2, len(heads), figsize=(5.5 * len(heads), 8), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for col, k in enumerate(heads):
        for j, impl in enumerate(impls):
            for row_i, key in enumerate(("ms", "peak_gb_extra")):
                ax = axes[row_i][col]
                for x, seq in enumerate(seqs):
                    r = next(
                        (r for r in rows if (r["heads"], r["seq_len"], variant(r)) == (k, seq, impl)), None
                    )
                    pos = x - 0.4 + width * (j + 0.5)
                    if r is None:
                        continue
                    if r["status"] == "ok" and r[key] is not None:
                        ax.bar(pos, r[key], width, color=f"C{j}", label=impl if x == 0 else None)
                    elif r["status"] != "ok":
                        ax.text(
                            pos, 0, r["status"].upper(), rotation=90, ha="center", va="bottom", fontsize=7
                        )
        for row_i, label in enumerate(("fwd+bwd ms (median)", "peak GB above inputs+grads")):
            ax = axes[row_i][col]
            ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
            ax.set_xlabel(f"T (B={rows[0]['batch']})")
            ax.set_ylabel(label)
            ax.set_title(f"{k} head{'s' if k > 1 else ''}")
            if row_i == 0:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    env = result["env"]
    what = "linear KL divergence to a teacher" if result.get("loss") == "kl" else "linear cross-entropy"
    matmul = f", matmul {result['matmul_tflops']:.0f} TFLOP/s" if result.get("matmul_tflops") else ""
    wrapped_title(
        fig,
        f"{what}, H={result['args']['hidden']} V={result['args']['vocab']}{_draft_note(result['args'])} "
        f"{result['args'].get('dtype', 'bf16')}, {env['device']}, "
        f"{env['date'][:10]}, torch {env['versions'].get('torch')}{matmul}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draft_note(args: dict) -> str:
    n = args.get("draft_vocab")
    return f" (heads: draft vocabulary {n}, token map = first {n} ids)" if n else ""


def merge(paths: list[Path]) -> dict:
    """One result from several runs of the grid (e.g. split across device calls): rows concatenated."""
    results = [read_results(p, "loss", ("env", "args", "rows"), ("heads", "seq_len", "impl", "status")) for p in paths]
    for res in results:  # files from before rows recorded their chunk size: the run's --chunk-rows
        for row in res["rows"]:
            row.setdefault("chunk_rows", res["args"].get("chunk_rows") if row["impl"] in OWN else None)
    merged = dict(results[0])
    merged["rows"] = [r for res in results for r in res["rows"]]
    merged["runs"] = [
        {"env": r["env"], "matmul_tflops": r["matmul_tflops"], "args": r["args"]} for r in results
    ]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_file(args.out, replaces=is_benchmark_result, beside=(".png",))
    if args.plot:
        result = merge(args.plot)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {args.device}: no CUDA GPU is visible; fastmedusa bench loss measures on a GPU "
                "(--device cpu runs a smoke test)"
            )
        result = run_grid(args)
    result["summary"] = summary(result["rows"], result.get("loss", "ce"))
    path = write_json(args.out, result)
    if not any(r["status"] == "ok" for r in result["rows"]):
        first = result["rows"][0] if result["rows"] else {}
        raise ValueError(
            f"no row of the grid ran (rows in {path}; e.g. {first.get('impl')}: {first.get('status')} "
            f"{first.get('note', '')[:120]}): pick --impls that run on this device"
        )
    png = plot(result, path.with_suffix(".png"))
    print("\n".join(result["summary"]))
    print(f"wrote {path} and {png}")
    return 0
