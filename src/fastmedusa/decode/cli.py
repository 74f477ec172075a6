"""`fastmedusa generate`: text from a prompt with Medusa tree decoding (or plain greedy), plus one stats line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastmedusa.bench.common import positive_int
from fastmedusa.dtypes import add_device_arguments, parse_device, parse_dtype


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="base model: hub id, local directory or .gguf (default: the one the heads were trained on, as their "
        "config.json records it, else the embedded SmolLM2)",
    )
    parser.add_argument(
        "--heads",
        default=None,
        help="Medusa heads: a directory in any layout fastmedusa reads (`fastmedusa train`, `fastmedusa export`, "
        "FasterDecoding/Medusa, vLLM) or a training output dir holding heads/",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="the prompt text; repeat the flag to generate for several prompts as one batch (left-padded; "
        "each answer is printed in order, separated by a blank line)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user turn in the chat template"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="most tokens to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--no-medusa", action="store_true", help="plain decoding on the same engine (no heads)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (lossless Medusa: exact in fp32, up to rounding-level argmax ties in bf16/fp16); "
        "> 0 samples, speculated tokens passing --acceptance (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None,
        help="sampling: draw only from the K most likely tokens (Hugging Face's top-k; default: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--top-p", type=float, default=None,
        help="sampling: draw only from the fewest most likely tokens whose probability reaches P (nucleus "
        "sampling; default: no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--acceptance",
        choices=("typical", "exact"),  # decode.generate.ACCEPTANCE_RULES, not imported for a fast --help
        default="typical",
        help="which speculated tokens pass when sampling (temperature > 0): typical = Medusa's typical "
        "acceptance (--typical-epsilon/--typical-delta; more tokens per step, but the text is not distributed "
        "exactly as the model's samples); exact = only the token the model itself samples there, so the text is the one "
        "--no-medusa samples with the same --seed (lossless) (default: %(default)s)",
    )
    parser.add_argument(
        "--tree",
        default=None,
        help="Medusa tree. Default: the tree measured for the heads (HEADS/tree.json, written at the end of "
        "`fastmedusa train` or by `fastmedusa bench heads --write-tree`), else mc_sim_7b_63 pruned to the "
        "number of heads; for B prompts at once, its best subtree of at most 2^k - 1 nodes, the largest with "
        "B x 2^k <= 256 (a verify pass of at most 256 tokens; plain decoding past 128 prompts). auto:N builds an N-node tree from the heads' measured accuracies (per rank, and how the heads were right "
        "together); auto "
        "picks N for this device and batch size by timing verify steps of trees of 3-127 nodes (a verify pass is N + 1 "
        "tokens with the root; N + 1 a power of two fills whole GPU tiles) and plain "
        "decoding, and keeping the one with the most expected tokens/s (expected tokens per step / step time; "
        "costs a compile per size with --compile on, a CUDA-graph capture per size otherwise); where plain decoding wins (large batches), it decodes without the heads. "
        "Also: "
        "a preset (mc_sim_7b_63, mc_sim_7b_31, mc_sim_7b_15, mc_sim_7b_7, chain_<depth>) or a JSON file",
    )
    parser.add_argument(
        "--typical-epsilon",
        type=float,
        default=0.09,
        help="typical acceptance (temperature > 0): a candidate is accepted when its probability exceeds "
        "min(epsilon, delta * exp(-entropy)); epsilon (default: %(default)s)",
    )
    parser.add_argument(
        "--typical-delta", type=float, default=0.3, help="typical acceptance: delta (default: %(default)s)"
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--max-len", type=positive_int, default=None, help="KV cache slots per row (default: what the call needs)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (temperature > 0)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="with more prompts than this, decode them through this many batch slots, each slot refilled with "
        "the next prompt as its row ends (generate_many) instead of all prompts as one batch (the default). "
        "\"auto\" trees are not taken then",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the decode steps. auto (the default) is off: this command makes one call, and on an "
        "H100 compiling added 12-33 s to first calls to save about 1.7 ms per step (SmolLM2), so it pays only in a "
        "long-running process (the Python API compiles by default on CUDA). On CUDA each step, compiled or not, "
        "is replayed from one captured CUDA graph; FASTMEDUSA_CUDA_GRAPHS=off turns graphs off",
    )


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Default to CUDA + bf16 when a GPU exists, else CPU + fp32; refuse a CUDA device that is not there."""
    dev = parse_device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, parse_dtype(dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, P); with `chat`, the prompt becomes a user turn followed by the assistant's header."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "--chat: this model's tokenizer has no chat template (a base model, not a chat one): drop --chat "
                "to continue the prompt as plain text"
            )
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (chat models often add end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def read_heads_arg(path: str):
    """(heads directory, heads) for `--heads`: a heads directory or a training output dir holding `heads/`.

    A file the user can break (a config.json that is not UTF-8 JSON, truncated or corrupt weights) is a
    ValueError naming that file, read before the base model loads."""
    import pickle

    from safetensors import SafetensorError

    from fastmedusa.model.export import WEIGHT_FILES, find_heads_dir, read_heads

    directory = find_heads_dir(path)
    try:
        return directory, read_heads(directory)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--heads {path}: {directory / 'config.json'} is not UTF-8 text ({err.reason} at byte {err.start}): "
            "pass a heads directory written by `fastmedusa train` or `fastmedusa export`"
        ) from err
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        weights = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), directory)
        raise ValueError(
            f"--heads {path}: {weights} is truncated or corrupt ({err}): export or train the heads again"
        ) from err


