"""`fastmedusa bench heads`: per-head, per-rank accuracy of Medusa heads on held-out prompts, and the trees it implies.

The accuracies are measured against the base model's own greedy continuation of each held-out prompt
(`fastmedusa.decode.accuracy`), per head and jointly (which ranks the heads held together at each position).
They feed `build_tree` (greedy node additions maximising the expected accepted length), whose trees are written
as JSON for `--tree FILE`. A cross-check builds trees on one half of the prompts and scores them on the other
half's positions, for the joint estimate and for Medusa's independent one. Writes JSON (+ PNG) under
bench/results/.

`--temperature T` scores the heads against the model's sampled continuations instead (plain sampling at T):
those are the tokens exact acceptance (`acceptance="exact"`) compares a tree's nodes with, so the accuracies,
trees and cross-check are what sampling with exact acceptance gets. It also measures the greedy continuations
and scores both kinds of tree on the sampled positions of the other half (`temperature_check`): whether a tree
built for sampling beats the one built from greedy accuracies (what `tree.json` holds) when sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastmedusa.bench.common import environment, positive_int, temperature, write_json
from fastmedusa.decode import build_tree, expected_accept_length, prune_tree, save_tree
from fastmedusa.decode.accuracy import (
    DEFAULT_TREE_NODES,
    HeadAcceptance,
    first_user_prompts,
    measure_head_acceptance,
    write_tree_json,
)
from fastmedusa.decode.trees import PRESETS, Chains, chains_to_json, measured_accept_length
from fastmedusa.dtypes import add_device_arguments
from fastmedusa.errors import CommandParser
from fastmedusa.model.export import find_heads_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench heads", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--heads", required=True, help="Medusa heads directory (written by `fastmedusa train`)")
    p.add_argument("--prompts", type=positive_int, default=32, help="held-out prompts to continue and score")
    p.add_argument(
        "--new-tokens", type=positive_int, default=128, help="greedy continuation length per prompt"
    )
    p.add_argument(
        "--ranks", type=positive_int, default=10, help="ranks r scored per head (top-k of the tree)"
    )
    p.add_argument(
        "--temperature", type=temperature, default=0.0,
        help="0: score against the model's greedy continuations; above 0: against its sampled ones at this "
        "temperature (what exact acceptance accepts), and compare trees built from each on those (default: 0)",
    )  # fmt: skip
    p.add_argument(
        "--sample-seed", type=int, default=0,
        help="with --temperature: prompt i (counted over all --prompts) samples as `generate(..., seed=[S + i])`",
    )
    p.add_argument(
        "--tree-nodes", type=positive_int, nargs="+", default=[15, 31, 63], help="node budgets of built trees"
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench/results/heads.json"), help="JSON path (PNG beside)"
    )
    p.add_argument(
        "--tree-dir", type=Path, default=None, help="where tree_<n>.json go (default: beside --out)"
    )
    p.add_argument(
        "--write-tree",
        type=positive_int,
        nargs="?",
        const=DEFAULT_TREE_NODES,
        default=None,
        metavar="NODES",
        help=f"also write HEADS/tree.json (accuracies + a NODES-node tree, default {DEFAULT_TREE_NODES}): what `generate` then "
        "uses by default and builds `--tree auto:N` from",
    )
    return p.parse_args(argv)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared with `bench decode`: model, data split (as `fastmedusa train` made it), device."""
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--data", default=None, help="ShareGPT file (default: the embedded one)")
    p.add_argument("--max-conversations", type=int, default=400, help="as in `fastmedusa train` (same split)")
    p.add_argument(
        "--eval-size", type=int, default=48, help="held-out conversations, as in `fastmedusa train`"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed, as in `fastmedusa train`")
    p.add_argument(
        "--max-prompt-tokens", type=int, default=384, help="skip held-out prompts longer than this"
    )
    add_device_arguments(p)


def held_out_prompts(args: argparse.Namespace, tokenizer) -> list[torch.Tensor]:
    """First user turns of the conversations `fastmedusa train` held out, chat-templated: (1, P) each."""
    from fastmedusa.data import read_sharegpt, train_eval_split

    conversations, _ = read_sharegpt(args.data, limit=args.max_conversations)
    _, held_out = train_eval_split(conversations, args.eval_size, seed=args.seed)
    prompts = first_user_prompts(tokenizer, held_out, args.max_prompt_tokens)
    if not prompts:
        raise ValueError(
            f"no held-out prompt of <= {args.max_prompt_tokens} tokens: raise --max-prompt-tokens or --eval-size"
        )
    return prompts


def tree_report(
    rank_acc: torch.Tensor, budgets: list[int], tree_dir: Path, meta: dict, chains: Chains | None = None
) -> list[dict]:
    """Build a tree per budget (joint where `chains` were measured), write it, and compare its expected
    tokens/step with the presets'. Each row also gives the independent estimate of the same tree."""
    num_heads = rank_acc.shape[0]
    rows = []
    for n in budgets:
        paths = build_tree(rank_acc, n, chains=chains)
        eal = expected_accept_length(paths, rank_acc, chains)
        file = save_tree(tree_dir / f"tree_{n}.json", paths, expected_accept_length=eal, **meta)
        rows.append({"tree": f"built_{n}", "nodes": len(paths), "expected_tokens_per_step": eal,
                     "expected_independent": expected_accept_length(paths, rank_acc), "file": str(file)})  # fmt: skip
    for name, preset in PRESETS.items():
        paths = prune_tree(preset, num_heads)
        if max(max(p) for p in paths) < rank_acc.shape[1]:
            eal = expected_accept_length(paths, rank_acc, chains)
            rows.append({"tree": name, "nodes": len(paths), "expected_tokens_per_step": eal,
                         "expected_independent": expected_accept_length(paths, rank_acc)})  # fmt: skip
    return rows


def measure_halves(measure, prompts: list) -> list[HeadAcceptance]:
    """Each half of the prompts measured apart (for `cross_check`), or all of them at once where there is one
    prompt, or where a half is too short to score every head. `measure(part, first)`: `first` is the index of
    the part's first prompt among all of them (what a sampled prompt's seed counts from)."""
    half = len(prompts) // 2
    if half:
        try:
            return [measure(prompts[:half], 0), measure(prompts[half:], half)]
        except ValueError:  # "some heads were never scored" in one half: no cross-check, not an error
            pass
    return [measure(prompts, 0)]


def greedy_measurement(measure, prompts: list) -> list[HeadAcceptance]:
    """With --temperature: the same halves measured on greedy continuations, for `temperature_check`; none
    where greedy text ends too soon to score every head (the sampled measurement still stands)."""
    try:
        return measure_halves(lambda part, first: measure(part, first, 0.0), prompts)
    except ValueError:
        return []


def cross_check(halves: list[HeadAcceptance], budgets: list[int]) -> list[dict]:
    """Trees built on one half of the prompts, scored on the other half's positions (`measured_accept_length`),
    both ways: what the joint estimate gains over the independent one on prompts it was not built from."""
    rows = []
    for n in budgets:
        scores: dict[str, list[float]] = {"independent": [], "joint": []}
        for built_on, scored_on in ((0, 1), (1, 0)):
            acc, chains = halves[built_on].rank_accuracies, halves[built_on].chains
            for name, used in (("independent", None), ("joint", chains)):
                paths = build_tree(acc, n, chains=used)
                scores[name].append(measured_accept_length(paths, halves[scored_on].chains))
        row = {"nodes": n, **{f"{name}_tokens_per_step": sum(v) / len(v) for name, v in scores.items()}}
        row["joint_gain"] = row["joint_tokens_per_step"] / row["independent_tokens_per_step"] - 1
        rows.append(row)
    return rows


def temperature_check(greedy: list[HeadAcceptance], sampled: list[HeadAcceptance], budgets: list[int]) -> list[dict]:
    """Trees built on one half's greedy measurement and on its sampled one, both scored on the other half's
    sampled positions (`measured_accept_length`: exact acceptance's tokens/step there), both ways round."""
    rows = []
    for n in budgets:
        scores: dict[str, list[float]] = {"greedy_built": [], "sampled_built": []}
        for built_on, scored_on in ((0, 1), (1, 0)):
            for name, halves in (("greedy_built", greedy), ("sampled_built", sampled)):
                paths = build_tree(halves[built_on].rank_accuracies, n, chains=halves[built_on].chains)
                scores[name].append(measured_accept_length(paths, sampled[scored_on].chains))
        row = {"nodes": n, **{f"{name}_tokens_per_step": sum(v) / len(v) for name, v in scores.items()}}
        row["sampled_gain"] = row["sampled_built_tokens_per_step"] / row["greedy_built_tokens_per_step"] - 1
        rows.append(row)
    return rows


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = torch.tensor(payload["rank_accuracies"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, row in enumerate(acc):
        a.plot(range(1, len(row) + 1), row.cumsum(0).tolist(), marker="o", label=f"head {k + 1} (t+{k + 2})")
    sampled_at = payload["args"].get("temperature") or 0
    against = f"base samples at T {sampled_at:g}" if sampled_at > 0 else "base greedy"
    a.set(xlabel="k", ylabel=f"top-k accuracy vs {against}", title="Medusa heads on held-out prompts")
    a.legend()
    built = [r for r in payload["trees"] if r["tree"].startswith("built_")]
    nodes = [r["nodes"] for r in built]
    b.plot(nodes, [r["expected_tokens_per_step"] for r in built], "o-", label="built trees: expected")
    if any("expected_independent" in r for r in built):
        b.plot(nodes, [r["expected_independent"] for r in built], "o--", mfc="none",
               label="same trees, heads taken as independent")  # fmt: skip
    for row in payload.get("cross_check") or []:
        b.scatter(row["nodes"], row["joint_tokens_per_step"], marker="x", color="k", zorder=3)
        b.scatter(row["nodes"], row["independent_tokens_per_step"], marker="+", color="r", zorder=3)
    if payload.get("cross_check"):
        b.scatter([], [], marker="x", color="k", label="built on half the prompts, measured on the rest")
        b.scatter([], [], marker="+", color="r", label="the same, independent trees")
    for row in payload.get("temperature_check") or []:
        b.scatter(row["nodes"], row["greedy_built_tokens_per_step"], marker="v", color="tab:green", zorder=3)
    if payload.get("temperature_check"):
        b.scatter([], [], marker="v", color="tab:green", label="trees from greedy accuracies, on the other half")
    for row in payload["trees"]:
        if not row["tree"].startswith("built_"):
            b.scatter(row["nodes"], row["expected_tokens_per_step"], marker="s", s=18, label=row["tree"])
    b.set(xlabel="tree nodes", ylabel="tokens / step", title="trees under the measured accuracies")
    b.legend(fontsize=7)
    save_figure(fig, path, payload["env"])


def save_figure(fig, path: Path, env: dict, title: str | None = None) -> None:
    """Stamp `title` (if any), the device, date and versions on a chart, save it, and free it."""
    import matplotlib.pyplot as plt

    versions = env.get("versions", {})
    stamp = " · ".join(f"{name} {versions[name]}" for name in ("torch", "transformers") if versions.get(name))
    head = f"{title}\n" if title else ""
    fig.suptitle(
        f"{head}{env.get('device', '')} · {str(env.get('date', ''))[:10]} · {stamp}",
        fontsize=10 if title else 8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from fastmedusa.decode.cli import base_model_arg, eos_token_ids, resolve_device_dtype
    from fastmedusa.files import check_output_file, is_benchmark_result
    from fastmedusa.model import MedusaModel, load_tokenizer

    args = parse_args(argv)
    if args.write_tree and args.temperature > 0:
        raise ValueError(
            "--write-tree with --temperature: tree.json holds the greedy measurement (what `generate` uses for "
            "every mode); measure without --temperature to write it"
        )
    check_output_file(args.out, replaces=is_benchmark_result, beside=(".png",), inputs=(args.data,))
    if args.tree_dir is not None and args.tree_dir.exists() and not args.tree_dir.is_dir():
        raise NotADirectoryError(f"--tree-dir {args.tree_dir} is a file: pass a directory for the tree_<n>.json files")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.model = base_model_arg(args.model, args.heads)
    tokenizer = load_tokenizer(args.model)
    model = MedusaModel.from_pretrained(args.model, heads=args.heads, dtype=dtype, device=device).eval()
    choices = model.medusa_config.head_vocab_size
    if choices is not None and args.ranks > choices:
        kind = "draft-vocabulary " if model.medusa_config.draft_vocab_size else ""
        raise ValueError(f"--ranks {args.ranks}: these {kind}heads choose among {choices} tokens; pass at most {choices}")
    prompts = held_out_prompts(args, tokenizer)[: args.prompts]
    eos = eos_token_ids(tokenizer, model.base)
    def measure(part: list, first: int, temperature: float = args.temperature) -> HeadAcceptance:
        """Prompt i of all of them samples with seed --sample-seed + i, in whichever half it is measured."""
        return measure_head_acceptance(model, part, args.new_tokens, args.ranks, eos, temperature=temperature,
                                       seed=args.sample_seed + first)  # fmt: skip

    halves = measure_halves(measure, prompts)
    measured = halves[0].merged(halves[1]) if len(halves) == 2 else halves[0]
    rank_acc, counts, chains = measured.rank_accuracies, measured.positions_scored, measured.chains
    checked = len(halves) == 2 and all(h.chain_positions for h in halves)
    greedy_halves = greedy_measurement(measure, prompts) if checked and args.temperature > 0 else []
    compared = len(greedy_halves) == 2 and all(h.chain_positions for h in greedy_halves)
    meta = {"rank_accuracies": rank_acc.tolist(), "heads": str(args.heads), "model": args.model or "embedded"}
    trees = tree_report(rank_acc, args.tree_nodes, args.tree_dir or args.out.parent, meta, chains)
    if args.write_tree:
        written = write_tree_json(find_heads_dir(args.heads), rank_acc, counts, args.write_tree, chains=chains,
                                  prompts=len(prompts), new_tokens=args.new_tokens)  # fmt: skip
        print(f"wrote {written}")
    payload = {
        "env": environment(device),
        "args": vars(args),
        "prompts": len(prompts),
        "positions_scored": counts.tolist(),
        "rank_accuracies": rank_acc.tolist(),
        "topk_accuracies": rank_acc.cumsum(1).tolist(),
        "chain_positions": measured.chain_positions,
        "accepted_chains": chains_to_json(chains),
        "trees": trees,
        "cross_check": cross_check(halves, args.tree_nodes) if checked else None,
        "temperature_check": temperature_check(greedy_halves, halves, args.tree_nodes) if compared else None,
        "halves": [
            {"rank_accuracies": h.rank_accuracies.tolist(), "positions_scored": h.positions_scored.tolist(),
             "accepted_chains": chains_to_json(h.chains)}
            for h in halves
        ] if checked else None,
    }  # fmt: skip
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    for k, row in enumerate(rank_acc.cumsum(1)):
        print(f"head {k + 1}: top-1 {row[0]:.3f}, top-{args.ranks} {row[-1]:.3f}")
    for row in trees:
        print(
            f"{row['tree']:>14}: {row['nodes']:3d} nodes, expected {row['expected_tokens_per_step']:.2f} tokens/step "
            f"(heads taken as independent: {row['expected_independent']:.2f})"
        )
    for row in payload["cross_check"] or []:
        print(
            f"built on one half, scored on the other: {row['nodes']:3d} nodes, joint "
            f"{row['joint_tokens_per_step']:.3f} vs independent {row['independent_tokens_per_step']:.3f} tokens/step"
        )
    for row in payload["temperature_check"] or []:
        print(
            f"sampling at T {args.temperature:g}, scored on the other half: {row['nodes']:3d} nodes, tree built "
            f"for sampling {row['sampled_built_tokens_per_step']:.3f} vs from greedy accuracies "
            f"{row['greedy_built_tokens_per_step']:.3f} tokens/step ({row['sampled_gain']:+.1%})"
        )
    return 0
