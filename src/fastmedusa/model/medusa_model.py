"""`MedusaModel`: a Hugging Face causal LM plus Medusa heads, joined without patching HF classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fastmedusa.files import input_path
from fastmedusa.model.config import MedusaConfig
from fastmedusa.model.export import (
    HEADS_WEIGHTS_NAME,
    LEGACY_WEIGHTS_NAME,
    base_model_for_heads,
    checkpoint_from_module_state,
    find_heads_dir,
    module_state,
    read_heads,
    write_heads,
)
from fastmedusa.model.heads import MedusaHeads, check_heads_fit_lm_head
from fastmedusa.model.loading import DEFAULT_ALIASES, check_has_lm_head, load_base_model

__all__ = ["HEADS_WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "MedusaModel", "MedusaOutput", "decoder_hidden_states"]


def decoder_hidden_states(
    hf_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden state (B, T, H) of an HF causal LM's decoder; never computes the LM logits."""
    out = hf_model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class MedusaOutput:
    """What `MedusaModel.forward` returns. Losses are None without labels."""

    loss: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None  # (K,) mean CE (or KL to the base model) per Medusa head
    lm_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, T, H) last hidden state of the backbone


def check_forward_inputs(
    input_ids: object, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
) -> None:
    """Shapes and dtypes of a training batch (no values read: that would sync the GPU every step)."""
    integer = (torch.int64, torch.int32)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in integer:
        got = (
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"input_ids must be (batch, seq_len) integer token ids, got {got}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.shape != input_ids.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} shape {shape} must equal input_ids shape {tuple(input_ids.shape)}")
    if labels is not None and labels.dtype not in integer:
        raise ValueError(f"labels must be integer token ids (-100 where not trained on), got {labels.dtype}")


def _medusa_config(config: object) -> MedusaConfig | None:
    if config is None or isinstance(config, MedusaConfig):
        return config
    raise TypeError(
        f"config must be a MedusaConfig, got {type(config).__name__}: build one with MedusaConfig(num_heads=...) "
        "(MedusaConfig.from_dict(d) for a dict)"
    )


