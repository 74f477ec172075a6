"""What a decode step costs: a plain step against a Medusa verify step (default 64-node tree).

A SmolLM2-135M-shaped Llama with random weights and 4 fresh heads, bf16, CUDA graphs. Environment:
$BATCHES batch sizes (default "1"), $LAYERS decoder layers (default 30), $TEMPERATURE (default 0: greedy;
above 0: sampling and typical acceptance). Step time does not depend on weight values, and acceptance here is
meaningless, so the result is the step time (the difference of a long and a short call divided by their
difference in steps, which leaves out the prefill and the call's fixed cost), the first call's time (it
compiles), and how many steps ran without CUDA graphs: under FASTMEDUSA_CUDA_GRAPHS=compile torch.compile's
`cudagraph_skips` (TORCH_LOGS=cudagraphs says why), under the default "step" the step runners whose capture
failed (a warning says why). A step that fails to compile is recorded with its error. Writes
$OUT/step_cost_L{layers}_T{temperature}.json (or ./...), so runs with other settings do not overwrite it. Without CUDA it runs a 2-layer fp32 model as a smoke test.

    PYTHONPATH=src BATCHES="1 16" python3 bench/step_cost.py
"""

import json
import os
import time
import traceback

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from fastmedusa.decode import generate
from fastmedusa.decode.engine import attention_layout, cached_engine, regional_compile
from fastmedusa.decode.generate import cuda_graphs_mode
from fastmedusa.model import MedusaConfig, MedusaModel

BATCHES = [int(b) for b in os.environ.get("BATCHES", "1").split()]
TEMPERATURE = float(os.environ.get("TEMPERATURE", 0))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEV == "cpu"


def build_model() -> MedusaModel:
    torch.manual_seed(0)
    layers = 2 if SMALL else int(os.environ.get("LAYERS", 30))
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).to(torch.float32 if SMALL else torch.bfloat16)
    return MedusaModel.from_base(base, MedusaConfig(num_heads=4)).to(DEV).eval()


def measure(model: MedusaModel, batch: int, medusa: bool) -> dict:
    ids = torch.randint(1, 49152, (batch, 128), device=DEV)
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=8 if SMALL else 128, medusa=medusa, max_len=1024,
        max_batch_size=batch, temperature=TEMPERATURE, seed=0,
    )  # fmt: skip
    row = dict(batch=batch, mode="medusa" if medusa else "plain", temperature=TEMPERATURE,
               layers=model.base.config.num_hidden_layers, cuda_graphs=cuda_graphs_mode(),
               regional_compile=regional_compile(), attention=attention_layout())  # fmt: skip
    skips = counters["inductor"]["cudagraph_skips"]
    start = time.perf_counter()
    try:
        generate(model, ids, **kw)
    except Exception as e:  # a compile failure is a result: record it and go on
        print(f"batch {batch} {row['mode']}: FAILED {type(e).__name__}", flush=True)
        traceback.print_exc(limit=-3)
        return dict(row, error=str(e)[-2000:])
    if DEV == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    short = dict(kw, max_new_tokens=kw["max_new_tokens"] // 4)
    times = []
    for _ in range(3):
        out, few = generate(model, ids, **kw), generate(model, ids, **short)
        times.append((out.seconds - few.seconds) / max(out.steps - few.steps, 1))
    engine = cached_engine(model.base)
    row["attention"] = engine.attention if engine is not None else row["attention"]  # what "auto" resolved to
    row["sdpa_attention"] = engine.sdpa_attention if engine is not None else None  # the prefill's under "triton"
    return dict(row, first_call_s=round(first, 1), step_ms=round(1000 * sorted(times)[1], 3), steps=out.steps,
                tree_nodes=out.tree_nodes, cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips,
                uncaptured_step_runners=uncaptured_runners(model))  # fmt: skip


def uncaptured_runners(model: MedusaModel) -> int:
    """Step runners of the engine that hold no captured graph ("step" mode on CUDA: a failed capture)."""
    engine = cached_engine(model.base)
    if engine is None or DEV != "cuda" or cuda_graphs_mode() != "step":
        return 0
    return sum(1 for key, runner in engine.compiled.items() if key[0] == "runner" and not runner.graphs)


def main() -> None:
    model = build_model()
    rows = []
    for batch in BATCHES:
        for medusa in (False, True):
            rows.append(measure(model, batch, medusa))
            print(rows[-1], flush=True)
        plain, tree = (r.get("step_ms") for r in rows[-2:])
        if plain and tree:
            print(f"batch {batch}: medusa step / plain step = {tree / plain:.2f}x", flush=True)
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    result = dict(device=device, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows)
    name = f"step_cost_L{model.base.config.num_hidden_layers}_T{TEMPERATURE:g}.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
