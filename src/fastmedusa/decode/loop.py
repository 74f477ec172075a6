"""The decode loop: each step reads its state from tensors of fixed address and writes it back in place.

A step is one `body`: the step function, then in-place writes of the new state, the output tokens, the
accepted lengths, a step counter and the number of unfinished rows. Compiled, step and body are one function,
so those writes fuse into the step's last kernels (on an H100, SmolLM2: 18 us less per greedy step, 12 us per
Medusa step, bench/results/step_cost_fused_body_h100). Nothing in the loop allocates per step, so the same
body serves every way of running steps under CUDA graphs (`cuda_graphs_mode` in fastmedusa.decode.generate):
- "step" (default): the body (compiled with `compile=True`) is run for real as warm-up, then captured with
  `torch.cuda.graph` and replayed: one host call per step, whatever the model's size.
  A capture that fails falls back to uncaptured steps with a warning.
- "compile" (FASTMEDUSA_CUDA_GRAPHS=compile): the step is compiled with mode="reduce-overhead",
  torch.compile's own CUDA graphs. Its replay is driven from Python on every call: dynamo's guards and the
  CUDA-graph tree's input checks walk every tensor the step reads (each layer's weights and KV cache).
- "off" (FASTMEDUSA_CUDA_GRAPHS=off): no graphs, every step launched from the host.
Measured on an H100 with SmolLM2-135M, bf16, same heads, runs back to back: a greedy step took 1.41 ms
("step") against 1.44 ms ("compile"), a Medusa step 1.67 against 1.70 ms; at batch 16, 1.38 / 1.41 ms and
2.52 / 2.60 ms (bench/results/decode_graphs_regional_h100).
On the CPU the body runs directly.

Batches. The host reads "how many rows are unfinished" one step late (a pinned copy and an event), so the GPU
always has the next step queued. With `compact`, once at most half the rows are unfinished, those rows' caches
and states move into the first slots and steps run at the next power of two of their count (at least
MIN_COMPACT_ROWS), so finished rows stop costing work. Medusa rows finish apart even without EOS (each accepts
its own lengths), and a batch otherwise runs as many steps as its slowest row at full width. The compacted
sizes have state buffers of their own, with a dynamic batch dimension, and (in "step" mode) a body compiled
apart from the full batch's: one more compile serves every smaller size (not one per size), a full batch
always runs its own static step, and each size gets its own graph on first use.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch

from fastmedusa.decode.engine import DecodeEngine

PLAIN_IN = ("token", "cur", "offset", "seeds", "n", "limit", "done")
PLAIN_OUT = ("token", "cur", "n", "done")
MEDUSA_IN = ("token", "hidden", "cur", "offset", "seeds", "n", "limit", "done")
MEDUSA_OUT = ("token", "hidden", "cur", "n", "done")
WARMUP_STEPS = 2  # real steps run before a batch size's graph is captured (the first one compiles)
MIN_COMPACT_ROWS = 2  # compaction stops here: a 1-row step costs about a 2-row one, and would compile again
BATCH_COMPILES = ("apart", "shared")


def batch_compile() -> str:
    """How batches that may compact compile their step (`FASTMEDUSA_BATCH_COMPILE`): "apart" (default), the
    full batch static and the compacted sizes one dynamic-batch compile; "shared", the full batch too runs
    the dynamic-batch step: one compile, but a slower one. On an H100 the first Medusa call at batch 16 / 64
    took 14.3 / 17.6 s "apart" and 24.9 / 28.7 s "shared", warm calls equal within 1%
    (bench/results/first_call_batch_h100)."""
    mode = os.environ.get("FASTMEDUSA_BATCH_COMPILE", "apart")
    if mode not in BATCH_COMPILES:
        raise ValueError(f"FASTMEDUSA_BATCH_COMPILE={mode!r}: use 'apart' (the default) or 'shared'")
    return mode


def plain_body(step: Callable, state: dict, shared: SimpleNamespace) -> None:
    """One plain step in place: the token goes to column n (the row's tokens so far) of its output row, then
    the state moves on. (By row count, not by step: a row refilled mid-run starts at its own column 1.)"""
    emitted, *new = step(*(state[k] for k in PLAIN_IN))
    rows = state["rows"]
    column = state["n"].clamp(max=shared.out.shape[1] - 1)
    shared.out.index_put_((rows, column), emitted)
    _finish_body(state, shared, PLAIN_OUT, new)


def medusa_body(step: Callable, state: dict, shared: SimpleNamespace) -> None:
    """One Medusa step in place: the step's kept tokens go to their output columns (-1: the scratch column),
    each row's accepted length to the log row `counter`, then the state moves on."""
    emitted, columns, accepted, *new = step(*(state[k] for k in MEDUSA_IN))
    rows = state["rows"]
    shared.out.index_put_((rows[:, None].expand(columns.shape), columns), emitted)
    log_row = shared.counter.clamp(max=shared.log.shape[0] - 1).expand(rows.shape)
    shared.log.index_put_((log_row, rows), accepted)
    _finish_body(state, shared, MEDUSA_OUT, new)


def prefill_body(step: Callable, state: dict, shared: SimpleNamespace) -> None:
    """One prompt chunk through the cache: the chunk's last hidden state goes to `state["hidden"]`."""
    state["hidden"].copy_(step(state["tokens"], state["start"], state["offset"]))


def _finish_body(state: dict, shared: SimpleNamespace, names: tuple[str, ...], new: list) -> None:
    for name, value in zip(names, new):
        state[name].copy_(value)
    shared.counter.add_(1)
    shared.active.copy_((~state["done"]).sum())


class StepRunner:
    """A step and its buffers for one engine and step kind: output tokens and the accepted-length log by batch
    row (shared by every batch size), and per batch size the state buffers and, on CUDA, the captured graph.
    `body(state, shared)` runs one step in place (a loop body with its step bound, compiled or not).

    Cached on the engine, so later calls with the same step reuse the graphs: a call only copies its prefill
    state in. Graphs of all batch sizes draw on one memory pool (only one runs at a time)."""

    def __init__(
        self,
        engine: DecodeEngine,
        body: Callable,
        out_width: int,
        graphs: bool,
        mark_steps: bool,
        compacted_body: Callable | None = None,
    ) -> None:
        self.engine, self.graphs, self.mark_steps = engine, graphs, mark_steps
        # compacted batches have a body of their own (compiled apart, with a dynamic batch dimension), so a
        # full batch always runs its own static step, whatever ran on this engine before
        self.bodies = {False: body, True: compacted_body or body}
        device, rows = engine.device, engine.max_batch_size
        self.shared = SimpleNamespace(
            out=torch.zeros(rows, out_width, dtype=torch.long, device=device),
            log=torch.full((engine.max_len + 2, rows), -1, dtype=torch.long, device=device),
            counter=torch.zeros((), dtype=torch.long, device=device),
            active=torch.zeros((), dtype=torch.long, device=device),
        )
        # by (batch size, compacted)
        self.states: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
        self.captured: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.warm: dict[tuple[int, bool], int] = {}
        self.side: torch.cuda.Stream | None = None  # warm-up steps run here

    def start(self, batch: int, pad_id: int) -> None:
        """A new call's rows: outputs all pad, the step log empty, the step counter (the log's row) at 0."""
        self.shared.out[:batch].fill_(pad_id)
        self.shared.log[:, :batch].fill_(-1)
        self.shared.counter.zero_()

    def load(
        self, values: dict[str, torch.Tensor], rows: torch.Tensor, compacted: bool = False
    ) -> dict[str, torch.Tensor]:
        """Copy a state (each (b, ...)) and its slot -> batch row map into the buffers of batch size b.
        `compacted`: the buffers of compacted batches, with a dynamic batch dimension, so their compiled
        body compiles once for all such sizes instead of once per size."""
        key = (rows.shape[0], compacted)
        if key not in self.states:
            self.states[key] = {k: torch.empty_like(v) for k, v in values.items()} | {"rows": torch.empty_like(rows)}
            if compacted:
                for buffer in self.states[key].values():
                    torch._dynamo.mark_dynamic(buffer, 0)
        state = self.states[key]
        for name, value in values.items():
            state[name].copy_(value)
        state["rows"].copy_(rows)
        return state

    def run(self, size: int, compacted: bool = False) -> None:
        """One step of the state of batch size `size` (a compacted batch's with `compacted`): a graph replay
        once captured."""
        key = (size, compacted)
        graph = self.captured.get(key)
        if graph is not None:
            graph.replay()
            return
        state, body = self.states[key], self.bodies[compacted]
        if not self.graphs:
            if self.mark_steps:  # torch.compile's CUDA graphs (reduce-overhead): a new step, outputs consumed
                torch.compiler.cudagraph_mark_step_begin()
            body(state, self.shared)
            return
        if self.warm.get(key, 0) < WARMUP_STEPS:  # real steps, on a side stream as CUDA-graph capture wants
            self.warm[key] = self.warm.get(key, 0) + 1
            side = self.side = self.side or torch.cuda.Stream(self.engine.device)
            side.wait_stream(torch.cuda.current_stream(self.engine.device))
            with torch.cuda.stream(side):
                body(state, self.shared)
            torch.cuda.current_stream(self.engine.device).wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=_graph_pool(self.engine)):
                body(state, self.shared)
        except RuntimeError as e:  # nothing ran during the failed capture: go on without graphs
            warnings.warn(f"decode steps run without CUDA graphs (slower): capture failed: {e}", stacklevel=3)
            self.graphs = False
            body(state, self.shared)
            return
        self.captured[key] = graph
        graph.replay()


