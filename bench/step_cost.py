"""What a decode step costs: a plain step against a Medusa verify step (default tree mc_sim_7b_63: 64 tokens).

A SmolLM2-135M-shaped Llama with random weights and 4 fresh heads, bf16, CUDA graphs. Environment:
$BATCHES batch sizes (default "1"), $LAYERS decoder layers (default 30), $PROMPT_TOKENS the prompt's length
(default 128) and $MAX_LEN the KV cache's slots per row (default 1024): a long prompt shows what attention over
a long context costs a step; $TEMPERATURE (default 0: greedy;
above 0: sampling, with $ACCEPTANCES the Medusa rows' acceptance rules, default "typical"; "typical exact"
measures both), $DRAFT_VOCABS the heads' vocabularies (default "0": the full 49,152;
"0 16384 8192" measures each; "shared": heads that project through the base model's LM head), $TREES tree presets (default "mc_sim_7b_63"; e.g. "mc_sim_7b_63 mc_sim_7b_31"),
$PROFILE=1 adds each row's kernels per step (`profile`: a profiled short call subtracted from a profiled long
one, as `bench decode --profile` does; the timed pairs run without the profiler).
Step time does not depend on weight values, and acceptance here is meaningless, so the result is the step
time (the difference of a long and a short call divided by their difference in steps, which leaves out the
prefill and the call's fixed cost; the median of REPEATS such pairs, all kept), the first call's time (it
compiles), and how many steps ran without CUDA graphs: under FASTMEDUSA_CUDA_GRAPHS=compile torch.compile's
`cudagraph_skips` (TORCH_LOGS=cudagraphs says why), under the default "step" the step runners whose capture
failed (a warning says why). A step that fails to compile is recorded with its error. Writes
$OUT/step_cost_L{layers}_T{temperature}[_heads_trees][_{acceptances}][_P{prompt}_S{slots}].json (or ./...), so runs with other settings do not
overwrite it. Without CUDA it runs a 2-layer fp32 model as a smoke test.

    PYTHONPATH=src BATCHES="1 16" python3 bench/step_cost.py
    PYTHONPATH=src DRAFT_VOCABS="0 16384 8192" TREES="mc_sim_7b_63 mc_sim_7b_31" python3 bench/step_cost.py
    PYTHONPATH=src python3 bench/step_cost.py --plot step_cost_L30_T0_heads_trees.json   # the chart again

Each run writes a PNG beside its JSON: Medusa step / plain step per tree size, one line per heads' vocabulary
and batch size.
"""

import json
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from fastmedusa.bench.common import median
from fastmedusa.bench.decode import event_counts, profile_summary, synced_seconds, timed_step_ms
from fastmedusa.decode import generate
from fastmedusa.decode.engine import attention_layout, cached_engine, regional_compile
from fastmedusa.decode.generate import cuda_graphs_mode
from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.ops.linear_argmax import FUSED_ARGMAX

