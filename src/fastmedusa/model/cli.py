"""`fastmedusa export`: heads rewritten in the layout a serving engine loads, with a model card."""

from __future__ import annotations

import argparse

from fastmedusa.model.export import LAYOUTS


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "heads_dir",
        metavar="HEADS_DIR",
        help="heads directory in any layout fastmedusa reads, or a `fastmedusa train --output-dir` holding heads/",
    )
    parser.add_argument(
        "--format",
        choices=LAYOUTS,
        default="medusa",
        help="medusa: FasterDecoding/Medusa's medusa_lm_head.safetensors (TGI, TensorRT-LLM, vLLM read it); "
        "vllm: vLLM's own names (blocks.*, lm_heads.*, token_map) in model.safetensors (default: %(default)s)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="directory to write (config.json, weights, README.md)"
    )
    parser.add_argument(
        "--legacy-pt",
        action="store_true",
        help="also write medusa_lm_head.pt (torch.save of the same tensors), the only file FasterDecoding/Medusa's "
        "MedusaModel.from_pretrained reads (--format medusa; heads of at most 1 ResBlock, no draft vocabulary)",
    )


def run_export(args: argparse.Namespace) -> int:
    from fastmedusa.files import check_output_directory, check_writable
    from fastmedusa.model.config import MedusaConfig
    from fastmedusa.model.export import export_heads, portability_notes, read_heads

    check_output_directory(args.output)
    check_writable(args.output, "--output")
    out = export_heads(args.heads_dir, args.output, args.format, legacy_pt=args.legacy_pt)
    cfg = MedusaConfig.from_pretrained(out)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"{cfg.num_heads} heads x {cfg.num_layers} layers in the {args.format} layout: {out} ({files})")
    for note in portability_notes(read_heads(out), args.format, args.legacy_pt):
        print(f"note: {note}")
    return 0
