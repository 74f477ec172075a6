"""How well Medusa heads predict the base model's own greedy tokens: per head, per rank.

What greedy Medusa decoding needs from a head is agreement with the base model's greedy continuation. Each
prompt is continued by plain greedy decoding, the backbone runs once over prompt + continuation, and head
k's rank-r token at position t counts as right when it equals the continuation's token at t+k+2. The rank
accuracies feed `build_tree` and `expected_accept_length` (expected tokens per decoding step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from fastmedusa.decode.generate import generate


def first_user_prompts(
    tokenizer, conversations: Sequence[list[dict]], max_prompt_tokens: int
) -> list[torch.Tensor]:
    """The first non-empty user turn of each conversation, chat-templated as a generation prompt: (1, P)
    token ids each; prompts longer than `max_prompt_tokens` are skipped."""
    from fastmedusa.decode.cli import encode_prompt

    prompts = []
    for conversation in conversations:
        turn = next(
            (t["content"] for t in conversation if t["role"] == "user" and t["content"].strip()), None
        )
        if turn is None:
            continue
        ids = encode_prompt(tokenizer, turn, chat=True)
        if ids.shape[1] <= max_prompt_tokens:
            prompts.append(ids)
    return prompts


@torch.no_grad()
def measure_rank_accuracies(
    model,
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    ranks: int,
    eos_token_id=None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, ranks) P(head k's rank-r token = the base model's greedy token), and the (K,) positions scored.

    The cumulative sum over ranks is the top-k accuracy against the model's own greedy tokens."""
    heads = model.medusa_heads
    hits = torch.zeros(heads.num_heads, ranks, dtype=torch.long)
    counts = torch.zeros(heads.num_heads, dtype=torch.long)
    for ids in tqdm(prompts, desc="scoring heads", disable=not progress):
        seq = generate(
            model, ids, max_new_tokens=new_tokens, medusa=False, eos_token_id=eos_token_id
        ).sequences
        seq = seq.to(next(model.base.parameters()).device)
        hidden = model.backbone_hidden_states(seq)[0]  # (L, H)
        start, length = ids.shape[1] - 1, seq.shape[1]  # heads act on the last accepted token: t >= P - 1
        if length - 2 <= start:
            continue
        top = heads.draft_topk(hidden[start : length - 2], ranks).cpu()  # (K, T, ranks) token ids
        tokens = seq[0].cpu()
        for k in range(heads.num_heads):
            scored = length - k - 2 - start  # positions t whose target t+k+2 exists
            if scored <= 0:
                continue
            target = tokens[start + k + 2 : start + k + 2 + scored]
            hits[k] += (top[k, :scored] == target[:, None]).sum(0)
            counts[k] += scored
    if (counts == 0).any():
        raise ValueError("some heads were never scored: raise --new-tokens or --prompts")
    return hits.double() / counts[:, None].double(), counts
