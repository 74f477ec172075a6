"""Medusa heads: K small residual towers on the last hidden state, each with a vocabulary projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.model.config import MedusaConfig


class ResBlock(nn.Module):
    """`x + SiLU(Linear(x))`, zero-initialised so a fresh head starts as the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def head_shifts(num_heads: int, with_lm_head: bool = False) -> list[int]:
    """Label shifts: the LM head scores t against t+1, Medusa head k (1-based) against t+k+1."""
    return ([1] if with_lm_head else []) + [k + 1 for k in range(1, num_heads + 1)]


class MedusaHeads(nn.Module):
    """The K Medusa heads, stored under FasterDecoding/Medusa's names (`medusa_head.{i}.{j}.linear.weight`,
    `medusa_head.{i}.{num_layers}.weight`) so heads move between the two projects.

    The base model's LM head is held as a plain reference, not a submodule: it belongs to the base
    model (its parameters are saved and sharded with it). The heads call the loss kernel with its
    weight inside their own forward, so under FSDP the weight has been gathered by then.
    """

    def __init__(self, config: MedusaConfig, lm_head: nn.Module) -> None:
        super().__init__()
        lm_weight = lm_head.weight
        if config.hidden_size is None or config.vocab_size is None:
            config.vocab_size, config.hidden_size = lm_weight.shape
        if tuple(lm_weight.shape) != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"heads config (vocab {config.vocab_size}, hidden {config.hidden_size}) does not match the base "
                f"model's lm_head {tuple(lm_weight.shape)}: these heads were trained for another base model"
            )
        self.config = config
        self.__dict__["base_lm_head"] = lm_head  # a reference, deliberately not registered
        factory = {"device": lm_weight.device, "dtype": lm_weight.dtype}
        self.medusa_head = nn.ModuleList()
        for _ in range(config.num_heads):
            layers: list[nn.Module] = [
                ResBlock(config.hidden_size).to(**factory) for _ in range(config.num_layers)
            ]
            if not config.shared_lm_head:
                proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
                with torch.no_grad():
                    proj.weight.copy_(lm_weight)
                layers.append(proj)
            self.medusa_head.append(nn.Sequential(*layers))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def head_hidden_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each head's ResBlock tower applied to `hidden` (..., H): K tensors (..., H)."""
        towers = []
        for head in self.medusa_head:
            x = hidden
            for block in head[: self.config.num_layers]:
                x = block(x)
            towers.append(x)
        return towers

    def projection_weights(self) -> list[torch.Tensor]:
        """Each head's (V, H) vocabulary projection (the base LM head's weight when shared)."""
        if self.config.shared_lm_head:
            return [self.base_lm_head.weight] * self.num_heads
        return [head[self.config.num_layers].weight for head in self.medusa_head]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every head, (K, ..., V). For decoding (few positions), never for training."""
        weights = self.projection_weights()
        return torch.stack([F.linear(h, w) for h, w in zip(self.head_hidden_states(hidden), weights)])

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        with_lm_loss: bool = False,
        impl: str = "auto",
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Mean cross-entropy of each head, without materialising tokens x vocab logits.

        hidden (B, T, H) from the backbone, labels (B, T) token-aligned (-100 = ignored).
        Returns (lm_loss or None, head_losses (K,)).
        """
        from fastmedusa.ops import medusa_cross_entropy

        hiddens = self.head_hidden_states(hidden)
        weights = self.projection_weights()
        if with_lm_loss:
            hiddens = [hidden, *hiddens]
            weights = [self.base_lm_head.weight, *weights]
        losses = medusa_cross_entropy(
            hiddens, weights, labels, shifts=head_shifts(self.num_heads, with_lm_loss), impl=impl
        )
        if with_lm_loss:  # clones: FSDP2 warns about (and cannot track) views returned by a sharded module
            return losses[0].clone(), losses[1:].clone()
        return None, losses

    @torch.no_grad()
    def topk_correct(
        self, hidden: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head top-k hits, computed chunk by chunk: (K, len(ks)) hits and (K,) scored positions."""
        from fastmedusa.ops import topk_correct

        hits, counts = [], []
        shifts = head_shifts(self.num_heads)
        for h, w, s in zip(self.head_hidden_states(hidden), self.projection_weights(), shifts):
            c, n = topk_correct(h, w, labels, shift=s, ks=tuple(ks))
            hits.append(torch.as_tensor(c, device="cpu"))
            counts.append(int(n))
        return torch.stack(hits), torch.tensor(counts)
