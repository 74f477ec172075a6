"""The seams between the training loop and how many processes run it.

`Trainer` calls only these methods for anything that changes under data parallelism: wrapping the model,
reducing metrics, deciding who writes files, and turning model/optimizer state into checkpoint files and
back. `SingleProcess` is the one-device implementation; `fastmedusa.train.distributed` provides an FSDP2
one with the same methods (DCP sharded checkpoints), passed as `Trainer(..., backend=...)`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class SingleProcess:
    """One process on one device: every seam is the trivial one."""

    rank = 0
    world_size = 1
    device: torch.device | None = None  # None: the Trainer uses config.torch_device()
    shards_model = False  # True under FSDP: the heads' weights exist only inside the model's forward

    def is_main_process(self) -> bool:
        """Only the main process writes logs, plots and exported heads."""
        return True

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Where FSDP2 shards the model (after stage and checkpointing are set, before the optimizer)."""
        return model

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max, or mean) a metric tensor over processes; here the identity."""
        return tensor

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's rows of a global batch; here all of them."""
        return batch

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (inf: only measure); the norm is over every process's gradient shards."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def export_heads(self, model: nn.Module, directory: Path) -> Path | None:
        """Write the heads (`save_heads` format); returns the directory on the main process, else None."""
        return model.save_heads(directory)

    def export_backbone(
        self, model: nn.Module, directory: Path, tokenizer=None, marker: dict | None = None
    ) -> Path | None:
        """Write the trained backbone (stage 2) with `save_pretrained`; the directory on the main process."""
        from fastmedusa.model.loading import save_base_model

        return save_base_model(model.base, directory, tokenizer, marker=marker)

    def first_error(self, message: str | None) -> str | None:
        """Collective: the first process's error message, or None when no process has one."""
        return message

    def barrier(self) -> None:
        """Wait for every process (before renaming a checkpoint written by all of them)."""

    def save_checkpoint(
        self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        """Write trainable parameters, optimizer state and `extra` (JSON) into `directory`.

        The format is FSDP's (torch.distributed.checkpoint, no process group needed): a run started on one
        process resumes under torchrun at any world size, and the other way round. The caller's
        `checkpoint.write_checkpoint` adds the manifest and fsyncs."""
        from fastmedusa.train.distributed import save_sharded

        with warnings.catch_warnings():  # "no process group: assuming a single process" is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            save_sharded(directory, model, optimizer, extra)

    def load_checkpoint(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore what `save_checkpoint` (or an FSDP run) wrote, in place; returns `extra`."""
        from fastmedusa.train.distributed import load_sharded

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return load_sharded(directory, model, optimizer)
