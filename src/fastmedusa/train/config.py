"""`TrainConfig`: every knob of a training run, one field per `fastmedusa train` flag.

The defaults are the README's main job: 3 heads, stage 1, on the embedded SmolLM2-135M-Instruct and
ShareGPT, sized to finish in a few minutes on a 2-core CPU while every head's top-1 accuracy rises.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from fastmedusa.dtypes import DTYPES, parse_device
from fastmedusa.files import check_output_directory, check_writable
from fastmedusa.ops.cross_entropy import IMPLS as LOSS_IMPLS

CUDA_ONLY_IMPLS = ("liger", "cce", "quack")  # the peers' kernels

HEADS_SCHEDULES = ("constant", "linear", "sine")
LR_SCHEDULES = ("cosine", "constant")
LOSSES = ("ce", "kl")
LM_LOSSES = ("ce", "kl")  # stage 2: cross-entropy on the labels, or KL from a frozen copy of the original


@dataclass
class TrainConfig:
    """A training run. `fastmedusa train --help` shows the same fields as flags, with these docs."""

    # -- model -------------------------------------------------------------------------
    model: str | None = None  # hub id, local dir or .gguf; None = the embedded SmolLM2-135M-Instruct
    stage: int = 1  # 1: heads only, backbone frozen; 2: heads + backbone (Medusa-2)
    num_heads: int = 3
    num_layers: int = 1  # ResBlocks per head
    shared_lm_head: bool = False  # heads reuse the base LM head (frozen in stage 1) instead of a copy each
    draft_vocab: int | None = None  # heads score the N most frequent label tokens only (None/0 = full vocab)
    init_heads: str | None = None  # start from these heads (an earlier run's), e.g. stage 2 after stage 1
    # -- data --------------------------------------------------------------------------
    data: str | None = None  # ShareGPT .json/.jsonl, a directory holding one, or a hub id; None = embedded
    max_conversations: int | None = 300  # records kept from the file (None = all)
    eval_size: int = 32  # held-out conversations (taken from the ones read)
    seq_len: int = 128  # tokens per conversation (longer ones are truncated)
    pack: bool = False  # fill rows of seq_len tokens with several conversations
    # -- optimisation ------------------------------------------------------------------
    batch_size: int = 4  # rows per micro-batch of one process (the global batch is this x processes)
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int | None = 60  # optimiser steps; None = run `epochs` over the training split
    epochs: float | None = None
    lr: float = 2e-3
    heads_lr_multiplier: float = 1.0  # stage 2: heads' lr = lr * this (the backbone gets lr)
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None = warmup_ratio of the steps
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"  # cosine (to min_lr_ratio * lr) or constant, after the warm-up
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    heads_coefficient: float = 1.0  # weight of the heads' losses against the LM loss
    heads_decay: float = 1.0  # head k's loss is weighted by heads_decay**k
    heads_schedule: str = "constant"  # ramp of heads_coefficient over training: constant, linear, sine
    loss: str = field(
        default="ce",
        metadata={
            "help": "what the heads learn: ce (the data's next tokens: head k at t the label at t+k+1) or kl "
            "(the base model's own distribution for that token, from its LM head on the same hidden states; "
            "soft targets, best with data the model wrote itself, see `fastmedusa distill`). Stage 2 keeps "
            "the LM cross-entropy either way"
        },
    )
    lm_loss: str = field(
        default="ce",
        metadata={
            "help": "stage 2's LM loss: ce (cross-entropy on the data's tokens) or kl (KL from a frozen copy of "
            "the original model to the training one at every scored position: the Medusa paper's "
            "self-distillation loss, which keeps the model's distribution where it was; costs a copy of the "
            "model's weights and one more forward per step; one process only)"
        },
    )
    tree_prompts: int = field(
        default=8,
        metadata={
            "help": "at the end, continue this many held-out first turns greedily (128 tokens) and measure how often each "
            "head's rank-r token is the model's own, alone and together with the other heads; writes HEADS/tree.json, the tree "
            "`fastmedusa generate` then uses by default and builds --tree auto:N from (0: skip)"
        },
    )
    # -- loop --------------------------------------------------------------------------
    eval_every: int = 20  # steps between evaluations (0 = only before and after training)
    eval_batch_size: int | None = None  # None = batch_size
    log_every: int = 5
    save_every: int = 20  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # older ones are deleted once a newer one is complete (2: one to fall back on)
    output_dir: str = "runs/medusa"
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # start over in an output_dir holding an earlier run (deleted once inputs load)
    allow_changed_data: bool = False  # resume although the model or data file changed, or moved to another path
    seed: int = 0
    progress: bool = True  # tqdm bars
    plot: bool = True  # write curves.png at the end
    # -- hardware / numerics -----------------------------------------------------------
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # autocast dtype: auto = bf16 on CUDA, fp32 (no autocast) on the CPU
    param_dtype: str = "fp32"  # fp32 params (+ autocast) or bf16 params (pure bf16, as the seed's benchmark)
    gradient_checkpointing: bool = False  # recompute backbone activations in backward (stage 2)
    impl: str = "auto"  # heads' loss: auto, chunked, triton, torch, compile, liger, cce, quack
    loss_chunk_rows: int = 0  # rows per logits chunk of the fused losses (0: automatic, see fused.resolve_chunk_rows)
    compile: bool = False  # torch.compile the backbone's decoder
    peak_tflops: float | None = None  # device peak for MFU; None = look it up (H100/H200 bf16: 989)
    fsdp: bool = False  # shard with FSDP2 even in one process (torchrun/accelerate turn it on by themselves)

    def __post_init__(self) -> None:
        self.validate()

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject values that cannot work, saying which flag to change."""
        _check(
            not isinstance(self.stage, bool) and self.stage in (1, 2),
            f"--stage {self.stage!r}: pass 1 (heads only) or 2 (heads + backbone)",
        )
        _check_int(self.num_heads, 1, "--num-heads", "pass 1 or more (3 to 5 is usual)")
        _check_int(self.num_layers, 0, "--num-layers", "pass 0 or more ResBlocks per head")
        if self.draft_vocab == 0:
            self.draft_vocab = None  # 0 spells "the full vocabulary" on the command line too
        if self.draft_vocab is not None:
            from fastmedusa.model.config import MIN_DRAFT_VOCAB

            _check_int(
                self.draft_vocab, MIN_DRAFT_VOCAB, "--draft-vocab",
                f"pass at least {MIN_DRAFT_VOCAB} tokens (the default tree drafts each head's top 10), "
                "or 0 for the full vocabulary",
            )  # fmt: skip
        _check_int(self.seq_len, 2, "--seq-len", "pass at least 2 (a token and the one it predicts)")
        _check_int(self.batch_size, 1, "--batch-size", "pass 1 or more rows")
        _check_int(self.grad_accum, 1, "--grad-accum", "pass 1 or more micro-batches per step")
        _check_int(self.eval_size, 0, "--eval-size", "pass 0 (no eval) or more held-out conversations")
        _check_int(self.tree_prompts, 0, "--tree-prompts", "pass 0 (no tree.json) or more held-out prompts")
        if self.max_conversations is not None:
            _check_int(
                self.max_conversations, 2, "--max-conversations", "pass 2 or more, or 'all' for every conversation"
            )
            _check(
                self.eval_size < self.max_conversations,
                f"--eval-size {self.eval_size} leaves no training conversation out of --max-conversations "
                f"{self.max_conversations}: hold out fewer or read more",
            )
        if self.eval_batch_size is not None:
            _check_int(self.eval_batch_size, 1, "--eval-batch-size", "pass 1 or more rows")
        _check(
            self.max_steps is not None or self.epochs is not None,
            "pass --max-steps or --epochs: the run needs an end",
        )
        if self.max_steps is not None:
            _check_int(self.max_steps, 1, "--max-steps", "pass 1 or more optimiser steps")
        if self.epochs is not None:
            _check(
                _finite(self.epochs) and self.epochs > 0, f"--epochs {self.epochs}: pass a positive number"
            )
        _check(_finite(self.lr) and self.lr > 0, f"--lr {self.lr}: pass a positive learning rate, e.g. 1e-3")
        for name in (
            "heads_lr_multiplier",
            "weight_decay",
            "max_grad_norm",
            "heads_coefficient",
        ):
            value = getattr(self, name)
            _check(_finite(value) and value >= 0, f"--{_flag(name)} {value}: pass a number >= 0")
        _check(
            _finite(self.heads_decay) and self.heads_decay > 0,
            f"--heads-decay {self.heads_decay}: pass a number > 0 (head k's loss is weighted by heads_decay**k, "
            "so 0 would train no head)",
        )
        _check(
            _finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            f"--warmup-ratio {self.warmup_ratio!r}: pass a fraction in [0, 1)",
        )
        _check(
            _finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            f"--min-lr-ratio {self.min_lr_ratio!r}: pass a fraction in [0, 1]",
        )
        if self.warmup_steps is not None:
            _check_int(self.warmup_steps, 0, "--warmup-steps", "pass 0 or more steps")
        _choice(self.heads_schedule, HEADS_SCHEDULES, "--heads-schedule")
        _choice(self.lr_schedule, LR_SCHEDULES, "--lr-schedule")
        _choice(self.loss, LOSSES, "--loss")
        _choice(self.impl, LOSS_IMPLS, "--impl")
        _check(
            self.loss == "ce" or self.impl not in ("liger", "cce", "quack", "compile"),
            f"--impl {self.impl} is a cross-entropy peer with no KL divergence: with --loss kl pass --impl "
            "auto, triton, chunked or torch",
        )
        _check_int(self.loss_chunk_rows, 0, "--loss-chunk-rows", "pass 0 (automatic) or a number of rows, e.g. 128")
        _check(
            self.loss_chunk_rows == 0 or self.impl in ("auto", "triton", "chunked"),
            f"--loss-chunk-rows sizes fastmedusa's fused losses; --impl {self.impl} chunks its own way: drop "
            "--loss-chunk-rows or pass --impl auto, triton or chunked",
        )
        _choice(self.lm_loss, LM_LOSSES, "--lm-loss")
        _check(
            self.lm_loss == "ce" or self.stage == 2,
            "--lm-loss kl is stage 2's LM loss (the backbone trains only there): drop it or pass --stage 2",
        )
        _check(
            self.lm_loss == "ce" or self.impl not in ("liger", "cce", "quack", "compile"),
            f"--impl {self.impl} is a cross-entropy peer with no KL divergence: with --lm-loss kl pass --impl "
            "auto, triton, chunked or torch",
        )
        _check(
            self.lm_loss == "ce" or not (self.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1),
            "--lm-loss kl keeps a frozen copy of the model, which is not sharded under FSDP yet: run it in one "
            "process, or use --lm-loss ce",
        )
        cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        _check(
            cuda or self.impl not in CUDA_ONLY_IMPLS,
            f"--impl {self.impl} runs on CUDA only and this run is on the CPU: pass --impl auto (or chunked)",
        )
        _choice(self.dtype, ("auto", *DTYPES), "--dtype")
        _choice(self.param_dtype, ("fp32", "bf16"), "--param-dtype")
        for name in ("eval_every", "save_every", "log_every"):
            _check_int(getattr(self, name), 0, f"--{_flag(name)}", "pass 0 or more steps")
        _check_int(self.keep_checkpoints, 1, "--keep-checkpoints", "keep at least the newest one")
        _check(
            not (self.resume and self.overwrite),
            "--resume continues the run in --output-dir, --overwrite deletes it: pass one of them",
        )
        if self.peak_tflops is not None:
            _check(
                self.peak_tflops > 0, f"--peak-tflops {self.peak_tflops}: pass the device's peak, e.g. 989"
            )

    # -- derived -----------------------------------------------------------------------
    def torch_device(self) -> torch.device:
        """`device` with "auto" resolved; a CUDA device that is absent is a clear error."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return parse_device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype, or None for none: bf16 on CUDA by default, plain fp32 on the CPU."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        dtype = DTYPES[self.dtype]
        return None if dtype == torch.float32 else dtype

    def parameter_dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}: known keys are {sorted(known)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it is writable, before minutes of loading and training."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is a file: pass a directory")
    if (out / "config.json").is_file():  # a run keeps its heads and backbone in subfolders, never at its root
        run = out.absolute().parent
        hint = f" (to continue the run whose heads these are, pass {run})" if (run / "train_config.json").is_file() else ""
        raise ValueError(
            f"--output-dir {path} holds a config.json, so it is a model's or heads' directory, not a training "
            f"run's: pass a new directory{hint}; a run writes its heads to OUTPUT_DIR/heads"
        )
    check_output_directory(out, "--output-dir")  # a file where one of its folders would go
    check_writable(out, "--output-dir")  # where it would be made, before making it
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_int(value: object, minimum: int, flag: str, fix: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _check(ok, f"{flag} {value!r}: {fix}")


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    _check(value in choices, f"{flag} {value!r}: pass one of {', '.join(choices)}")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flag(name: str) -> str:
    return name.replace("_", "-")
