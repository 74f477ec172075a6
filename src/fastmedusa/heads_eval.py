"""`fastmedusa eval`: how good a set of heads is, without training.

Two held-out measures per head, on the conversations `fastmedusa train` held out (the run's own split when
HEADS_DIR is, or sits in, a training output dir; the same flags otherwise):

- against the data: top-1/top-5 of head k at t against the conversation's token at t+k+1 (assistant turns
  only), as training's evaluation reports it;
- against the model's own greedy tokens: the first user turn of each held-out conversation is continued
  greedily by the base model, and head k's top-1/top-5 is scored against that continuation. This is what
  greedy Medusa decoding accepts, so it also gives the expected tokens per decoding step of a tree.

Writes JSON (default: HEADS_DIR/eval.json, which `fastmedusa export` puts in the model card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmedusa.dtypes import add_device_arguments
from fastmedusa.files import check_writable, json_object_keys, parse_json

RUN_CONFIG = "train_config.json"
SPLIT_FIELDS = ("model", "data", "max_conversations", "eval_size", "seed", "seq_len")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "heads_dir",
        metavar="HEADS_DIR",
        help="heads directory, or a `fastmedusa train --output-dir` holding heads/",
    )
    add_split_arguments(parser, "held-out conversations, as in training")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="held-out rows per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=16,
        help="held-out prompts continued greedily for the greedy-token accuracy; 0 skips it (default: %(default)s)",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="greedy tokens per prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=384, help="skip longer prompts (default: %(default)s)"
    )
    parser.add_argument(
        "--tree",
        default=None,
        help="tree whose expected tokens/step is reported: a preset, chain_<depth>, auto:N (built from the "
        "accuracies measured here) or a JSON file (default: HEADS_DIR/tree.json if present, else mc_sim_7b_63)",
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--output", default=None, metavar="FILE", help="JSON to write (default: HEADS_DIR/eval.json)"
    )


def add_split_arguments(parser: argparse.ArgumentParser, eval_size_help: str) -> None:
    """--model and the flags that pick the run's data split; each defaults to the run's train_config.json."""
    parser.add_argument(
        "--model",
        default=None,
        help="base model (default: the run's --model, else the heads' base_model_name_or_path)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="ShareGPT file or hub id (default: the run's --data, else the embedded one)",
    )
    parser.add_argument(
        "--max-conversations",
        type=count_or_all,
        default=None,
        help="records read, as in training ('all' for every one) (default: the run's)",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help=f"{eval_size_help} (default: the run's)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="split seed, as in training (default: the run's)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per conversation, as in training (default: the run's)"
    )


def count_or_all(text: str) -> int | str:
    """argparse `type=` of --max-conversations: a count, or 'all' (every conversation, as `train` reads it)."""
    if text.lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: pass a number or 'all'") from None


def split_settings(args: argparse.Namespace, heads_dir: Path, need_held_out: bool = True) -> dict:
    """Model and held-out split: flags first, then the training run's train_config.json, then the defaults
    of `fastmedusa train` (so that the held-out conversations are the ones training never saw).
    `need_held_out=False`: a split that holds nothing out (eval_size 0) is allowed."""
    from fastmedusa.train.config import TrainConfig

    defaults = TrainConfig()
    run_file = heads_dir.parent / RUN_CONFIG
    try:
        run = parse_json(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        run = err
    if not isinstance(run, dict):
        raise ValueError(
            f"{run_file} is not the settings of a `fastmedusa train` run (not a JSON object): restore it, or "
            "delete it and pass --model, --data, --eval-size and --seed as the run used them"
        )
    try:  # the run's values, checked by the rules that `train` applied to them (a hand edit is named)
        TrainConfig(**{name: run[name] for name in SPLIT_FIELDS if name in run})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{run_file}: {err} (a value recorded there: restore it, or pass that flag)") from None
    settings = {}
    for name in SPLIT_FIELDS:
        given = getattr(args, name)
        settings[name] = given if given is not None else run.get(name, getattr(defaults, name))
    if settings["max_conversations"] == "all":
        settings["max_conversations"] = None
    if need_held_out and run.get("eval_size") == 0 and same_data(args.data, run.get("data")):  # all trained on
        raise ValueError(
            f"the run held out no conversations (eval_size 0 in {run_file}): every conversation of its data was "
            "trained on; pass --data with other conversations (and --eval-size N)"
        )
    if need_held_out and settings["eval_size"] < 1:
        raise ValueError(
            f"--eval-size {settings['eval_size']}: evaluation needs held-out conversations; pass a positive "
            "number, e.g. --eval-size 32"
        )
    if settings["eval_size"] < 0:
        raise ValueError(f"--eval-size {settings['eval_size']}: pass 0 (hold nothing out) or more")
    if settings["seq_len"] < 2:
        raise ValueError(f"--seq-len {settings['seq_len']}: pass at least 2 (a token and the one it predicts)")
    if settings["max_conversations"] is not None and settings["max_conversations"] < 2:
        raise ValueError(f"--max-conversations {settings['max_conversations']}: pass 2 or more (or leave it out: the run's own)")
    recorded = settings["data"] if args.data is None else None
    if recorded and Path(recorded).is_absolute() and not Path(recorded).exists():
        raise FileNotFoundError(
            f"the run's data {recorded} (from {run_file}) is not there any more: pass --data, the same "
            "conversations, so that the held-out split is the one training never saw"
        )
    settings["run_config"] = str(run_file) if run else None
    if run:
        warn_if_split_differs(args, {n: run.get(n, getattr(defaults, n)) for n in SPLIT_FIELDS}, run_file)
    return settings


def same_data(given: str | None, recorded: str | None) -> bool:
    """Whether --data (None: not given) names the run's own data, however the path is spelled."""
    if given is None or given == recorded:
        return True
    if recorded is None:
        return False
    return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()


