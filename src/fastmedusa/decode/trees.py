"""Medusa candidate trees: path lists (FasterDecoding/Medusa's `medusa_choices` format), the buffers one
verify pass needs, and trees built from measured head accuracies.

A tree is a list of paths; path `(r1, r2, ..., rd)` is the node reached by taking head 1's rank-r1 token,
then head 2's rank-r2 token, ... (ranks 0-based, heads 1-based, head k predicts t+k+1). Node 0 is the root:
the token the base LM head already chose. Every prefix of a path must itself be a path.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmedusa.files import parse_json

Path_ = tuple[int, ...]

# FasterDecoding/Medusa's 63-node tree for 4 heads (from simulated Vicuna-7B head accuracies). It is listed
# in the order its nodes were added, so every leading slice of it is a valid (prefix-closed) tree too.
MC_SIM_7B_63: list[list[int]] = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]  # fmt: skip

PRESETS: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    # Leading slices of mc_sim_7b_63: cheaper verify passes for small models or weak heads.
    "mc_sim_7b_31": MC_SIM_7B_63[:31],
    "mc_sim_7b_15": MC_SIM_7B_63[:15],
    "mc_sim_7b_7": MC_SIM_7B_63[:7],
}


def chain_tree(depth: int) -> list[list[int]]:
    """Only the top-1 guess of each head: `depth` nodes, one path (a linear speculation)."""
    return [[0] * d for d in range(1, depth + 1)]


def preset_names() -> list[str]:
    return sorted(PRESETS) + ["chain_<depth>"]


def validate_paths(
    paths: Sequence[Sequence[int]], num_heads: int | None = None, given: bool = True
) -> list[Path_]:
    """Check a path list and return it sorted by (depth, path), the node order of the buffers. `given`: the
    user passed this tree (--tree / tree=), so a too-deep one is answered with the trees they could pass
    instead; False for a heads directory's tree.json, whose own message says what to do."""
    example = "a list of paths, each a list of 0-based ranks, e.g. [[0], [1], [0, 0]]"
    if isinstance(paths, str | bytes | dict) or not isinstance(paths, Sequence | torch.Tensor):
        raise TypeError(f"tree must be {example} (or a preset name, auto:N, a JSON file); got {paths!r:.60}")
    if len(paths) == 0:
        raise ValueError(
            "the tree has no paths: give at least one (e.g. --tree chain_1, [[0]] in Python), or decode without the "
            "heads (--no-medusa; medusa=False in Python)"
        )
    seen: set[Path_] = set()
    for p in paths:
        if not isinstance(p, Sequence | torch.Tensor) or isinstance(p, str | bytes):
            raise TypeError(f"tree path {p!r:.40} is not a list of ranks: the tree must be {example}")
        if not all(isinstance(r, numbers.Integral | torch.Tensor) and not isinstance(r, bool) for r in p):
            raise TypeError(f"tree path {list(p)!r:.60} holds something other than integer ranks: the tree must be {example}")
        path = tuple(int(r) for r in p)
        if len(path) == 0 or min(path) < 0:
            raise ValueError(
                f"tree path {list(p)} is empty or has a negative rank: ranks are 0-based top-k indices"
            )
        if path in seen:
            raise ValueError(f"tree path {list(path)} appears twice")
        seen.add(path)
    for path in seen:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(
                f"tree path {list(path)} has no parent {list(path[:-1])}: every prefix of a path must be a path"
            )
    depth = max(len(p) for p in seen)
    if num_heads is not None and depth > num_heads and not given:
        raise ValueError(f"the tree is {depth} deep but the heads are {num_heads}")
    if num_heads is not None and depth > num_heads:
        raise ValueError(
            f"the tree is {depth} deep but the model has {num_heads} Medusa heads: leave out --tree (the heads' "
            f"tree.json, else mc_sim_7b_63 pruned to {num_heads} heads), pass a tree of depth <= {num_heads} "
            f"(e.g. --tree chain_{num_heads}; prune_tree(paths, {num_heads}) in Python), or use more heads"
        )
    return sorted(seen, key=lambda p: (len(p), p))


