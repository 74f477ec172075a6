"""Full-vocabulary heads cut down to a draft vocabulary after training (frequency-ranked drafting).

A decode step reads every head's vocabulary projection: for SmolLM2's four heads that is 4 x 49,152 x 576 bf16
weights, the largest read of the step after the base model's own. Nearly every token the heads get right is one
of the few thousand most frequent tokens of the training answers, so keeping only those rows (as FR-Spec does for
EAGLE's drafter) cuts the read by V/N and costs only the drafts of rarer tokens. The base model still verifies
every drafted token: greedy decoding stays lossless.

`restrict_heads` keeps the rows of a `token_map` (the same map `fastmedusa train --draft-vocab` counts before
training); `fastmedusa shrink-vocab` counts it over the run's own training split, writes the heads with the map
(the same files as heads trained with `--draft-vocab`), and measures their tree.json again on the held-out prompts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastmedusa.model.export import TOKEN_MAP, HeadsCheckpoint
from fastmedusa.model.heads import check_token_map


def check_restrictable(checkpoint: HeadsCheckpoint) -> None:
    """Only heads over the full vocabulary, of a known size, can be cut: a draft head's rows are not token ids."""
    if checkpoint.token_map is not None:
        raise ValueError(
            f"these heads already project onto a draft vocabulary of {checkpoint.token_map.numel()} tokens: "
            "shrink heads of the full vocabulary (or train new ones with a smaller --draft-vocab)"
        )
    if checkpoint.config.vocab_size is None:
        raise ValueError("these heads' config.json records no vocab_size: re-export them with fastmedusa")


def restrict_heads(checkpoint: HeadsCheckpoint, token_map: torch.Tensor) -> HeadsCheckpoint:
    """The heads of `checkpoint` projecting onto the `token_map` rows only: each head's projection keeps those
    rows (in map order), the ResBlocks are unchanged, and the config gets `draft_vocab_size`. Heads that share
    the LM head keep sharing it (decoding gathers the rows once). Heads with a draft vocabulary already are
    refused: their rows are not token ids."""
    cfg = checkpoint.config
    check_restrictable(checkpoint)
    token_map = check_token_map(token_map, cfg.vocab_size)
    if token_map.numel() >= cfg.vocab_size:
        raise ValueError(
            f"a draft vocabulary of {token_map.numel()} tokens is not smaller than the heads' {cfg.vocab_size}: "
            "pass a smaller --draft-vocab"
        )
    config = replace(cfg, draft_vocab_size=token_map.numel())  # checks N against the heads' top-k floor
    state = dict(checkpoint.state)
    gathered: dict[int, torch.Tensor] = {}  # shared heads store one tensor K times: gather it once
    for head in range(cfg.num_heads):
        key = f"{head}.{cfg.num_layers}.weight"
        weight = state[key]
        if id(weight) not in gathered:
            gathered[id(weight)] = weight.index_select(0, token_map.to(weight.device)).contiguous()
        state[key] = gathered[id(weight)]
    state[TOKEN_MAP] = token_map.cpu()
    metadata = dict(checkpoint.metadata)
    if isinstance(metadata.get("training"), dict):  # training's last evaluation scored every row: not these heads
        metadata["training"] = {k: v for k, v in metadata["training"].items() if k != "final_eval"}
    return HeadsCheckpoint(config, state, metadata, checkpoint.layout)


def label_counts(
    tokenizer, conversations: list, seq_len: int, vocab_size: int, progress: bool = False
) -> torch.Tensor:
    """(vocab_size,) counts of each token over the labelled (assistant) positions of `conversations`,
    encoded exactly as `fastmedusa train` encodes them (`progress`: its progress bar)."""
    from fastmedusa.data import encode_dataset
    from fastmedusa.data.vocab import count_label_tokens

    if not conversations:
        return torch.zeros(vocab_size, dtype=torch.long)
    return count_label_tokens(encode_dataset(tokenizer, conversations, seq_len, progress=progress), vocab_size)

