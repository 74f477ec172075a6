"""How far a fine-tuned model (the backbone a stage-2 run saves) moved from its base model, on chat prompts.

Both models answer the same MT-Bench first turns greedily. Each model also scores both sets of answers, as the
mean negative log-likelihood per answer token. The report gives:
- how many answers are identical, and the tokens the two answers share before they first differ;
- the base model's NLL of its own answers against the tuned model's answers: how far from what the original
  would write the tuned model's answers are;
- the tuned model's NLL of both sets.

    python bench/model_drift.py --base model.gguf --tuned runs/kl2/model --prompts question.jsonl \\
        --new-tokens 128 --out drift.json

`--tuned` also takes a heads directory or a run directory of a stage-2 run: its backbone is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="the original model (default: the embedded SmolLM2)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model, or a stage-2 run / heads dir")
    parser.add_argument("--prompts", default=None, help="MT-Bench question.jsonl (default: the embedded copy)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--out", default="model_drift.json")
    return parser.parse_args(argv)


def tuned_model_path(tuned: str) -> str:
    """A model as given, or the backbone a stage-2 run saved beside its heads (for a run or heads directory)."""
    from fastmedusa.model.export import trained_backbone

    backbone = trained_backbone(tuned) if Path(tuned).is_dir() else None
    return tuned if backbone is None else str(backbone)


@torch.no_grad()
def greedy_answers(model, prompts, batch_size, new_tokens, eos, pad_id) -> list[torch.Tensor]:
    """Each prompt's greedy answer (new tokens up to EOS, EOS included), batched on the decode engine."""
    from fastmedusa.decode.accuracy import left_pad_batch
    from fastmedusa.decode.generate import generate

    answers = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        ids, mask = left_pad_batch(group, pad_id)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, medusa=False,
                       eos_token_id=eos)  # fmt: skip
        answers += [out.row_new_token_ids(r).cpu() for r in range(len(group))]
    return answers


@torch.no_grad()
def answer_nll(model, prompts, answers, device) -> list[float]:
    """Mean NLL per answer token of each (prompt, answer) under `model` (fp32 log-softmax)."""
    values = []
    for prompt, answer in zip(prompts, answers):
        if answer.numel() == 0:
            continue
        ids = torch.cat([prompt[0], answer]).to(device)[None]
        logits = model(ids).logits[0, prompt.shape[1] - 1 : -1].float()
        values.append(float(F.cross_entropy(logits, answer.to(device))))
    return values


def shared_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def summary(base_answers, tuned_answers, nll: dict[str, list[float]]) -> dict:
    same = sum(a.numel() == b.numel() and bool((a == b).all()) for a, b in zip(base_answers, tuned_answers))
    prefixes = [shared_prefix(a, b) for a, b in zip(base_answers, tuned_answers)]
    mean = {name: statistics.fmean(v) if v else None for name, v in nll.items()}
    return {
        "prompts": len(base_answers),
        "identical_answers": same,
        "shared_prefix_tokens_median": statistics.median(prefixes) if prefixes else None,
        "shared_prefix_tokens_mean": statistics.fmean(prefixes) if prefixes else None,
        "nll_per_token": mean,
    }


def main(argv: list[str] | None = None) -> None:
    from fastmedusa.data.mtbench import mtbench_first_turns
    from fastmedusa.decode.accuracy import chat_prompts
    from fastmedusa.decode.cli import eos_token_ids, resolve_device_dtype
    from fastmedusa.environment import environment
    from fastmedusa.model import load_base_model, load_tokenizer

    args = parse_args(argv)
    device, dtype = resolve_device_dtype(args.device, None if args.dtype == "auto" else args.dtype)
    tuned_path = tuned_model_path(args.tuned)
    tokenizer = load_tokenizer(args.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = chat_prompts(tokenizer, mtbench_first_turns(args.prompts), args.max_prompt_tokens)
    prompts = prompts[: args.num_prompts]
    models = {name: load_base_model(path, dtype=dtype, device=device).eval()  # both held: each scores both
              for name, path in (("base", args.base), ("tuned", tuned_path))}  # fmt: skip
    answers = {
        name: greedy_answers(model, prompts, args.batch_size, args.new_tokens, eos_token_ids(tokenizer, model), pad_id)
        for name, model in models.items()
    }
    nll = {
        f"{scorer} model on {writer} answers": answer_nll(models[scorer], prompts, answers[writer], device)
        for scorer in models
        for writer in answers
    }
    del models
    result = {
        "env": environment(device),
        "base": args.base or "embedded SmolLM2-135M-Instruct",
        "tuned": tuned_path,
        "dtype": str(dtype).replace("torch.", ""),
        "new_tokens": args.new_tokens,
        **summary(answers["base"], answers["tuned"], nll),
        "examples": [
            {"prompt": tokenizer.decode(p[0]), "base": tokenizer.decode(a), "tuned": tokenizer.decode(b)}
            for p, a, b in list(zip(prompts, answers["base"], answers["tuned"]))[:3]
        ],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['identical_answers']}/{result['prompts']} identical answers; shared prefix median "
          f"{result['shared_prefix_tokens_median']} tokens")  # fmt: skip
    for name, value in result["nll_per_token"].items():
        print(f"NLL per token, {name}: {value:.3f}" if value is not None else f"{name}: no tokens")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