def prune_tree(paths: Sequence[Sequence[int]], max_depth: int) -> list[list[int]]:
    """The paths no deeper than `max_depth`, order kept (a tree for fewer heads)."""
    return [list(p) for p in paths if len(p) <= max_depth]


# Tokens a verify pass may hold, all rows together, for the default tree: B x (nodes + 1) <= this. A weight GEMM
# is memory-bound below about (peak FLOP/s) / (bytes/s) tokens, ~295 for bf16 on an H100, so up to there a
# pass costs little more than a plain step's, whatever the model's size; past it every token costs compute.
# On an H100 (SmolLM2, batch 16), a 64-node tree (1,040 tokens a pass) decoded at 0.81x plain greedy and a
# 16-node one (272 tokens) at 1.71x (bench/results/decode_trained_heads_h100).
VERIFY_TOKEN_BUDGET = 256


def default_tree_nodes(batch_size: int, budget: int = VERIFY_TOKEN_BUDGET) -> int:
    """Nodes of the default tree at this batch size: the largest 2^k - 1 with batch_size * 2^k <= budget
    (whole GPU tiles per row), 0 where not even one node fits (then plain decoding is the default)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_row = budget // batch_size
    return 0 if per_row < 2 else (1 << (per_row.bit_length() - 1)) - 1


def leading_subtree(paths: Sequence[Sequence[int]], num_nodes: int) -> list[list[int]]:
    """The first `num_nodes` nodes of `paths` in their listed order whose parent came before them: for a tree
    listed in the order its nodes were added (presets, `build_tree`, tree.json), its best smaller tree."""
    taken: set[Path_] = set()
    out: list[list[int]] = []
    for p in paths:
        if len(out) == num_nodes:
            break
        node = tuple(int(r) for r in p)
        if node not in taken and (len(node) == 1 or node[:-1] in taken):
            taken.add(node)
            out.append(list(node))
    return out


def _is_count(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def check_tree_name(name: str) -> str:
    """The node count of an "auto:N" tree name is an integer >= 1 (checked before any work is done)."""
    if name.startswith("auto:"):
        size = name[len("auto:") :]
        if not _is_count(size) or int(size) < 1:
            raise ValueError(f"tree {name!r}: the node count after 'auto:' must be an integer >= 1, e.g. auto:63")
    return name


def resolve_tree(
    tree: str | os.PathLike | Sequence[Sequence[int]] | None,
    num_heads: int,
    tree_info: dict | None = None,
    batch_size: int = 1,
) -> list[Path_]:
    """A tree given as None, a preset name, "auto:N", a JSON file, or a list of paths.

    `tree_info` is the heads' measured tree.json (see `fastmedusa.decode.accuracy`): None then means its
    tree, and "auto:N" an N-node tree built from its measurements. Without it, None means mc_sim_7b_63
    pruned to `num_heads`, and "auto:N" is an error (there is nothing to build from). For a batch, None keeps
    `default_tree_nodes(batch_size)` nodes of that tree at most (its best subtree; [] where none fits)."""
    if tree is None:
        cap = default_tree_nodes(batch_size)
        full = tree_info["paths"] if tree_info is not None else prune_tree(MC_SIM_7B_63, num_heads)
        if cap >= len(full):
            return validate_paths(full, num_heads)
        if cap == 0:
            return []
        if tree_info is not None and tree_info.get("rank_accuracies"):  # the best tree of that size
            return validate_paths(build_tree(tree_info["rank_accuracies"], cap, chains=info_chains(tree_info)), num_heads)
        return validate_paths(leading_subtree(full, cap), num_heads)
    if isinstance(tree, str | os.PathLike):
        name = str(tree)
        if name in PRESETS:
            return validate_paths(PRESETS[name], num_heads)
        if name.startswith("chain_") and _is_count(name[len("chain_") :]):
            return validate_paths(chain_tree(int(name[len("chain_") :])), num_heads)
        if name.startswith("auto:"):
            check_tree_name(name)
            size = name[len("auto:") :]
            if tree_info is not None and not tree_info.get("rank_accuracies"):
                raise ValueError(
                    f"tree {name!r} is built from the heads' measured accuracies, and their tree.json holds none "
                    "(no rank_accuracies): measure them again (`fastmedusa bench heads --heads DIR --write-tree`), "
                    "or leave out --tree"
                )
            if tree_info is None:
                raise ValueError(
                    f"tree {name!r} is built from the heads' measured accuracies, and these heads have no "
                    "tree.json with them: measure them (`fastmedusa bench heads --heads DIR --write-tree`), or "
                    "leave out --tree (mc_sim_7b_63 pruned to the heads)"
                )
            paths = build_tree(tree_info["rank_accuracies"], int(size), chains=info_chains(tree_info))
            return validate_paths(paths, num_heads)
        if not name.strip():
            raise ValueError(
                f"tree {name!r} is empty: pass a JSON file of paths, auto:<nodes>, or one of {preset_names()}"
            )
        if Path(name).is_file():
            return validate_paths(load_tree(name, num_heads), num_heads)
        if Path(name).exists() and not Path(name).is_dir():
            raise ValueError(f"tree {name} is not a regular file: pass a JSON file of paths (e.g. a tree.json)")
        if Path(name).is_dir():
            raise IsADirectoryError(f"tree {name} is a directory: pass its tree.json (a JSON list of paths)")
        if name.endswith(".json") or os.sep in name:
            raise FileNotFoundError(
                f"tree file {name}: no such file; pass an existing JSON list of paths (a heads directory's "
                f"tree.json works), auto:<nodes>, or one of {preset_names()}"
            )
        raise ValueError(
            f"unknown tree {name!r}: use one of {preset_names()}, auto:<nodes>, or a JSON file of paths"
        )
    return validate_paths(tree, num_heads)


@dataclass
class TreeBuffers:
    """Index tensors for one verify pass over N = len(paths) + 1 nodes (node 0 = root).

    attention_mask (N, N) bool: node i sees node j iff j is i or an ancestor of i.
    tree_indices (N,): where each node's token sits in `cat([root], topk[:depth].flatten())`.
    depths (N,): 0 for the root; position of node i = current length + depths[i].
    parents (N,): parent node (the root is its own parent, never checked).
    retrieve_indices (P, depth + 1): the nodes of each root-to-leaf path, padded with 0.
    path_valid (P, depth + 1) bool: False on padding.
    """

    paths: list[Path_]
    attention_mask: torch.Tensor
    tree_indices: torch.Tensor
    depths: torch.Tensor
    parents: torch.Tensor
    retrieve_indices: torch.Tensor
    path_valid: torch.Tensor
    topk: int
    depth: int

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    def to(self, device: torch.device | str) -> TreeBuffers:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return TreeBuffers(**moved)


def build_tree_buffers(
    paths: Sequence[Sequence[int]], num_heads: int | None = None, device: torch.device | str = "cpu"
) -> TreeBuffers:
    """The verify-pass buffers of a tree (see `TreeBuffers`)."""
    nodes = validate_paths(paths, num_heads)
    index = {p: i + 1 for i, p in enumerate(nodes)}  # node 0 is the root
    n = len(nodes) + 1
    topk = max(max(p) for p in nodes) + 1
    depth = max(len(p) for p in nodes)
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    tree_indices = torch.zeros(n, dtype=torch.long)
    depths = torch.zeros(n, dtype=torch.long)
    parents = torch.zeros(n, dtype=torch.long)
    for p, i in index.items():
        for d in range(1, len(p)):
            mask[i, index[p[:d]]] = True
        tree_indices[i] = 1 + (len(p) - 1) * topk + p[-1]
        depths[i] = len(p)
        parents[i] = index[p[:-1]] if len(p) > 1 else 0
    parent_paths = {p[:-1] for p in nodes}
    leaves = [p for p in nodes if p not in parent_paths]
    retrieve = torch.zeros(len(leaves), depth + 1, dtype=torch.long)
    valid = torch.zeros(len(leaves), depth + 1, dtype=torch.bool)
    for row, leaf in enumerate(leaves):
        valid[row, : len(leaf) + 1] = True
        for d in range(1, len(leaf) + 1):
            retrieve[row, d] = index[leaf[:d]]
    buffers = TreeBuffers(nodes, mask, tree_indices, depths, parents, retrieve, valid, topk, depth)
    return buffers.to(device)


@functools.lru_cache(maxsize=64)
def cached_tree_buffers(paths: tuple[tuple[int, ...], ...], num_heads: int | None, device: str) -> TreeBuffers:
    """`build_tree_buffers`, built and moved once per tree and device: `generate` asks for them at every call
    (building a 64-node tree took ~2 ms of Python, and moving it ten small host-to-device copies). Callers
    must not write into the returned tensors."""
    if device != "cpu":
        return cached_tree_buffers(paths, num_heads, "cpu").to(device)
    return build_tree_buffers(paths, num_heads)


# -- trees from measured accuracies ---------------------------------------------------------------------


def _as_rank_accuracies(rank_accuracies: Sequence[Sequence[float]] | torch.Tensor) -> list[list[float]]:
    acc = torch.as_tensor(rank_accuracies, dtype=torch.float64)
    if acc.ndim != 2 or acc.numel() == 0:
        raise ValueError(f"rank_accuracies must be (num_heads, num_ranks), got shape {tuple(acc.shape)}")
    if (acc < 0).any() or (acc > 1).any():
        raise ValueError("rank_accuracies must be probabilities in [0, 1]")
    return acc.tolist()


def path_probability(path: Sequence[int], rank_accuracies: Sequence[Sequence[float]]) -> float:
    """P(every node on the path is accepted), heads assumed independent (as Medusa's tree search does)."""
    prob = 1.0
    for head, rank in enumerate(path):
        prob *= rank_accuracies[head][rank]
    return prob


# Weight of the independent estimate in `AcceptanceModel`'s conditional rates, in positions: a node whose parent
# was accepted at this many measured positions gets half its rate from them and half from the head's marginal.
CHAIN_PRIOR_WEIGHT = 8.0

Chains = Mapping[tuple[int, ...], int]


class AcceptanceModel:
    """P(a tree node is accepted), the quantity a tree search ranks nodes by.

    A node (r1, ..., rd) is accepted when, for every j <= d, head j's rank-rj token is the base model's token.
    Medusa's tree search multiplies the heads' marginal rank accuracies, as if heads erred independently.
    They do not: where head 1 is right the context is predictable and head 2 is right more often too, so the
    product underrates deep paths (trained SmolLM2 heads, 63-node tree: 3.67 tokens per step by the product, 3.90
    measured on unseen prompts, 3.91 by this estimate; bench/results/tree_joint_h100).

    `chains` are measured joint outcomes: for each scored position, the ranks at which heads 1, 2, ... held the
    base model's tokens, cut at the first head that missed (an empty chain: head 1 missed), mapped to how many
    positions ended that way. Then P(node) = P(parent) * q, where q, the rate at which the node's head holds
    its rank where the parent was accepted, is (positions through the node + w * marginal) / (positions
    through the parent + w): the measured conditional rate where the parent was reached often, the head's
    marginal (the independent estimate) where it was reached rarely; w = `prior_weight`. (The marginals count
    every position a head was scored at, the chains only those where every head was.) Without chains it is
    the independent product. A child is never likelier than its parent, so the likeliest N nodes form a tree.
    """

    def __init__(
        self,
        rank_accuracies: Sequence[Sequence[float]] | torch.Tensor,
        chains: Chains | None = None,
        prior_weight: float = CHAIN_PRIOR_WEIGHT,
    ) -> None:
        self.accuracies = _as_rank_accuracies(rank_accuracies)
        self.num_heads, self.ranks = len(self.accuracies), len(self.accuracies[0])
        if prior_weight < 0 or not math.isfinite(prior_weight):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight}")
        self.prior_weight = float(prior_weight)
        self.through: dict[Path_, int] | None = None  # positions whose chain passes through each node
        if chains:
            self.through = _positions_through(check_chains(chains, self.num_heads, self.ranks))
        self._memo: dict[Path_, float] = {(): 1.0}

    @property
    def joint(self) -> bool:
        return self.through is not None

    def __call__(self, path: Sequence[int]) -> float:
        node = tuple(int(r) for r in path)
        if node in self._memo:
            return self._memo[node]
        head, rank = len(node) - 1, node[-1]
        if head >= self.num_heads or not 0 <= rank < self.ranks:
            raise ValueError(
                f"tree path {list(node)} needs head {head + 1}'s rank {rank}, but accuracies were measured for "
                f"{self.num_heads} heads and ranks 0..{self.ranks - 1}"
            )
        marginal = self.accuracies[head][rank]
        rate = marginal
        if self.through is not None:
            reached = self.through.get(node[:-1], 0)
            if reached + self.prior_weight > 0:
                rate = (self.through.get(node, 0) + self.prior_weight * marginal) / (reached + self.prior_weight)
        prob = self(node[:-1]) * rate
        self._memo[node] = prob
        return prob


