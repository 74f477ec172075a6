"""`fastmedusa train` flags: one per `TrainConfig` field, with the same name (dashes for underscores)."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields

from fastmedusa.dtypes import dtype_arg, dtype_or_auto_arg
from fastmedusa.errors import CommandParser
from fastmedusa.train.config import DTYPES, HEADS_SCHEDULES, LM_LOSSES, LOSSES, LR_SCHEDULES, TrainConfig

HELP = {
    "model": "base model: a hub id, a local directory saved by save_pretrained, or a .gguf file "
    "(default: the embedded SmolLM2-135M-Instruct)",
    "stage": "1: train the heads on a frozen backbone; 2: train heads and backbone together (Medusa-2, adds the LM "
    "loss; the trained backbone is saved to OUTPUT_DIR/model, and loading the heads loads it)",
    "num_heads": "number of Medusa heads; head k predicts the token k+1 positions after the next one",
    "num_layers": "ResBlocks per head",
    "shared_lm_head": "heads reuse the base model's LM head instead of each training a copy (frozen in stage 1)",
    "draft_vocab": "heads score only the N most frequent label tokens of the training data (counted before "
    "training; saved as token_map with the heads; labels outside are not scored). Smaller heads, faster "
    "training; decoding stays lossless (0 or none: the full vocabulary)",
    "init_heads": "start from these heads instead of fresh ones: a heads directory (or the --output-dir) of an "
    "earlier run with the same heads settings. Medusa-2 trains stage 1 first and starts stage 2 from its heads: "
    "fresh heads' large early gradients otherwise reach the backbone and degrade the model",
    "data": "ShareGPT conversations: a .json/.jsonl file, plain or gzip (a truncated one is fine), a directory "
    "holding one, or a hub dataset id (default: the embedded ShareGPT V3)",
    "max_conversations": "read at most this many usable conversations ('all' for every one)",
    "eval_size": "conversations held out for evaluation (0: no evaluation)",
    "seq_len": "tokens per training row; longer conversations are truncated",
    "pack": "fill each row with several whole conversations up to --seq-len tokens",
    "batch_size": "rows per micro-batch of one process (under torchrun the global batch is this x processes)",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "max_steps": "optimiser steps ('none' with --epochs)",
    "epochs": "passes over the training conversations (used when --max-steps is not given)",
    "lr": "peak learning rate (AdamW)",
    "heads_lr_multiplier": "stage 2: the heads' learning rate is --lr times this",
    "weight_decay": "AdamW weight decay on weight matrices",
    "warmup_steps": "linear warm-up steps (default: --warmup-ratio of the steps)",
    "warmup_ratio": "fraction of the steps used for warm-up when --warmup-steps is not given",
    "lr_schedule": f"learning rate after warm-up: {' or '.join(LR_SCHEDULES)}",
    "min_lr_ratio": "the cosine schedule ends at --lr times this",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "heads_coefficient": "weight of the heads' losses (against the LM loss in stage 2)",
    "heads_decay": "head k's loss is weighted by heads_decay**k, to favour the nearer heads",
    "heads_schedule": f"ramp of the heads' weight over training: {', '.join(HEADS_SCHEDULES)}",
    "eval_every": "evaluate on the held-out conversations every N steps (also before and after training)",
    "eval_batch_size": "rows per evaluation batch (default: --batch-size)",
    "log_every": "log loss, per-head top-1/top-5, tokens/s and memory every N steps",
    "save_every": "write a checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep (a corrupt newest one falls back to the next)",
    "output_dir": "where checkpoints, metrics.jsonl, curves.png and the exported heads/ go",
    "resume": "continue exactly from the newest usable checkpoint in --output-dir",
    "overwrite": "start a new run in an --output-dir that holds an earlier one; its checkpoints and log are "
    "deleted once the model and data have loaded (without it such a directory is refused)",
    "allow_changed_data": "resume although the --model weights or --data file changed since the checkpoint, or a "
    "local one now lies at another path (a hub id must stay the same)",
    "seed": "seed of the data split and order",
    "progress": "show progress bars",
    "plot": "draw curves.png at the end",
    "device": "cpu, cuda or cuda:N (auto: cuda when available)",
    "dtype": f"autocast dtype: auto (bf16 on CUDA, none on the CPU), {', '.join(DTYPES)}",
    "param_dtype": "parameter dtype: fp32 (with bf16 autocast on CUDA) or bf16 (pure bf16, less memory)",
    "gradient_checkpointing": "recompute the backbone's activations in backward (stage 2: less memory)",
    "impl": "heads' loss implementation: auto (Triton on CUDA, chunked PyTorch on the CPU), chunked, triton, "
    "torch (materialised logits), compile (torch under torch.compile), liger, cce, quack (the last four: "
    "--loss ce only)",
    "loss_chunk_rows": "rows of logits per chunk in fastmedusa's fused losses, heads' and LM's (0: automatic; for "
    "cross-entropy at least 512 rows, which is faster; 128 keeps the loss's extra memory at or under "
    "Liger-Kernel's for short rows of large vocabularies, at Liger-Kernel's speed there)",
    "compile": "torch.compile the backbone's decoder",
    "peak_tflops": "device peak TFLOP/s for MFU (default: looked up, H100/H200 bf16 dense = 989)",
    "fsdp": "shard with FSDP2 even without a launcher (one process; torchrun/accelerate launch use it anyway)",
}
HELP.update({f.name: f.metadata["help"] for f in fields(TrainConfig) if "help" in f.metadata})
CHOICES = {
    "stage": (1, 2),
    "loss": LOSSES,
    "lm_loss": LM_LOSSES,
    "heads_schedule": HEADS_SCHEDULES,
    "lr_schedule": LR_SCHEDULES,
    "dtype": ("auto", *DTYPES),
    "param_dtype": ("fp32", "bf16"),
}


# one dtype vocabulary (`bf16`, `fp16`, `fp32`; `bfloat16` etc. are accepted as aliases)
DTYPE_FLAGS = {"dtype": dtype_or_auto_arg, "param_dtype": dtype_arg}


def _optional(kind: type):
    """Parse a value that may also be 'none'/'all' (-> None)."""

    def parse(text: str):
        if text.lower() in ("none", "all"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _base_type(hint) -> tuple[type, bool]:
    """(int/float/str/bool, whether None is allowed) from a field type such as `int | None`."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    return kinds[0], len(kinds) < len(args)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per `TrainConfig` field; unset flags keep the dataclass default (shown in --help)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind, nullable = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        # one default per flag: a help text that explains its default keeps it; the others show the value
        text = HELP[f.name] if "(default:" in HELP[f.name] else f"{HELP[f.name]} (default: {default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
            continue
        parser.add_argument(
            flag,
            type=DTYPE_FLAGS.get(f.name) or (_optional(kind) if nullable else kind),
            choices=CHOICES.get(f.name),
            default=argparse.SUPPRESS,
            metavar=None if f.name in CHOICES else f.name.upper(),
            help=text,
        )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A `TrainConfig` from the flags given; `--epochs` without `--max-steps` runs by epochs."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if given.get("epochs") is not None and "max_steps" not in given:
        given["max_steps"] = None
    if given.get("epochs") is not None and given.get("max_steps") is not None:  # one would silently lose
        raise ValueError(
            f"--max-steps {given['max_steps']} and --epochs {given['epochs']} both set the run's length: pass one "
            "of them (--max-steps wins in a config object, so the epochs would be ignored)"
        )
    return TrainConfig(**given)


def run_train(args: argparse.Namespace) -> int:
    """Train; bad input raises ValueError/FileNotFoundError/PermissionError for the CLI to print as one line."""
    from fastmedusa.train.run import train
    from fastmedusa.train.trainer import NonFiniteLossError

    config = config_from_args(args)
    try:
        train(config)
    except NonFiniteLossError as err:  # the settings or the data made it diverge: a user's error like any other
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fastmedusa.train.cli ...`: the same as `fastmedusa train ...`."""
    parser = add_train_arguments(CommandParser(prog="fastmedusa train", description=__doc__))
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