def recorded_base_model(heads: str) -> str | None:
    """The base model the heads' config.json names (`base_model_name_or_path`), when it is not the embedded
    default: heads trained on another model are decoded on it without --model (said on stderr)."""
    from fastmedusa.model.config import MedusaConfig
    from fastmedusa.model.export import CONFIG_NAME, find_heads_dir, recorded_base_model_name

    try:
        config, _ = MedusaConfig.read_file(find_heads_dir(heads) / CONFIG_NAME)
    except (OSError, ValueError):  # heads that cannot be read: loading them reports it with its own message
        return None
    name = recorded_base_model_name(config.base_model_name_or_path)
    if name is None:
        return None
    if Path(name).is_absolute() and not Path(name).exists():
        raise FileNotFoundError(
            f"--heads {heads} were trained on {name}, which is not there any more: pass that model with --model"
        )
    print(f"base model: {name} (recorded with these heads; --model picks another)", file=sys.stderr)
    return name


def base_model_arg(model: str | None, heads: str | None) -> str | None:
    """--model, or else the backbone that a stage-2 run saved beside --heads, or else the base model the heads
    record (said on stderr; None: the embedded SmolLM2)."""
    from fastmedusa.model.export import base_model_for_heads, trained_backbone

    resolved = base_model_for_heads(model, heads)
    if model is None and resolved is not None:
        print(f"base model: {resolved} (trained together with these heads, stage 2)", file=sys.stderr)
    elif model is None and heads is not None:
        resolved = recorded_base_model(heads)
    try:
        backbone = trained_backbone(heads) if model is not None and heads is not None else None
    except (OSError, ValueError):  # heads that cannot be read: loading them reports it with its own message
        backbone = None
    if backbone is not None and Path(model).resolve() != Path(backbone).resolve():
        print(
            f"warning: these heads were trained together with the backbone in {backbone} (stage 2), and --model "
            f"is {model}: on another backbone they accept far fewer tokens (SmolLM2 on an H100: 1.5 against 4.0 "
            "tokens/step); leave out --model to decode on their own backbone",
            file=sys.stderr,
        )
    return resolved


