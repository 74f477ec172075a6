"""`fastmedusa bench draft-kl`: which KL target trains draft-vocabulary heads better, measured on a small run.

A head over a draft vocabulary D (N tokens) cannot put mass outside D, while the base model (the teacher)
does. Two targets for the head's KL, both over the teacher's full-vocabulary softmax p:
  renorm   p restricted to D and renormalised: the head learns the teacher's distribution given D
           (what `MedusaHeads.kl_divergence` trains; the library's fused KL op runs it)
  extra    p over D plus one class holding the mass outside D, 1 - sum_D p; the head gets one more
           logit (a learned (H,) row and bias per head), unused when decoding
and, for reference, `ce`: cross-entropy on the data's labels (draft rows; labels outside D not scored).
Stage 1 (frozen backbone, hidden states computed once), the same heads, data, steps and seed for each.
Scored on held-out conversations: each head's top-1/top-5 against the base model's greedy token for that
position (what tree verification accepts) and top-1 against the data's label; a token outside D is a
miss. Logits are materialised (plain PyTorch; the teacher's once per batch), so keep N*T*B small; runs on
the CPU or CUDA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.bench.common import environment, write_json
from fastmedusa.dtypes import parse_device
from fastmedusa.errors import CommandParser
from fastmedusa.files import check_output_file, is_benchmark_result

VARIANTS = ("renorm", "extra", "ce")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog="fastmedusa bench draft-kl", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="ShareGPT file (default: the embedded ShareGPT)")
    p.add_argument("--conversations", type=int, default=160, help="conversations read (train + held out)")
    p.add_argument("--eval-size", type=int, default=32, help="held-out conversations")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")
    p.add_argument("--draft-vocab", type=int, nargs="+", default=[2048], help="N values")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="losses to compare")
    p.add_argument("--heads", type=int, default=3, help="Medusa heads to train")
    p.add_argument("--steps", type=int, default=120, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation, the batches drawn and the held-out split")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 throughout)")
    p.add_argument("--out", type=Path, default=Path("bench/results/draft_kl.json"), help="JSON path")
    return p.parse_args(argv)


def cached_batches(model, encoded, batch_size: int, device) -> list[dict]:
    """Padded batches with the frozen backbone's hidden states, computed once."""
    from fastmedusa.data import ConversationBatches

    out = []
    for batch in ConversationBatches(encoded, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            batch["hidden"] = model.backbone_hidden_states(batch["input_ids"], batch["attention_mask"])
        out.append(batch)
    return out


@torch.no_grad()
def add_teacher(batches: list[dict], lm_weight: torch.Tensor, token_map: torch.Tensor) -> None:
    """What the KL targets need from the teacher (the base LM head), kept per position instead of all V
    logits: its logits on the draft rows (B, T, N), its full log-sum-exp and its greedy token (B, T)."""
    for batch in batches:
        logits = batch["hidden"] @ lm_weight.T  # (B, T, V)
        batch["t_draft"] = logits[..., token_map]
        batch["t_lse"] = logits.logsumexp(-1)
        batch["t_greedy"] = logits.argmax(-1)


def head_terms(heads, extra: nn.ModuleList | None, batch: dict, variant: str):
    """Per head: (loss over its scored positions, student draft logits (M, N), teacher greedy (M,),
    labels (M,)), M = positions t whose label at t + shift exists (shift = k + 1 for head k, 1-based);
    the teacher for t is the base model at t + shift - 1 (its distribution for token t + shift)."""
    hidden, labels = batch["hidden"], batch["labels"]
    terms = []
    towers = heads.head_hidden_states(hidden)
    for k, (x, w) in enumerate(zip(towers, heads.projection_weights())):
        shift = k + 2
        target = labels[:, shift:]
        keep = target != -100
        student = (x[:, :-shift] @ w.T)[keep]  # (M, N)
        t_draft = batch["t_draft"][:, shift - 1 : -1][keep]  # (M, N)
        if variant == "ce":
            rows = heads.head_labels(target)[keep]
            loss = (
                F.cross_entropy(student, rows, ignore_index=-100) if (rows >= 0).any() else student.sum() * 0
            )
        else:
            if variant == "renorm":
                target_logp = t_draft.log_softmax(-1)
                log_q = student.log_softmax(-1)
            else:
                inside = t_draft - batch["t_lse"][:, shift - 1 : -1][keep][:, None]
                outside = torch.log1p(-inside.exp().sum(-1).clamp(max=1 - 1e-6))
                target_logp = torch.cat([inside, outside[:, None]], dim=-1)
                log_q = torch.cat([student, extra[k](x[:, :-shift][keep])], dim=-1).log_softmax(-1)
            loss = (target_logp.exp() * (target_logp - log_q)).sum(-1).mean()
        terms.append((loss, student, batch["t_greedy"][:, shift - 1 : -1][keep], target[keep]))
    return terms


@torch.no_grad()
def evaluate(heads, extra, batches: list[dict]) -> dict:
    """Per head: top-1/top-5 vs the base model's greedy token, top-1 vs the data's label."""
    k = heads.num_heads
    greedy1, greedy5, data1, count = [0] * k, [0] * k, [0] * k, [0] * k
    for batch in batches:
        for i, (_, student, greedy, target) in enumerate(head_terms(heads, extra, batch, "ce")):
            top = heads.token_map[student.topk(5, dim=-1).indices]  # (M, 5) token ids
            greedy1[i] += int((top[:, 0] == greedy).sum())
            greedy5[i] += int((top == greedy[:, None]).any(-1).sum())
            data1[i] += int((top[:, 0] == target).sum())
            count[i] += target.numel()
    return {
        "top1_vs_greedy": [a / max(n, 1) for a, n in zip(greedy1, count)],
        "top5_vs_greedy": [a / max(n, 1) for a, n in zip(greedy5, count)],
        "top1_vs_data": [a / max(n, 1) for a, n in zip(data1, count)],
        "positions": count,
    }


def train_variant(base, token_map, train, held_out, variant: str, args) -> dict:
    from fastmedusa.model import MedusaConfig, MedusaModel

    torch.manual_seed(args.seed)
    config = MedusaConfig(num_heads=args.heads, num_layers=1, draft_vocab_size=token_map.numel())
    model = MedusaModel.from_base(base, config, token_map)
    model.set_stage(1)
    heads = model.medusa_heads
    extra = None
    params = list(heads.parameters())
    if variant == "extra":  # the outside class's logit: a learned row and bias per head
        extra = nn.ModuleList(nn.Linear(config.hidden_size, 1) for _ in range(args.heads)).to(args.device)
        for layer in extra:
            nn.init.zeros_(layer.weight)
        params += list(extra.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = train[int(torch.randint(len(train), (), generator=gen))]
        loss = sum(term[0] for term in head_terms(heads, extra, batch, variant))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"variant": variant, "draft_vocab": token_map.numel(), "train_s": time.perf_counter() - start,
            **evaluate(heads, extra, held_out)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fastmedusa.data import encode_dataset, read_sharegpt, train_eval_split
    from fastmedusa.data.vocab import label_token_map
    from fastmedusa.model import load_base_model, load_tokenizer

    args = parse_args(argv)
    check_output_file(args.out, replaces=is_benchmark_result, inputs=(args.data,))
    device = parse_device(args.device)
    tokenizer = load_tokenizer(args.model)
    base = load_base_model(args.model, dtype=torch.float32).to(device).eval()
    conversations, _ = read_sharegpt(args.data, limit=args.conversations)
    train_convs, eval_convs = train_eval_split(conversations, args.eval_size, seed=args.seed)
    train_enc = encode_dataset(tokenizer, train_convs, args.seq_len, progress=False)
    eval_enc = encode_dataset(tokenizer, eval_convs, args.seq_len, progress=False)
    from fastmedusa.model import MedusaConfig, MedusaModel

    backbone = MedusaModel.from_base(base, MedusaConfig(num_heads=1, num_layers=0))
    backbone.set_stage(1)
    train = cached_batches(backbone, train_enc, args.batch_size, device)
    held_out = cached_batches(backbone, eval_enc, args.batch_size, device)
    vocab = base.get_output_embeddings().weight.shape[0]
    rows = []
    for n in args.draft_vocab:
        token_map, coverage = label_token_map(train_enc, vocab, n)
        token_map = token_map.to(device)
        for batches in (train, held_out):
            add_teacher(batches, base.get_output_embeddings().weight, token_map)
        for variant in args.variants:
            row = train_variant(base, token_map, train, held_out, variant, args)
            row["train_label_coverage"] = coverage
            rows.append(row)
            print(
                f"N={n:6d} {variant:7s} top-1 vs greedy {' '.join(f'{x:.3f}' for x in row['top1_vs_greedy'])} | "
                f"top-5 vs greedy {' '.join(f'{x:.3f}' for x in row['top5_vs_greedy'])} | "
                f"top-1 vs data {' '.join(f'{x:.3f}' for x in row['top1_vs_data'])}",
                flush=True,
            )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_json(args.out, {"env": environment(device), "settings": settings, "rows": rows})
    print(f"wrote {path}")
    return 0