def check_chains(chains: Chains, num_heads: int, ranks: int) -> dict[Path_, int]:
    """Accepted-rank chains as a dict of tuples to counts, checked against the heads and ranks measured."""
    checked: dict[Path_, int] = {}
    for chain, count in chains.items():
        node = tuple(chain)
        if len(node) > num_heads or any(not isinstance(r, int) or not 0 <= r < ranks for r in node):
            raise ValueError(
                f"accepted chain {list(node)} does not fit {num_heads} heads and ranks 0..{ranks - 1}: the chains "
                "and the rank accuracies come from different measurements; measure the heads again"
            )
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"accepted chain {list(node)} has count {count!r}: counts are integers >= 0")
        checked[node] = checked.get(node, 0) + count
    return checked


def _positions_through(chains: dict[Path_, int]) -> dict[Path_, int]:
    """For every prefix of every chain (the root () included), the positions whose chain starts with it."""
    through: dict[Path_, int] = {}
    for chain, count in chains.items():
        for depth in range(len(chain) + 1):
            through[chain[:depth]] = through.get(chain[:depth], 0) + count
    return through


def info_chains(tree_info: dict | None) -> dict[Path_, int] | None:
    """The measured chains of a tree.json payload (`accepted_chains`), None where it has none."""
    rows = None if tree_info is None else tree_info.get("accepted_chains")
    return None if rows is None else chains_from_json(rows)


