"""Medusa heads, the model that joins them to a Hugging Face causal LM, and loading helpers."""

from fastmedusa.model.config import MedusaConfig
from fastmedusa.model.heads import MedusaHeads, ResBlock, head_shifts
from fastmedusa.model.loading import default_model_path, load_base_model, load_tokenizer, resolve_model_source
from fastmedusa.model.medusa_model import MedusaModel, MedusaOutput

__all__ = [
    "MedusaConfig",
    "MedusaHeads",
    "MedusaModel",
    "MedusaOutput",
    "ResBlock",
    "default_model_path",
    "head_shifts",
    "load_base_model",
    "load_tokenizer",
    "resolve_model_source",
]