def load_for_generation(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(model for `generate`, base HF model): a MedusaModel with --heads, else the bare base model."""
    from fastmedusa.model import MedusaModel, load_base_model

    if args.heads is not None:
        directory, checkpoint = read_heads_arg(args.heads)
        model = MedusaModel.from_pretrained(args.model, config=checkpoint.config, dtype=dtype, device=device)
        model.load_heads(directory, checkpoint=checkpoint)
        return model.eval(), model.base
    if not args.no_medusa:
        raise ValueError(
            "Medusa decoding needs heads: pass --heads DIR (written by `fastmedusa train`) or --no-medusa"
        )
    base = load_base_model(args.model, dtype=dtype, device=device).eval()
    return base, base


def check_prompts(prompts: list[str]) -> None:
    """Empty or non-UTF-8 prompts fail before the model loads, with one line each."""
    if any(not prompt for prompt in prompts):
        raise ValueError("--prompt is empty: give the text to continue (or to answer, with --chat)")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")  # bytes that are not UTF-8 reach argv as lone surrogates
        except UnicodeEncodeError:
            raise ValueError(
                f"--prompt {prompt[:40]!r} is not valid UTF-8 text: pass text (convert the file or shell "
                "variable to UTF-8 first)"
            ) from None


def run_generate(args: argparse.Namespace) -> int:
    from fastmedusa.decode.generate import generate
    from fastmedusa.model import load_tokenizer

    check_prompts(args.prompt)
    if args.no_medusa and args.tree is not None:  # it would be ignored without a word
        raise ValueError(f"--tree {args.tree} shapes Medusa decoding, and --no-medusa decodes plainly: drop one")
    if args.batch_size is not None and args.batch_size < len(args.prompt) and args.tree == "auto":
        raise ValueError(
            "--tree auto measures one batch size, and --batch-size below the number of prompts refills slots: "
            "pass --tree auto:N (N nodes from the heads' tree.json) or a preset, or leave out --batch-size"
        )
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.model = base_model_arg(args.model, args.heads)
    tokenizer = load_tokenizer(args.model)
    model, base = load_for_generation(args, device, dtype)
    from fastmedusa.decode.accuracy import left_pad_batch

    encoded = [encode_prompt(tokenizer, prompt, args.chat) for prompt in args.prompt]
    if args.batch_size is not None and args.batch_size < len(encoded):
        return _generate_in_slots(args, tokenizer, model, base, encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad_batch(encoded, pad_id)
    if args.tree == "auto" and not args.no_medusa:
        print(
            "--tree auto: timing plain decoding and 7 tree sizes on this device first (a compile per size with "
            "--compile on; minutes in all on a CPU, where plain decoding usually wins)",
            file=sys.stderr,
        )
    out = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=args.max_new_tokens,
        medusa=not args.no_medusa,
        temperature=args.temperature,
        tree=args.tree,
        eos_token_id=eos_token_ids(tokenizer, base),
        typical_epsilon=args.typical_epsilon,
        typical_delta=args.typical_delta,
        acceptance=args.acceptance,
        top_k=args.top_k,
        top_p=args.top_p,
        compile=args.compile == "on",  # one call per process: a compile would cost more than it saves
        max_len=args.max_len,
        seed=args.seed,
    )
    texts = [
        tokenizer.decode(out.row_new_token_ids(r).tolist(), skip_special_tokens=True)
        for r in range(len(encoded))
    ]
    print("\n\n".join(texts))
    print(out.summary(), file=sys.stderr)
    return 0


def _generate_in_slots(args, tokenizer, model, base, encoded: list[torch.Tensor]) -> int:
    """--batch-size below the number of prompts: every prompt through that many refilled slots."""
    from fastmedusa.decode.many import generate_many

    out = generate_many(
        model, [e[0] for e in encoded], args.max_new_tokens, batch_size=args.batch_size,
        medusa=not args.no_medusa, temperature=args.temperature, tree=args.tree,
        eos_token_id=eos_token_ids(tokenizer, base), typical_epsilon=args.typical_epsilon,
        typical_delta=args.typical_delta, acceptance=args.acceptance, top_k=args.top_k, top_p=args.top_p,
        compile=args.compile == "on", max_len=args.max_len, seed=args.seed,
    )  # fmt: skip
    print("\n\n".join(tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in out.new_token_ids))
    print(out.summary(), file=sys.stderr)
    return 0