def _graph_pool(engine: DecodeEngine):
    pool = engine.__dict__.get("_graph_pool")
    if pool is None:
        pool = engine.__dict__["_graph_pool"] = torch.cuda.graph_pool_handle()
    return pool


class ActiveRows:
    """Which slots still decode, read one step late so that the host never waits on the step it just queued.

    `poll()` after queueing step i queues a copy of the unfinished count into pinned host memory, then waits
    for the copy queued after step i - 1 (an event) and returns that count (None at the first step). A plain
    `int()` of a device tensor would queue its copy behind step i and wait for step i to finish: the host then
    could not prepare step i + 1 while step i runs."""

    def __init__(self, runner: StepRunner) -> None:
        self.runner = runner
        self.cuda = runner.engine.device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.long, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.calls = 0

    def poll(self) -> int | None:
        slot, self.calls = self.calls % 2, self.calls + 1
        active = self.runner.shared.active
        if not self.cuda:  # the step has run: read it now
            return int(active)
        self.host[slot].copy_(active, non_blocking=True)
        self.events[slot].record()
        if self.calls == 1:
            return None
        self.events[1 - slot].synchronize()
        return int(self.host[1 - slot])


def compact_rows(
    runner: StepRunner, state: dict[str, torch.Tensor], n_all: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Move the unfinished rows' caches and states into slots 0..b-1, b the next power of two of their count
    and at least MIN_COMPACT_ROWS (finished rows fill the rest, frozen); returns the state buffers of size b.
    Reads the current state (one sync, at most log2(B) times per call)."""
    done = state["done"]
    keep = (~done).nonzero()[:, 0]
    size = max(MIN_COMPACT_ROWS, 1 << max(int(keep.numel()) - 1, 0).bit_length())
    slots = torch.cat([keep, done.nonzero()[:, 0][: size - keep.numel()]])
    n_all[state["rows"]] = state["n"]
    runner.engine.gather_rows(slots)
    values = {k: v[slots] for k, v in state.items() if k != "rows"}
    return runner.load(values, state["rows"][slots], compacted=True)


def run_loop(
    runner: StepRunner, prefill: dict[str, torch.Tensor], max_steps: int | None, check: bool, compact: bool
) -> tuple[torch.Tensor, int]:
    """Step until every row is done (or `max_steps` steps); returns (new tokens per batch row (B,), steps)."""
    bsz = prefill["token"].shape[0]
    rows = torch.arange(bsz, device=runner.engine.device)
    one_compile = compact and batch_compile() == "shared"  # the full batch runs the compacted sizes' step too
    state = runner.load(prefill, rows, compacted=one_compile)
    n_all = prefill["n"].clone()
    if check and not bool((~prefill["done"]).any()):  # every row ended at its first token (one sync per call)
        return n_all, 0
    active = ActiveRows(runner)
    steps, compacted = 0, one_compile
    while max_steps is None or steps < max_steps:
        size = state["rows"].shape[0]
        runner.run(size, compacted)
        steps += 1
        if not check:
            continue
        unfinished = active.poll()
        if unfinished == 0:
            break
        if compact and unfinished is not None and size > MIN_COMPACT_ROWS and unfinished <= size // 2:
            state, compacted = compact_rows(runner, state, n_all), True
            if not bool((~state["done"]).any()):
                break
            active = ActiveRows(runner)
    n_all[state["rows"]] = state["n"]
    return n_all, steps