def chains_to_json(chains: Chains) -> list[list]:
    """[[ranks, count], ...], most frequent first (JSON has no tuple keys)."""
    return [[list(c), n] for c, n in sorted(chains.items(), key=lambda item: (-item[1], item[0]))]


def chains_from_json(rows: object) -> dict[Path_, int]:
    """Inverse of `chains_to_json`; a malformed list is a ValueError."""
    ok = isinstance(rows, list) and all(
        isinstance(row, list) and len(row) == 2 and isinstance(row[0], list)
        and all(isinstance(r, int) and not isinstance(r, bool) for r in row[0])
        and isinstance(row[1], int) and not isinstance(row[1], bool)
        for row in rows
    )  # fmt: skip
    if not ok:
        raise ValueError("accepted_chains must be a list of [ranks, count] pairs, e.g. [[[0, 0], 12], [[], 30]]")
    chains: dict[Path_, int] = {}
    for ranks, count in rows:  # a chain listed twice counts twice, as `check_chains` adds them
        chains[tuple(ranks)] = chains.get(tuple(ranks), 0) + count
    return chains


def expected_accept_length(
    paths: Sequence[Sequence[int]],
    rank_accuracies: Sequence[Sequence[float]] | torch.Tensor,
    chains: Chains | None = None,
) -> float:
    """Expected tokens per verify step: 1 (the root) + sum over nodes of P(node accepted) (`AcceptanceModel`:
    the independent product, or with measured `chains` the joint estimate)."""
    model = AcceptanceModel(rank_accuracies, chains)
    return 1.0 + sum(model(p) for p in paths)


