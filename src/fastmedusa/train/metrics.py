"""Training metrics: FLOPs per token (for MFU), device peaks, peak memory, the JSONL log and the PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fastmedusa.files import parse_json

# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s), matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, `override` when given; None on the CPU or an unknown GPU (no MFU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def train_flops_per_token(model: nn.Module, seq_len: int, stage: int) -> float:
    """Model FLOPs per token of one training step (recomputation not counted, as MFU conventionally is).

    A matmul weight costs 2 FLOPs per token forward and 4 backward (input and weight gradients):
    6 per trained parameter, 2 per frozen one that only runs forward, 4 for a frozen projection whose
    input still needs a gradient (a shared LM head). Attention adds 2 * 2 * T * H per layer forward
    (scores and values), halved by the causal mask, times 3 when trained. Embedding lookups cost nothing.
    Stage 1 never computes the base LM head; stage 2 adds it (the LM loss).
    """
    cfg = model.base.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    decoder = model.base.get_decoder()
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    decoder_matmul = _numel(decoder.parameters()) - (_numel(embed.parameters()) if embed is not None else 0)
    attention = 2 * 2 * seq_len * hidden * cfg.num_hidden_layers / 2
    heads = model.medusa_heads
    tower = _numel(p for head in heads.medusa_head for p in head[: heads.config.num_layers].parameters())
    projections = heads.num_heads * (heads.config.head_vocab_size or vocab) * hidden  # draft rows if any
    heads_flops = 6 * tower + (4 if heads.config.shared_lm_head and stage == 1 else 6) * projections
    if stage == 1:
        return 2 * decoder_matmul + attention + heads_flops
    return 6 * decoder_matmul + 3 * attention + 6 * vocab * hidden + heads_flops


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated memory on CUDA since the last reset; None on the CPU (no allocator statistics)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings measure work, not launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class JsonlLog:
    """Append-only JSON lines (one record per log/eval step); appending keeps a resumed run's history."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> int:
        """On resume drop records past the checkpoint's step: that part of training runs again.

        A line that is not a whole JSON record (the last one, torn by a kill mid-write) is dropped too;
        returns how many such lines were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                record = parse_json(line)
                record_step = record["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if record_step <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        return torn


def read_jsonl(path: Path) -> list[dict]:
    return [parse_json(line) for line in Path(path).read_text().split("\n") if line.strip()]


def plot_curves(records: list[dict], path: Path, num_heads: int) -> Path:
    """Three panels: training loss per head, training top-1 per head, held-out top-1/top-5 per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k in range(num_heads):
        color = f"C{k}"
        label = f"head {k + 1} (t+{k + 2})"
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["head_loss"][k] for r in train], color=color, label=label)
        axes[1].plot(steps, [r["top1"][k] for r in train], color=color, label=label)
        eval_steps = [r["step"] for r in evals]
        axes[2].plot(eval_steps, [r["top1"][k] for r in evals], "o-", color=color, label=f"{label} top-1")
        axes[2].plot(eval_steps, [r["top5"][k] for r in evals], "s--", color=color, alpha=0.5, label="top-5")
    titles = ("training loss per head", "training top-1 per head (current batch)", "held-out top-1 / top-5")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("head loss (CE, or KL with --loss kl)")
    axes[1].set_ylabel("accuracy")
    axes[2].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt_pct(values: list[float]) -> str:
    return " ".join("nan" if math.isnan(v) else f"{100 * v:.1f}" for v in values)
