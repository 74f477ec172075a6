"""Medusa heads on disk in the layouts serving engines load: one writer per layout, one reader for all.

Layouts of a heads directory:

- ``medusa`` (the default of `save_heads` and `fastmedusa train`): FasterDecoding/Medusa's, which TGI and
  TensorRT-LLM's converter read. `medusa_lm_head.safetensors` holds `{i}.{j}.linear.weight` and
  `{i}.{j}.linear.bias` (ResBlock j of head i) and `{i}.{L}.weight` (head i's vocabulary projection,
  L = number of ResBlocks); `config.json` has `medusa_num_heads`, `medusa_num_layers`,
  `base_model_name_or_path`, and also `model_type: medusa`, `hidden_size`, `vocab_size`, `medusa_fc_bias`,
  `original_lm_head`, so that vLLM 0.32 (which maps FasterDecoding's keys itself) loads the same directory.
  No `architectures`: TGI turns Medusa off for a speculator whose config names one. FasterDecoding's own
  `MedusaModel.from_pretrained` reads `medusa_lm_head.pt` only: `legacy_pt=True` writes that file too.
- ``vllm``: vLLM's own names (vllm/model_executor/models/medusa.py): `blocks.{i}.layers.{j}.weight|bias`,
  `lm_heads.{i}.weight` and an optional `token_map` in `model.safetensors`; config `num_heads`,
  `num_hidden_layers`, `truncated_vocab_size`, `medusa_fc_bias`, `original_lm_head`.
- read only: fastmedusa's earlier files (keys prefixed `medusa_head.`); FasterDecoding's `medusa_lm_head.pt`
  (torch.save) is read too, and written beside the medusa layout's safetensors file with `legacy_pt`.

Heads that share the base model's LM head: FasterDecoding, TGI and TensorRT-LLM have no such option, so the
medusa layout stores the LM head's weight as every head's projection (K copies: it loads everywhere, at
K x vocab x hidden of disk) and `shared_lm_head: true` tells fastmedusa to use the base model's own instead
(and `original_lm_head: true` tells vLLM to read only the first copy). The vLLM layout stores one copy,
`lm_heads.0.weight`, under vLLM's `original_lm_head: true`.

A draft vocabulary (`token_map`: draft row -> token id) is written as the `token_map` tensor in both layouts,
with `truncated_vocab_size` (vLLM's name) beside the full `vocab_size`. vLLM applies a token map only to a
shared head (`original_lm_head`): per-head draft projections are refused for the vLLM layout, and in the medusa
layout only fastmedusa reads them (`portability_notes` says so). TGI, TensorRT-LLM and FasterDecoding have no
draft vocabulary at all.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastmedusa.files import (
    atomic_output,
    parse_json,
    refused_by_weights_only,
    write_json_atomic,
    write_text_atomic,
)
from fastmedusa.model.config import CONFIG_NAME, MedusaConfig

LAYOUTS = ("medusa", "vllm")
HEADS_WEIGHTS_NAME = "medusa_lm_head.safetensors"  # FasterDecoding/Medusa, TGI, TensorRT-LLM
LEGACY_WEIGHTS_NAME = "medusa_lm_head.pt"  # FasterDecoding/Medusa's torch.save format
VLLM_WEIGHTS_NAME = "model.safetensors"
TOKEN_MAP = "token_map"
MODEL_CARD_NAME = "README.md"
DERIVED_FILES = ("tree.json", "eval.json")  # measured on the heads they sit beside: never kept for other heads
WEIGHT_FILES = (HEADS_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, VLLM_WEIGHTS_NAME)
TOKENIZER_FILES = (  # what `save_pretrained` of a Hugging Face tokenizer writes, by kind of tokenizer
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
)  # fmt: skip

_BLOCK = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_PROJ = re.compile(r"(\d+)\.(\d+)\.weight")
_VLLM_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
_VLLM_PROJ = re.compile(r"lm_heads\.(\d+)\.weight")


@dataclass
class HeadsCheckpoint:
    """Heads independent of any layout: the config, the weights under FasterDecoding's unprefixed names
    (`{i}.{j}.linear.weight`, `{i}.{L}.weight`, `token_map`), and the other config.json fields (training
    metadata, tokenizer) carried from one layout to the next."""

    config: MedusaConfig
    state: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    layout: str = "medusa"

    def projection(self, head: int) -> torch.Tensor | None:
        return self.state.get(f"{head}.{self.config.num_layers}.weight")

    @property
    def token_map(self) -> torch.Tensor | None:
        return self.state.get(TOKEN_MAP)


# -- from and to a MedusaHeads module -------------------------------------------------------------------------


def checkpoint_from_module_state(
    config: MedusaConfig,
    module_state: dict[str, torch.Tensor],
    lm_head_weight: torch.Tensor | None = None,
    metadata: dict | None = None,
) -> HeadsCheckpoint:
    """A checkpoint from `MedusaHeads.state_dict()` (full tensors, any device); for heads that share the
    base LM head, `lm_head_weight` becomes every head's stored projection (see the module docstring)."""
    state = {}
    for key, value in module_state.items():
        name = key.removeprefix("medusa_head.")
        state[name] = value.detach().to("cpu").contiguous()
    if config.shared_lm_head:
        if lm_head_weight is None:
            raise ValueError(
                "heads that share the base LM head need its weight (lm_head_weight) to be written"
            )
        weight = lm_head_weight.detach().to("cpu").contiguous()
        if TOKEN_MAP in state and weight.shape[0] != state[TOKEN_MAP].numel():
            weight = weight[state[TOKEN_MAP].long()]
        for i in range(config.num_heads):
            state[f"{i}.{config.num_layers}.weight"] = weight
    return HeadsCheckpoint(config, state, dict(metadata or {}))


