"""How often each head's rank-r token is the base model's own next-next token, and the tree that implies.

What greedy Medusa decoding needs from a head is agreement with the base model's own greedy tokens (not
with a dataset's). So held-out prompts are continued by plain greedy decoding (batched), the backbone runs
once over prompt + continuation, and head k's rank-r token at position t counts as right when it equals the
continuation's token at t+k+2. These rank accuracies, and the joint outcomes (at each position, the ranks at
which heads 1, 2, ... were right together: `AcceptanceModel` in trees.py), give `build_tree` its input;
`tree.json` in a heads directory keeps them with the tree built from them, which `generate` then uses by
default and from which `tree="auto:N"` builds an N-node tree. `choose_tree_size` picks N for a device: the
expected tokens per step of each tree divided by its measured step time, the best tokens/s wins.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastmedusa.decode.trees import (
    Chains,
    build_tree,
    chains_from_json,
    chains_to_json,
    check_chains,
    expected_accept_length,
    stated_num_heads,
    validate_paths,
)
from fastmedusa.files import parse_json
from fastmedusa.progress import Progress

TREE_FILE = "tree.json"
# A verify pass runs the tree's nodes plus the root: 63 nodes make 64 tokens, a whole number of the GEMM and
# attention tiles. One token past a power of two starts new tiles: on an H100 (SmolLM2, 16k draft heads) a
# 32-node step took 1.059 ms against 1.030 ms for 31 nodes (five runs each, all within 7 us), and a 64-node
# step 1.125 ms against 1.104 ms for 63 (noisier runs; bench/results/step_cost_tree_width_h100). So the
# default and auto's candidates make N + 1 a power of two, or a multiple of 32 for the largest trees.
DEFAULT_TREE_NODES = 63
# Greedy tokens per held-out prompt that `measure_heads_tree` scores. Heads are right more often past an answer's
# first tokens, so short continuations undersell them: trained SmolLM2 heads expected 3.22 tokens/step from 48
# tokens and 3.91 from 128 (the same 63-node tree size), and gave 3.98 on MT-Bench's 256-token answers (H100,
# bench/results/tree_joint_h100).
TREE_NEW_TOKENS = 128


def first_user_turns(conversations: Sequence[Sequence[dict]]) -> list[str]:
    """The first non-empty user turn of each conversation (`{"role", "content"}` turns), where there is one."""
    turns = []
    for conversation in conversations:
        turn = next(
            (t["content"] for t in conversation if t["role"] == "user" and t["content"].strip()), None
        )
        if turn is not None:
            turns.append(turn)
    return turns


def first_user_prompts(
    tokenizer, conversations: Sequence[Sequence[dict]], max_prompt_tokens: int | None = None
) -> list[torch.Tensor]:
    """The first non-empty user turn of each conversation, chat-templated as a generation prompt: (1, P)
    token ids each; prompts longer than `max_prompt_tokens` are skipped."""
    return chat_prompts(tokenizer, first_user_turns(conversations), max_prompt_tokens)


def chat_prompts(tokenizer, texts: Sequence[str], max_prompt_tokens: int | None = None) -> list[torch.Tensor]:
    """Each text as a chat-templated user turn, (1, P) ids; prompts longer than max_prompt_tokens are skipped."""
    prompts = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
        if max_prompt_tokens is None or ids.shape[1] <= max_prompt_tokens:
            prompts.append(ids)
    return prompts


def left_pad_batch(prompts: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest): (1, P) prompts right-aligned after `pad_id` padding."""
    width = max(p.shape[-1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[-1] :] = p.reshape(-1)
        mask[row, width - p.shape[-1] :] = 1
    return ids, mask


def one_row(prompt: object, index: int) -> torch.Tensor:
    """Prompt `index` as a (1, P) tensor: a 1-D tensor of token ids or one row of them; else a clear error."""
    if not isinstance(prompt, torch.Tensor) or prompt.ndim not in (1, 2) or (prompt.ndim == 2 and prompt.shape[0] != 1):
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt {index} is {shape}: give each prompt as a 1-D tensor of token ids, or (1, P)")
    if prompt.numel() == 0:
        raise ValueError(f"prompt {index} is empty: give at least one token")
    return prompt.reshape(1, -1)


def model_continuations(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    eos_token_id=None,
    batch_size: int = 8,
    progress: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """prompt + the base model's own continuation, (1, P + n) each, generated `batch_size` at a time: greedy,
    or at `temperature` > 0 plain sampling, prompt i as `generate(..., seed=[seed + i])` (whatever the batch)."""
    from fastmedusa.decode.generate import generate

    sequences = []
    starts = range(0, len(prompts), batch_size)
    what = "greedy continuations" if temperature <= 0 else "sampled continuations"
    for start in Progress(starts, desc=what, unit="batch", enabled=progress):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad_batch(chunk)
        seeds = [seed + start + i for i in range(len(chunk))]
        out = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, medusa=False,
                       eos_token_id=eos_token_id, compile=False, temperature=temperature, seed=seeds)  # fmt: skip
        for row, p in enumerate(chunk):
            sequences.append(torch.cat([p.reshape(-1), out.row_new_token_ids(row).cpu()])[None])
    return sequences


@dataclass
class HeadAcceptance:
    """What `measure_head_acceptance` measured: per-head rank accuracies (K, ranks), the positions each head
    was scored at (K,), and the joint outcomes: `chains` maps the ranks at which heads 1, 2, ... held the base
    model's tokens, cut at the first head that missed, to the number of positions that ended so (only positions
    where every head has a target; `chain_positions` of them)."""

    rank_accuracies: torch.Tensor
    positions_scored: torch.Tensor
    chains: dict[tuple[int, ...], int] = field(default_factory=dict)

    @property
    def chain_positions(self) -> int:
        return sum(self.chains.values())

    def merged(self, other: HeadAcceptance) -> HeadAcceptance:
        """Both measurements as one (the accuracies weighted by the positions behind them)."""
        counts = self.positions_scored + other.positions_scored
        hits = sum(m.rank_accuracies * m.positions_scored[:, None] for m in (self, other))
        chains = dict(self.chains)
        for chain, n in other.chains.items():
            chains[chain] = chains.get(chain, 0) + n
        return HeadAcceptance(hits / counts.clamp(min=1)[:, None].double(), counts, chains)


def _rank_of_target(top: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(T,) rank of each target among its top-k list (T, ranks), `ranks` where it is not in the list."""
    match = top == target[:, None]
    rank = match.int().argmax(1)
    return torch.where(match.any(1), rank, top.shape[1])


@torch.no_grad()
def measure_head_acceptance(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    ranks: int = 10,
    eos_token_id=None,
    progress: bool = True,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
) -> HeadAcceptance:
    """How often head k's rank-r token is the base model's own greedy token, per head and jointly.

    `model` is a MedusaModel (or anything with `.base`, `.medusa_heads` and `backbone_hidden_states`); the
    greedy continuations are generated `batch_size` prompts at a time (eager: a few prompts do not repay a
    compile). The joint chains (`HeadAcceptance`) let `build_tree` see that heads are right together.
    At `temperature` > 0 the continuations are plain sampling's (prompt i with `seed=[seed + i]`): the tokens
    that exact acceptance compares a tree's nodes with, so the chains are what it accepts at that temperature."""
    prompts = [one_row(p, i) for i, p in enumerate(prompts)]
    heads = model.medusa_heads
    num_heads = heads.num_heads
    hits = torch.zeros(num_heads, ranks, dtype=torch.long)
    counts = torch.zeros(num_heads, dtype=torch.long)
    chains: dict[tuple[int, ...], int] = {}
    device = next(model.base.parameters()).device
    sequences = model_continuations(
        model, prompts, new_tokens, eos_token_id, batch_size, temperature=temperature, seed=seed
    )
    pairs = list(zip(prompts, sequences))
    for ids, seq in Progress(pairs, desc="scoring heads", unit="prompt", enabled=progress):
        hidden = model.backbone_hidden_states(seq.to(device))[0]  # (L, H)
        start, length = ids.shape[1] - 1, seq.shape[1]  # heads act on the last accepted token: t >= P - 1
        if length - 2 <= start:
            continue
        top = heads.draft_topk(hidden[start : length - 2], ranks).cpu()  # (K, T, ranks) token ids
        tokens = seq[0]
        ranks_by_head = []  # per head, the rank of its target at each position it is scored at (ranks: missed)
        for k in range(num_heads):
            scored = max(0, length - k - 2 - start)  # positions t whose target t+k+2 exists
            rank = _rank_of_target(top[k, :scored], tokens[start + k + 2 : start + k + 2 + scored])
            hits[k] += torch.bincount(rank, minlength=ranks + 1)[:ranks]
            counts[k] += scored
            ranks_by_head.append(rank)
        every = length - num_heads - 1 - start  # positions where every head has its target
        if every > 0:
            rank_rows = torch.stack([r[:every] for r in ranks_by_head], dim=1).tolist()  # (every, K)
            for row in rank_rows:
                chain = tuple(itertools.takewhile(lambda r: r < ranks, row))
                chains[chain] = chains.get(chain, 0) + 1
    if (counts == 0).any():
        raise ValueError("some heads were never scored: give more or longer prompts (or more new tokens)")
    return HeadAcceptance(hits.double() / counts[:, None].double(), counts, chains)


def measure_rank_accuracies(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    ranks: int = 10,
    eos_token_id=None,
    progress: bool = True,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, ranks) P(head k's rank-r token = the base model's greedy token), and the (K,) positions scored.

    The cumulative sum over ranks is the top-k accuracy against the model's own greedy tokens. The per-head
    part of `measure_head_acceptance`, which also measures how the heads are right together."""
    measured = measure_head_acceptance(model, prompts, new_tokens, ranks, eos_token_id, progress, batch_size)
    return measured.rank_accuracies, measured.positions_scored


def write_tree_json(
    path: str | os.PathLike,
    rank_accuracies: torch.Tensor,
    positions_scored: torch.Tensor | Sequence[int] | None = None,
    num_nodes: int = DEFAULT_TREE_NODES,
    chains: Chains | None = None,
    **extra: object,
) -> Path:
    """Write tree.json (into `path` if it is a directory): the N-node tree built from the accuracies (joint,
    with measured `chains`: `AcceptanceModel`), the measurements themselves (what `auto:N` builds other trees
    from) and the expected tokens per step."""
    path = Path(path)
    if path.is_dir():
        path = path / TREE_FILE
    acc = torch.as_tensor(rank_accuracies, dtype=torch.float64)
    chains = chains or None
    paths = build_tree(acc, num_nodes, chains=chains)
    payload = {
        "paths": paths,
        "num_heads": acc.shape[0],
        "tree_nodes": len(paths),
        "expected_tokens_per_step": expected_accept_length(paths, acc, chains),
        "tree_model": "joint" if chains else "independent",
        "rank_accuracies": acc.tolist(),
        "positions_scored": None if positions_scored is None else torch.as_tensor(positions_scored).tolist(),
        **extra,
    }
    if chains:
        payload["expected_tokens_per_step_independent"] = expected_accept_length(paths, acc)
        payload["chain_positions"] = sum(chains.values())
        payload["accepted_chains"] = chains_to_json(chains)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def well_formed_accuracies(accuracies: object) -> bool:
    """Per-head lists of per-rank probabilities: equal lengths, finite numbers in [0, 1] (NaN is refused: a
    tree built from it would be arbitrary)."""
    if not isinstance(accuracies, list) or not accuracies:
        return False
    if not all(isinstance(row, list) and row and len(row) == len(accuracies[0]) for row in accuracies):
        return False
    return all(isinstance(a, int | float) and not isinstance(a, bool) and 0 <= a <= 1 for row in accuracies for a in row)


def read_tree_json(path: str | os.PathLike, num_heads: int | None = None) -> dict | None:
    """The tree.json of a heads directory (or a tree.json path); None when the directory has none.

    A file made for another number of heads is an error, not a silent fallback."""
    path = Path(path)
    if path.is_dir():
        path = path / TREE_FILE
    if not path.is_file():
        return None
    try:
        info = parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not UTF-8 text: delete it, or measure it again with `fastmedusa bench heads --heads DIR "
            "--write-tree`"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg}): delete it, or measure it again with `fastmedusa bench heads "
            "--heads DIR --write-tree`"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("paths"), list):
        raise ValueError(f"{path} holds no tree: expected {{'paths': [...], 'rank_accuracies': [...]}}")
    accuracies = info.get("rank_accuracies")
    if accuracies is not None and not well_formed_accuracies(accuracies):
        raise ValueError(
            f"{path}: rank_accuracies must be per-head lists of equal length, of numbers in [0, 1]; delete it, or "
            "measure it again (`fastmedusa bench heads --heads DIR --write-tree`)"
        )
    if info.get("accepted_chains") is not None:
        if not accuracies:
            raise ValueError(f"{path}: accepted_chains without rank_accuracies; measure it again")
        try:
            check_chains(chains_from_json(info["accepted_chains"]), len(accuracies), len(accuracies[0]))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    stated = stated_num_heads(
        info, str(path), "delete the file, or measure it again with `fastmedusa bench heads --heads DIR --write-tree`"
    )
    if stated and accuracies and len(accuracies) != stated:  # `auto:N` would build trees for the wrong heads
        raise ValueError(
            f"{path} says num_heads {stated} but holds rank_accuracies for {len(accuracies)} head{'s' * (len(accuracies) != 1)}: delete the "
            "file, or measure it again with `fastmedusa bench heads --heads DIR --write-tree`"
        )
    theirs = stated or (len(info["rank_accuracies"]) if info.get("rank_accuracies") else None)
    if num_heads is not None and theirs is not None and theirs != num_heads:
        raise ValueError(
            f"{path} was measured for {theirs} Medusa heads but these heads have {num_heads}: re-measure it "
            "(`fastmedusa bench heads --heads DIR --write-tree`) or delete it"
        )
    remeasure = "delete it, or measure it again (`fastmedusa bench heads --heads DIR --write-tree`)"
    if not info["paths"]:
        raise ValueError(f"{path} holds an empty list of paths: {remeasure}")
    if num_heads is not None:  # a bad path names this file, not a --tree flag never given
        try:
            validate_paths(info["paths"], num_heads, given=False)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: {err} -- {remeasure}"
            ) from None
    return info


def measure_heads_tree(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    heads_dir: str | os.PathLike,
    *,
    new_tokens: int = TREE_NEW_TOKENS,
    ranks: int = 10,
    num_nodes: int = DEFAULT_TREE_NODES,
    eos_token_id=None,
    progress: bool = False,
    **extra: object,
) -> Path:
    """Measure the heads' rank accuracies on `prompts` against the model's own greedy tokens and write
    heads_dir/tree.json. The engine built for the measurement is dropped afterwards (it holds a KV cache)."""
    started = time.perf_counter()
    measured = measure_head_acceptance(model, prompts, new_tokens, ranks, eos_token_id, progress)
    model.base.__dict__.pop("_fastmedusa_engine", None)
    return write_tree_json(
        heads_dir, measured.rank_accuracies, measured.positions_scored, num_nodes, chains=measured.chains,
        prompts=len(prompts), new_tokens=new_tokens, seconds=round(time.perf_counter() - started, 2), **extra,
    )  # fmt: skip


@torch.no_grad()
def expected_by_heads(
    rank_accuracies: Sequence[Sequence[float]], nodes: int = DEFAULT_TREE_NODES, chains: Chains | None = None
) -> list[dict]:
    """Expected tokens/step when only the first k heads are used (k = 1..K), each on the `nodes`-node tree
    built from their rank accuracies. In stage 1 the heads are independent models on a frozen backbone, so
    the first k heads of a K-head run stand for a k-head run."""
    rows = []
    for k in range(1, len(rank_accuracies) + 1):
        cut = None if not chains else _cut_chains(chains, k)
        paths = build_tree(rank_accuracies[:k], nodes, chains=cut)
        expected = expected_accept_length(paths, rank_accuracies[:k], cut)
        rows.append({"heads": k, "tree_nodes": len(paths), "expected_tokens_per_step": round(expected, 3)})
    return rows


def choose_tree_size(
    model: nn.Module,
    rank_accuracies: torch.Tensor,
    prompt: torch.Tensor,
    candidates: Sequence[int] = (3, 7, 15, 31, 63, 95, 127),
    *,
    batch_size: int = 1,
    steps: int = 24,
    compile: bool | None = None,
    include_plain: bool = True,
    chains: Chains | None = None,
) -> tuple[int, list[dict]]:
    """The tree size that maximises expected tokens/s on this device: for each candidate N, time Medusa steps
    of the N-node tree built from `rank_accuracies` and divide its expected tokens per step by the step time.
    With `include_plain`, plain decoding (0 nodes, 1 token per step) competes too: at large batches a verify
    pass costs more than the tokens it adds (on an H100, SmolLM2 at batch 64: 0.80x plain greedy), and then
    0 wins. Returns (best N, 0 for plain decoding; one row per candidate).

    A step's time is the difference of a call of 2 x `steps` new tokens and one of `steps`, over the difference
    of their step counts, after a warm-up call that compiles: the prompt's pass and each call's fixed costs
    cancel out."""
    from fastmedusa.decode.generate import generate

    acc = torch.as_tensor(rank_accuracies, dtype=torch.float64)
    ids = prompt.reshape(1, -1).expand(batch_size, -1)
    mask = torch.ones_like(ids)

    def step_seconds(**kw) -> float:
        generate(model, ids, attention_mask=mask, max_new_tokens=steps, compile=compile, **kw)  # compile, warm up
        short = generate(model, ids, attention_mask=mask, max_new_tokens=steps, compile=compile, **kw)
        long = generate(model, ids, attention_mask=mask, max_new_tokens=2 * steps, compile=compile, **kw)
        if long.steps > short.steps and long.seconds > short.seconds:
            return (long.seconds - short.seconds) / (long.steps - short.steps)
        return long.seconds / max(long.steps, 1)

    rows = []
    if include_plain:
        step_s = step_seconds(medusa=False)
        rows.append({"nodes": 0, "expected_tokens_per_step": 1.0, "step_ms": 1e3 * step_s,
                     "expected_tokens_per_s": batch_size / step_s})  # fmt: skip
    for n in candidates:
        paths = build_tree(acc, n, chains=chains)
        step_s = step_seconds(tree=paths)
        expected = expected_accept_length(paths, acc, chains)
        rows.append({"nodes": len(paths), "expected_tokens_per_step": expected, "step_ms": 1e3 * step_s,
                     "expected_tokens_per_s": batch_size * expected / step_s})  # fmt: skip
    best = max(rows, key=lambda r: r["expected_tokens_per_s"])
    return best["nodes"], rows


def _cut_chains(chains: Chains, heads: int) -> dict[tuple[int, ...], int]:
    """The chains as the first `heads` heads alone would have made them."""
    cut: dict[tuple[int, ...], int] = {}
    for chain, count in chains.items():
        cut[tuple(chain[:heads])] = cut.get(tuple(chain[:heads]), 0) + count
    return cut
