"""The generation loop: plain greedy/sampling and Medusa tree decoding on one `DecodeEngine`, for a
left-padded batch of B prompts (B = 1 included).

Batches. Every row keeps its own length: its tokens sit at its own cache slots, get their own RoPE positions
(a row's first real token is position 0 whatever its left pad) and attend under their own mask, so a row
computes what it computes alone; with Medusa each row accepts its own number of tokens per step. A row that
reaches EOS or max_new_tokens is frozen (its length stops moving, its outputs are dropped) until every row
is done. The host never waits on a step it just launched: it reads "all rows done" one step late, so at
most one spare step runs at the end.

Medusa step (one forward per step): the heads' top-k on the hidden state of the last accepted token give
the tree's tokens; the root is the token the base LM head already chose. One verify forward runs every tree
node with the tree mask; the longest path whose tokens the base model agrees with is accepted, its KV rows
are moved into place, and the base model's choice after the last accepted node becomes the next root.
Everything in a step has static shapes and lives in one compiled function (heads, candidates, mask, verify
forward, acceptance, KV compaction); nothing in it depends on max_new_tokens or the prompt length except
through tensors, so one compiled step serves every call with the same batch size and tree.

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

import logging
import math
import numbers
import operator
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.data.vocab import id_outside
from fastmedusa.decode.accuracy import choose_tree_size, read_tree_json
from fastmedusa.decode.engine import DecodeEngine, check_position_limit, get_engine
from fastmedusa.decode.loop import StepRunner, medusa_body, plain_body, prefill_body, run_loop
from fastmedusa.decode.packed_heads import packed_heads
from fastmedusa.decode.trees import TreeBuffers, cached_tree_buffers, info_chains, resolve_tree
from fastmedusa.model.heads import MedusaHeads, check_draft_k

TreeSpec = str | os.PathLike | Sequence[Sequence[int]] | None
SeedSpec = int | Sequence[int] | torch.Tensor | None

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """What `generate` returns. A step is one model forward; the prefill counts as one (it yields a token).

    `sequences` is (B, P + W): the (left-padded) prompts, then each row's new tokens, then `pad_token_id`
    after a row's end; W is the longest row's number of new tokens (max_new_tokens unless every row stopped
    at EOS earlier). Per-row counts say where each row ends.
    """

    sequences: torch.Tensor  # (B, P + W) LongTensor
    prompt_length: int  # P, the padded prompt width
    new_tokens: int  # over all rows
    steps: int  # forwards the batch ran (the longest row's steps)
    seconds: float
    accept_lengths: list[list[int]] = field(default_factory=list)  # per row: accepted per Medusa step
    tree_nodes: int = 0  # tokens per verify pass: the tree's nodes + the root (0 = plain decoding)
    new_tokens_per_row: list[int] = field(default_factory=list)
    steps_per_row: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def tokens_per_step(self) -> float:
        """New tokens per forward of a row (summed over rows: finished rows' idle steps do not count)."""
        return self.new_tokens / max(sum(self.steps_per_row) or self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        """New tokens of all rows per second (throughput)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def new_token_ids(self) -> torch.Tensor:
        """The new tokens of a batch-1 call (for a batch, use `row_new_token_ids(i)`)."""
        if self.batch_size != 1:
            raise ValueError(
                f"new_token_ids is for batch 1; this output has {self.batch_size} rows: use "
                "row_new_token_ids(i)"
            )
        return self.row_new_token_ids(0)

    def row_new_token_ids(self, row: int) -> torch.Tensor:
        """Row `row`'s new tokens, up to and including its EOS (no padding)."""
        count = self.new_tokens_per_row[row] if self.new_tokens_per_row else self.new_tokens
        return self.sequences[row, self.prompt_length : self.prompt_length + count]

    def summary(self) -> str:
        mode = f"medusa ({self.tree_nodes - 1}-node tree, {self.tree_nodes} tokens per verify pass)" if self.tree_nodes else "plain"
        batch = f", batch {self.batch_size}" if self.batch_size > 1 else ""
        return (
            f"{mode}{batch}: {self.new_tokens} tokens in {self.steps} steps, "
            f"{self.tokens_per_step:.2f} tokens/step, {self.tokens_per_s:.1f} tokens/s ({self.seconds:.2f} s)"
        )


# -- sampling and acceptance (pure tensor code, traced into the compiled steps) ------------------------

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2^32; products stay below 2^63)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def token_keys(vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(V,) int64 per-token keys of `gumbel_noise`. Computed eagerly and passed into compiled steps as a buffer:
    traced, `arange(V) * 0x9E3779B1` becomes an index expression, and Triton refuses that constant as an
    int32 scalar (inductor then fails to compile any sampling step on CUDA)."""
    return (torch.arange(vocab_size, device=device) * 0x9E3779B1) & _MASK32


def gumbel_noise(
    seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., V) Gumbel noise that is a pure function of (row seed, position, token id): seeds and positions
    broadcast to the leading shape, (B,) for one token per row, (B, N) for every node of a tree.

    A counter-based generator: a row samples the same tokens whatever the batch around it, eager or
    compiled, and the step needs no RNG state (no host sync, nothing for CUDA graphs to capture). `keys`:
    `token_keys(vocab_size)`, required inside compiled code."""
    if keys is None:
        keys = token_keys(vocab_size, seeds.device)
    base = _hash32(_hash32(seeds & _MASK32) ^ (positions & _MASK32))  # (...,)
    bits = _hash32(base[..., None] ^ keys) >> 9  # 23 random bits
    return -torch.log(-torch.log(open_unit_interval(bits)))


def open_unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """23-bit integers -> fp32 (k + 0.5) / 2^23, strictly inside (0, 1): every value is exact in fp32, so the
    largest is 1 - 2^-24 and its Gumbel noise stays finite. (With 24 bits, k + 0.5 rounds to 2^24 for the top
    k: the noise is +inf, and that token wins whatever its probability, -inf + inf = NaN included.)"""
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(..., V) -> (...,): argmax at temperature 0, else a sample from softmax(logits / T), truncated to
    `top_k` / `top_p` (`scaled_logits`), by the Gumbel-max trick with `gumbel_noise(seeds, positions, V, keys)`
    (needs no host sync, as torch.multinomial would)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if seeds is None or positions is None:
        raise ValueError("sampling (temperature > 0) needs per-row seeds and positions")
    noise = gumbel_noise(seeds, positions, logits.shape[-1], keys)
    return gumbel_max(logits, temperature, noise, top_k, top_p)


def gumbel_max(
    logits: torch.Tensor, temperature: float, noise: torch.Tensor, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """(..., V) -> (...,): the sample that Gumbel noise (..., V) picks from softmax(`scaled_logits`)."""
    return (scaled_logits(logits, temperature, top_k, top_p) + noise).argmax(-1)


def scaled_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) fp32 logits / temperature, then (in Hugging Face's order) every token outside the `top_k` best
    (0: no limit) and outside the nucleus (the fewest best tokens whose probability reaches `top_p`; 1: no
    limit) set to -inf, so softmax of the result is the truncated, renormalised distribution. Tokens tied with
    the last one kept are kept too."""
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        ordered = z.sort(dim=-1, descending=True).values
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the tokens ranked above each one
        kept = (before < top_p).sum(dim=-1, keepdim=True)  # >= 1: the best token is always kept
        z = z.masked_fill(z < ordered.gather(-1, kept - 1), float("-inf"))
    return z


def node_acceptance(
    logits: torch.Tensor | None,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: float,
    epsilon: float,
    delta: float,
    argmax: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(..., N) bool: would the base model, at node i's parent, accept node i's token?

    logits (..., N, V), tokens (..., N), parents (N,). Greedy (temperature 0): the token is the parent's
    argmax (`argmax`, (..., N), when the caller has taken it already; logits may then be None), which makes
    Medusa lossless; exact sampling passes each node's sample as `argmax`, with temperature 0. Typical
    acceptance: p(token) > min(epsilon, delta * exp(-H(p))), p = softmax(parent logits / temperature,
    truncated to `top_k` / `top_p` as sampling is); computed from per-node log-sum-exp and entropy so that no
    (N, V) probability tensor is kept.
    """
    parent_idx = parents.expand(tokens.shape)
    if temperature <= 0:
        argmax = logits.argmax(-1) if argmax is None else argmax
        return tokens == argmax.gather(-1, parent_idx)
    z = scaled_logits(logits, temperature, top_k, top_p)  # (..., N, V), -inf outside top-k / top-p
    lse = z.logsumexp(-1)  # (..., N)
    p_z = torch.where(z > float("-inf"), torch.softmax(z, dim=-1) * z, 0.0)  # a truncated token adds 0, not NaN
    entropy = lse - p_z.sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    z_token = z.flatten(-2).gather(-1, parent_idx * z.shape[-1] + tokens)  # z[parent(i), token(i)]
    return torch.exp(z_token - lse.gather(-1, parent_idx)) > threshold.gather(-1, parent_idx)


ACCEPTANCE_RULES = ("typical", "exact")


def check_acceptance(acceptance: object) -> str:
    """The acceptance rule of speculated tokens when sampling (temperature > 0), one of ACCEPTANCE_RULES:
    "typical" (Medusa's: a token whose probability clears a threshold) or "exact" (the token the base
    model samples there; `make_medusa_step` says why that is lossless)."""
    if not isinstance(acceptance, str) or acceptance not in ACCEPTANCE_RULES:
        raise ValueError(
            f"acceptance={acceptance!r} (--acceptance): pass 'typical' (Medusa's typical acceptance, more tokens "
            "per step) or 'exact' (the output is distributed exactly as plain sampling)"
        )
    return acceptance


def longest_accepted_path(node_ok: torch.Tensor, tree: TreeBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """node_ok (B, N) -> (best path row, its number of accepted speculated tokens), both (B,); the first
    path wins ties."""
    ok = node_ok[:, tree.retrieve_indices[:, 1:]] & tree.path_valid[:, 1:]  # (B, paths, depth)
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B, paths)
    best = accepted.argmax(dim=-1)  # (B,)
    return best, accepted.gather(1, best[:, None])[:, 0]


def _is_eos(tokens: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """Elementwise: is the token one of the EOS ids."""
    if eos_ids is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return (tokens[..., None] == eos_ids).any(-1)


# -- step functions -----------------------------------------------------------------------------------
# State per row (all (B,) tensors): cur = the cache slot of the newest token, whose KV is not written yet;
# offset = left-pad slots of the row (RoPE position = slot - offset); seeds; n = tokens emitted so far;
# limit = max_new_tokens; done = the row stopped (EOS or limit) and is frozen.


def make_plain_step(
    engine: DecodeEngine,
    temperature: float,
    eos_ids: torch.Tensor | None,
    pad_id: int,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """(token, cur, offset, seeds, n, limit, done) -> (emitted, next token, cur + 1, n, done): one token per
    row. A frozen row emits pad_id but keeps feeding a real token (a pad id may lie outside the vocabulary),
    and stays at its slot: `generate_many` keeps finished rows stepping until their slot is refilled, for as
    many steps as other rows take, and a row that moved on would run past the cache sized for its own tokens."""
    positions = torch.arange(engine.max_len, device=engine.device)
    keys = token_keys(engine.lm_head.shape[0], engine.device)  # per-token noise keys, a static buffer

    def step(token, cur, offset, seeds, n, limit, done):
        mask = (positions[None, :] <= cur[:, None]) & (positions[None, :] >= offset[:, None])  # (B, max_len)
        rope = cur - offset
        kv_end = (cur + 1).clamp(max=engine.max_len)  # the mask's last slot + 1, not reduced out of it
        hidden = engine(token[:, None], cur[:, None], rope[:, None], mask[:, None, :], kv_end)  # (B, 1, H)
        if temperature <= 0:
            nxt = engine.greedy_tokens(hidden[:, 0])  # (B,)
        else:
            nxt = sample_token(engine.logits(hidden[:, 0]), temperature, seeds, rope + 1, keys, top_k, top_p)
        n = n + (~done).long()
        emitted = torch.where(done, pad_id, nxt)
        done = done | _is_eos(nxt, eos_ids) | (n >= limit)
        return emitted, nxt, torch.where(done, cur, cur + 1), n, done

    step.static_tensors = [positions, keys]
    return step


def make_medusa_step(
    engine: DecodeEngine,
    heads: nn.Module,
    tree: TreeBuffers,
    temperature: float,
    epsilon: float,
    delta: float,
    eos_ids: torch.Tensor | None,
    acceptance: str = "typical",
    top_k: int = 0,
    top_p: float = 1.0,
) -> Callable:
    """One Medusa step for every row: (root, hidden of the last token (B, H), cur, offset, seeds, n, limit,
    done) -> (emitted (B, depth+1), columns (B, depth+1), accepted (B,), next root, next hidden, cur, n, done).

    Which speculated tokens pass: at temperature 0, each node's parent's argmax. Sampling with `acceptance`
    "typical", those whose probability at the parent clears Medusa's threshold. With "exact", the verify pass
    samples one token at every node, with the noise plain sampling uses at that position (`gumbel_noise` of
    the row's seed and the position: the same draw whatever else is in the tree), and a node passes when its
    token is its parent's sample. Along the accepted path each sample is the one plain sampling draws after the
    same prefix, and the next root is the last node's own sample, so the output equals plain sampling's token
    for token (fp32; in bf16 up to near-ties, as greedy): lossless at any temperature, at fewer accepted tokens
    than typical acceptance. `top_k` / `top_p` truncate every distribution sampled or tested (`scaled_logits`).

    emitted[b, :accepted] are row b's accepted speculated tokens and emitted[b, accepted] the next root (the
    base model's own token after them); the first count[b] of them are kept (fewer at EOS or the limit, 0 for
    a frozen row) and go to output columns n[b], n[b] + 1, ...: `columns` holds those, and -1 (the caller's
    scratch column) for the rest, so the host writes the step's tokens with one indexed copy. accepted is what
    the verify pass accepted (the heads' measure; at EOS or max_new_tokens fewer may be kept), -1 for a frozen
    row.
    """
    exact = temperature > 0 and check_acceptance(acceptance) == "exact"
    engine.prepare_move_kv()
    positions = torch.arange(engine.max_len, device=engine.device)
    n_nodes, depth = tree.num_nodes, tree.depth
    steps_ar = torch.arange(depth + 1, device=engine.device)
    node_rows = torch.arange(n_nodes, device=engine.device)
    tree_mask_t = tree.attention_mask.t().contiguous()  # (N, N): [j, i] = node i sees node j
    keys = token_keys(engine.lm_head.shape[0], engine.device)  # per-token noise keys, a static buffer

    def step(root, hidden_last, cur, offset, seeds, n, limit, done):
        bsz = root.shape[0]
        # token ids, best first: draft_topk maps a draft-vocabulary head's rows back through its token_map
        topk = heads.draft_topk(hidden_last, tree.topk)[:depth]  # (depth, B, k)
        topk = topk.transpose(0, 1).reshape(bsz, -1)  # (B, depth*k)
        tokens = torch.cat([root[:, None], topk], dim=1)[:, tree.tree_indices]  # (B, N)
        # Node i of row b sits in slot cur + i at RoPE position cur - offset + depth(i); it sees the row's
        # prefix (without its pad) and its own tree ancestors.
        rel = positions[None, :] - cur[:, None]  # (B, max_len)
        prefix = (rel < 0) & (positions[None, :] >= offset[:, None])
        in_tree = (rel >= 0) & (rel < n_nodes)
        tree_part = tree_mask_t[rel.clamp(0, n_nodes - 1)].transpose(1, 2) & in_tree[:, None, :]  # (B, N, L)
        mask = prefix[:, None, :] | tree_part
        rope0 = cur - offset
        kv_end = (cur + n_nodes).clamp(max=engine.max_len)  # the last node's slot + 1 (within the cache)
        hidden = engine(tokens, cur[:, None] + node_rows, rope0[:, None] + tree.depths, mask, kv_end)  # (B, N, H)
        # greedy needs only each node's argmax (B, N), the base model's token after it: no logits written;
        # exact sampling, each node's sample at the position after it
        if temperature <= 0:
            node_next, logits = engine.greedy_tokens(hidden), None
        elif exact:  # the noise of the position after each node: one draw per depth, shared by its nodes
            noise = gumbel_noise(seeds[:, None], rope0[:, None] + steps_ar + 1, keys.shape[0], keys)  # (B, depth+1, V)
            node_next = gumbel_max(engine.logits(hidden), temperature, noise[:, tree.depths], top_k, top_p)
            logits = None
        else:
            node_next, logits = None, engine.logits(hidden)  # (B, N, V)
        node_ok = node_acceptance(logits, tokens, tree.parents, 0.0 if exact else temperature, epsilon, delta,
                                  node_next, top_k, top_p)  # fmt: skip
        best, accepted = longest_accepted_path(node_ok, tree)
        path = tree.retrieve_indices[best]  # (B, depth+1)
        last = path.gather(1, accepted[:, None])  # (B, 1)
        if node_next is not None:  # the next root is the token already taken at the path's last node
            next_root = node_next.gather(1, last)[:, 0]
        else:
            last_logits = logits.gather(1, last[:, :, None].expand(bsz, 1, logits.shape[-1]))[:, 0]
            next_root = sample_token(last_logits, temperature, seeds, rope0 + accepted + 1, keys, top_k, top_p)
        speculated = tokens.gather(1, path[:, 1:])  # (B, depth)
        emitted = torch.cat([speculated, next_root[:, None]], dim=1)
        emitted = torch.where(steps_ar[None, :] == accepted[:, None], next_root[:, None], emitted)
        eos = _is_eos(emitted, eos_ids) & (steps_ar[None, :] <= accepted[:, None])
        eos_at = torch.where(eos, steps_ar[None, :], depth + 1).amin(dim=1)  # (B,)
        count = torch.minimum(torch.minimum(accepted + 1, eos_at + 1), limit - n)
        count = torch.where(done, 0, count)
        engine.move_kv(cur[:, None] + path, cur[:, None] + steps_ar[None, :])
        next_hidden = hidden.gather(1, last[:, :, None].expand(bsz, 1, hidden.shape[-1]))[:, 0]
        n_next = n + count
        done_next = done | (eos_at < count) | (n_next >= limit)
        columns = torch.where(steps_ar[None, :] < count[:, None], n[:, None] + steps_ar[None, :], -1)
        return (
            emitted,
            columns,
            torch.where(done, -1, accepted),
            torch.where(done, root, next_root),
            torch.where(done[:, None], hidden_last, next_hidden),
            # a row that ends here stays put: past max_new_tokens its accepted path may run beyond the slots
            # reserved for it, and its frozen steps keep writing a tree's worth of slots from `cur`
            torch.where(done_next, cur, cur + accepted + 1),
            n_next,
            done_next,
        )

    step.static_tensors = [positions, steps_ar, node_rows, tree_mask_t, keys, *vars(tree).values()]
    if hasattr(heads, "static_tensors"):
        step.static_tensors += heads.static_tensors()
    elif isinstance(heads, nn.Module):
        step.static_tensors += [*heads.parameters(), *heads.buffers()]
    return step


CUDA_GRAPHS_MODES = ("step", "compile", "off")


def cuda_graphs_mode() -> str:
    """How decode steps use CUDA graphs (`FASTMEDUSA_CUDA_GRAPHS`), on CUDA only:
    - "step" (default): the loop captures each whole step as one graph (see fastmedusa.decode.loop); with
      `compile=False` that is the eager step, captured;
    - "compile": torch.compile's own CUDA graphs (mode="reduce-overhead"), only with `compile=True`;
    - "off": no CUDA graphs (compiled or eager steps launched from the host: for debugging and profiling).
    On an H100 "step" ran 1.4-3.4% faster per step than "compile" (bench/results/decode_graphs_regional_h100)."""
    mode = os.environ.get("FASTMEDUSA_CUDA_GRAPHS", "step")
    if mode not in CUDA_GRAPHS_MODES:
        raise ValueError(f"FASTMEDUSA_CUDA_GRAPHS={mode!r}: use 'step' (the default), 'compile' or 'off'")
    return mode


def _mark_static(tensors) -> None:
    """Tell CUDA graphs these tensors keep their address (as HF's StaticCache does for its KV buffers), so a
    replay reads them in place instead of first copying them into the graph's input slots."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            torch._dynamo.mark_static_address(t)


def _allow_recompiles(limit: int = 64) -> None:
    """Every step closure shares one code object, and dynamo's recompile limit (8) counts per code object:
    batch sizes x trees x temperatures exceed it, after which steps silently ran eager. Raise it."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def _step_runner(
    engine: DecodeEngine,
    key: tuple,
    build: Callable[[], Callable],
    body: Callable,
    out_width: int,
    compile: bool,
) -> StepRunner:
    """The runner of a step, built (and compiled) once per engine and key, so repeated calls reuse its buffers
    and CUDA graphs. `body(step, state, shared)` is the loop's work around the step (fastmedusa.decode.loop).

    Compiled, the step and its body are one compiled function: the body's bookkeeping (output tokens, the
    accepted-length log, the new state written into the state buffers) fuses into a few kernels instead of a
    dozen copies and indexed writes per step. Under torch.compile's own CUDA graphs
    (FASTMEDUSA_CUDA_GRAPHS=compile) only the step is compiled, since those graphs are skipped for functions
    that write their inputs in place. dynamic=False: every shape in a step is fixed by (batch size, tree,
    max_len), never by the prompt or max_new_tokens, so automatic dynamic shapes would only add a second,
    slower compile. The batches that compaction shrinks (fastmedusa.decode.loop) get a body compiled apart,
    whose state buffers have a dynamic batch dimension: one compile for all their sizes. (Under
    FASTMEDUSA_CUDA_GRAPHS=compile the one compiled step serves both, so there a full batch may run the
    dynamic graph once compaction has compiled it.)"""
    cuda, graphs = engine.device.type == "cuda", cuda_graphs_mode()
    options = step_compile_options() if compile else {}
    key = ("runner", *key, *((tuple(options.items()),) if options else ()), compile, graphs)  # new options: anew
    if key not in engine.compiled:
        step = build()
        compile_graphs = compile and cuda and graphs == "compile"
        run_body = compacted_body = partial(body, step)
        if compile:
            _allow_recompiles()
            logger.info("the %s step compiles on its first run (once per engine and batch size)", key[1])
        if compile_graphs:  # one compiled step for every size, as run on a GPU with its tests
            _mark_static([*engine.buffers(), *getattr(step, "static_tensors", [])])
            run_body = compacted_body = partial(
                body, torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            )
        elif compile:
            run_body = torch.compile(run_body, fullgraph=True, dynamic=False, options=options)
            compacted_body = torch.compile(_own_code(compacted_body), fullgraph=True, dynamic=False, options=options)
        engine.compiled[key] = StepRunner(
            engine, run_body, out_width, graphs=cuda and graphs == "step", mark_steps=compile_graphs,
            compacted_body=compacted_body,
        )  # fmt: skip
    return engine.compiled[key]


def step_compile_options() -> dict:
    """Inductor options of the compiled steps (not under FASTMEDUSA_CUDA_GRAPHS=compile, whose mode= excludes
    options). Pointwise kernels are not autotuned (`FASTMEDUSA_COMPILE_AUTOTUNE=1` turns it back on): a decode
    step's pointwise kernels are a few rows wide, where the first config is as good as any, and benchmarking
    each config on first use lengthened first calls. On an H100 (SmolLM2-135M shape,
    empty caches, two pairs of fresh processes in alternating order) the first greedy call took 25.4 / 30.6 s
    against 27.9 / 36.3 s, the first Medusa call 12.2 / 15.2 s against 14.6 / 17.9 s, and 96 greedy steps
    85.7 / 87.4 ms against 86.8 / 86.9 ms."""
    raw = os.environ.get("FASTMEDUSA_COMPILE_AUTOTUNE", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"FASTMEDUSA_COMPILE_AUTOTUNE={raw!r}: use 0 (the default) or 1 (autotune pointwise kernels)")
    return {"triton.autotune_pointwise": raw == "1"}


def _own_code(fn: Callable) -> Callable:
    """fn behind a function of its own code object: dynamo keeps compiled graphs per code object, so graphs
    compiled through this wrapper (the dynamic-batch steps of compacted batches) never serve calls of fn
    itself (full batches, compiled static)."""

    def compacted_step(*args):
        return fn(*args)

    return compacted_step


def _accept_lengths(runner: StepRunner, steps: int, batch: int) -> list[list[int]]:
    """Per batch row: the speculated tokens accepted at each of its Medusa steps (from the step log)."""
    log = runner.shared.log[: min(steps, runner.shared.log.shape[0]), :batch].t().tolist()
    return [[a for a in row if a >= 0] for row in log]


# -- the public entry point ---------------------------------------------------------------------------


def _split_model(model: nn.Module, heads: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    if hasattr(model, "medusa_heads") and hasattr(model, "base"):
        return model.base, heads if heads is not None else model.medusa_heads
    return model, heads


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P) long, left pad per row (B,)) from a left-padded batch, or a clear error."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError("input_ids must be an integer tensor of token ids, shape (batch, prompt_len)")
    ids = input_ids.long().reshape(1, -1) if input_ids.ndim == 1 else input_ids.long()
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, prompt_len), got shape {tuple(input_ids.shape)}")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"input_ids of shape {tuple(ids.shape)} is empty: give at least one prompt token")
    if attention_mask is None:
        if ids.shape[0] > 1:
            raise ValueError(
                f"input_ids has {ids.shape[0]} rows but no attention_mask: padding cannot be told from tokens; "
                "pass the tokenizer's attention_mask (padding_side='left')"
            )
        return ids, torch.zeros(1, dtype=torch.long, device=ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor (the tokenizer's, return_tensors='pt'), got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) not in (tuple(input_ids.shape), tuple(ids.shape)):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.reshape(ids.shape)
    mask = mask.to(ids.device)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    if (mask[:, 1:] < mask[:, :-1]).any():
        row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding after tokens (right padding or a hole): the engine "
            "needs left padding; set tokenizer.padding_side = 'left'"
        )
    if (mask[:, -1] == 0).any():
        row = int((mask[:, -1] == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is all padding: every row needs at least one token")
    return ids, (ids.shape[1] - mask.sum(1)).long()


def heads_tree_info(model: nn.Module, heads: nn.Module) -> dict | None:
    """The measured tree.json of the heads' directory (`MedusaModel.heads_dir`), if it has one."""
    directory = getattr(model, "heads_dir", None) or getattr(heads, "heads_dir", None)
    return None if directory is None else read_tree_json(directory, heads.num_heads)


def _auto_tree_size(model, heads, tree_info, prompt, batch_size, compile) -> int:
    """tree="auto": the node count that maximises tokens/s here, 0 where plain decoding is faster (measured once
    per heads, batch size and device)."""
    if tree_info is None or not tree_info.get("rank_accuracies"):
        raise ValueError(
            "tree='auto' picks a size for the heads' measured accuracies, and these heads have no tree.json: "
            "measure them (`fastmedusa bench heads --heads DIR --write-tree`) or pass a preset"
        )
    cache = heads.__dict__.setdefault("_fastmedusa_tree_size", {})
    key = (batch_size, str(next(model.parameters()).device))
    if key not in cache:
        acc = torch.tensor(tree_info["rank_accuracies"])
        chains = info_chains(tree_info)
        cache[key], _ = choose_tree_size(model, acc, prompt, batch_size=batch_size, compile=compile, chains=chains)
    return cache[key]


def check_models(model: object, heads: object, medusa: object) -> None:
    """What was passed as the model, the heads and `medusa` is of the kind `generate` takes (a hub id or a
    heads directory given as the model, or a bool given as a string, fail here, naming the argument)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a MedusaModel or a loaded Hugging Face causal LM, got {type(model).__name__}: load one "
            "with MedusaModel.from_pretrained(base, heads=DIR)"
        )
    if isinstance(medusa, str | bytes) or medusa not in (True, False):  # True/False, 1/0, numpy or 0-d bools
        raise TypeError(f"medusa={medusa!r}: pass True (decode with the heads) or False (plain decoding)")
    if isinstance(model, MedusaHeads):
        raise TypeError(
            "model is the Medusa heads alone: pass the MedusaModel, or the base model with heads=model.medusa_heads"
        )
    medusa_model = hasattr(model, "medusa_heads") and hasattr(model, "base")  # as `_split_model` tells them
    if not medusa_model and not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(
            f"model must be a MedusaModel or a Hugging Face causal LM, got a {type(model).__name__} without "
            "get_input_embeddings(): load the model with AutoModelForCausalLM or MedusaModel.from_pretrained"
        )
    if heads is not None and not (hasattr(heads, "draft_topk") and hasattr(heads, "num_heads")):
        raise TypeError(
            f"heads must be Medusa heads (a module with draft_topk and num_heads, e.g. MedusaModel.medusa_heads), "
            f"got {type(heads).__name__}: a heads directory loads with MedusaModel.from_pretrained(base, heads=DIR)"
        )
    if heads is not None and not _is_int(heads.num_heads):
        raise TypeError(
            f"heads.num_heads is {heads.num_heads!r}: Medusa heads must say how many they are (an int >= 1)"
        )
    if heads is not None and heads.num_heads < 1:
        raise ValueError(f"heads.num_heads is {heads.num_heads}: Medusa heads number 1 or more")


def check_token_ids(ids: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> None:
    """Every prompt token (left padding aside) is an id of the model's vocabulary: an id from another
    tokenizer would index past the embedding (a device-side assert on CUDA)."""
    real = torch.arange(ids.shape[1], device=ids.device) >= offsets.to(ids.device)[:, None]
    if (bad := id_outside(ids[real], vocab_size)) is not None:
        raise ValueError(
            f"input_ids hold token id {bad}, outside the model's vocabulary [0, {vocab_size}): the tokenizer does "
            "not match the model"
        )


def check_heads_placement(heads: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """fastmedusa's heads in another floating dtype or on another device than the base model would fail
    mid-step with a GEMM error (other heads modules may cast or move inside and are left alone)."""
    if not isinstance(heads, MedusaHeads):
        return
    weight = next((p for p in heads.parameters() if p.is_floating_point()), None)
    if weight is None:
        return
    if weight.dtype != dtype:
        raise ValueError(
            f"the Medusa heads are {str(weight.dtype).removeprefix('torch.')} but the base model is "
            f"{str(dtype).removeprefix('torch.')}: move them to one dtype (model.to({dtype}) on a MedusaModel, "
            f"heads.to({dtype}) for heads passed with heads=)"
        )
    if weight.device != device:
        raise ValueError(
            f"the Medusa heads are on {weight.device} but the base model is on {device}: move them to one device "
            f"(model.to('{device}') on a MedusaModel, heads.to('{device}') for heads passed with heads=)"
        )


def check_custom_heads(heads: nn.Module, engine: DecodeEngine, depth: int, topk: int, batch: int) -> None:
    """Heads other than fastmedusa's own (any module with `draft_topk` and `num_heads`) are called once on
    zeros before decoding (one more eager call of their forward, before any graph is captured): what they
    return must be (>= depth, batch, topk) integer token ids of the base model's vocabulary on its device.
    Inside the step a wrong shape fails as an IndexError, or silently reshapes into the wrong tree, and an id
    past the vocabulary is a device-side assert on CUDA."""
    if isinstance(heads, MedusaHeads):
        return
    name = type(heads).__name__
    drafts = heads.draft_topk(torch.zeros(batch, engine.hidden_size, device=engine.device, dtype=engine.dtype), topk)
    if not isinstance(drafts, torch.Tensor):
        raise TypeError(f"heads {name}: draft_topk returned a {type(drafts).__name__}; it must return a tensor")
    if drafts.dtype == torch.bool or drafts.is_floating_point() or drafts.is_complex():
        raise TypeError(f"heads {name}: draft_topk returned {drafts.dtype} values; it must return integer token ids")
    if drafts.ndim != 3 or drafts.shape[0] < depth or tuple(drafts.shape[1:]) != (batch, topk):
        raise ValueError(
            f"heads {name}: draft_topk(hidden ({batch}, {engine.hidden_size}), k={topk}) returned shape "
            f"{tuple(drafts.shape)}; the tree needs (heads >= {depth}, batch rows = {batch}, k = {topk}): "
            "k token ids per head and batch row, best first"
        )
    if drafts.device != engine.device:
        raise ValueError(
            f"heads {name}: draft_topk returned ids on {drafts.device}, the base model is on {engine.device}"
        )
    if (bad := id_outside(drafts[:depth], engine.vocab_size)) is not None:
        raise ValueError(
            f"heads {name}: draft_topk returned token id {bad}, outside the base model's vocabulary "
            f"[0, {engine.vocab_size}): map draft ids back to the base model's ids"
        )


MIN_TEMPERATURE = 1e-6  # logits / temperature overflows fp32 past |logit| 3.4e38 * temperature: 3.4 at 1e-38


def check_sampling(temperature: float, typical_epsilon: float, typical_delta: float) -> tuple[float, float, float]:
    """temperature 0 (greedy) or more, typical acceptance's thresholds non-negative, all finite (NaN and inf
    are none of these); returned as floats (a numpy or 0-d tensor value becomes a plain number, as the step
    caches key on it)."""
    values = []
    for name, value in (("temperature", temperature), ("typical_epsilon", typical_epsilon),
                        ("typical_delta", typical_delta)):  # fmt: skip
        flag = "--" + name.replace("_", "-")
        scalar = isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
        if not (scalar or isinstance(value, numbers.Real)) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} ({flag}): pass a number")
        number = float(value)
        if not (number >= 0 and math.isfinite(number)):
            hint = " (temperature 0 is greedy decoding)" if name == "temperature" else ""
            raise ValueError(f"{name}={value} ({flag}): pass a finite number, 0 or more{hint}")
        if name == "temperature" and 0 < number < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature={value} ({flag}) is too small to divide logits by (they overflow to inf): pass 0 "
                f"for greedy decoding, which such a temperature means, or at least {MIN_TEMPERATURE:g}"
            )
        values.append(number)
    return values[0], values[1], values[2]


def check_truncation(top_k: object, top_p: object) -> tuple[int, float]:
    """Sampling's `top_k` (None or 0: no limit; else a positive int) and `top_p` (None or 1: no limit; else in
    (0, 1)), returned as (int, float) with the no-limit values 0 and 1.0 (the step caches key on them)."""
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or int(top_k) < 0:
        raise ValueError(f"top_k={top_k!r} (--top-k): pass a number of tokens, 1 or more, or 0/None for no limit")
    if top_p is None:
        top_p = 1.0
    scalar = isinstance(top_p, torch.Tensor) and top_p.numel() == 1 and top_p.is_floating_point()
    if isinstance(top_p, bool) or not (scalar or isinstance(top_p, numbers.Real)) or not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p={top_p!r} (--top-p): pass a probability above 0 and at most 1 (1/None: no limit)")
    return int(top_k), float(top_p)


def _check_heads(heads: nn.Module, engine: DecodeEngine, tree_topk: int) -> None:
    """Heads trained for another base model, or a tree drafting more tokens per head than a draft vocabulary
    holds, fail loudly here: not with a shape error mid-step, nor wrapped in a compiler error."""
    config = getattr(heads, "config", None)
    rows = getattr(config, "head_vocab_size", None)
    if isinstance(rows, int):
        check_draft_k(tree_topk, rows)
    for name, mine in (("hidden_size", engine.hidden_size), ("vocab_size", engine.vocab_size)):
        theirs = getattr(config, name, None)
        if theirs is not None and theirs != mine:
            raise ValueError(
                f"the Medusa heads have {name}={theirs} but the base model has {mine}: "
                "these heads were trained for another base model; pass the matching --model"
            )


def _is_int(value: object) -> bool:
    """An integer of any kind (int, numpy integer, 0-d integer tensor), not a bool or a float."""
    if isinstance(value, bool) or getattr(value, "dtype", None) in (torch.bool, bool):
        return False
    if getattr(value, "ndim", 0) > 0:  # a one-token prompt tensor([537]) converts like 537, but is a sequence
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def positive_int(value: object, name: str, optional: bool = False) -> int | None:
    """`value` (an integer of any kind: int, numpy, 0-d tensor) as an int >= 1, None where `optional` allows
    it, or a ValueError naming the argument: a float would be silently cut, a str compared to nothing."""
    if value is None and optional:
        return None
    if not _is_int(value) or operator.index(value) < 1:
        allowed = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= 1{allowed}, got {value!r:.60}")
    return operator.index(value)


def optional_flag(value: object, name: str) -> bool | None:
    """True, False (or a numpy / 0-d tensor bool) or None; else a TypeError naming the argument: a string
    such as "no" would otherwise count as true."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or value not in (True, False):
        raise TypeError(f"{name}={value!r:.60}: pass True, False or None (the default)")
    return bool(value)


def _int_list(value: object, name: str, what: str) -> list[int]:
    """`value` as a list of ints: an int, a (nested) sequence of ints, or an integer tensor or numpy array; else
    a TypeError naming the argument (a float would be silently cut, a str is a token's text)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype") and not _is_int(value):  # tensor or numpy array
        if str(value.dtype).removeprefix("torch.").startswith(("float", "bfloat", "bool", "complex")):
            raise TypeError(f"{name} must hold integers ({what}), got {value.dtype} values")
        value = value.tolist()
    items = [value] if not isinstance(value, Sequence) or isinstance(value, str | bytes) else list(value)
    while any(isinstance(v, list | tuple) for v in items):  # nested lists (a tensor's tolist) flatten
        items = [w for v in items for w in (v if isinstance(v, list | tuple) else [v])]
    bad = [v for v in items if not _is_int(v)]
    if bad:
        hint = " (a token's text: pass its id, e.g. tokenizer.eos_token_id)" if isinstance(bad[0], str) else ""
        raise TypeError(f"{name}={value!r:.60} must be {what}{hint}")
    return [operator.index(v) for v in items]


def _eos_tensor(
    eos_token_id: int | Sequence[int] | None, device: torch.device, vocab_size: int | None = None
) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = _int_list(eos_token_id, "eos_token_id", "a token id or a list of token ids")
    if vocab_size is not None and ids and not any(0 <= i < vocab_size for i in ids):
        raise ValueError(
            f"eos_token_id={eos_token_id!r} is outside the model's vocabulary [0, {vocab_size}): no token would "
            "ever end a row; pass the tokenizer's eos_token_id"
        )
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _pad_id(pad_token_id: object, eos_ids: torch.Tensor | None) -> int:
    """`pad_token_id` checked, or the first EOS id, else 0."""
    if pad_token_id is None:
        return int(eos_ids[0]) if eos_ids is not None else 0
    if not _is_int(pad_token_id):
        raise TypeError(f"pad_token_id={pad_token_id!r}: pass a token id (tokenizer.pad_token_id), or None")
    return operator.index(pad_token_id)


def row_seeds(seed: SeedSpec, batch_size: int, device: torch.device, unit: str = "row") -> torch.Tensor:
    """(B,) sampling seeds: an int gives row b the seed (seed, b); a sequence gives each row its own (then a
    prompt samples the same tokens in any batch, given the same tree: with tree=None the default tree depends
    on the batch size); None draws one from torch's RNG (torch.manual_seed). `unit` names what a seed is for
    in the error (a row, or generate_many's prompt)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if _is_int(seed):
        return ((operator.index(seed) & _MASK32) * 1_000_003 + torch.arange(batch_size, device=device)) & _MASK32
    seeds = torch.tensor(_int_list(seed, "seed", "an int, one int per row, or None"), dtype=torch.long).to(device)
    if seeds.numel() != batch_size:
        raise ValueError(
            f"seed has {seeds.numel()} entries for {batch_size} {unit}s: give one per {unit} or an int"
        )
    return seeds & _MASK32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoding(fn: Callable) -> Callable:
    """Run `fn` under no_grad and outside inference mode, even when called inside it: the engine cached on the
    model (KV cache, fused weights, step buffers) is written in place by every later call, and an inference
    tensor refuses that outside the mode."""
    return torch.inference_mode(False)(torch.no_grad()(fn))


@decoding
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    medusa: bool = True,
    temperature: float = 0.0,
    tree: TreeSpec = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: SeedSpec = None,
    typical_epsilon: float = 0.09,
    typical_delta: float = 0.3,
    acceptance: str = "typical",
    top_k: int | None = None,
    top_p: float | None = None,
    heads: nn.Module | None = None,
    compile: bool | None = None,
    max_len: int | None = None,
    max_batch_size: int | None = None,
    compact: bool | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` after each row of `input_ids` (B, P), a row stopping after EOS.

    A batch must be left-padded with its `attention_mask` (required when B > 1); each row then gets what it
    would get alone. `model` is a `MedusaModel` or a plain HF Llama-family causal LM (then `medusa=False`,
    or pass `heads`: any module with `draft_topk(hidden (..., H), k) -> (K, ..., k)` token ids and
    `num_heads`).
    temperature 0 is greedy (Medusa output then equals plain greedy token for token in fp32, and up to
    argmax near-ties within rounding in bf16/fp16: see the module docstring); above 0, tokens are sampled
    (reproducibly from `seed`: an int, one per row, or None for torch's RNG) and speculated tokens pass
    `acceptance`: "typical" (default; Medusa's typical acceptance, `typical_epsilon`, `typical_delta`: more
    tokens per step, a distribution near the model's) or "exact" (a speculated token must be the token the
    model samples there, so the output equals plain sampling's with the same seed, token for token in fp32:
    lossless). `top_k` / `top_p` truncate the distribution sampled from (Hugging Face's top-k and nucleus
    sampling, applied after the temperature; both acceptance rules see the truncated distribution).
    `tree`: a preset name, "auto:N", a JSON file, a list of paths, or None (the heads' tree.json, else
    mc_sim_7b_63 pruned to the number of heads; for a batch, at most `default_tree_nodes(B)` of its nodes, so
    that a verify pass holds at most 256 tokens: 63 up to B=4, 15 at 16, 3 at 64, plain decoding above 128
    rows); "auto" measures which size gives the most tokens/s for this batch size on this device (`choose_tree_size`), plain
    decoding included: where no tree pays (large batches), the call decodes without the heads.
    `pad_token_id` fills rows after their end (default: the first EOS id, else 0). `compile`: torch.compile
    the steps, default on CUDA only (CUDA graphs: `cuda_graphs_mode`, each step captured whether compiled or
    not); `max_len`/`max_batch_size`: KV cache slots per row / rows (default: enough
    for this call, rounded up so that similar calls reuse the engine and its compiled steps). `compact`
    (default: B >= 4, for Medusa or with EOS ids, the cases where rows finish at different steps): once half
    the rows have finished, move the others together and run the step at the next power of two of their
    count (at least 2), so finished rows stop costing work and a batch's slowest row no longer keeps it at
    full width (compiled: one more compile on first use, shared by every smaller size).
    """
    check_models(model, heads, medusa)
    medusa = bool(medusa)
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    max_len = positive_int(max_len, "max_len", optional=True)
    max_batch_size = positive_int(max_batch_size, "max_batch_size", optional=True)
    compile, compact = optional_flag(compile, "compile"), optional_flag(compact, "compact")
    base, heads = _split_model(model, heads)
    ids, offsets = check_batch(input_ids, attention_mask)
    check_token_ids(ids, offsets, base.get_input_embeddings().num_embeddings)
    temperature, typical_epsilon, typical_delta = check_sampling(temperature, typical_epsilon, typical_delta)
    acceptance = check_acceptance(acceptance)
    truncation = check_truncation(top_k, top_p)
    tree_buffers = None
    if medusa:
        if heads is None:
            raise ValueError("medusa=True needs Medusa heads: pass a MedusaModel, heads=..., or medusa=False")
        tree_info = heads_tree_info(model, heads)
        if isinstance(tree, str) and tree == "auto":
            prompt = ids[0, int(offsets[0]) :]
            size = _auto_tree_size(model, heads, tree_info, prompt, ids.shape[0], compile)
            tree = f"auto:{size}" if size else None  # 0: no tree pays at this batch size, decode plainly
            medusa = size > 0
    if medusa:  # validated (depth, path)-sorted tuples; the default tree shrinks with the batch
        paths = tuple(resolve_tree(tree, heads.num_heads, tree_info, batch_size=ids.shape[0]))
        medusa = len(paths) > 0  # a batch too large for any default tree: plain decoding
    if medusa:
        tree_buffers = cached_tree_buffers(paths, heads.num_heads, "cpu")
    check_position_limit(base, ids.shape[1], max_new_tokens)
    slack = tree_buffers.num_nodes if tree_buffers is not None else 0
    needed = ids.shape[1] + max_new_tokens + slack
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) + tree ({slack} nodes) = "
            f"{needed} does not fit the KV cache of {max_len} slots per row: raise max_len (--max-len), or "
            "shorten the prompt, max_new_tokens (--max-new-tokens) or the tree"
        )
    engine = get_engine(base, needed, max_len, ids.shape[0], max_batch_size)
    if medusa:
        check_heads_placement(heads, engine.dtype, engine.device)
    ids, offsets = ids.to(engine.device), offsets.to(engine.device)
    compile = engine.device.type == "cuda" if compile is None else compile
    eos_ids = _eos_tensor(eos_token_id, engine.device, engine.vocab_size)
    pad_token_id = _pad_id(pad_token_id, eos_ids)
    seeds = row_seeds(seed, ids.shape[0], engine.device)
    if tree_buffers is not None:
        tree_buffers = cached_tree_buffers(paths, heads.num_heads, str(engine.device))
        _check_heads(heads, engine, tree_buffers.topk)
        check_custom_heads(heads, engine, tree_buffers.depth, tree_buffers.topk, ids.shape[0])
    _sync(engine.device)
    start = time.perf_counter()
    if compact is None:
        compact = ids.shape[0] >= 4 and (eos_ids is not None or tree_buffers is not None)
    graphs = cuda_graphs_mode()
    compile_prompt = prefill_compiled(engine.eager_prefill_chunks)  # read, and checked, on every call
    compile_prompt = compile and (compile_prompt or graphs == "compile")
    on_cuda = engine.device.type == "cuda"
    chunk = prefill_chunk(captured=on_cuda and (graphs == "step" or (graphs == "compile" and compile)))
    run_ids, run_offsets, chunked = pad_to_chunks(ids, offsets, chunk, engine.max_len - needed)
    state = _prefill(
        engine, run_ids, run_offsets, seeds, max_new_tokens, temperature, eos_ids, chunk if chunked else 0,
        compile_prompt, truncation,
    )
    runner = decode_runner(
        engine, heads, tree_buffers, temperature, typical_epsilon, typical_delta, eos_ids, pad_token_id, compile,
        acceptance, truncation,
    )
    runner.start(ids.shape[0], pad_token_id)
    if tree_buffers is None:
        n, _ = run_loop(runner, state, max_new_tokens - 1, eos_ids is not None, compact)
        steps = n.tolist()
        accepts: list[list[int]] = [[] for _ in range(ids.shape[0])]
    else:
        n, count = run_loop(runner, state, None, True, compact)
        accepts = _accept_lengths(runner, count, ids.shape[0])
        steps = [1 + len(a) for a in accepts]
    out = runner.shared.out[: ids.shape[0]]
    out[:, 0] = state["token"]
    counts = n.tolist()
    _sync(engine.device)
    seconds = time.perf_counter() - start
    width = max(counts)
    sequences = torch.cat([ids, out[:, :width]], dim=1).to(input_ids.device)
    nodes = tree_buffers.num_nodes if tree_buffers is not None else 0
    return GenerationOutput(
        sequences, ids.shape[1], sum(counts), max(steps), seconds, accepts, nodes, counts, steps
    )


def decode_runner(
    engine: DecodeEngine,
    heads: nn.Module | None,
    tree_buffers: TreeBuffers | None,
    temperature: float,
    typical_epsilon: float,
    typical_delta: float,
    eos_ids: torch.Tensor | None,
    pad_token_id: int,
    compile: bool,
    acceptance: str = "typical",
    truncation: tuple[int, float] = (0, 1.0),
) -> StepRunner:
    """The engine's runner of plain steps (`tree_buffers` None) or Medusa steps over that tree, built once per
    setting and kept on the engine (its compiled steps and graphs are reused by later calls). `truncation`:
    (top_k, top_p) of sampling."""
    eos_key = None if eos_ids is None else tuple(eos_ids.tolist())
    if tree_buffers is None:
        return _step_runner(
            engine,
            ("plain", temperature, truncation if temperature > 0 else None, eos_key, pad_token_id),
            lambda: make_plain_step(engine, temperature, eos_ids, pad_token_id, *truncation),
            plain_body,
            engine.max_len + 1,
            compile,
        )
    rule = (acceptance, truncation) if temperature > 0 else "greedy"  # greedy ignores them: one step for all
    key = ("medusa", tuple(tree_buffers.paths), id(heads), temperature, typical_epsilon, typical_delta, rule)
    drafter = packed_heads(engine.compiled, heads, tree_buffers.depth)  # refreshed if the weights changed
    return _step_runner(
        engine,
        (*key, eos_key),
        lambda: make_medusa_step(
            engine, drafter, tree_buffers, temperature, typical_epsilon, typical_delta, eos_ids, acceptance,
            *truncation,
        ),
        medusa_body,
        engine.max_len + tree_buffers.depth + 2,
        compile,
    )


PREFILL_CHUNK = 64  # prompt tokens per prefill step (FASTMEDUSA_PREFILL_CHUNK)


def prefill_chunk(captured: bool = True) -> int:
    """Prompt tokens per prefill step: `FASTMEDUSA_PREFILL_CHUNK` when set (0: the whole prompt in one eager
    forward), else 64 where the prefill step is captured in a CUDA graph (`captured`) and 0 elsewhere (on the
    CPU, or with graphs off, chunks would only add forwards).

    In chunks, the prompt is left-padded to a multiple of the chunk and run chunk by chunk through one step of
    static shape, captured like the decode steps (compiled when `prefill_compiled` says so), so a prompt of any
    length costs a few graph replays instead of thousands of eager kernel launches (on an H100, SmolLM2-135M:
    1.3-2.2 ms against 22 ms for prompts of 16-128 tokens, bench/results/prefill_h100)."""
    raw = os.environ.get("FASTMEDUSA_PREFILL_CHUNK")
    if raw is None:
        return PREFILL_CHUNK if captured else 0
    try:
        chunk = int(raw)
    except ValueError:
        chunk = -1
    if chunk < 0:
        raise ValueError(f"FASTMEDUSA_PREFILL_CHUNK={raw!r}: use a token count >= 1, or 0 for no chunks")
    return chunk


PREFILL_COMPILE_AFTER = 4096  # eager chunk steps an engine runs before its prefill step compiles ("auto")


def prefill_compiled(eager_chunks: int = 0) -> bool:
    """Whether steps that compile also compile the prefill chunk step now (`FASTMEDUSA_PREFILL_COMPILE`):
    "1" on first use, "0" never (the eager forward captured in a CUDA graph), "auto" (the default) once the
    engine has run `PREFILL_COMPILE_AFTER` chunk steps eagerly (`eager_chunks`). Under
    FASTMEDUSA_CUDA_GRAPHS=compile only a compiled step is captured, so there the step always compiles.

    Why "auto": the compile is paid once, the eager step's cost on every chunk. On H100s (SmolLM2-135M,
    bench/results/first_call_h100 and decode_real_heads_auto_prefill_h100) compiling the chunk step added
    7-12 s to a cold first call and saved about 2.2 ms per 64-token chunk afterwards, so it pays after
    3,400-5,500 chunks. Renting until the rent equals
    the price, then buying, never costs more than twice the best choice made knowing the future; and no first
    call of a mode waits for two compiles (prefill and step) at once."""
    raw = os.environ.get("FASTMEDUSA_PREFILL_COMPILE", "auto")
    if raw not in ("auto", "0", "1"):
        raise ValueError(
            f"FASTMEDUSA_PREFILL_COMPILE={raw!r}: use auto (the default: compile the prefill step once "
            f"{PREFILL_COMPILE_AFTER} chunks have run eagerly), 1 (compile it on first use) or 0 (never)"
        )
    return eager_chunks >= PREFILL_COMPILE_AFTER if raw == "auto" else raw == "1"


def pad_to_chunks(ids: torch.Tensor, offsets: torch.Tensor, chunk: int, room: int):
    """Left-pad (B, P) prompts to a multiple of `chunk` tokens (more pad per row: the mask hides it), or leave
    them as they are (chunk 0, or the padding would not fit the `room` cache slots left). Returns
    (ids, offsets, chunked)."""
    # the mask hides pad slots, but the embedding still reads their ids: any pad id (-1, the vocabulary size)
    # becomes 0 here, so only the real tokens need to lie in the vocabulary (`check_token_ids`)
    ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < offsets[:, None], 0)
    pad = (-ids.shape[1]) % chunk if chunk > 0 else 0
    if chunk <= 0 or pad > room:
        return ids, offsets, False
    return F.pad(ids, (pad, 0), value=0), offsets + pad, True


def prompt_mask(keys: torch.Tensor, pos: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, T, max_len) mask of prompt tokens at slots `pos` (T,): each sees the earlier slots of its row but
    not the row's pad. Pad slots attend to themselves only (a query that sees nothing would give NaNs, and NaN
    values of a masked slot would still poison a softmax-weighted sum); real tokens never see pad slots."""
    causal = keys[None, None, :] <= pos[None, :, None]
    visible = (keys[None, None, :] >= offsets[:, None, None]) | (keys[None, None, :] == pos[None, :, None])
    return causal & visible


def make_prefill_step(engine: DecodeEngine, chunk: int) -> Callable:
    """(tokens (B, chunk), start (), offset (B,)) -> the chunk's last hidden state (B, H): prompt slots
    start..start+chunk-1 written to the cache. Static shapes: one compile and graph per batch size."""
    keys = torch.arange(engine.max_len, device=engine.device)
    columns = torch.arange(chunk, device=engine.device)

    def step(tokens, start, offset):
        pos = start + columns  # (chunk,)
        rope = (pos[None, :] - offset[:, None]).clamp(min=0)  # (B, chunk)
        hidden = engine(tokens, pos.expand(tokens.shape[0], chunk), rope, prompt_mask(keys, pos, offset))
        return hidden[:, -1]

    step.static_tensors = [keys, columns]
    return step


def _prompt_through_cache(engine, ids, offsets, chunk: int, compile: bool) -> torch.Tensor:
    """Write the prompts' KV into the cache; returns each row's last hidden state (B, H).

    With `chunk` (> 0; ids already padded to a multiple of it): chunk by chunk through the captured prefill step
    (compiled with `compile`: generate passes it the FASTMEDUSA_PREFILL_COMPILE choice); else one eager forward
    over the whole prompt (its length varies)."""
    bsz, length = ids.shape
    start = torch.zeros((), dtype=torch.long, device=engine.device)
    if chunk <= 0:  # the whole prompt as one chunk, eagerly
        last = make_prefill_step(engine, length)(ids, start, offsets)
        return last.clone(memory_format=torch.contiguous_format)  # a stride set by P would recompile
    runner = _step_runner(
        engine, ("prefill", chunk), lambda: make_prefill_step(engine, chunk), prefill_body, 1, compile
    )
    hidden = torch.empty(bsz, engine.hidden_size, dtype=engine.dtype, device=engine.device)
    values = dict(tokens=ids[:, :chunk], start=start, offset=offsets, hidden=hidden)
    state = runner.load(values, torch.arange(bsz, device=engine.device))
    while runner.graphs and (bsz, False) not in runner.captured:  # warm up and capture now, so every call replays:
        runner.run(bsz)  # the first chunk again writes the same slots with the same values
    for begin in range(0, length, chunk):
        if begin:
            state["tokens"].copy_(ids[:, begin : begin + chunk])
            state["start"].fill_(begin)
        runner.run(bsz)
    if not compile:
        engine.eager_prefill_chunks += length // chunk
    return state["hidden"].clone()


def _prefill(
    engine, ids, offsets, seeds, max_new_tokens, temperature, eos_ids, chunk: int = 0, compile: bool = False,
    truncation: tuple[int, float] = (0, 1.0),
) -> dict[str, torch.Tensor]:
    """Run the prompts through the cache (`_prompt_through_cache`) and sample each row's first token."""
    bsz, length = ids.shape
    last = _prompt_through_cache(engine, ids, offsets, chunk, compile)
    real_len = length - offsets
    if temperature <= 0:  # the same kernel as the greedy steps
        token = engine.greedy_tokens(last)  # (B,)
    else:
        token = sample_token(engine.logits(last), temperature, seeds, real_len, None, *truncation)
    n = torch.ones(bsz, dtype=torch.long, device=engine.device)
    limit = torch.full_like(n, max_new_tokens)
    done = _is_eos(token, eos_ids) | (n >= limit)
    cur = torch.full_like(n, length)
    return dict(token=token, hidden=last, cur=cur, offset=offsets, seeds=seeds, n=n, limit=limit, done=done)
