"""vLLM loads fastmedusa's heads as its Medusa speculator: greedy text with speculation equals vLLM's own.

Two steps, in two Python environments (vLLM pins its own torch and transformers):

  prepare (fastmedusa's environment): the base model as a Hugging Face directory (the embedded SmolLM2 GGUF
      converted with `save_pretrained`, or --model), heads (--heads, or fresh ones made from the base model
      with seeded noise on the ResBlocks so that every tensor matters), and both export layouts.
  check (vLLM's environment; imports nothing of fastmedusa): greedy generation without speculation, then with
      each heads directory as the Medusa speculator; the texts must be equal, the drafter's weights must equal
      the files' (biases included), and the acceptance counters are reported. Writes result.json.

`bench/interop_vllm.sh` runs both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Three tips for staying healthy are",
]


def prepare(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from fastmedusa.model import MedusaConfig, MedusaModel, load_base_model, load_tokenizer
    from fastmedusa.model.export import export_heads

    out = Path(args.out)
    base_dir = out / "base"
    if not (base_dir / "config.json").is_file():
        model = load_base_model(args.model, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):  # a GGUF load is marked quantized: not serialisable as is
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(base_dir)
        load_tokenizer(args.model).save_pretrained(base_dir)
    if args.heads:
        heads_dir = Path(args.heads)
    else:
        heads_dir = out / "heads"
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = MedusaConfig(num_heads=args.num_heads, num_layers=1, base_model_name_or_path=str(base_dir),
                              shared_lm_head=args.shared_lm_head, draft_vocab_size=args.draft_vocab)  # fmt: skip
        # a draft vocabulary of the N lowest ids (a byte-level BPE's earliest merges, common in any text)
        token_map = torch.arange(args.draft_vocab) if args.draft_vocab else None
        medusa = MedusaModel.from_base(base, config, token_map=token_map)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in medusa.medusa_heads.named_parameters():
                if "linear" in name:  # ResBlocks (and their biases) away from zero: a dropped bias would show
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        medusa.save_heads(heads_dir)
    for layout in ("medusa", "vllm"):
        export_heads(heads_dir, out / f"heads_{layout}", layout)
    print(json.dumps({"base": str(base_dir), "heads": str(heads_dir)}))
    return 0


def _drafter(llm):
    """The Medusa module inside an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0); None if not found."""
    try:
        worker = llm.llm_engine.model_executor.driver_worker.worker
        return worker.model_runner.drafter.model
    except AttributeError:
        return None


def _weights_match(llm, heads_dir: Path) -> dict:
    from safetensors.torch import load_file

    model = _drafter(llm)
    if model is None:
        return {"checked": False, "reason": "drafter module not reachable in this vLLM version"}
    files = [p for p in heads_dir.glob("*.safetensors")]
    saved = load_file(str(files[0]))
    params = dict(model.named_parameters())
    worst, compared = 0.0, []
    for name, param in params.items():
        source = saved.get(name)
        if source is None:  # the FasterDecoding layout: vLLM maps {i}.{j}.linear.* and {i}.{L}.weight itself
            parts = name.split(".")
            if name.startswith("blocks."):
                source = saved.get(f"{parts[1]}.{parts[3]}.linear.{parts[4]}")
            elif name.startswith("lm_heads.") or name == "lm_head.weight":  # lm_head: original_lm_head's one
                head = parts[1] if name.startswith("lm_heads.") else "0"
                source = saved.get(f"lm_heads.{head}.weight")
                if source is None:
                    layers = max(int(k.split(".")[1]) for k in saved if k.startswith(head + "."))
                    source = saved.get(f"{head}.{layers}.weight")
        if source is None:
            return {"checked": True, "equal": False, "reason": f"no tensor in {files[0].name} for {name}"}
        rows = source.shape[0]
        diff = (param.detach().float()[:rows] - source.float()).abs().max().item()
        worst = max(worst, diff)
        compared.append(name)
    return {"checked": True, "equal": worst == 0.0, "max_abs_diff": worst, "tensors": len(compared)}


def _spec_counters(llm) -> dict:
    try:
        metrics = llm.get_metrics()
    except Exception as err:  # noqa: BLE001 - older vLLM: no metrics API; the text check still stands
        return {"error": str(err)}
    counters = {}
    for m in metrics:
        if m.name.startswith("vllm:spec_decode") and hasattr(m, "value"):
            counters[m.name.removeprefix("vllm:spec_decode_")] = m.value
    return counters


def check(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the drafter in this process, to read it
    import vllm
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(model=args.base, dtype="float32", max_model_len=512, enforce_eager=True,
                  gpu_memory_utilization=args.memory_fraction, seed=0)  # fmt: skip
    result = {"vllm": vllm.__version__, "prompts": PROMPTS, "max_tokens": args.max_tokens, "runs": {}}
    llm = LLM(**common)
    reference = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    result["runs"]["no_speculation"] = {"texts": reference}
    del llm
    ok = True
    for heads in args.heads:
        heads_dir = Path(heads)
        config = json.loads((heads_dir / "config.json").read_text())
        k = config.get("num_heads") or config.get("medusa_num_heads")
        spec = {"method": "medusa", "model": str(heads_dir), "num_speculative_tokens": k}
        extra = {}
        if config.get("truncated_vocab_size", config["vocab_size"]) < config["vocab_size"]:
            # vLLM 0.32's Medusa makes token_map a parameter while loading but does not report it loaded, so
            # its strict weight tracking refuses every draft vocabulary: that check has to be off for one
            extra["model_loader_extra_config"] = {"enable_weights_track": False}
        llm = LLM(**common, **extra, speculative_config=spec, disable_log_stats=False)
        texts = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
        run = {
            "layout": config.get("fastmedusa_layout"),
            "llm_options": extra,
            "texts": texts,
            "equal_to_no_speculation": texts == reference,
            "weights": _weights_match(llm, heads_dir),
            "spec_decode": _spec_counters(llm),
        }
        ok &= run["equal_to_no_speculation"] and run["weights"].get("equal", True)
        result["runs"][heads_dir.name] = run
        del llm
    result["ok"] = bool(ok)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    for name, run in result["runs"].items():
        if name == "no_speculation":
            continue
        print(f"{name}: text equal to no speculation: {run['equal_to_no_speculation']}; weights: {run['weights']}; "
              f"spec decode counters: {run['spec_decode']}")  # fmt: skip
    print(f"interop vLLM {result['vllm']}: {'OK' if ok else 'FAILED'} (details in {args.result})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("prepare", help="base model dir + heads + both export layouts (fastmedusa's Python)")
    a.add_argument("--out", required=True, help="work directory")
    a.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2 GGUF)")
    a.add_argument("--heads", default=None, help="trained heads (default: fresh heads with seeded noise)")
    a.add_argument("--num-heads", type=int, default=3, help="heads made when --heads is not given")
    a.add_argument("--shared-lm-head", action="store_true", help="made heads share the base model's LM head")
    a.add_argument("--draft-vocab", type=int, default=None, help="made heads' draft vocabulary (the N lowest ids)")
    b = sub.add_parser("check", help="generate with and without the heads in vLLM (vLLM's Python)")
    b.add_argument("--base", required=True, help="base model as a Hugging Face directory")
    b.add_argument("--heads", nargs="+", required=True, help="exported heads directories")
    b.add_argument("--result", required=True, help="JSON file to write")
    b.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    b.add_argument(
        "--memory-fraction", type=float, default=0.3, help="vLLM's gpu_memory_utilization (CPU RAM)"
    )
    args = p.parse_args(argv)
    return prepare(args) if args.step == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
