"""Training Medusa heads: `TrainConfig`, the `Trainer` (one step, evaluation, loop, checkpoints) and `train()`.

Seams for multi-GPU runs live in `backend.py` (`SingleProcess`); `distributed.py` provides the FSDP2 backend.
"""

from fastmedusa.train.backend import SingleProcess
from fastmedusa.train.config import TrainConfig
from fastmedusa.train.run import build_data, build_model, export_heads, train
from fastmedusa.train.schedules import head_weights, heads_ramp, lr_factor
from fastmedusa.train.trainer import NonFiniteLossError, Trainer, build_optimizer, random_batch, summary_lines

__all__ = [
    "NonFiniteLossError",
    "SingleProcess",
    "TrainConfig",
    "Trainer",
    "build_data",
    "build_model",
    "build_optimizer",
    "export_heads",
    "head_weights",
    "heads_ramp",
    "lr_factor",
    "random_batch",
    "summary_lines",
    "train",
]
