"""`fastmedusa export`: heads rewritten in the layout a serving engine loads, with a model card; `fastmedusa
shrink-vocab`: full-vocabulary heads cut to a draft vocabulary after training."""

from __future__ import annotations

import argparse

import torch

from fastmedusa.model.export import LAYOUTS, read_heads, update_heads_config


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


def add_shrink_arguments(parser: argparse.ArgumentParser) -> None:
    from fastmedusa.dtypes import add_device_arguments
    from fastmedusa.heads_eval import add_split_arguments

    parser.add_argument(
        "heads_dir",
        metavar="HEADS_DIR",
        help="full-vocabulary heads, or a `fastmedusa train --output-dir` holding heads/",
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        required=True,
        metavar="N",
        help="keep each head's projection rows of the N most frequent label tokens of the run's training "
        "conversations (e.g. 16384: a decode step reads V/N times fewer head weights)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the shrunk heads")
    add_split_arguments(parser, "held-out conversations: not counted, and their first turns measure tree.json")
    parser.add_argument(
        "--tree-prompts",
        type=int,
        default=8,
        help="held-out first turns continued greedily to measure the new heads' tree.json, as `train` does "
        "(0: no tree.json; generate then uses the preset tree) (default: %(default)s)",
    )
    add_device_arguments(parser, "weights dtype for the tree.json measurement")


def run_shrink(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastmedusa.files import atomic_directory, check_output_directory, check_writable, write_text_atomic
    from fastmedusa.heads_eval import model_for_heads, split_settings
    from fastmedusa.model import load_tokenizer
    from fastmedusa.model.draft_vocab import check_restrictable
    from fastmedusa.model.export import (
        MODEL_CARD_NAME,
        check_export_output,
        export_heads,
        find_heads_dir,
        model_card,
    )

    if args.tree_prompts < 0:
        raise ValueError(f"--tree-prompts {args.tree_prompts}: pass 0 (no tree.json) or more")
    heads = find_heads_dir(args.heads_dir)
    output = Path(args.output).expanduser()
    check_output_directory(args.output)
    check_export_output(heads, output)
    check_shrink_output(output)
    check_writable(args.output, "--output")
    checkpoint = read_heads(heads)
    check_restrictable(checkpoint)  # before the data is read; restrict_heads checks the map itself
    check_draft_vocab_arg(args.draft_vocab, checkpoint)
    settings = split_settings(args, heads, need_held_out=False)
    if settings["run_config"] is None and args.data is None:
        raise ValueError(
            f"{heads} has no train_config.json beside it (not a training run's heads directory), so the data the "
            "heads trained on is unknown: pass --data (and --max-conversations, --eval-size, --seed, --seq-len "
            "as the run used them), or the run's directory"
        )
    model_name = model_for_heads(args.model, heads, settings, checkpoint.config)
    tokenizer = load_tokenizer(model_name)
    if args.tree_prompts and settings["eval_size"] and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tree.json is measured on chat-templated held-out first turns, but this model's tokenizer has no chat "
            "template: pass --tree-prompts 0 (generate then uses the preset tree)"
        )
    token_map, held_out, source = count_draft_vocabulary(tokenizer, settings, args.draft_vocab, checkpoint)
    source["heads"] = str(heads)
    with atomic_directory(output) as staging:  # all or nothing: a failed measurement leaves no half-written heads
        export_heads(heads, staging, token_map=token_map)
        update_heads_config(staging, draft_vocab_source=source)
        write_shrunk_tree(staging, heads, model_name, tokenizer, held_out, settings["seq_len"], args)
        write_text_atomic(staging / MODEL_CARD_NAME, model_card(staging))
    files = ", ".join(sorted(p.name for p in output.iterdir() if p.is_file()))
    print(f"{checkpoint.config.num_heads} heads with a {args.draft_vocab}-token draft vocabulary: {output} ({files})")
    return 0


def check_shrink_output(output) -> None:
    """The output directory is replaced whole (it appears only complete): refuse a link, and a directory holding
    anything an export does not write (a hub clone's .git, the user's notes), which the swap would delete."""
    from fastmedusa.model.export import DERIVED_FILES, MODEL_CARD_NAME, TOKENIZER_FILES, WEIGHT_FILES

    if output.is_symlink():
        raise ValueError(f"--output {output} is a symbolic link: pass the directory it points to")
    if not output.is_dir():
        return
    ours = {*WEIGHT_FILES, *DERIVED_FILES, *TOKENIZER_FILES, MODEL_CARD_NAME, "config.json"}
    others = sorted(item.name for item in output.iterdir() if item.name not in ours)
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise ValueError(
            f"--output {output} holds files that shrink-vocab does not write ({shown}); it replaces the directory "
            "whole, so they would be lost: pass a new directory"
        )