def recorded_base_name(base_name_or_path: str | os.PathLike | None) -> str:
    """What saved heads record as their base model: "embedded" for the SmolLM2 fastmedusa ships (None or any of
    its names, as `train` records it), a local path made absolute (so the heads find it from any directory), a
    hub id as it is."""
    name = input_path("model", base_name_or_path)
    return "embedded" if name is None or str(name).lower() in DEFAULT_ALIASES else name


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
        if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(
                f"from_base takes a loaded Hugging Face causal LM, got {type(hf_model).__name__}: for a hub id or a "
                "path use MedusaModel.from_pretrained(name, heads=...)"
            )
        # a copy: the heads fill in the base model's sizes, and the caller's config may serve another model
        config = replace(_medusa_config(config) or MedusaConfig())
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

        `heads` is a heads directory in any layout `fastmedusa.model.export` reads (FasterDecoding/Medusa's,
        vLLM's, fastmedusa's earlier prefixed one, `medusa_lm_head.pt`) or a training output dir holding
        `heads/`; without it fresh heads are made from `config` (default `MedusaConfig()`). Heads of a
        stage-2 run load on the backbone trained with them when `base_name_or_path` is None.
        """
        config = _medusa_config(config)
        checkpoint = read_heads(heads) if heads is not None else None
        if checkpoint is not None and config is not None:
            for field in ("num_heads", "num_layers", "shared_lm_head", "draft_vocab_size"):
                if getattr(config, field) != getattr(checkpoint.config, field):
                    raise ValueError(
                        f"config={field}={getattr(config, field)!r} but the heads in {heads} have "
                        f"{getattr(checkpoint.config, field)!r}: heads bring their own config (config.json); pass "
                        "config= only for fresh heads"
                    )
        base_name_or_path = base_model_for_heads(base_name_or_path, heads)  # a stage-2 run's own backbone
        if checkpoint is not None:
            config = checkpoint.config
        base = load_base_model(base_name_or_path, **hf_kwargs)
        config = config or MedusaConfig()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = recorded_base_name(base_name_or_path)
        model = cls(base, config)
        if checkpoint is not None:
            model.load_heads(heads, checkpoint=checkpoint)
        return model

    # -- save / load ------------------------------------------------------------------
    def save_heads(self, directory: str | os.PathLike, layout: str = "medusa") -> Path:
        """Write the heads in FasterDecoding/Medusa's layout (default) or vLLM's; see `fastmedusa.model.export`."""
        shared = self.medusa_heads.base_lm_head.weight if self.medusa_config.shared_lm_head else None
        checkpoint = checkpoint_from_module_state(self.medusa_config, self.medusa_heads.state_dict(), shared)
        return write_heads(directory, checkpoint, layout)

    def load_heads(self, directory: str | os.PathLike, *, checkpoint=None) -> None:
        """Load heads of any layout `read_heads` knows into this model (shapes and head counts must match)."""
        checkpoint = checkpoint or read_heads(directory)
        saved, mine = checkpoint.config, self.medusa_config
        for field in ("num_heads", "num_layers", "shared_lm_head", "draft_vocab_size"):
            if getattr(saved, field) != getattr(mine, field):
                raise ValueError(
                    f"heads in {directory} have {field}={getattr(saved, field)}, model has {getattr(mine, field)}"
                )
        try:
            check_heads_fit_lm_head(saved, self.base.get_output_embeddings().weight)
        except ValueError as err:
            raise ValueError(f"heads in {directory}: {err}") from None
        state = module_state(checkpoint)
        head = self.medusa_heads.state_dict()
        for key, value in state.items():
            if key not in head or head[key].shape == value.shape:
                continue
            if head[key].dim() != value.dim():  # not another model's size: not a heads tensor at all
                raise ValueError(
                    f"heads in {directory}: {key} has shape {tuple(value.shape)} where heads hold a "
                    f"{head[key].dim()}-D tensor: the weights file is damaged or was not written for Medusa "
                    "heads; save or export the heads again"
                )
            raise ValueError(
                f"heads in {directory}: {key} has shape {tuple(value.shape)}, the base model needs "
                f"{tuple(head[key].shape)}: these heads were trained for another base model"
            )
        # checked before anything is copied: a failed load leaves the model's heads as they were
        missing, unexpected = sorted(set(head) - set(state)), sorted(set(state) - set(head))
        if missing or unexpected:
            raise ValueError(
                f"heads in {directory} do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}; the "
                "weights file is incomplete or from another layout: save or export the heads again"
            )
        try:
            self.medusa_heads.load_state_dict(state, strict=True)  # checks the token map before copying
        except ValueError as err:
            raise ValueError(f"heads in {directory}: {err}") from None
        # decoding reads its tree.json (measured tree) from here: a run's directory means its heads/
        self.heads_dir = find_heads_dir(directory) if Path(directory).expanduser().is_dir() else directory

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
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return decoder_hidden_states(self.base, input_ids, attention_mask)

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
        lm_teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunk_rows: int | None = None,
    ) -> MedusaOutput:
        """`loss = lm_loss_weight * lm_loss + sum_k head_weights[k] * L_k`, L_k the head's CE (loss="ce")
        or its KL to the base model's distribution (loss="kl", see `MedusaHeads.kl_divergence`).

        labels (B, T) are token-aligned like input_ids (-100 = not trained on); each head shifts them
        itself. Defaults: every head weight 1; the LM loss counts only when the backbone trains (stage 2).
        `lm_teacher`: (hidden states, LM head weight) of a frozen reference model; the LM loss is then
        KL(reference || model) instead of cross-entropy on the labels (`MedusaHeads.lm_distillation_loss`).
        `chunk_rows`: rows of logits per chunk of the fused losses (None: automatic; fewer, less memory).
        """
        check_forward_inputs(input_ids, attention_mask, labels)
        hidden = self.backbone_hidden_states(input_ids, attention_mask)
        if labels is None:
            return MedusaOutput(hidden_states=hidden)
        if lm_loss_weight is None:
            lm_loss_weight = 0.0 if self.backbone_frozen else 1.0
        lm_loss, head_losses = self.medusa_heads(
            hidden, labels, with_lm_loss=lm_loss_weight != 0.0, impl=impl, loss=loss, lm_teacher=lm_teacher,
            chunk_rows=chunk_rows,
        )  # fmt: skip
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