def warn_if_split_differs(args: argparse.Namespace, run: dict, run_file: Path) -> None:
    """The run's data split another way holds out conversations that the run trained on: say so."""
    given = {n: getattr(args, n) for n in ("max_conversations", "eval_size", "seed")}
    if given["max_conversations"] == "all":  # what the run records as null
        given["max_conversations"] = run["max_conversations"] if run["max_conversations"] is None else "all"
    changed = [f"--{n.replace('_', '-')}" for n, value in given.items() if value is not None and value != run[n]]
    if changed and same_data(args.data, run["data"]):
        print(f"warning: {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} from the run's own "
              f"({run_file}): the held-out conversations are not the ones it held out, and some may have been "
              "trained on", file=sys.stderr)  # fmt: skip


def base_model_name(settings: dict, heads_config) -> str | None:
    """The base model to load: --model, the run's, else what the heads record ("embedded" = the default)."""
    from fastmedusa.model.export import recorded_base_model_name

    return recorded_base_model_name(settings["model"] or heads_config.base_model_name_or_path)


def model_for_heads(given: str | None, heads_dir: Path, settings: dict, heads_config) -> str | None:
    """The model the heads run on: --model, else a stage-2 run's own trained backbone, else `base_model_name`."""
    from fastmedusa.model.export import base_model_for_heads

    backbone = base_model_for_heads(given, heads_dir)
    return backbone if backbone is not None else base_model_name(settings, heads_config)


def held_out_conversations(settings: dict) -> list:
    from fastmedusa.data import read_sharegpt, train_eval_split

    conversations, _ = read_sharegpt(settings["data"], limit=settings["max_conversations"])
    _, held_out = train_eval_split(conversations, settings["eval_size"], seed=settings["seed"])
    return held_out


