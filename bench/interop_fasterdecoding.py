"""Real-client check: FasterDecoding/Medusa's own loader (`medusa.model.medusa_model.MedusaModel.from_pretrained`,
PyPI `medusa-llm`) reads heads that `fastmedusa export --legacy-pt` wrote, and its heads compute what ours do.

Two steps, each in its own Python (medusa-llm needs an older transformers than fastmedusa):
- `prepare` (fastmedusa's Python): export HEADS (default: vLLM check's fresh heads) with `legacy_pt=True`, and
  write probe hidden states with our heads' logits for them;
- `check` (a virtualenv with medusa-llm): load the export with FasterDecoding's `from_pretrained`, run its
  `medusa_head` modules on the probe, compare with our logits; write RESULT (JSON).

    bash bench/interop_fasterdecoding.sh   # sets both up; see its header
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

PROBE = "probe.safetensors"


def prepare(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from fastmedusa.model import MedusaModel
    from fastmedusa.model.export import export_heads, read_heads, update_heads_config

    out = Path(args.out)
    export = export_heads(args.heads, out / "heads_pt", "medusa", legacy_pt=True)
    checkpoint = read_heads(export)
    base = checkpoint.config.base_model_name_or_path
    model = MedusaModel.from_pretrained(base, heads=export, dtype=torch.float32).eval()
    # medusa-llm's transformers (4.3x) cannot name the tokenizer class that transformers 5 saves: its loader
    # gets a copy of the base model whose tokenizer_config names the fast tokenizer class (weights untouched)
    old_base = out / "base_for_medusa_llm"
    shutil.rmtree(old_base, ignore_errors=True)
    shutil.copytree(base, old_base)
    tokenizer_config = json.loads((old_base / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (old_base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    update_heads_config(export, base_model_name_or_path=str(old_base))
    hidden = torch.randn(5, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.medusa_heads.head_logits(hidden)  # (K, 5, V)
    save_file({"hidden": hidden, "logits": logits.contiguous()}, str(out / PROBE))
    print(json.dumps({"heads": str(export), "base": base, "num_heads": checkpoint.config.num_heads}))
    return 0


def check(args: argparse.Namespace) -> int:
    import medusa
    import torch
    import transformers
    from medusa.model.medusa_model import MedusaModel
    from safetensors.torch import load_file

    heads = Path(args.heads)
    model = MedusaModel.from_pretrained(str(heads), torch_dtype=torch.float32)
    probe = load_file(str(Path(args.probe)))
    state = torch.load(heads / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    missing = [n for n, _ in model.medusa_head.named_parameters() if n not in state]
    with torch.no_grad():
        theirs = torch.stack([head(probe["hidden"]) for head in model.medusa_head])
    diff = (theirs - probe["logits"]).abs().max().item() if theirs.shape == probe["logits"].shape else None
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "medusa_llm": getattr(medusa, "__version__", "0.1 (PyPI medusa-llm; no __version__)"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "heads_built": len(model.medusa_head),
        "parameters_not_in_file": missing,
        "logits_shape": list(theirs.shape),
        "max_abs_diff": diff,
        "ok": not missing and diff is not None and diff <= 1e-5,
    }
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("prepare", help="export with --legacy-pt and write the probe (fastmedusa's Python)")
    a.add_argument("--heads", required=True, help="heads to export (their base model must be a local HF dir)")
    a.add_argument("--out", required=True, help="work directory")
    b = sub.add_parser("check", help="load with FasterDecoding's MedusaModel and compare (medusa-llm's Python)")
    b.add_argument("--heads", required=True, help="the export written by prepare")
    b.add_argument("--probe", required=True, help=f"the {PROBE} written by prepare")
    b.add_argument("--result", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    return prepare(args) if args.step == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
