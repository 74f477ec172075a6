"""Many prompts through a fixed number of batch slots, each slot refilled with the next prompt as its row ends.

A batch of `generate` runs as many steps as its slowest row. With Medusa rows accept their own lengths, so
even without EOS they end at different steps: on an H100 at batch 64 (SmolLM2, MT-Bench) the average row
needed 96 steps for 256 tokens and the slowest 201 (bench/results/decode_batch_compaction_h100). Compaction
makes those late steps narrower; refilling keeps them full instead. Here, once a quarter of the slots hold
finished rows, their outputs are read out, the unfinished rows' caches move behind them, the next prompts run
through the cache in those slots, and decoding goes on at full width. When no prompt is left, the last rows
finish as in `generate` (compacted as they end).

Every prompt gets what it would get alone: its own cache row, positions and sampling seed (greedy is lossless
per prompt, as in `generate`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastmedusa.decode.engine import check_position_limit, engine_fits, get_engine
from fastmedusa.decode.generate import (
    SeedSpec,
    TreeSpec,
    _check_heads,
    _eos_tensor,
    _is_int,
    _pad_id,
    _prefill,
    _split_model,
    _sync,
    check_acceptance,
    check_custom_heads,
    check_heads_placement,
    check_models,
    check_sampling,
    check_token_ids,
    check_truncation,
    cuda_graphs_mode,
    decode_runner,
    decoding,
    heads_tree_info,
    optional_flag,
    pad_to_chunks,
    positive_int,
    prefill_chunk,
    prefill_compiled,
    row_seeds,
)
from fastmedusa.decode.loop import ActiveRows, StepRunner, batch_compile, compact_rows
from fastmedusa.decode.trees import cached_tree_buffers, resolve_tree

REFILL_SHARE = 4  # refill once 1/REFILL_SHARE of the slots have finished, that many prompts a pass (all: all slots)


@dataclass
class ManyOutput:
    """What `generate_many` returns: per prompt, in the order given, its new tokens (up to and including its
    EOS) and, with Medusa, the tokens accepted at each of its steps. A step is one model forward of the slots
    (a refill's pass over its prompts counts as one)."""

    new_token_ids: list[torch.Tensor]
    accept_lengths: list[list[int]]
    steps: int
    seconds: float
    batch_size: int
    tree_nodes: int = 0  # tokens per verify pass (0: plain decoding)
    steps_per_prompt: list[int] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(int(t.numel()) for t in self.new_token_ids)

    @property
    def tokens_per_step(self) -> float:
        """New tokens per forward of a prompt's row (idle slots do not count)."""
        return self.new_tokens / max(sum(self.steps_per_prompt), 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        mode = f"medusa ({self.tree_nodes - 1}-node tree)" if self.tree_nodes else "plain"
        return (
            f"{mode}, {len(self.new_token_ids)} prompts in {self.batch_size} slots: {self.new_tokens} tokens in "
            f"{self.steps} steps, {self.tokens_per_step:.2f} tokens/step, {self.tokens_per_s:.1f} tokens/s "
            f"({self.seconds:.2f} s)"
        )


def _prompt_tensors(prompts: Sequence) -> list[torch.Tensor]:
    """Each prompt as a 1-D long tensor of token ids (a (1, P) tensor counts as one prompt), or a clear
    error."""
    if isinstance(prompts, torch.Tensor) and prompts.ndim == 2:
        raise ValueError(
            "prompts is one 2-D tensor: pass a list of 1-D prompts (list(ids) for a batch without padding, or "
            "each row's tokens without its padding), or call generate(input_ids, attention_mask=...) for a batch"
        )
    if isinstance(prompts, torch.Tensor | str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            "prompts must be a non-empty list of token-id sequences (lists or 1-D tensors), one per prompt"
        )
    if all(_is_int(p) for p in prompts):
        raise ValueError(f"prompts is one flat list of token ids: pass a list of prompts, e.g. [{list(prompts)[:3]}]")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise ValueError(f"prompt {i} is text: give token ids (tokenizer(text).input_ids)")
        if not isinstance(p, torch.Tensor) and len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        t = p if isinstance(p, torch.Tensor) else torch.as_tensor(p)
        if t.ndim == 2 and t.shape[0] == 1:  # one tokenized prompt, return_tensors="pt"
            t = t[0]
        if t.dtype not in (torch.long, torch.int32, torch.int64) or t.ndim != 1 or t.numel() == 0:
            raise ValueError(
                f"prompt {i} must be a non-empty 1-D sequence of integer token ids, got "
                f"{t.dtype} of shape {tuple(t.shape)}"
            )
        out.append(t.long())
    return out


def _left_pad(prompts: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (k, P), left pad per row (k,)) of prompts of any lengths."""
    width = max(int(p.numel()) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel() :] = p
    pads = torch.tensor([width - p.numel() for p in prompts], dtype=torch.long)
    return ids.to(device), pads.to(device)


class _Slots:
    """The prompts in flight: which prompt each output row holds, and what has been read out so far."""

    def __init__(self, runner: StepRunner, count: int, medusa: bool) -> None:
        self.runner, self.medusa = runner, medusa
        self.prompt_of_row: dict[int, int] = {}
        self.first_token: dict[int, int] = {}
        self.tokens: list[torch.Tensor | None] = [None] * count
        self.accepts: list[list[int]] = [[] for _ in range(count)]

    def assign(self, rows: list[int], prompts: list[int | None], first_tokens: list[int], pad_id: int) -> None:
        out = self.runner.shared.out
        for row, prompt, token in zip(rows, prompts, first_tokens):
            out[row].fill_(pad_id)
            if prompt is None:
                self.prompt_of_row.pop(row, None)
            else:
                self.prompt_of_row[row] = prompt
                self.first_token[prompt] = token

    def read_accepts(self) -> None:
        """Move the step log (accepted lengths by step and row) into each prompt's list, then clear it, so the
        log never outgrows its rows however many prompts pass through."""
        if not self.medusa:
            return
        shared = self.runner.shared
        steps = min(int(shared.counter), shared.log.shape[0])
        log = shared.log[:steps].t().tolist()  # by output row
        for row, prompt in self.prompt_of_row.items():
            if self.tokens[prompt] is None:
                self.accepts[prompt] += [a for a in log[row] if a >= 0]
        shared.log.fill_(-1)
        shared.counter.zero_()

    def read_tokens(self, rows: list[int], counts: list[int]) -> None:
        """The finished prompts of output rows `rows`, with `counts` new tokens each (the first from the
        prompt's pass, the rest from the output row's columns 1..count-1)."""
        out = self.runner.shared.out
        for row, count in zip(rows, counts):
            prompt = self.prompt_of_row.pop(row, None)
            if prompt is None or self.tokens[prompt] is not None:
                continue
            rest = out[row, 1:count].cpu()
            self.tokens[prompt] = torch.cat([torch.tensor([self.first_token[prompt]]), rest])


@decoding
def generate_many(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
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
) -> ManyOutput:
    """Generate up to `max_new_tokens` after each of `prompts` (token-id lists or 1-D tensors, any lengths)
    through `batch_size` slots, a slot refilled with the next prompt as soon as a quarter of the slots have
    finished. Returns the prompts' new tokens in the order given (see `ManyOutput`).

    The other arguments are `generate`'s. `tree` None is the default tree for the slots' rows (`batch_size`, or
    fewer where fewer prompts are given); "auto" is not
    taken here (pass "auto:N" or a tree). `seed`: an int (prompt i gets the seed `generate` would give row i of
    one batch of all the prompts), one per prompt, or None."""
    ids_list = _prompt_tensors(prompts)
    batch_size = positive_int(batch_size, "batch_size")
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    max_len = positive_int(max_len, "max_len", optional=True)
    compile = optional_flag(compile, "compile")
    temperature, typical_epsilon, typical_delta = check_sampling(temperature, typical_epsilon, typical_delta)
    acceptance = check_acceptance(acceptance)
    truncation = check_truncation(top_k, top_p)
    check_models(model, heads, medusa)
    medusa = bool(medusa)
    base, heads = _split_model(model, heads)
    every = torch.cat([p.cpu() for p in ids_list])
    check_token_ids(every[None], torch.zeros(1, dtype=torch.long), base.get_input_embeddings().num_embeddings)
    slots = min(batch_size, len(ids_list))
    tree_buffers, paths = None, ()
    if medusa:
        if heads is None:
            raise ValueError("medusa=True needs Medusa heads: pass a MedusaModel, heads=..., or medusa=False")
        if isinstance(tree, str) and tree == "auto":
            raise ValueError('generate_many takes no tree="auto": pass "auto:N", a preset, a file or None')
        paths = tuple(resolve_tree(tree, heads.num_heads, heads_tree_info(model, heads), batch_size=slots))
        medusa = len(paths) > 0
    slack = len(paths) + 1 if medusa else 0
    graphs = cuda_graphs_mode()
    on_cuda = next(base.parameters()).device.type == "cuda"
    compile = on_cuda if compile is None else compile
    chunk = prefill_chunk(captured=on_cuda and (graphs == "step" or (graphs == "compile" and compile)))
    longest = max(int(p.numel()) for p in ids_list)
    check_position_limit(base, longest, max_new_tokens, what="the longest prompt")
    needed = longest + max_new_tokens + slack  # as in `generate`: prompts are cut in chunks where room allows
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) + tree ({slack} nodes) = "
            f"{needed} does not fit the KV cache of {max_len} slots per row: raise max_len (--max-len), or "
            "shorten the prompts, max_new_tokens or the tree"
        )
    # a cached engine that fits is kept (with its compiled steps); a new one gets `batch_size` rows, as
    # `generate(max_batch_size=batch_size)` in distill's fixed batches asks, so the two share it
    rows = None if engine_fits(base, needed, max_len, slots) else batch_size
    engine = get_engine(base, needed, max_len, slots, rows)
    if medusa:
        check_heads_placement(heads, engine.dtype, engine.device)
        tree_buffers = cached_tree_buffers(paths, heads.num_heads, str(engine.device))
        _check_heads(heads, engine, tree_buffers.topk)
        check_custom_heads(heads, engine, tree_buffers.depth, tree_buffers.topk, slots)
    eos_ids = _eos_tensor(eos_token_id, engine.device, engine.vocab_size)
    pad_id = _pad_id(pad_token_id, eos_ids)
    seeds = row_seeds(seed, len(ids_list), engine.device, unit="prompt")
    prefill_compiled(0)  # a bad FASTMEDUSA_PREFILL_COMPILE fails here, before any work
    runner = decode_runner(
        engine, heads, tree_buffers, temperature, typical_epsilon, typical_delta, eos_ids, pad_id, compile,
        acceptance, truncation,
    )

    def prefill(batch: list[int | None]) -> dict[str, torch.Tensor]:
        """Prompts `batch` (None: an idle slot, run as a 1-token prompt and marked done) into cache rows
        0..len(batch)-1; their first tokens and states."""
        chosen = [ids_list[p] if p is not None else ids_list[0][:1] for p in batch]
        ids, pads = _left_pad(chosen, engine.device)
        run_ids, run_pads, chunked = pad_to_chunks(ids, pads, chunk, engine.max_len - ids.shape[1] - max_new_tokens - slack)
        row_seed = seeds[torch.tensor([p if p is not None else 0 for p in batch], device=engine.device)]
        compile_prompt = compile and (prefill_compiled(engine.eager_prefill_chunks) or graphs == "compile")
        values = _prefill(engine, run_ids, run_pads, row_seed, max_new_tokens, temperature, eos_ids,
                          chunk if chunked else 0, compile_prompt, truncation)  # fmt: skip
        idle = torch.tensor([p is None for p in batch], device=engine.device)
        values["done"] = values["done"] | idle
        return values

    _sync(engine.device)
    start = time.perf_counter()
    queue = deque(range(len(ids_list)))
    first = [queue.popleft() for _ in range(slots)]
    values = prefill(first)
    book = _Slots(runner, len(ids_list), medusa)
    runner.start(slots, pad_id)
    book.assign(list(range(slots)), first, values["token"].tolist(), pad_id)
    one_compile = slots > 2 and batch_compile() == "shared"  # full slots run the compacted sizes' step too
    state = runner.load(values, torch.arange(slots, device=engine.device), compacted=one_compile)
    refill_rows = max(1, slots // REFILL_SHARE)
    steps, compacted, refill_now = 1, one_compile, True
    n_all = torch.zeros(slots, dtype=torch.long, device=engine.device)
    while True:
        if refill_now:  # after a (re)fill, or once enough rows ended: fill free slots, then step again
            while queue:
                free = int(state["done"].sum())  # (a sync, once per refill)
                count = slots if free == slots else refill_rows if free >= refill_rows else 0
                if not count:
                    break
                state = _refill(engine, runner, book, state, queue, count, prefill, pad_id, one_compile)
                steps += 1
            if not queue and bool(state["done"].all()):
                break
            active, refill_now = ActiveRows(runner), False
        runner.run(state["rows"].shape[0], compacted)
        steps += 1
        unfinished = active.poll()
        if unfinished is None:
            continue
        size = state["rows"].shape[0]
        if queue and size - unfinished >= refill_rows:
            refill_now = True
        elif not queue and unfinished == 0:
            break
        elif not queue and size > 2 and unfinished <= size // 2:  # the last rows: compacted as in `generate`
            state, compacted = compact_rows(runner, state, n_all), True
            if not bool((~state["done"]).any()):
                break
            active = ActiveRows(runner)
    _sync(engine.device)
    book.read_accepts()
    n_all[state["rows"]] = state["n"]
    rows = sorted(book.prompt_of_row)
    book.read_tokens(rows, [int(n_all[r]) for r in rows])
    seconds = time.perf_counter() - start
    accepts = book.accepts if medusa else [[] for _ in ids_list]
    per_prompt = [1 + len(a) for a in accepts] if medusa else [int(t.numel()) for t in book.tokens]
    return ManyOutput(book.tokens, accepts, steps, seconds, slots, len(paths) + 1 if medusa else 0, per_prompt)


def _refill(
    engine, runner: StepRunner, book: _Slots, state, queue: deque, count: int, prefill, pad_id: int, one_compile: bool
):
    """Read out the finished rows, move the unfinished ones behind `count` free slots, run the next prompts
    through those slots (idle slots where none is left) and load the new full state. The prompts' pass runs
    at `count` rows: the caller keeps that to two sizes (a quarter of the slots, or all of them), so a
    compiled, captured prefill step exists for few batch sizes."""
    done = state["done"]
    free = done.nonzero()[:, 0]
    keep = torch.cat([(~done).nonzero()[:, 0], free[count:]])
    take = free[:count]
    rows = state["rows"]
    finished_rows = rows[free].tolist()
    book.read_accepts()
    book.read_tokens(finished_rows, state["n"][free].tolist())
    batch = [queue.popleft() if queue else None for _ in range(count)]
    kept = {name: value[keep] for name, value in state.items() if name != "rows"}
    new_rows = torch.cat([rows[take], rows[keep]])
    engine.gather_rows(torch.cat([take, keep]))  # the prompts' pass below overwrites rows 0..count-1
    values = prefill(batch)  # (with "hidden", which plain steps ignore: the runner's buffers are shared with `generate`)
    book.assign(rows[take].tolist(), batch, values["token"].tolist(), pad_id)
    merged = {name: torch.cat([values[name], kept[name]]) for name in kept}
    return runner.load(merged, new_rows, compacted=one_compile)
