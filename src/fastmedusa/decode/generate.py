"""The generation loop: plain greedy/sampling and Medusa tree decoding on one `DecodeEngine`.

Medusa step (one forward per step): the heads' top-k on the hidden state of the last accepted token give
the tree's tokens; the root is the token the base LM head already chose. One verify forward runs every tree
node with the tree mask; the longest path whose tokens the base model agrees with is accepted, its KV rows
are moved into place, and the base model's choice after the last accepted node becomes the next root.
Everything in a step has static shapes; the host reads two integers per step (accepted length, EOS).

What "lossless" means. A token is accepted only if it is the argmax of the base model's logits at its
parent, computed in the verify forward, so in fp32 Medusa greedy equals plain greedy token for token (the
tests check this). In bf16/fp16 the verify forward (N query rows, a tree mask) and the one-token greedy step
are different matmul/attention shapes, so KV rows and logits differ in the last bits; where the top two
logits are closer than that noise the argmax can flip, and from there the two continuations diverge. Both
remain greedy up to argmax ties within rounding: every emitted token's fp32 logit is within ~2x the
low-precision noise of the fp32 maximum (tests/decode/test_low_precision.py). Measured on SmolLM2-135M in
bf16 (CPU): at each first divergence the fp32 gap between the two tokens was 0.02-0.06, below one bf16 ulp
of the logits (0.125-0.25), and the plain-vs-Medusa logit difference was up to 0.3. Computing the final
norm and LM head in fp32 does not remove these flips (the difference is already in the hidden state) and
would add the LM head's fp32 read to every step, so the engine keeps the model dtype throughout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastmedusa.decode.engine import DecodeEngine, get_engine
from fastmedusa.decode.trees import TreeBuffers, build_tree_buffers, resolve_tree

TreeSpec = str | os.PathLike | Sequence[Sequence[int]] | None


@dataclass
class GenerationOutput:
    """What `generate` returns. A step is one model forward; the prefill counts as one (it yields a token)."""

    sequences: torch.Tensor  # (1, prompt + new) LongTensor
    prompt_length: int
    new_tokens: int
    steps: int
    seconds: float
    accept_lengths: list[int] = field(default_factory=list)  # speculated tokens accepted per Medusa step
    tree_nodes: int = 0  # nodes per verify pass (0 = plain decoding)

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def new_token_ids(self) -> torch.Tensor:
        return self.sequences[0, self.prompt_length :]

    def summary(self) -> str:
        mode = f"medusa ({self.tree_nodes}-node tree)" if self.tree_nodes else "plain"
        return (
            f"{mode}: {self.new_tokens} tokens in {self.steps} steps, {self.tokens_per_step:.2f} tokens/step, "
            f"{self.tokens_per_s:.1f} tokens/s ({self.seconds:.2f} s)"
        )


# -- sampling and acceptance (pure tensor code, traced into the compiled steps) ------------------------


def sample_token(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """argmax at temperature 0, else a sample from softmax(logits / T) by the exponential-race trick,
    which needs no host sync (torch.multinomial would)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(-1)


def node_acceptance(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: float,
    epsilon: float,
    delta: float,
) -> torch.Tensor:
    """(N,) bool: would the base model, at node i's parent, accept node i's token?

    Greedy (temperature 0): the token is the parent's argmax, which makes Medusa lossless. Typical
    acceptance: p(token) > min(epsilon, delta * exp(-H(p))), p = softmax(parent logits / temperature).
    """
    if temperature <= 0:
        return tokens == logits.argmax(-1)[parents]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    return probs[parents, tokens] > threshold[parents]


