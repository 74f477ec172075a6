"""Where the first batch-64 greedy call's time goes: dynamo/inductor compile times, per function.
(As run, tidied for the linter: the same calls.)

    PYTHONPATH=src python3 b64_breakdown.py
"""

import os
import tempfile
import time

# empty compile caches, as on a machine that never ran fastmedusa: set before torch is imported
_TMP = tempfile.mkdtemp()
os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{_TMP}/inductor"
os.environ["TRITON_CACHE_DIR"] = f"{_TMP}/triton"

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastmedusa.decode import generate  # noqa: E402
from fastmedusa.model import MedusaConfig, MedusaModel  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    model = (
        MedusaModel.from_base(base, MedusaConfig(num_heads=4)).to(device="cuda", dtype=torch.bfloat16).eval()
    )
    ids = torch.randint(1, 49152, (64, 100), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    for name, extra in (("greedy", dict(medusa=False)), ("medusa", dict(tree="mc_sim_7b_63"))):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, ids, attention_mask=mask, max_new_tokens=256, max_len=2048, seed=0, **extra)
        torch.cuda.synchronize()
        print(f"first {name} call at batch 64: {time.perf_counter() - start:.2f} s", flush=True)
        print(torch._dynamo.utils.compile_times(repr="str"), flush=True)


if __name__ == "__main__":
    main()
