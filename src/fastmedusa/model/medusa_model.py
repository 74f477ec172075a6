"""`MedusaModel`: a Hugging Face causal LM plus Medusa heads, joined without patching HF classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmedusa.model.config import MedusaConfig
from fastmedusa.model.heads import MedusaHeads
from fastmedusa.model.loading import check_has_lm_head, load_base_model

HEADS_WEIGHTS_NAME = "medusa_lm_head.safetensors"
LEGACY_WEIGHTS_NAME = "medusa_lm_head.pt"  # FasterDecoding/Medusa's torch.save format


@dataclass
class MedusaOutput:
    """What `MedusaModel.forward` returns. Losses are None without labels."""

    loss: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None  # (K,) mean CE (or KL to the base model) per Medusa head
    lm_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, T, H) last hidden state of the backbone


class MedusaModel(nn.Module):
    """Backbone (`self.base`, any HF causal LM) + `self.medusa_heads`.

    Stage 1 (`set_stage(1)`) freezes the backbone and runs it under no_grad: only heads train.
    Stage 2 trains everything and adds the LM loss (the Medusa-2 recipe).
    """

    def __init__(self, base: nn.Module, config: MedusaConfig, token_map: torch.Tensor | None = None) -> None:
        super().__init__()
        check_has_lm_head(base)
        self.base = base
        self.config = base.config  # HF convention: model.config is the base model's config
        self.medusa_config = config
        self.medusa_heads = MedusaHeads(config, base.get_output_embeddings(), token_map)
        self.backbone_frozen = False

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_base(
        cls, hf_model: nn.Module, config: MedusaConfig | None = None, token_map: torch.Tensor | None = None
    ) -> MedusaModel:
        """Attach fresh heads (ResBlocks zero, projections copied from the LM head) to a loaded HF model.

        With `config.draft_vocab_size`, `token_map` lists the draft vocabulary's token ids
        (`fastmedusa.data.vocab.label_token_map` counts them); the projections copy those LM head rows."""
        config = config or MedusaConfig()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(hf_model.config, "_name_or_path", None) or None
        return cls(hf_model, config, token_map)

    @classmethod
    def from_pretrained(
        cls,
        base_name_or_path: str | os.PathLike | None = None,
        heads: str | os.PathLike | None = None,
        config: MedusaConfig | None = None,
        **hf_kwargs,
    ) -> MedusaModel:
        """Load a base model (hub id, local dir, .gguf, or None for the embedded SmolLM2) and heads.

        `heads` is a directory written by `save_heads` (or FasterDecoding/Medusa's format); without it
        fresh heads are made from `config` (default `MedusaConfig()`).
        """
        if heads is not None:
            config = MedusaConfig.from_pretrained(heads)
        base = load_base_model(base_name_or_path, **hf_kwargs)
        config = config or MedusaConfig()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = None if base_name_or_path is None else str(base_name_or_path)
        model = cls(base, config)
        if heads is not None:
            model.load_heads(heads)
        return model

    # -- save / load -------------------------------------------------------------------
    def save_heads(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` + `medusa_lm_head.safetensors` (FasterDecoding/Medusa key names), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.medusa_config.save_pretrained(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.medusa_heads.state_dict().items()}
        tmp = directory / (HEADS_WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "num_heads": str(self.medusa_config.num_heads)})
        os.replace(tmp, directory / HEADS_WEIGHTS_NAME)
        return directory

    def load_heads(self, directory: str | os.PathLike) -> None:
        """Load heads saved by `save_heads` or by FasterDecoding/Medusa (`medusa_lm_head.pt`)."""
        directory = Path(directory)
        saved = MedusaConfig.from_pretrained(directory)
        mine = self.medusa_config
        for field in ("num_heads", "num_layers", "shared_lm_head", "draft_vocab_size"):
            if getattr(saved, field) != getattr(mine, field):
                raise ValueError(
                    f"heads in {directory} have {field}={getattr(saved, field)}, model has {getattr(mine, field)}"
                )
        state = read_heads_state(directory)
        head = self.medusa_heads.state_dict()
        for key, value in state.items():
            if key in head and head[key].shape != value.shape:
                raise ValueError(
                    f"heads in {directory}: {key} has shape {tuple(value.shape)}, the base model needs "
                    f"{tuple(head[key].shape)}: these heads were trained for another base model"
                )
        missing, unexpected = self.medusa_heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"heads in {directory} do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )

    # -- stages ------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        """Stage 1: backbone frozen (no grads, run under no_grad). Stage 2: everything trains."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (heads only) or 2 (joint, Medusa-2), got {stage!r}")
        self.backbone_frozen = stage == 1
        self.base.requires_grad_(stage == 2)  # a shared projection is the base LM head: frozen in stage 1
        self.medusa_heads.requires_grad_(True)

    # -- forward -----------------------------------------------------------------------
    def backbone_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last hidden state (B, T, H) of the base model's decoder; never computes the LM logits."""
        decoder = self.base.get_decoder()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        head_weights: Sequence[float] | torch.Tensor | None = None,
        lm_loss_weight: float | None = None,
        impl: str = "auto",
        loss: str = "ce",
    ) -> MedusaOutput:
        """`loss = lm_loss_weight * lm_loss + sum_k head_weights[k] * L_k`, L_k the head's CE (loss="ce")
        or its KL to the base model's distribution (loss="kl", see `MedusaHeads.kl_divergence`).

        labels (B, T) are token-aligned like input_ids (-100 = not trained on); each head shifts them
        itself. Defaults: every head weight 1; the LM loss counts only when the backbone trains (stage 2).
        """
        hidden = self.backbone_hidden_states(input_ids, attention_mask)
        if labels is None:
            return MedusaOutput(hidden_states=hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if lm_loss_weight is None:
            lm_loss_weight = 0.0 if self.backbone_frozen else 1.0
        lm_loss, head_losses = self.medusa_heads(
            hidden, labels, with_lm_loss=lm_loss_weight != 0.0, impl=impl, loss=loss
        )
        weights = (
            torch.ones_like(head_losses)
            if head_weights is None
            else torch.as_tensor(head_weights, dtype=head_losses.dtype, device=head_losses.device)
        )
        if weights.shape != head_losses.shape:
            raise ValueError(
                f"head_weights has {weights.numel()} entries, the model has {head_losses.numel()} heads"
            )
        total = (weights * head_losses).sum()
        if lm_loss is not None:
            total = total + lm_loss_weight * lm_loss
        return MedusaOutput(loss=total, head_losses=head_losses, lm_loss=lm_loss, hidden_states=hidden)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128, **kwargs):
        """Medusa tree decoding (`medusa=True`, default) or plain greedy on the same engine."""
        from fastmedusa.decode import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def read_heads_state(directory: Path) -> dict[str, torch.Tensor]:
    """Head weights keyed `medusa_head.{i}...` from either project's file format."""
    path = directory / HEADS_WEIGHTS_NAME
    if path.is_file():
        state = load_file(str(path))
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        state = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"no head weights in {directory}: expected {HEADS_WEIGHTS_NAME} (fastmedusa) or {LEGACY_WEIGHTS_NAME}"
        )
    # `token_map` (a draft vocabulary's ids) sits at the top level, where vLLM's Medusa loader reads it
    return {
        k if k.startswith("medusa_head.") or k == "token_map" else f"medusa_head.{k}": v
        for k, v in state.items()
    }
