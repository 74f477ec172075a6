"""What a decode step costs: a plain greedy step against a Medusa verify step (default 64-node tree).

A SmolLM2-135M-shaped Llama with random weights and 4 fresh heads, bf16, CUDA graphs; batch sizes from
$BATCHES (default "1"). Step time does not depend on weight values; acceptance here is meaningless, so only
step_ms and the first call's compile time are reported. Writes $OUT/step_cost.json (or ./step_cost.json).
On a machine without CUDA it runs a 2-layer fp32 model as a smoke test.

    PYTHONPATH=src BATCHES="1 16" python3 bench/step_cost.py
"""
import json, time, torch, platform, os
from transformers import LlamaConfig, LlamaForCausalLM
from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.decode import generate
torch.manual_seed(0)
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1").split()]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEV == "cpu"
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2 if SMALL else 30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
base = LlamaForCausalLM(cfg).to(torch.float32 if SMALL else torch.bfloat16)
model = MedusaModel.from_base(base, MedusaConfig(num_heads=4)).to(DEV).eval()
rows = []
for B in BATCHES:
    ids = torch.randint(1, 49152, (B, 128), device=DEV); mask = torch.ones_like(ids)
    for medusa in (False, True):
        kw = dict(attention_mask=mask, max_new_tokens=8 if SMALL else 128, medusa=medusa, max_len=1024, max_batch_size=B)
        t = time.perf_counter(); generate(model, ids, **kw); (torch.cuda.synchronize() if DEV == "cuda" else None); first = time.perf_counter() - t
        times = []
        for _ in range(3):
            out = generate(model, ids, **kw); times.append(out.seconds / out.steps)
        row = dict(batch=B, mode="medusa" if medusa else "plain", first_call_s=round(first, 1),
                   step_ms=round(1000 * sorted(times)[1], 3), steps=out.steps, tree_nodes=out.tree_nodes)
        print(row, flush=True); rows.append(row)
for B in BATCHES:
    p, m = [r["step_ms"] for r in rows if r["batch"] == B]
    print(f"batch {B}: medusa step / plain step = {m / p:.2f}x", flush=True)
json.dump(dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               rows=rows), open(os.path.join(os.environ.get("OUT", "."), "step_cost.json"), "w"), indent=1)