BATCHES = [int(b) for b in os.environ.get("BATCHES", "1").split()]
# 0: the full vocabulary, "shared": through the base model's LM head
DRAFT_VOCABS = [v if v == "shared" else int(v) for v in os.environ.get("DRAFT_VOCABS", "0").split()]
TREES = os.environ.get("TREES", "mc_sim_7b_63").split()
REPEATS = 5  # long/short pairs per row; the median is reported
TEMPERATURE = float(os.environ.get("TEMPERATURE", 0))
ACCEPTANCES = os.environ.get("ACCEPTANCES", "typical").split() if TEMPERATURE > 0 else ["typical"]
PROMPT_TOKENS = int(os.environ.get("PROMPT_TOKENS", 128))
MAX_LEN = int(os.environ.get("MAX_LEN", 1024))
PROFILE = os.environ.get("PROFILE", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEV == "cpu"


def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    layers = 2 if SMALL else int(os.environ.get("LAYERS", 30))
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(torch.float32 if SMALL else torch.bfloat16).to(DEV).eval()


def with_heads(base: LlamaForCausalLM, draft_vocab: int | str) -> MedusaModel:
    """4 fresh heads on `base`, over the full vocabulary (0), a draft vocabulary of that many tokens, or
    projecting through the base model's LM head ("shared")."""
    if draft_vocab == "shared":
        config = MedusaConfig(num_heads=4, shared_lm_head=True)
    else:
        config = MedusaConfig(num_heads=4, draft_vocab_size=draft_vocab or None)
    model = MedusaModel.from_base(base, config)
    return model.to(device=DEV, dtype=next(base.parameters()).dtype).eval()


def measure(
    model: MedusaModel, batch: int, medusa: bool, tree: str | None = None, acceptance: str = "typical"
) -> dict:
    ids = torch.randint(1, 49152, (batch, PROMPT_TOKENS), device=DEV)
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=8 if SMALL else 128, medusa=medusa, max_len=MAX_LEN,
        max_batch_size=batch, temperature=TEMPERATURE, seed=0,
    )  # fmt: skip
    if medusa:
        kw.update(tree=tree, acceptance=acceptance)
    row = dict(batch=batch, mode="medusa" if medusa else "plain", temperature=TEMPERATURE, tree=tree,
               acceptance=acceptance if medusa and TEMPERATURE > 0 else None,
               prompt_tokens=PROMPT_TOKENS, max_len=MAX_LEN,
               draft_vocab=model.medusa_config.draft_vocab_size,
               shared_lm_head=model.medusa_config.shared_lm_head,
               layers=model.base.config.num_hidden_layers, cuda_graphs=cuda_graphs_mode(),
               regional_compile=regional_compile(), attention=attention_layout())  # fmt: skip
    skips = counters["inductor"]["cudagraph_skips"]
    start = time.perf_counter()
    try:
        out = generate(model, ids, **kw)
    except Exception as e:  # a compile failure is a result: record it and go on
        print(f"batch {batch} {row['mode']}: FAILED {type(e).__name__}", flush=True)
        traceback.print_exc(limit=-3)
        return dict(row, error=str(e)[-2000:])
    if DEV == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    short = dict(kw, max_new_tokens=kw["max_new_tokens"] // 4)
    times = timed_step_ms(partial(generate, model, ids, **short), partial(generate, model, ids, **kw),
                          torch.device(DEV), REPEATS)  # fmt: skip
    if PROFILE:
        row["profile"] = profile_pair(partial(generate, model, ids, **short), partial(generate, model, ids, **kw))
    engine = cached_engine(model.base)
    row["attention"] = engine.attention if engine is not None else row["attention"]  # what "auto" resolved to
    row["sdpa_attention"] = engine.sdpa_attention if engine is not None else None  # the prefill's under "triton"
    row["fused_argmax"] = engine.fused_argmax if engine is not None else None  # greedy tokens without logits
    return dict(row, first_call_s=round(first, 1), step_ms=round(median(times), 3),
                step_ms_runs=[round(t, 3) for t in times], steps=out.steps,
                tree_nodes=out.tree_nodes, cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips,
                uncaptured_step_runners=uncaptured_runners(model))  # fmt: skip


def profile_pair(run_short, run_long) -> dict:
    """Kernels per step under the profiler: a long call minus a short one (`profile_summary`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    runs = {}
    for name, run in (("short", run_short), ("long", run_long)):
        with profile(activities=activities) as prof:
            out, seconds = synced_seconds(run, torch.device(DEV))
        runs[name] = {"counts": event_counts(prof.events()), "steps": out.steps, "wall_ms": 1e3 * seconds}
    return profile_summary(runs["short"], runs["long"])


def uncaptured_runners(model: MedusaModel) -> int:
    """Step runners of the engine that hold no captured graph ("step" mode on CUDA: a failed capture)."""
    engine = cached_engine(model.base)
    if engine is None or DEV != "cuda" or cuda_graphs_mode() != "step":
        return 0
    return sum(1 for key, runner in engine.compiled.items() if key[0] == "runner" and not runner.graphs)


def plot(result: dict, path: Path) -> None:
    """Medusa step / plain step (same batch size) against the tokens per verify pass (the tree's nodes + the
    root), a line per heads' vocabulary and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastmedusa.bench.heads import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plain = {r["batch"]: r["step_ms"] for r in result["rows"] if r["mode"] == "plain" and r.get("step_ms")}
    lines: dict[tuple, list] = {}
    for r in result["rows"]:
        if r["mode"] == "medusa" and r.get("step_ms") and r["batch"] in plain:
            vocab = "shared" if r.get("shared_lm_head") else r.get("draft_vocab")
            lines.setdefault((r["batch"], vocab, r.get("acceptance") or ""), []).append(r)
    by_batch_then_vocab = sorted(lines.items(), key=lambda kv: (kv[0][0], -_vocab_order(kv[0][1]), kv[0][2]))
    for i, ((batch, vocab, acceptance), rows) in enumerate(by_batch_then_vocab):
        rows.sort(key=lambda r: r["tree_nodes"])
        ratios = [r["step_ms"] / plain[batch] for r in rows]
        ax.plot([r["tree_nodes"] for r in rows], ratios, "o-", label=f"batch {batch}, " + _heads_label(vocab)
                + (f", {acceptance} acceptance" if acceptance else ""))
        for r, ratio in zip(rows, ratios):
            offset = ((5, 6), (5, -12), (-30, 6))[i % 3]  # lines close together: labels above, below, left
            ax.annotate(f"{ratio:.2f}x", (r["tree_nodes"], ratio), fontsize=7, xytext=offset, textcoords="offset points")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    nodes = sorted({r["tree_nodes"] for rows in lines.values() for r in rows})
    crowded = any(b / a < 1.1 for a, b in zip(nodes, nodes[1:]))  # e.g. 63, 64, 65: labels would overlap
    ax.set_xticks(nodes, [str(n) for n in nodes], rotation=90 if crowded else 0, fontsize=7 if crowded else None)
    ax.set_xlabel("tokens per verify pass and row (the tree's nodes + the root)")
    ax.set_ylabel("Medusa step / plain step (median of calls)")
    ax.legend(fontsize=8)
    ms = ", ".join(f"batch {b}: {v:.3f} ms" for b, v in sorted(plain.items()))
    env = {"device": result["device"], "date": result["date"],
           "versions": {"torch": result["torch"], "transformers": result.get("transformers")}}  # fmt: skip
    save_figure(fig, path, env, title=f"decode step cost, SmolLM2-135M shape, bf16; plain step {ms}")


def _vocab_order(vocab: int | str | None) -> int:
    """Lines in the legend: full-vocabulary heads, then draft vocabularies largest first, then shared."""
    return 0 if vocab == "shared" else vocab or 1 << 30


def _heads_label(vocab: int | str | None) -> str:
    if vocab == "shared":
        return "heads through the LM head"
    return f"heads over {vocab:,} tokens" if vocab else "heads over the full vocabulary"


def main() -> None:
    if sys.argv[1:2] == ["--plot"] and len(sys.argv) == 3:
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]).with_suffix(".png"))
        return
    base = build_base()
    rows = []
    for batch in BATCHES:
        plain = measure(with_heads(base, 0), batch, medusa=False)
        rows.append(plain)
        print(plain, flush=True)
        for draft_vocab in DRAFT_VOCABS:
            model = with_heads(base, draft_vocab)
            for tree in TREES:
                for acceptance in ACCEPTANCES:
                    rows.append(measure(model, batch, True, tree, acceptance))
                    print(rows[-1], flush=True)
                    if plain.get("step_ms") and rows[-1].get("step_ms"):
                        rule = f", {acceptance} acceptance" if TEMPERATURE > 0 else ""
                        print(f"batch {batch}, heads' vocabulary {draft_vocab or 'full'}, {tree}{rule}: medusa step /"
                              f" plain step = {rows[-1]['step_ms'] / plain['step_ms']:.2f}x", flush=True)  # fmt: skip
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    result = dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                  date=time.strftime("%Y-%m-%d"), fused_argmax_mode=FUSED_ARGMAX, rows=rows)  # fmt: skip
    suffix = "" if DRAFT_VOCABS == [0] and TREES == ["mc_sim_7b_63"] else "_heads_trees"
    if ACCEPTANCES != ["typical"]:
        suffix += "_" + "_".join(ACCEPTANCES)
    if PROMPT_TOKENS != 128 or MAX_LEN != 1024:
        suffix += f"_P{PROMPT_TOKENS}_S{MAX_LEN}"
    name = f"step_cost_L{base.config.num_hidden_layers}_T{TEMPERATURE:g}{suffix}.json"
    path = Path(os.environ.get("OUT", ".")) / name
    path.write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