def longest_accepted_path(node_ok: torch.Tensor, tree: TreeBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(best path row, its number of accepted speculated tokens), both (1,); the first path wins ties.

    Indices stay 1-element tensors (never 0-d): indexing with a 0-d tensor is an `.item()` to torch.compile,
    a host sync that would split the compiled step.
    """
    ok = node_ok[tree.retrieve_indices[:, 1:]] & tree.path_valid[:, 1:]  # (P, depth)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (P,)
    best = accepted.argmax().view(1)
    return best, accepted[best]


# -- step functions -----------------------------------------------------------------------------------


def _eos_position(emitted: torch.Tensor, count: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """Index of the first EOS among the first `count` emitted tokens, else len(emitted)."""
    ar = torch.arange(emitted.shape[0], device=emitted.device)
    if eos_ids is None:
        return torch.full((), emitted.shape[0], device=emitted.device, dtype=torch.long)
    is_eos = (emitted[:, None] == eos_ids[None, :]).any(-1) & (ar < count)
    return torch.where(is_eos, ar, emitted.shape[0]).min()


def make_greedy_step(engine: DecodeEngine, temperature: float) -> Callable:
    """(token (1,), cur_len (1,)) -> (next token (1,), cur_len + 1): one token through the cached model."""
    positions = torch.arange(engine.max_len, device=engine.device)

    def step(token: torch.Tensor, cur_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = positions[None, :] <= cur_len[:, None]  # (1, max_len)
        hidden = engine(token[None], cur_len, mask)  # (1, 1, H)
        nxt = sample_token(engine.logits(hidden[0]), temperature)  # (1,)
        return nxt, cur_len + 1

    step.static_tensors = [positions]
    return step


def make_medusa_step(
    engine: DecodeEngine,
    heads: nn.Module,
    tree: TreeBuffers,
    temperature: float,
    epsilon: float,
    delta: float,
    eos_ids: torch.Tensor | None,
) -> Callable:
    """One Medusa step: (root (1,), hidden of the last token (1, H), cur_len (1,)) ->
    (emitted (depth+1,), [accepted, eos index] (2,), next root, next hidden, next cur_len).

    emitted[:accepted] are the accepted speculated tokens and emitted[accepted] is the next root (the base
    model's own token after them), so a step yields accepted + 1 tokens.
    """
    positions = torch.arange(engine.max_len, device=engine.device)
    n, depth = tree.num_nodes, tree.depth
    steps_ar = torch.arange(depth + 1, device=engine.device)
    node_rows = torch.arange(n, device=engine.device)

    def step(root: torch.Tensor, hidden_last: torch.Tensor, cur_len: torch.Tensor):
        # token ids, best first: draft_topk maps a draft-vocabulary head's rows back through its token_map
        topk = heads.draft_topk(hidden_last, tree.topk)[:depth, 0]  # (depth, topk)
        tokens = torch.cat([root, topk.reshape(-1)])[tree.tree_indices]  # (N,)
        # Node i sits in cache row cur_len + i at RoPE position cur_len + depth(i); it sees the prefix and
        # its tree ancestors.
        rel = positions - cur_len  # (max_len,)
        in_tree = (rel >= 0) & (rel < n)
        mask = (rel < 0)[None, :] | (tree.attention_mask[:, rel.clamp(0, n - 1)] & in_tree[None, :])
        hidden = engine.forward_at(tokens[None], cur_len + node_rows, cur_len + tree.depths, mask)
        logits = engine.logits(hidden[0])  # (N, V)
        node_ok = node_acceptance(logits, tokens, tree.parents, temperature, epsilon, delta)
        best, accepted = longest_accepted_path(node_ok, tree)
        path = tree.retrieve_indices[best][0]  # (depth+1,)
        last = path[accepted]  # (1,)
        next_root = sample_token(logits[last], temperature)  # (1,)
        speculated = tokens[path[1:]]
        emitted = torch.where(steps_ar == accepted, next_root, torch.cat([speculated, next_root]))
        info = torch.cat([accepted, _eos_position(emitted, accepted + 1, eos_ids).view(1)])
        engine.move_kv(cur_len + path, cur_len + steps_ar)
        return emitted, info, next_root, hidden[0, last], cur_len + accepted + 1

    step.static_tensors = [positions, steps_ar, node_rows, *vars(tree).values()]
    step.static_tensors += list(heads.parameters()) if isinstance(heads, nn.Module) else []
    return step


def _mark_static(tensors) -> None:
    """Tell CUDA graphs these tensors keep their address (as HF's StaticCache does for its KV buffers), so a
    replay reads them in place instead of first copying them into the graph's input slots."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            torch._dynamo.mark_static_address(t)


def _compiled(engine: DecodeEngine, key: tuple, build: Callable[[], Callable], compile: bool) -> Callable:
    """Build (and compile) a step once per engine and key, so repeated calls reuse CUDA graphs."""
    key = (*key, compile)
    if key not in engine.compiled:
        fn = build()
        if compile:
            _mark_static([*engine.buffers(), *getattr(fn, "static_tensors", [])])
            mode = "reduce-overhead" if engine.device.type == "cuda" else "default"
            fn = torch.compile(fn, mode=mode, fullgraph=True)
        engine.compiled[key] = fn
    return engine.compiled[key]


# -- the public entry point ---------------------------------------------------------------------------


def _split_model(model: nn.Module, heads: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    if hasattr(model, "medusa_heads") and hasattr(model, "base"):
        return model.base, heads if heads is not None else model.medusa_heads
    return model, heads


def _check_inputs(input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError("input_ids must be an integer tensor of token ids, shape (1, prompt_len)")
    ids = input_ids.long().reshape(1, -1) if input_ids.ndim == 1 else input_ids.long()
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"the decode engine runs batch 1; got input_ids of shape {tuple(input_ids.shape)}: "
            "call generate once per prompt (sequences accept different lengths per step)"
        )
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return ids


def _check_heads(heads: nn.Module, engine: DecodeEngine) -> None:
    """Heads trained for another base model fail loudly here, not with a shape error mid-step."""
    config = getattr(heads, "config", None)
    for name, mine in (("hidden_size", engine.hidden_size), ("vocab_size", engine.vocab_size)):
        theirs = getattr(config, name, None)
        if theirs is not None and theirs != mine:
            raise ValueError(
                f"the Medusa heads have {name}={theirs} but the base model has {mine}: "
                "these heads were trained for another base model; pass the matching --model"
            )


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    medusa: bool = True,
    temperature: float = 0.0,
    tree: TreeSpec = None,
    eos_token_id: int | Sequence[int] | None = None,
    typical_epsilon: float = 0.09,
    typical_delta: float = 0.3,
    heads: nn.Module | None = None,
    compile: bool | None = None,
    max_len: int | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` after `input_ids` (1, P), stopping after an EOS token.

    `model` is a `MedusaModel` or a plain HF Llama-family causal LM (then `medusa=False`, or pass `heads`:
    any module with `draft_topk(hidden (..., H), k) -> (K, ..., k)` token ids and `num_heads`). temperature 0 is
    greedy (Medusa output then equals plain greedy token for token in fp32, and up to argmax near-ties
    within rounding in bf16/fp16: see the module docstring); above 0, tokens are sampled and
    speculated tokens pass typical acceptance (`typical_epsilon`, `typical_delta`). `tree`: a preset name,
    a JSON file, a list of paths, or None (mc_sim_7b_63 pruned to the number of heads). `compile`: default
    on CUDA only (CUDA graphs); `max_len`: KV cache rows (default: enough for this call, rounded up).
    """
    base, heads = _split_model(model, heads)
    ids = _check_inputs(input_ids, max_new_tokens)
    tree_buffers = None
    if medusa:
        if heads is None:
            raise ValueError("medusa=True needs Medusa heads: pass a MedusaModel, heads=..., or medusa=False")
        tree_buffers = build_tree_buffers(resolve_tree(tree, heads.num_heads), heads.num_heads)
    slack = tree_buffers.num_nodes if tree_buffers is not None else 0
    needed = ids.shape[1] + max_new_tokens + slack
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) + tree ({slack} nodes) = "
            f"{needed} does not fit the KV cache of {max_len} rows: shorten the prompt or raise max_len"
        )
    engine = get_engine(base, needed, max_len)
    ids = ids.to(engine.device)
    compile = engine.device.type == "cuda" if compile is None else compile
    eos_ids = _eos_tensor(eos_token_id, engine.device)
    if tree_buffers is not None:
        _check_heads(heads, engine)
        tree_buffers = tree_buffers.to(engine.device)
    _sync(engine.device)
    start = time.perf_counter()
    if tree_buffers is None:
        new, steps, accepts = _plain_loop(engine, ids, max_new_tokens, temperature, eos_ids, compile)
    else:
        key = ("medusa", tuple(tree_buffers.paths), id(heads), temperature, typical_epsilon, typical_delta)
        key += (None if eos_ids is None else tuple(eos_ids.tolist()),)
        step = _compiled(
            engine,
            key,
            lambda: make_medusa_step(
                engine, heads, tree_buffers, temperature, typical_epsilon, typical_delta, eos_ids
            ),
            compile,
        )
        new, steps, accepts = _medusa_loop(
            engine, step, ids, max_new_tokens, tree_buffers.depth, temperature, eos_ids, compile
        )
    _sync(engine.device)
    seconds = time.perf_counter() - start
    sequences = torch.cat([ids, new[None].to(ids.device)], dim=1).to(input_ids.device)
    nodes = tree_buffers.num_nodes if tree_buffers is not None else 0
    return GenerationOutput(sequences, ids.shape[1], new.numel(), steps, seconds, accepts, nodes)


def _prefill(
    engine: DecodeEngine, ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the prompt through the cache (eager: its length varies): first new token, last hidden, cur_len."""
    length = ids.shape[1]
    pos = torch.arange(length, device=engine.device)
    hidden = engine(ids, pos, engine.causal_mask(0, length))  # (1, P, H)
    token = sample_token(engine.logits(hidden[0, -1:]), temperature)  # (1,)
    return token, hidden[0, -1:], torch.full((1,), length, device=engine.device, dtype=torch.long)


def _is_eos(token: torch.Tensor, eos_ids: torch.Tensor | None) -> bool:
    return eos_ids is not None and bool((token[:, None] == eos_ids[None, :]).any())


def _mark_step(compile: bool, engine: DecodeEngine) -> None:
    if compile and engine.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _plain_loop(engine, ids, max_new_tokens, temperature, eos_ids, compile):
    """One token per forward. Without EOS ids the loop never waits for the device."""
    step = _compiled(engine, ("plain", temperature), lambda: make_greedy_step(engine, temperature), compile)
    out = torch.empty(max_new_tokens, dtype=torch.long, device=engine.device)
    token, _, cur_len = _prefill(engine, ids, temperature)
    out[:1] = token
    n = 1
    while n < max_new_tokens and not _is_eos(token, eos_ids):
        _mark_step(compile, engine)
        token, cur_len = step(token, cur_len)
        token, cur_len = token.clone(), cur_len.clone()
        out[n : n + 1] = token
        n += 1
    return out[:n], n, []


def _medusa_loop(engine, step, ids, max_new_tokens, depth, temperature, eos_ids, compile):
    """Medusa steps until max_new_tokens or EOS; the only host reads are [accepted, eos index] per step."""
    root, hidden, cur_len = _prefill(engine, ids, temperature)
    out = torch.empty(max_new_tokens + depth + 1, dtype=torch.long, device=engine.device)
    out[:1] = root
    n, steps, accepts = 1, 1, []
    stop = _is_eos(root, eos_ids)
    while n < max_new_tokens and not stop:
        _mark_step(compile, engine)
        emitted, info, root, hidden, cur_len = step(root, hidden, cur_len)
        root, hidden, cur_len = root.clone(), hidden.clone(), cur_len.clone()
        accepted, eos_at = info.tolist()
        count = min(accepted + 1, eos_at + 1)
        out[n : n + count] = emitted[:count]
        n, steps, stop = n + count, steps + 1, eos_at <= accepted
        accepts.append(accepted)
    return out[: min(n, max_new_tokens)], steps, accepts