def label_accuracy(model, tokenizer, conversations: list, seq_len: int, batch_size: int, device) -> dict:
    """Per-head top-1/top-5 (and loss) against the data's tokens, with training's own evaluation code."""
    from fastmedusa.data import ConversationBatches, encode_dataset
    from fastmedusa.train.backend import SingleProcess
    from fastmedusa.train.evaluate import evaluate

    encoded = encode_dataset(tokenizer, conversations, seq_len, progress=False)
    if not encoded:
        raise ValueError("no held-out conversation has a labelled token: raise --seq-len or --eval-size")
    batches = list(
        ConversationBatches(encoded, batch_size, pad_id=tokenizer.pad_token_id or 0, shuffle=False)
    )
    result = evaluate(
        model,
        batches,
        num_heads=model.medusa_config.num_heads,
        impl="auto",
        backend=SingleProcess(),
        device=device,
    )
    return {
        k: result[k] for k in ("top1", "top5", "head_loss", "positions", "outside_draft_frac") if k in result
    }


def greedy_accuracy(model, tokenizer, conversations: list, args: argparse.Namespace, heads_dir: Path) -> dict:
    """Per-head top-1/top-5 against the base model's own greedy continuation, and the expected tokens per
    decoding step of the tree `generate` would use (--tree, else the heads' tree.json, else mc_sim_7b_63)
    under those accuracies. `auto:N` builds an N-node tree from the accuracies measured here."""
    from fastmedusa.decode import expected_accept_length, resolve_tree
    from fastmedusa.decode.accuracy import first_user_prompts, measure_head_acceptance, read_tree_json
    from fastmedusa.decode.cli import eos_token_ids
    from fastmedusa.decode.trees import chains_to_json

    num_heads = model.medusa_config.num_heads
    prompts = first_user_prompts(tokenizer, conversations, args.max_prompt_tokens)[: args.prompts]
    if not prompts:
        raise ValueError(
            f"no held-out prompt of <= {args.max_prompt_tokens} tokens: raise --max-prompt-tokens or --eval-size"
        )
    tree_info = read_tree_json(heads_dir, num_heads)
    built_here = isinstance(args.tree, str) and args.tree.startswith("auto:")
    paths = None if built_here else resolve_tree(args.tree, num_heads, tree_info)
    ranks = max(10, 1 + max(max(p) for p in paths)) if paths else 10
    eos = eos_token_ids(tokenizer, model.base)
    measured = measure_head_acceptance(model, prompts, args.new_tokens, ranks, eos, progress=False)
    rank_acc, counts, chains = measured.rank_accuracies, measured.positions_scored, measured.chains
    if built_here:
        info = {"rank_accuracies": rank_acc.tolist(), "accepted_chains": chains_to_json(chains), "paths": []}
        paths = resolve_tree(args.tree, num_heads, info)
    name = args.tree or ("tree.json" if tree_info is not None else "mc_sim_7b_63")
    topk = rank_acc.cumsum(1)
    return {
        "greedy": {
            "top1": topk[:, 0].tolist(),
            "top5": topk[:, 4].tolist(),
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "positions": counts.tolist(),
            "rank_accuracies": rank_acc.tolist(),
            "chain_positions": measured.chain_positions,
            "accepted_chains": chains_to_json(chains),
        },
        "tree": {
            "name": name,
            "nodes": len(paths),
            "expected_tokens_per_step": expected_accept_length(paths, rank_acc, chains),
            "expected_tokens_per_step_independent": expected_accept_length(paths, rank_acc),
        },
    }


def evaluate_heads(args: argparse.Namespace, settings: dict | None = None) -> dict:
    from fastmedusa.decode.cli import resolve_device_dtype
    from fastmedusa.model import MedusaModel, load_tokenizer
    from fastmedusa.model.export import find_heads_dir, read_heads

    heads_dir = find_heads_dir(args.heads_dir)
    checkpoint = read_heads(heads_dir)
    settings = settings or split_settings(args, heads_dir)
    model_name = model_for_heads(args.model, heads_dir, settings, checkpoint.config)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    tokenizer = load_tokenizer(model_name)
    model = MedusaModel.from_pretrained(model_name, heads=heads_dir, dtype=dtype, device=device).eval()
    conversations = held_out_conversations(settings)
    result = {
        "heads": str(heads_dir),
        "model": model_name or "embedded",
        "data": settings["data"] or "embedded",
        "conversations": len(conversations),
        "split": {k: settings[k] for k in ("max_conversations", "eval_size", "seed", "seq_len")},
        "run_config": settings["run_config"],
        "labels": label_accuracy(
            model, tokenizer, conversations, settings["seq_len"], args.batch_size, device
        ),
    }
    if args.prompts > 0:
        result.update(greedy_accuracy(model, tokenizer, conversations, args, heads_dir))
    return result