def check_draft_vocab_arg(size: int, checkpoint) -> None:
    """--draft-vocab: at least the tree's floor, fewer than the heads' vocabulary."""
    from fastmedusa.model.config import MIN_DRAFT_VOCAB

    vocab = checkpoint.config.vocab_size
    if size < MIN_DRAFT_VOCAB:
        raise ValueError(f"--draft-vocab {size}: pass at least {MIN_DRAFT_VOCAB} tokens (e.g. 16384)")
    if checkpoint.token_map is None and vocab and size >= vocab:
        raise ValueError(f"--draft-vocab {size}: pass fewer tokens than the heads' vocabulary of {vocab} (e.g. 16384)")


def count_draft_vocabulary(tokenizer, settings: dict, size: int, checkpoint) -> tuple[torch.Tensor, list, dict]:
    """(token map of the `size` most frequent training labels, held-out conversations, what the map covers)."""
    from fastmedusa.data import read_sharegpt, train_eval_split
    from fastmedusa.data.vocab import coverage_of_counts, draft_token_map
    from fastmedusa.model.draft_vocab import label_counts

    vocab = checkpoint.config.vocab_size
    conversations, _ = read_sharegpt(settings["data"], limit=settings["max_conversations"])
    if getattr(conversations, "stats", None) is not None:  # how many records were read, and why some were not
        print(conversations.stats.summary())
    if settings["eval_size"]:
        train, held_out = train_eval_split(conversations, settings["eval_size"], seed=settings["seed"])
    else:
        train, held_out = list(conversations), []
    counts = label_counts(tokenizer, train, settings["seq_len"], vocab, progress=True)
    if not int(counts.sum()):
        raise ValueError("no training conversation has a labelled token: check --data and --seq-len")
    token_map = draft_token_map(counts, size)
    held_counts = label_counts(tokenizer, held_out, settings["seq_len"], vocab)
    source = {
        "data": settings["data"] or "embedded",
        "train_conversations": len(train),
        "train_label_coverage": coverage_of_counts(counts, token_map),
        "held_out_label_coverage": coverage_of_counts(held_counts, token_map) if int(held_counts.sum()) else None,
    }
    line = f"the {size} most frequent of {vocab} tokens cover {100 * source['train_label_coverage']:.2f}%"
    line += f" of the training labels ({len(train)} conversations)"
    if source["held_out_label_coverage"] is not None:
        line += f", {100 * source['held_out_label_coverage']:.2f}% of the held-out ones"
    print(line)
    return token_map, held_out, source


def write_shrunk_tree(out, source, model_name, tokenizer, held_out: list, seq_len: int, args) -> None:
    """OUT/tree.json measured on the shrunk heads, as `train` measures it, next to the source's expectation."""
    from fastmedusa.decode.accuracy import first_user_prompts, measure_heads_tree, read_tree_json
    from fastmedusa.decode.cli import eos_token_ids, resolve_device_dtype
    from fastmedusa.model import MedusaModel

    if not held_out or not args.tree_prompts:
        why = "--tree-prompts 0" if held_out else "no held-out conversations"
        return print(f"no tree.json measured ({why}): generate will use the preset tree")
    prompts = first_user_prompts(tokenizer, held_out, max_prompt_tokens=seq_len)[: args.tree_prompts]
    if not prompts:
        return print(f"no held-out first turn fits {seq_len} tokens: no tree.json measured")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = MedusaModel.from_pretrained(model_name, heads=out, dtype=dtype, device=device).eval()
    eos = eos_token_ids(tokenizer, model.base)
    try:
        info = read_tree_json(measure_heads_tree(model, prompts, out, eos_token_id=eos, progress=True))
    except ValueError as err:  # nothing is written then: the output directory appears only whole
        raise ValueError(f"measuring tree.json failed: {err} (--tree-prompts 0 skips it)") from None
    line = f"tree.json: {info['tree_nodes']} nodes, expected {info['expected_tokens_per_step']:.2f} tokens/step"
    before = read_tree_json(source, model.medusa_config.num_heads)
    if before is not None and before.get("expected_tokens_per_step") is not None:
        line += f" (the full-vocabulary heads' tree.json: {before['expected_tokens_per_step']:.2f})"
    print(line)