def measured_accept_length(paths: Sequence[Sequence[int]], chains: Chains) -> float:
    """Tokens per verify step the tree would have given at the measured positions: 1 + the depth of the
    longest prefix of each position's chain that is a node, averaged over positions. Greedy acceptance is
    exactly that, so trees built on some prompts can be scored on others (`fastmedusa bench heads`)."""
    tree = {tuple(int(r) for r in p) for p in paths}
    total = sum(chains.values())
    if total <= 0:
        raise ValueError("no measured positions to score the tree on")
    accepted = 0
    for chain, count in chains.items():
        depth = 0
        while depth < len(chain) and tuple(chain[: depth + 1]) in tree:
            depth += 1
        accepted += depth * count
    return 1.0 + accepted / total


def build_tree(
    rank_accuracies: Sequence[Sequence[float]] | torch.Tensor,
    num_nodes: int,
    max_depth: int | None = None,
    chains: Chains | None = None,
) -> list[list[int]]:
    """Greedy tree search: add, `num_nodes` times, the child with the highest acceptance probability.

    rank_accuracies[k][r] = P(head k+1's rank-r token is the one the base model picks); `chains`, when
    measured, make the probabilities joint (`AcceptanceModel`). Each added node adds its probability to the
    expected accepted length, and a child is never likelier than its parent, so taking the likeliest frontier
    node each time gives the best tree for the budget. Paths come out in the order they were added (every
    leading slice is itself a tree).
    """
    model = AcceptanceModel(rank_accuracies, chains)
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    depth_limit = model.num_heads if max_depth is None else min(max_depth, model.num_heads)
    frontier: list[tuple[float, Path_]] = [(-model((r,)), (r,)) for r in range(model.ranks)]
    heapq.heapify(frontier)
    paths: list[list[int]] = []
    while frontier and len(paths) < num_nodes:
        _, path = heapq.heappop(frontier)
        paths.append(list(path))
        if len(path) < depth_limit:
            for r in range(model.ranks):
                heapq.heappush(frontier, (-model((*path, r)), (*path, r)))
    return paths