def report_lines(result: dict) -> list[str]:
    labels, greedy = result["labels"], result.get("greedy")
    data = "the embedded ShareGPT" if result["data"] == "embedded" else result["data"]
    lines = [f"held-out: {result['conversations']} conversations of {data}"]
    for k in range(len(labels["top1"])):
        line = (
            f"head {k + 1} (predicts t+{k + 2}): data top-1 {100 * labels['top1'][k]:.1f}% "
            f"top-5 {100 * labels['top5'][k]:.1f}%"
        )
        if greedy:
            line += f" | greedy top-1 {100 * greedy['top1'][k]:.1f}% top-5 {100 * greedy['top5'][k]:.1f}%"
        lines.append(line)
    if result.get("tree"):
        tree = result["tree"]
        lines.append(
            f"expected tokens/step with the {tree['name']} tree ({tree['nodes']} nodes): "
            f"{tree['expected_tokens_per_step']:.2f}"
        )
    return lines


EVAL_RESULT_KEYS = ("heads", "model", "data", "conversations", "labels")  # what every eval result holds


def is_eval_result(path: Path) -> bool:
    """Whether `path` holds an earlier `fastmedusa eval` result (a JSON object with its keys)."""
    return set(EVAL_RESULT_KEYS) <= json_object_keys(path)


def check_eval_output(output: Path, heads: Path, data: str | None, given: bool = True) -> None:
    """The results may replace an earlier eval result, never anything else: not the data read, a file the heads
    need, nor the model's weights or a run's settings (a stage-2 run's model/ lies beside its heads)."""
    target = output.resolve()
    if data is not None and Path(data).expanduser().exists() and target == Path(data).expanduser().resolve():
        raise ValueError(
            f"--output {output} is the data file being evaluated on ({data}): pass another path for the results"
        )
    if target.parent == heads.resolve() and target.name != "eval.json" and target.exists():
        raise ValueError(
            f"--output {output} is a file of the heads directory ({target.name}): pass another path, or leave "
            "--output out to write the heads' eval.json"
        )
    if target.is_dir():
        raise ValueError(f"--output {output} is a directory: pass a file path for the results (e.g. eval.json)")
    if target.exists() and not is_eval_result(target):  # the heads' own eval.json too: a user's notes stay
        named = f"--output {output}" if given else f"{output} (the default output)"
        raise ValueError(
            f"{named} exists and is not an earlier `fastmedusa eval` result: move it, or pass a new --output "
            "path (eval replaces only its own results)"
        )
    check_writable(output, "--output")  # before the evaluation, not after it


def run_eval(args: argparse.Namespace) -> int:
    from fastmedusa.files import write_json_atomic
    from fastmedusa.model.export import find_heads_dir

    for flag in ("batch_size", "new_tokens", "max_prompt_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: pass 1 or more")
    if args.prompts < 0:
        raise ValueError(f"--prompts {args.prompts}: pass 0 (skip the greedy measure) or more")
    if args.prompts == 0 and args.tree is not None:
        raise ValueError(
            f"--tree {args.tree} with --prompts 0: a tree's expected tokens/step comes from the greedy measure "
            "that --prompts 0 skips; drop one of them"
        )
    heads = find_heads_dir(args.heads_dir)
    output = Path(args.output).expanduser() if args.output else heads / "eval.json"
    settings = split_settings(args, heads)
    check_eval_output(output, heads, settings["data"], given=args.output is not None)  # data: given or the run's
    result = evaluate_heads(args, settings)
    write_json_atomic(output, result)
    for line in report_lines(result):
        print(line)
    print(f"results in {output}", file=sys.stderr)
    return 0
