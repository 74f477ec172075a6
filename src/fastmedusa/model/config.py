"""`MedusaConfig`: what a set of Medusa heads is, saved as JSON next to the weights."""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastmedusa.files import parse_json

CONFIG_NAME = "config.json"
# The default tree (mc_sim_7b_63) drafts each head's top 10 tokens: a smaller draft vocabulary could not fill it.
MIN_DRAFT_VOCAB = 10
# Other projects' names for our fields, read on load: FasterDecoding/Medusa (TGI, TensorRT-LLM) and vLLM.
FIELD_ALIASES = {
    "medusa_num_heads": "num_heads",
    "medusa_num_layers": "num_layers",
    "num_hidden_layers": "num_layers",
    "original_lm_head": "shared_lm_head",
}
# Aliases that our own medusa layout writes beside our name, so that a disagreement is a hand edit. (Not
# num_hidden_layers: a base model's config carries it as the transformer's depth beside medusa_num_layers.)
MIRRORED_FIELDS = ("original_lm_head",)


@dataclass
class MedusaConfig:
    """Shape of the Medusa heads that sit on a causal LM's last hidden state.

    Head k (1-based) predicts the token at t+k+1 from the hidden state at t; the base
    LM head predicts t+1. The JSON keeps FasterDecoding/Medusa's key names
    (`medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`) so heads move
    between the two projects.

    `draft_vocab_size` N (None: the full vocabulary): the heads project onto N tokens only, listed by
    the heads' `token_map` buffer (saved as `token_map` beside the weights, as vLLM's Medusa reads it).
    """

    num_heads: int = 3
    num_layers: int = 1
    shared_lm_head: bool = False
    hidden_size: int | None = None
    vocab_size: int | None = None
    base_model_name_or_path: str | None = None
    base_model_gguf_file: str | None = None
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_layers", "hidden_size", "vocab_size", "draft_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
                setattr(self, name, int(value))  # numpy and torch integers are integers
            elif isinstance(value, bool) or value is not None and not isinstance(value, int):
                raise TypeError(f"MedusaConfig {name}={value!r}: pass an integer")
        for name in ("base_model_name_or_path", "base_model_gguf_file"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"MedusaConfig {name}={value!r}: pass a model id or path as a string, or None")
        if not isinstance(self.shared_lm_head, bool):
            raise TypeError(f"MedusaConfig shared_lm_head={self.shared_lm_head!r}: pass True or False")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(
                f"num_heads (medusa_num_heads in a heads config.json, --num-heads of `fastmedusa train`) must be "
                f"an integer >= 1, got {self.num_heads!r}"
            )
        for name in ("hidden_size", "vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: pass a positive size, or None (the base model's)")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"num_layers must be an integer >= 0, got {self.num_layers!r}")
        n = self.draft_vocab_size
        if n is not None:
            if not isinstance(n, int) or isinstance(n, bool) or n < MIN_DRAFT_VOCAB:
                raise ValueError(
                    f"draft_vocab_size={n!r}: pass an integer >= {MIN_DRAFT_VOCAB} (the default tree drafts "
                    "each head's top 10 tokens), or None for the full vocabulary"
                )
            if self.vocab_size is not None and n > self.vocab_size:
                raise ValueError(
                    f"draft_vocab_size={n} is larger than the vocabulary ({self.vocab_size}): pass at most "
                    f"{self.vocab_size}, or None for the full vocabulary"
                )

    @property
    def head_vocab_size(self) -> int | None:
        """Rows of each head's projection: the draft vocabulary's size, else the full vocabulary's."""
        return self.draft_vocab_size or self.vocab_size

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields under FasterDecoding/Medusa's names (`medusa_num_heads`, `medusa_num_layers`)."""
        d = asdict(self)
        d["medusa_num_heads"] = d.pop("num_heads")
        d["medusa_num_layers"] = d.pop("num_layers")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MedusaConfig:
        """Read our names, FasterDecoding/Medusa's and vLLM's (`num_hidden_layers`, `original_lm_head`,
        `truncated_vocab_size`); unknown keys (training metadata, HF fields) are ignored."""
        d = dict(d)
        for alias, name in FIELD_ALIASES.items():
            if alias in d:
                value = d.pop(alias)
                if alias in MIRRORED_FIELDS and name in d and d[name] != value:  # both written, then one edited
                    raise ValueError(
                        f"{alias}={json.dumps(value)} and {name}={json.dumps(d[name])} name the same setting "
                        "but disagree: make them equal"
                    )
                d.setdefault(name, value)
        known = {f.name for f in fields(cls)}
        truncated = d.pop("truncated_vocab_size", None)
        if truncated is not None and truncated != d.get("vocab_size") and d.get("draft_vocab_size") is None:
            d["draft_vocab_size"] = truncated
        return cls(**{k: v for k, v in d.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json alone (the heads writer, `fastmedusa.model.export.write_heads`, adds layout fields)."""
        from fastmedusa.files import write_json_atomic

        write_json_atomic(os.path.join(directory, CONFIG_NAME), self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MedusaConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no Medusa heads config at {path}: pass the directory written by `save_heads` "
                "or `fastmedusa train --output-dir`"
            )
        return cls.read_file(path)[0]

    @classmethod
    def read_file(cls, path: str | os.PathLike) -> tuple[MedusaConfig, dict]:
        """A heads config.json: (the config, every field as written). Each flaw names the file."""
        try:
            raw = parse_json(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): pass a heads directory "
                "written by `fastmedusa train` or `fastmedusa export`"
            ) from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): re-export the heads") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds no JSON object: re-export the heads")
        try:
            return cls.from_dict(raw), raw
        except (TypeError, ValueError) as err:  # a field of the wrong type or out of range
            raise ValueError(f"{path}: {err} (a value in this file; fix it or re-export the heads)") from err