def save_tree(path: str | os.PathLike, paths: Sequence[Sequence[int]], **extra: object) -> Path:
    """Write `{"paths": [...], ...extra}` as JSON (what `--tree FILE` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"paths": [list(p) for p in paths], **extra}, indent=1) + "\n")
    return path


def stated_num_heads(data: object, where: str, fix: str) -> int | None:
    """The `num_heads` a tree file states (None when it states none); anything but a count >= 1 is refused."""
    stated = data.get("num_heads") if isinstance(data, dict) else None
    if stated is not None and (not isinstance(stated, int) or isinstance(stated, bool) or stated < 1):
        raise ValueError(f"{where}: num_heads is {stated!r}, not a whole number of heads: {fix}")
    return stated


def load_tree(path: str | os.PathLike, num_heads: int | None = None) -> list[list[int]]:
    """Paths from a JSON file: `{"paths": [[0], [0, 0], ...]}` or a bare list of paths. A file that says it
    was measured for another number of heads (`num_heads`) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tree file at {path}: write one with `fastmedusa bench heads`")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"tree file {path} is not UTF-8 text: expected JSON {{'paths': [[0], [0, 0], ...]}}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"tree file {path} is not JSON ({err.msg}): expected {{'paths': [[0], [0, 0], ...]}}") from None
    paths = data.get("paths") if isinstance(data, dict) else data
    valid = isinstance(paths, list) and all(
        isinstance(p, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in p) for p in paths
    )
    if not valid:
        raise ValueError(
            f"tree file {path} holds no list of paths of integer ranks: expected {{'paths': [[0], [0, 0], ...]}}"
        )
    if not paths:
        raise ValueError(f"tree file {path} holds no paths: expected {{'paths': [[0], [0, 0], ...]}}")
    theirs = stated_num_heads(data, f"tree file {path}", "fix or drop it")
    if num_heads is not None and theirs is not None and theirs != num_heads:
        raise ValueError(
            f"{path} is a tree for {theirs} Medusa heads but these heads have {num_heads}: use a tree made "
            "for these heads (re-measure with `fastmedusa bench heads --write-tree`)"
        )
    return paths