def module_state(checkpoint: HeadsCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint as `MedusaHeads.load_state_dict` wants it (shared heads drop their stored copies)."""
    cfg = checkpoint.config
    out = {}
    for key, value in checkpoint.state.items():
        if key == TOKEN_MAP:
            out[key] = value
        elif cfg.shared_lm_head and _PROJ.fullmatch(key) and int(key.split(".")[1]) == cfg.num_layers:
            continue
        else:
            out[f"medusa_head.{key}"] = value
    return out


# -- writers --------------------------------------------------------------------------------------------------


def write_heads(
    directory: str | os.PathLike, checkpoint: HeadsCheckpoint, layout: str = "medusa", legacy_pt: bool = False
) -> Path:
    """Write `config.json` + weights in `layout` ("medusa" or "vllm"), each file atomically, mode 0644.
    `legacy_pt`: also `medusa_lm_head.pt` (torch.save of the same tensors), the only file FasterDecoding/Medusa's
    `MedusaModel.from_pretrained` reads."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown heads layout {layout!r}: pass one of {', '.join(LAYOUTS)}")
    check_complete(checkpoint)
    if legacy_pt:
        check_fasterdecoding_loadable(checkpoint, layout)
    directory = Path(directory).expanduser()
    _check_heads_target(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "medusa":
        tensors, name = checkpoint.state, HEADS_WEIGHTS_NAME
    else:
        if checkpoint.token_map is not None and not checkpoint.config.shared_lm_head:
            # vLLM sizes per-head lm_heads by the full vocabulary and gathers token_map rows into them: the
            # shapes cannot agree, so it loads a draft vocabulary only under original_lm_head (one head)
            raise ValueError(
                "vLLM's Medusa applies a token_map only to one shared LM head (original_lm_head): these heads "
                "have their own draft-vocabulary projections; export them with --format medusa, or train "
                "with --shared-lm-head for vLLM"
            )
        if checkpoint.token_map is not None and checkpoint.token_map.numel() == checkpoint.config.vocab_size:
            # truncated_vocab_size == vocab_size reads as "no draft vocabulary" (vLLM and our loader alike)
            raise ValueError(
                f"these heads' draft vocabulary holds all {checkpoint.config.vocab_size} tokens: the vLLM layout "
                "marks a draft vocabulary only by a truncated_vocab_size below vocab_size, so its token_map "
                "would be ignored; export them with --format medusa, or train with a smaller --draft-vocab"
            )
        tensors, name = _vllm_tensors(checkpoint), VLLM_WEIGHTS_NAME
    with atomic_output(directory / name) as tmp:
        # safetensors refuses tensors that share memory: the shared-head copies are cloned on the way out
        save_file(_unshared(tensors), str(tmp), metadata={"format": "pt", "fastmedusa_layout": layout})
    written = {name}
    if legacy_pt:  # plain tensors under the same names: torch.load(weights_only=True) reads it
        with atomic_output(directory / LEGACY_WEIGHTS_NAME) as tmp:
            torch.save({k: v.contiguous().clone() for k, v in tensors.items()}, tmp)
        written.add(LEGACY_WEIGHTS_NAME)
    for other in WEIGHT_FILES:  # a directory holds one layout: a stale file of another would be read first
        if other not in written:
            (directory / other).unlink(missing_ok=True)
    for derived in DERIVED_FILES:  # measured on the heads written over: `generate` would use another's tree
        (directory / derived).unlink(missing_ok=True)
    write_json_atomic(directory / CONFIG_NAME, _config_json(checkpoint, layout))
    return directory


# FasterDecoding's from_pretrained on GitHub builds this many heads whatever config.json says (for a config
# that transformers cannot read, as ours: model_type medusa); the PyPI release medusa-llm 0.1 reads the count
FASTERDECODING_HEADS = 5


def check_fasterdecoding_loadable(checkpoint: HeadsCheckpoint, layout: str) -> None:
    """`medusa_lm_head.pt` is for FasterDecoding/Medusa's loader: refuse heads it would load wrongly."""
    cfg = checkpoint.config
    if layout != "medusa":
        raise ValueError("--legacy-pt writes FasterDecoding/Medusa's file: use it with --format medusa")
    if cfg.num_layers > 1:  # its heads are [ResBlock(h)] * L: one module L times, so the last block would win
        raise ValueError(
            f"these heads have {cfg.num_layers} ResBlocks each, but FasterDecoding/Medusa's MedusaModel repeats one "
            "ResBlock module, so it cannot hold them: leave out --legacy-pt (TGI, TensorRT-LLM and vLLM read "
            "medusa_lm_head.safetensors), or train heads with --num-layers 1"
        )
    if checkpoint.token_map is not None:
        raise ValueError(
            "these heads have a draft vocabulary, which FasterDecoding/Medusa cannot load (its projections span the "
            "whole vocabulary): leave out --legacy-pt, or train heads without --draft-vocab"
        )


def portability_notes(checkpoint: HeadsCheckpoint, layout: str, legacy_pt: bool = False) -> list[str]:
    """What the serving engines cannot do with these heads in this layout, one line each (empty when all can)."""
    cfg, notes = checkpoint.config, []
    if checkpoint.token_map is not None and layout == "medusa":
        readers = "fastmedusa and vLLM" if cfg.shared_lm_head else "only fastmedusa"
        notes.append(
            f"a draft vocabulary of {checkpoint.token_map.numel()} tokens: {readers} can use these heads; TGI, "
            "TensorRT-LLM and FasterDecoding/Medusa have no draft vocabulary (TGI would draft wrong tokens, the "
            "others refuse the projections' shape)"
        )
    if legacy_pt and cfg.num_heads != FASTERDECODING_HEADS:
        notes.append(
            f"FasterDecoding/Medusa's MedusaModel.from_pretrained on GitHub builds {FASTERDECODING_HEADS} heads "
            f"whatever config.json says (its PyPI release medusa-llm 0.1 reads the count): with these "
            f"{cfg.num_heads} "
            + ("its extra heads keep random weights (pass medusa_choices no deeper than the heads you have)"
               if cfg.num_heads < FASTERDECODING_HEADS else "it silently drops the heads past the fifth")
        )  # fmt: skip
    return notes


def check_not_dangling(directory: Path, flag: str = "") -> None:
    """A symbolic link to nothing cannot become a directory (mkdir says only "File exists"): say what it is."""
    if directory.is_symlink() and not directory.exists():
        raise FileExistsError(
            f"{flag}{directory} is a symbolic link to {os.readlink(directory)}, which does not exist: create that "
            "directory first, or pass another path"
        )


def _check_heads_target(directory: Path) -> None:
    """Heads replace a directory's config.json and delete its other weight files: a file in the way, or a
    directory holding a model (its config.json of another model_type, or weights that are not heads), is
    refused before anything is written."""
    check_not_dangling(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file: pass a directory for the heads")
    config = directory / CONFIG_NAME
    if not config.is_file():
        others = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in WEIGHT_FILES)
        if others:
            raise ValueError(
                f"{directory} holds weights that are not heads ({others[0]}): pass a new or empty directory"
            )
        return
    try:
        raw = parse_json(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    model_type = raw.get("model_type")
    heads_keys = ("medusa_num_heads", "fastmedusa_layout")  # FasterDecoding's config has no model_type
    if model_type != "medusa" and not any(key in raw for key in heads_keys):
        raise ValueError(
            f"{directory} holds a model's config.json (model_type {model_type!r}): writing heads there would "
            "replace it and may delete the model's weights; pass a new or empty directory for the heads"
        )


def _config_json(checkpoint: HeadsCheckpoint, layout: str) -> dict:
    cfg = checkpoint.config
    if layout == "medusa":
        fields = cfg.to_dict()
    else:
        fields = {
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers,
            "truncated_vocab_size": cfg.vocab_size,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "base_model_gguf_file": cfg.base_model_gguf_file,
        }
    # vLLM picks its Medusa config class by model_type (which names the architecture itself), and gives
    # ResBlocks a bias only with medusa_fc_bias; under original_lm_head it reads the one shared projection.
    # TGI loads a speculator as Medusa only when its config has no `architectures`: the medusa layout has none.
    config = {
        **checkpoint.metadata,
        "model_type": "medusa",
        **({"architectures": ["MedusaModel"]} if layout == "vllm" else {}),
        **fields,
        "original_lm_head": cfg.shared_lm_head,
        "medusa_fc_bias": True,
        "fastmedusa_layout": layout,
    }
    if checkpoint.token_map is not None:
        config["truncated_vocab_size"] = int(checkpoint.token_map.numel())
    return config


def _vllm_tensors(checkpoint: HeadsCheckpoint) -> dict[str, torch.Tensor]:
    cfg = checkpoint.config
    out = {}
    for key, value in checkpoint.state.items():
        if key == TOKEN_MAP:
            out[TOKEN_MAP] = value
        elif m := _BLOCK.fullmatch(key):
            out[f"blocks.{m[1]}.layers.{m[2]}.{m[3]}"] = value
        elif (m := _PROJ.fullmatch(key)) and int(m[2]) == cfg.num_layers:
            if not cfg.shared_lm_head or m[1] == "0":  # vLLM's original_lm_head reads lm_heads.0 only
                out[f"lm_heads.{m[1]}.weight"] = value
    return out


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def check_complete(checkpoint: HeadsCheckpoint) -> None:
    """Every head has its L ResBlocks and a projection of the right shape, and nothing else is there."""
    cfg = checkpoint.config
    expected = {f"{i}.{j}.linear.{p}" for i in range(cfg.num_heads) for j in range(cfg.num_layers)
                for p in ("weight", "bias")}  # fmt: skip
    expected |= {f"{i}.{cfg.num_layers}.weight" for i in range(cfg.num_heads)}
    have = set(checkpoint.state) - {TOKEN_MAP}
    if have != expected:
        missing, extra = sorted(expected - have), sorted(have - expected)
        hint = (
            " (heads sharing the base LM head were saved without a copy of it: load them with "
            "MedusaModel.from_pretrained(base, heads=DIR) and save_heads again)"
            if cfg.shared_lm_head and missing
            else ""
        )
        raise ValueError(
            f"heads checkpoint does not match its config ({cfg.num_heads} heads x {cfg.num_layers} layers): "
            f"missing {missing[:4]}, unexpected {extra[:4]}{hint}"
        )
    rows = cfg.vocab_size if checkpoint.token_map is None else checkpoint.token_map.numel()
    for i in range(cfg.num_heads):
        shape = tuple(checkpoint.projection(i).shape)
        if cfg.hidden_size is not None and rows is not None and shape != (rows, cfg.hidden_size):
            raise ValueError(
                f"head {i}'s projection has shape {shape}, the config says ({rows}, {cfg.hidden_size})"
            )


# -- the reader -----------------------------------------------------------------------------------------------


def find_heads_dir(path: str | os.PathLike) -> Path:
    """`path` itself when it holds heads, else its `heads/` (a `fastmedusa train --output-dir`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no heads directory at {path}: pass the directory written by `fastmedusa train`"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: pass the heads directory (config.json + weights)")
    if not (path / CONFIG_NAME).is_file() and (path / "heads" / CONFIG_NAME).is_file():
        return path / "heads"
    if not (path / CONFIG_NAME).is_file() and (path / "train_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a training run that has not written its heads/ yet (it stopped before its end): finish it "
            f"with `fastmedusa train --resume --output-dir {path}`, or pass another heads directory"
        )
    return path


def has_export_card(directory: Path) -> bool:
    """Whether `directory` holds the model card `fastmedusa export` writes (what marks an earlier export)."""
    try:
        card = (directory / MODEL_CARD_NAME).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return card.startswith("---") and "library_name: fastmedusa" in card.split("\n---", 1)[0]


def _check_output_replaceable(output: Path) -> None:
    """An export replaces config.json, README.md and every weights file of `output`: only an empty directory
    or an earlier export may be written over; not a model's directory (it would lose its weights), nor heads
    that `train` wrote (a run's only copy of its result)."""
    if not output.is_dir() or not any(output.iterdir()):
        return
    if output.name == "heads" and (output.parent / "train_config.json").exists():
        raise ValueError(
            f"--output {output} is the heads directory of the training run {output.parent}: the export would "
            "replace that run's heads; pass a new or empty directory"
        )
    try:
        read_heads(output)
    except (OSError, ValueError):
        pass
    else:
        if has_export_card(output):
            return  # an earlier export: replaced
        raise ValueError(
            f"--output {output} holds heads that `fastmedusa export` did not write (no model card): the export "
            "would replace them; pass a new or empty directory"
        )
    names = sorted(item.name for item in output.iterdir())
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ValueError(
        f"--output {output} already holds files that are not exported heads ({shown}): the export would "
        "replace its config.json and weights; pass a new or empty directory"
    )


def detect_layout(directory: str | os.PathLike) -> str:
    """Which layout a heads directory holds: "medusa", "vllm", "fastmedusa-prefixed" or "medusa-pt"."""
    return read_heads(directory).layout


BACKBONE_NAME = "model"  # OUTPUT_DIR/model: the backbone a stage-2 run trained, beside OUTPUT_DIR/heads
BACKBONE_DIR = f"../{BACKBONE_NAME}"  # the same, relative to the heads directory (config.json's pointer)


def trained_backbone(heads: str | os.PathLike) -> Path | None:
    """The backbone that a stage-2 run trained together with these heads (config.json's
    `training.backbone`, relative to the heads), or None for heads on an unchanged base model.

    Stage-2 heads read hidden states that only their own backbone produces: on the original base model they
    would propose, and be judged against, another model's tokens."""
    directory = find_heads_dir(heads)
    try:
        raw = parse_json((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # read_heads reports a missing or broken config.json with its own message
    training = raw.get("training") if isinstance(raw, dict) else None
    relative = training.get("backbone") if isinstance(training, dict) else None
    if not relative:
        return None
    path = (directory / relative).resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory}: these heads were trained together with their backbone (stage 2), which should be "
            f"at {path}: copy that directory beside the heads, or pass it with --model"
        )
    return path


EMBEDDED_NAMES = ("embedded", "default")  # what a heads config records for the SmolLM2 fastmedusa ships


def recorded_base_model_name(name: str | None) -> str | None:
    """A heads config's `base_model_name_or_path` as a model to load: None for the embedded default."""
    return None if not name or name in EMBEDDED_NAMES else name


def base_model_for_heads(model: str | os.PathLike | None, heads: str | os.PathLike | None) -> str | None:
    """The base model to load: `model` when given, else the stage-2 backbone saved with the heads, else None
    (the embedded SmolLM2)."""
    if model is not None or heads is None:
        return None if model is None else str(model)
    backbone = trained_backbone(heads)
    return None if backbone is None else str(backbone)


def read_heads(directory: str | os.PathLike) -> HeadsCheckpoint:
    """Read heads in any layout above (or a training output dir holding `heads/`)."""
    directory = find_heads_dir(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no Medusa heads config at {config_path}: pass the directory written by `save_heads`, "
            "`fastmedusa train --output-dir` or `fastmedusa export`"
        )
    config, raw_config = MedusaConfig.read_file(config_path)
    raw_state, file = _read_weights(directory)
    state, layout = canonical_state(raw_state, config, file)
    known = set(config.to_dict()) | _LAYOUT_FIELDS
    metadata = {k: v for k, v in raw_config.items() if k not in known}
    checkpoint = HeadsCheckpoint(config, state, metadata, layout)
    _check_weights_match_config(checkpoint, config_path, raw_config, file)
    if checkpoint.token_map is not None and checkpoint.token_map.numel() != config.draft_vocab_size:
        raise ValueError(
            f"heads in {directory}: token_map holds {checkpoint.token_map.numel()} ids but the config's "
            f"draft_vocab_size is {config.draft_vocab_size}: the heads directory disagrees with itself; re-export it"
        )
    _check_draft_vocabulary(checkpoint, config_path, file)
    if config.hidden_size is None and checkpoint.projection(0) is not None:
        config.vocab_size, config.hidden_size = checkpoint.projection(0).shape
    return checkpoint


def _check_draft_vocabulary(checkpoint: HeadsCheckpoint, config_path: Path, file: Path | str) -> None:
    """A draft vocabulary's config, token map and projections agree with each other, and the map is valid: a
    damaged or hand-edited directory is named here, not reported later as heads for another base model."""
    from fastmedusa.model.heads import check_token_map

    cfg, token_map = checkpoint.config, checkpoint.token_map
    if cfg.draft_vocab_size is not None and token_map is None:
        raise ValueError(
            f"{config_path} says draft_vocab_size={cfg.draft_vocab_size} but {file} holds no token_map (the ids "
            "of the draft rows): export the heads again from their training run"
        )
    if token_map is not None and cfg.vocab_size is not None:
        try:
            check_token_map(token_map, cfg.vocab_size, cfg.draft_vocab_size)
        except ValueError as err:
            raise ValueError(f"{file}: {err}; export the heads again from their training run") from None
    projection = None if cfg.shared_lm_head else checkpoint.projection(0)  # shared heads use the base's own
    rows = cfg.head_vocab_size
    if projection is not None and rows is not None and projection.dim() == 2 and projection.shape[0] != rows:
        what = f"draft_vocab_size={cfg.draft_vocab_size}" if cfg.draft_vocab_size else f"vocab_size={cfg.vocab_size}"
        raise ValueError(
            f"{config_path} says {what} but the heads' projections in {file} have {projection.shape[0]} rows: the "
            "heads directory disagrees with itself; export the heads again from their training run"
        )


def _check_weights_match_config(
    checkpoint: HeadsCheckpoint, config_path: Path, raw_config: dict, file: Path | str
) -> None:
    """The head count, layer count and hidden size that config.json states are those the weights hold: a
    hand-edited or mixed-up directory is named here, with the value to set, instead of failing later as
    missing state-dict keys or a shape error."""
    cfg = checkpoint.config
    names = [key.split(".") for key in checkpoint.state if key != TOKEN_MAP]
    heads = {int(parts[0]) for parts in names}
    layers = {int(parts[1]) for parts in names if parts[2:3] == ["linear"]}
    fix = f"set it in {config_path} to what the weights hold, or export the heads again from their training run"
    heads_key = "num_heads" if "num_heads" in raw_config else "medusa_num_heads"  # vLLM's name, or Medusa's
    layers_key = "num_hidden_layers" if "num_hidden_layers" in raw_config else "medusa_num_layers"
    if heads and len(heads) != cfg.num_heads:
        raise ValueError(
            f"{config_path} says {heads_key}={cfg.num_heads} but {file} holds {len(heads)} heads: {fix}"
        )
    if heads and len(layers) != cfg.num_layers:
        raise ValueError(
            f"{config_path} says {layers_key}={cfg.num_layers} but {file} holds {len(layers)} ResBlock "
            f"layer(s) per head: {fix}"
        )
    if cfg.shared_lm_head:  # one projection for every head: stored copies must be that one, not K of their own
        shared_key = "shared_lm_head" if "shared_lm_head" in raw_config else "original_lm_head"
        projections = [checkpoint.state.get(f"{i}.{cfg.num_layers}.weight") for i in range(cfg.num_heads)]
        stored = [p for p in projections if p is not None]
        if any(p is not stored[0] and not torch.equal(p, stored[0]) for p in stored[1:]):
            raise ValueError(
                f"{config_path} says {shared_key}=true (every head uses the base model's LM head) but {file} "
                f"holds a different vocabulary projection for each head: set {shared_key} to false, or export the "
                "heads again from their training run"
            )
    block = checkpoint.state.get("0.0.linear.weight")
    if block is not None and cfg.hidden_size is not None and block.shape[-1] != cfg.hidden_size:
        raise ValueError(
            f"{config_path} says hidden_size={cfg.hidden_size} but {file} holds heads of hidden size "
            f"{block.shape[-1]}: {fix}"
        )


_LAYOUT_FIELDS = {
    "model_type", "architectures", "medusa_fc_bias", "fastmedusa_layout", "num_heads", "num_hidden_layers",
    "truncated_vocab_size", "original_lm_head", "transformers_version", "version",
}  # fmt: skip


def _load_tensor_pickle(path: Path) -> dict[str, torch.Tensor]:
    """FasterDecoding's torch.save file, read weights-only (no code in it runs): a dict of tensors, or one
    clear error. torch's own refusal text suggests loading with weights_only=False; that advice is not passed
    on for a file of unknown origin."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not refused_by_weights_only(err):
            raise ValueError(f"{path} is truncated or corrupt: export or train the heads again") from None
        raise ValueError(
            f"{path} holds Python objects besides tensors, so it was refused unread (unpickling them could run "
            "code): save the heads as safetensors from a copy you trust (`fastmedusa export`)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a dict of tensors: it is not a Medusa heads file; "
            "export or train the heads again"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: {key!r} is a {type(value).__name__}, not a tensor: it is not a Medusa heads file; "
                "export or train the heads again"
            )
    return state


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors import SafetensorError

    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name == LEGACY_WEIGHTS_NAME:
                return _load_tensor_pickle(path), path
            return load_file(str(path)), path
        except (SafetensorError, EOFError, RuntimeError) as err:
            raise ValueError(
                f"{path} is truncated or corrupt ({err}): export or train the heads again"
            ) from err
    raise FileNotFoundError(
        f"no head weights in {directory}: expected {HEADS_WEIGHTS_NAME} (FasterDecoding/Medusa layout), "
        f"{VLLM_WEIGHTS_NAME} (vLLM layout) or {LEGACY_WEIGHTS_NAME}"
    )


def canonical_state(
    raw: dict[str, torch.Tensor], config: MedusaConfig, file: Path | str = "heads file"
) -> tuple[dict[str, torch.Tensor], str]:
    """Map any layout's keys to FasterDecoding's unprefixed names; returns (state, layout it was in)."""
    L = config.num_layers
    state: dict[str, torch.Tensor] = {}
    layouts = set()
    shared_weight = None
    for key, value in raw.items():
        name = key
        if name.startswith("medusa_head."):
            name, kind = name.removeprefix("medusa_head."), "fastmedusa-prefixed"
        else:
            name = name.removeprefix("medusa_heads.")
            kind = "medusa-pt" if str(file).endswith(".pt") else "medusa"
        if name == TOKEN_MAP:
            state[TOKEN_MAP] = value
            continue
        if m := _VLLM_BLOCK.fullmatch(name):
            name, kind = f"{m[1]}.{m[2]}.linear.{m[3]}", "vllm"
        elif m := _VLLM_PROJ.fullmatch(name):
            name, kind = f"{m[1]}.{L}.weight", "vllm"
        elif name == "lm_head.weight":
            shared_weight, kind = value, "vllm"
            layouts.add(kind)
            continue
        elif not (_BLOCK.fullmatch(name) or _PROJ.fullmatch(name)):
            raise ValueError(f"{file}: unexpected key {key!r}: not a Medusa heads file of a known layout")
        layouts.add(kind)
        state[name] = value
    if config.shared_lm_head and shared_weight is None and f"0.{L}.weight" in state:
        shared_weight = state[f"0.{L}.weight"]
    if config.shared_lm_head and shared_weight is not None:
        for i in range(config.num_heads):  # vLLM's original_lm_head stores one projection for all heads
            state.setdefault(f"{i}.{L}.weight", shared_weight)
    for i in range(config.num_heads):  # vLLM's medusa_fc_bias=false checkpoints have no biases
        for j in range(L):
            weight = state.get(f"{i}.{j}.linear.weight")
            if weight is not None and f"{i}.{j}.linear.bias" not in state:
                state[f"{i}.{j}.linear.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if len(layouts) > 1:
        raise ValueError(f"{file} mixes key layouts {sorted(layouts)}: re-export the heads")
    return state, layouts.pop() if layouts else "medusa"


def update_heads_config(directory: str | os.PathLike, **fields: object) -> None:
    """Add fields (training metadata, tokenizer) to a heads directory's config.json, atomically."""
    path = Path(directory) / CONFIG_NAME
    config = parse_json(path.read_text())
    config.update(fields)
    write_json_atomic(path, config)


# -- export ---------------------------------------------------------------------------------------------------


def check_export_output(source: Path, output: Path) -> None:
    """`output` may receive a copy of the heads of `source`: a new directory, or an earlier export's."""
    check_not_dangling(output, "--output ")
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file: pass a directory")
    if output.resolve() == source.resolve():
        raise ValueError(f"--output {output} is the heads directory itself: pass another directory")
    if source.resolve() in output.resolve().parents:  # it would travel with those heads, and go with them
        raise ValueError(f"--output {output} is inside the heads directory {source}: pass a directory outside it")
    if output.resolve() in source.resolve().parents or (output / "train_config.json").exists():
        # a run's root: the copy's config.json would make the run read as a bare heads directory
        raise ValueError(
            f"--output {output} holds the heads being exported (a training run's directory): pass a new directory"
        )
    _check_output_replaceable(output)


def export_heads(
    heads_dir: str | os.PathLike,
    output: str | os.PathLike,
    layout: str = "medusa",
    legacy_pt: bool = False,
    token_map: torch.Tensor | None = None,
) -> Path:
    """Rewrite the heads of `heads_dir` (any layout) into `output` in `layout`, with the tokenizer and
    tree files beside them and a model card (README.md), ready to push to a model hub as it is.
    `legacy_pt`: also FasterDecoding/Medusa's `medusa_lm_head.pt` (medusa layout only).
    `token_map`: keep only those vocabulary rows of full-vocabulary heads (`draft_vocab.restrict_heads`); the
    source's tree.json and eval.json, measured on all rows, are then not copied."""
    if layout not in LAYOUTS:
        raise ValueError(f"--format {layout!r}: pass one of {', '.join(LAYOUTS)}")
    source = find_heads_dir(heads_dir)
    output = Path(output).expanduser()
    check_export_output(source, output)
    checkpoint = read_heads(source)
    from fastmedusa.decode.accuracy import read_tree_json

    read_tree_json(source, checkpoint.config.num_heads)  # a tree.json that generate would refuse is not copied
    not_copied = {*WEIGHT_FILES, CONFIG_NAME, MODEL_CARD_NAME}
    if token_map is not None:
        from fastmedusa.model.draft_vocab import restrict_heads

        checkpoint = restrict_heads(checkpoint, token_map)
        not_copied.update(DERIVED_FILES)
    write_heads(output, checkpoint, layout, legacy_pt)  # drops an earlier export's tree.json and eval.json
    copied = set()
    for item in sorted(source.iterdir()):  # tokenizer, tree.json, eval.json: everything but what was rewritten
        if item.is_file() and item.name not in not_copied:
            with atomic_output(output / item.name) as tmp:
                shutil.copyfile(item, tmp)
            copied.add(item.name)
    for name in set(TOKENIZER_FILES) - copied:  # an earlier export's tokenizer, for another model perhaps
        (output / name).unlink(missing_ok=True)
    backbone = trained_backbone(source)
    if backbone is not None:  # stage-2 heads: point at their backbone from where the copy now lives
        recorded = checkpoint.metadata.get("training")
        training = dict(recorded) if isinstance(recorded, dict) else {}
        training["backbone"] = os.path.relpath(backbone, output.resolve())
        update_heads_config(output, training=training, base_model_name_or_path=str(backbone))
    write_text_atomic(output / MODEL_CARD_NAME, model_card(output, layout))
    return output


def model_card(directory: str | os.PathLike, layout: str = "medusa") -> str:
    """A model hub README for a heads directory: what the heads are, what they were trained on, how well
    they predict (held-out top-1/top-5 per head) and decode (tokens/step), and how to load them."""
    directory = Path(directory)
    checkpoint = read_heads(directory)
    cfg, meta = checkpoint.config, checkpoint.metadata
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    base = cfg.base_model_name_or_path or "unknown"
    hub_base = base if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None
    if base in EMBEDDED_NAMES:  # `fastmedusa train` without --model: the SmolLM2 GGUF it ships
        base, hub_base = EMBEDDED_BASE_TEXT, EMBEDDED_HUB_ID
    lines = ["---"]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["library_name: fastmedusa", "tags:", "- medusa", "- speculative-decoding", "---", ""]
    projection = (
        "the base model's LM head (shared)" if cfg.shared_lm_head else "its own vocabulary projection"
    )
    lines += [
        f"# Medusa heads for {base}",
        "",
        f"{cfg.num_heads} Medusa heads, each {cfg.num_layers} ResBlock(s) and {projection}, trained with "
        f"fastmedusa. Head k predicts the token k+1 positions after the next one. Layout: {_LAYOUT_TEXT[layout]}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base}{' (' + cfg.base_model_gguf_file + ')' if cfg.base_model_gguf_file else ''} |",
        f"| hidden size, vocabulary | {cfg.hidden_size}, {cfg.vocab_size} |",
    ]
    if checkpoint.token_map is not None:
        lines.append(f"| draft vocabulary | {checkpoint.token_map.numel()} tokens (`token_map`){_shrunk_from(meta)} |")
    for label, key in (("data", "data"), ("training stage", "stage"), ("steps", "steps"),
                       ("sequence length", "seq_len"), ("loss", "loss")):  # fmt: skip
        if training.get(key) is not None:
            lines.append(f"| {label} | {training[key]} |")
    measured = (_read_json(directory / "eval.json"), _read_json(directory / "tree.json"), training)
    lines += ["", "## Held-out accuracy", ""]
    lines += _card_section(_accuracy_table, *measured)
    lines += ["", "## Decoding speed", ""]
    lines += _card_section(_speed_lines, *measured)
    lines += ["", "## Use", "", *_usage(directory, cfg, base, layout, draft=checkpoint.token_map is not None)]
    notes = portability_notes(checkpoint, layout, legacy_pt=(directory / LEGACY_WEIGHTS_NAME).is_file())
    if notes:
        lines += ["", "Limits:", "", *(f"- {note}." for note in notes)]
    return "\n".join([*lines, ""])


def _shrunk_from(meta: dict) -> str:
    """How `fastmedusa shrink-vocab` made the map, when it did: the rows kept and what they cover."""
    source = meta.get("draft_vocab_source")
    if not isinstance(source, dict):
        return ""
    covered = [f"{100 * source[key]:.2f}% of the {what} labels"
               for key, what in (("train_label_coverage", "training"), ("held_out_label_coverage", "held-out"))
               if isinstance(source.get(key), (int, float))]  # fmt: skip
    return ", the most frequent rows of full-vocabulary heads (`fastmedusa shrink-vocab`)" + (
        f", covering {' and '.join(covered)}" if covered else ""
    )


EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_BASE_TEXT = f"{EMBEDDED_HUB_ID} (the Q4_1 GGUF embedded in fastmedusa)"

_LAYOUT_TEXT = {
    "medusa": "FasterDecoding/Medusa's (`medusa_lm_head.safetensors`, as its trainer writes it; read by TGI, "
    "TensorRT-LLM's converter, vLLM 0.32 and fastmedusa; FasterDecoding's own loader reads `medusa_lm_head.pt`, "
    "which `fastmedusa export --legacy-pt` adds)",
    "vllm": "vLLM (`model.safetensors` with `blocks.*`/`lm_heads.*`; read by vLLM and fastmedusa)",
}


def _card_section(section, evaluation: dict | None, tree: dict | None, training: dict) -> list[str]:
    """One section of the card from eval.json, tree.json and the training record: a file edited out of shape
    costs its section (named in the card), not the export."""
    try:
        return section(evaluation, tree, training)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        return [f"Not shown: eval.json, tree.json or config.json's `training` does not have the expected form "
                f"({type(err).__name__}: {err}); run `fastmedusa eval` on the heads, then export again."]  # fmt: skip


def _accuracy_table(evaluation: dict | None, tree: dict | None, training: dict) -> list[str]:
    rows = []
    if evaluation and evaluation.get("labels"):
        source = f"{evaluation.get('conversations', '?')} held-out conversations (`fastmedusa eval`)"
        labels, greedy = evaluation["labels"], evaluation.get("greedy") or {}
        for k, (t1, t5) in enumerate(zip(labels["top1"], labels["top5"])):
            g = (f" | {100 * greedy['top1'][k]:.1f}% | {100 * greedy['top5'][k]:.1f}%"
                 if greedy.get("top1") else " | | ")  # fmt: skip
            rows.append(f"| {k + 1} | t+{k + 2} | {100 * t1:.1f}% | {100 * t5:.1f}%{g} |")
        header = [
            f"Measured on {source}: against the data's tokens, and against the base model's own greedy tokens.",
            "",
            "| head | predicts | top-1 (data) | top-5 (data) | top-1 (greedy) | top-5 (greedy) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        return header + rows
    final = training.get("final_eval")
    if final and final.get("top1"):
        for k, (t1, t5) in enumerate(zip(final["top1"], final["top5"])):
            rows.append(f"| {k + 1} | t+{k + 2} | {100 * t1:.1f}% | {100 * t5:.1f}% |")
        return [
            "Measured at the end of training on the held-out conversations, against the data's tokens.",
            "",
            "| head | predicts | top-1 | top-5 |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    return ["Not measured: run `fastmedusa eval` on this directory, then export again."]


def _speed_lines(evaluation: dict | None, tree: dict | None, training: dict) -> list[str]:
    lines = []
    tree_eval = (evaluation or {}).get("tree")
    if tree_eval:
        lines.append(
            f"Expected tokens per decoding step with the {tree_eval.get('name', 'default')} tree "
            f"({tree_eval.get('nodes')} nodes), from the measured per-head accuracies: "
            f"{tree_eval['expected_tokens_per_step']:.2f}."
        )
    if tree:
        eal = tree.get("expected_accept_length") or tree.get("expected_tokens_per_step")
        measured = tree.get("measured_tokens_per_step") or tree.get("tokens_per_step")
        text = f"`tree.json` holds a tree of {len(tree.get('paths', []))} nodes built for these heads"
        if eal:
            text += f", expected {float(eal):.2f} tokens/step"
        if measured:
            text += f", measured {float(measured):.2f} tokens/step"
        lines.append(text + ".")
    return lines or ["Tokens per step not measured yet: `fastmedusa eval` estimates them."]


def _usage(directory: Path, cfg: MedusaConfig, base: str, layout: str, draft: bool) -> list[str]:
    name = directory.name
    embedded = base == EMBEDDED_BASE_TEXT
    model_flag = "" if embedded else f"--model {base} "
    if embedded:
        base = EMBEDDED_HUB_ID
    lines = ["fastmedusa:", "", "```bash", f"fastmedusa generate {model_flag}--heads {name} --prompt 'Hello'", "```"]
    if not draft or cfg.shared_lm_head:  # vLLM maps a token_map only onto one shared projection
        # vLLM 0.32 registers token_map while loading without reporting it loaded: its strict check refuses it
        extra = ", model_loader_extra_config={'enable_weights_track': False}" if draft else ""
        lines += ["", "vLLM 0.32 (the base model as a Hugging Face directory or hub id):", "", "```python",
                  "from vllm import LLM",
                  f"llm = LLM(model={base!r}, speculative_config={{'method': 'medusa', 'model': {name!r}, "
                  f"'num_speculative_tokens': {cfg.num_heads}}}{extra})", "```"]  # fmt: skip
        if draft:
            lines += ["", "(`enable_weights_track: False`: vLLM 0.32 makes `token_map` a parameter while loading "
                      "but does not count it as loaded, so its strict weight check refuses any draft vocabulary.)"]
    if layout == "medusa" and (directory / LEGACY_WEIGHTS_NAME).is_file():
        lines += ["", "FasterDecoding/Medusa (reads `medusa_lm_head.pt`):", "", "```python", "import torch",
                  "from medusa.model.medusa_model import MedusaModel",
                  f"model = MedusaModel.from_pretrained({name!r}, torch_dtype=torch.float16)", "```"]  # fmt: skip
    if layout == "medusa" and not draft:
        lines += ["", "TGI (reads `base_model_name_or_path` from config.json):", "", "```bash",
                  f"text-generation-launcher --model-id {name} --speculate {cfg.num_heads}", "```",
                  "", "TensorRT-LLM (its converter takes the head and layer counts from the command line):", "",
                  "```bash", f"python examples/medusa/convert_checkpoint.py --model_dir {base} "
                  f"--medusa_model_dir {name} --num_medusa_heads {cfg.num_heads} "
                  f"--num_medusa_layers {cfg.num_layers} --output_dir tllm_checkpoint --dtype float16",
                  "```"]  # fmt: skip
        if embedded:
            lines += ["", f"These heads record their base model as `{cfg.base_model_name_or_path}`, the name "
                      "fastmedusa gives the Q4_1 GGUF it ships. Before serving them with TGI, set "
                      f"`base_model_name_or_path` in config.json to `{EMBEDDED_HUB_ID}`, the model that GGUF "
                      "quantises (the heads were trained on the GGUF's dequantised weights)."]  # fmt: skip
    return lines


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = parse_json(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
