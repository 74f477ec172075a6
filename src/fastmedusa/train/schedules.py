"""Pure schedules: the learning rate over steps and the weight of each Medusa head's loss.

Total loss = [stage 2] * lm_loss + heads_coefficient * ramp(step) * sum_k heads_decay**k * CE_k (k 1-based).
The ramp lets stage 2 start close to the base model's own objective and bring the heads in gradually
(Medusa-2), so the backbone is not pulled around by heads that still predict badly.
"""

from __future__ import annotations

import math


def heads_ramp(schedule: str, step: int, total_steps: int) -> float:
    """Factor in [0, 1] on the heads' losses at `step` (0-based) of `total_steps`.

    constant: 1. linear: step / total. sine: sin(pi/2 * step / total), fast at first, flat near the end.
    """
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return progress
    if schedule == "sine":
        return math.sin(0.5 * math.pi * progress)
    raise ValueError(f"heads schedule {schedule!r}: pass constant, linear or sine")


def head_weights(num_heads: int, coefficient: float, decay: float, ramp: float = 1.0) -> list[float]:
    """Weight of each head's cross-entropy: coefficient * ramp * decay**k for k = 1..num_heads."""
    return [coefficient * ramp * decay**k for k in range(1, num_heads + 1)]


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier on the base lr for optimiser step `step` (0-based).

    Linear warm-up from lr/warmup to lr over `warmup_steps` (never 0, so step 0 moves the weights),
    then cosine decay to `min_ratio * lr` at the last step, or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr schedule {schedule!r}: pass cosine or constant")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
