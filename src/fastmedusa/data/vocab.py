"""The draft vocabulary: the N most frequent label tokens of the training data.

Medusa heads with a draft vocabulary project onto N << V rows (EAGLE-3 drafts over 32k of Llama-3's
128k): a few thousand tokens carry nearly all of chat text, and the heads' GEMMs shrink by V/N. The
base model still verifies every drafted token, so decoding stays lossless; only drafts of tokens
outside the map are lost. Counted on the CPU, before training, over the labelled (assistant) positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fastmedusa.data.chat import IGNORE_INDEX


def id_outside(ids: torch.Tensor, vocab_size: int) -> int | None:
    """An id of the non-empty `ids` outside [0, vocab_size) (the lowest if negative, else the highest), or None."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        return low
    return high if high >= vocab_size else None


def count_label_tokens(
    examples: Iterable[dict | Sequence[int] | torch.Tensor], vocab_size: int
) -> torch.Tensor:
    """(vocab_size,) int64 counts of each token over the labelled positions of `examples`.

    An example is a `{"labels": ...}` dict (an `EncodedDataset` item or a batch) or the labels
    themselves; IGNORE_INDEX positions are skipped. A label id outside [0, vocab_size) is an error.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r}: pass the base model's vocabulary size (>= 1)")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for example in examples:
        labels = example["labels"] if isinstance(example, dict) else example
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        labels = labels[labels != IGNORE_INDEX]
        if labels.numel() == 0:
            continue
        if (bad := id_outside(labels, vocab_size)) is not None:
            raise ValueError(
                f"label id {bad} is outside the vocabulary [0, {vocab_size}): the data was tokenized "
                "for another model (pass the matching --model)"
            )
        counts += torch.bincount(labels, minlength=vocab_size)
    return counts


def draft_token_map(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """(draft_vocab_size,) int64 token ids: the most frequent tokens of `counts`, sorted by id.

    Sorted by id (not by count) so the map is canonical: the same set always gives the same map,
    whatever the ties. Ties at the cut go to the smaller id; when fewer than N tokens occur, the rest
    are the smallest unseen ids (the heads still get N rows, a zero count only means no training signal).
    """
    vocab = counts.numel()
    if not isinstance(draft_vocab_size, int) or draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size={draft_vocab_size!r}: pass a positive number of tokens")
    if draft_vocab_size > vocab:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} is more than the model's {vocab} tokens: pass a smaller "
            "--draft-vocab, or 0 for the full vocabulary"
        )
    # stable sort on -count: equal counts keep id order, so ties go to the smaller id
    order = torch.sort(-counts.long(), stable=True).indices
    return order[:draft_vocab_size].sort().values


def label_token_map(
    examples: Iterable[dict | Sequence[int] | torch.Tensor], vocab_size: int, draft_vocab_size: int
) -> tuple[torch.Tensor, float]:
    """(token map (N,), fraction of labelled positions whose token is inside it) for `examples`."""
    counts = count_label_tokens(examples, vocab_size)
    token_map = draft_token_map(counts, draft_vocab_size)
    return token_map, coverage_of_counts(counts, token_map)


def label_coverage(
    examples: Iterable[dict | Sequence[int] | torch.Tensor], vocab_size: int, token_map: torch.Tensor
) -> float:
    """Fraction of the labelled positions of `examples` whose token is in `token_map`: for a map counted on
    other data (a resumed checkpoint's), which may cover these labels far less than a new count would."""
    return coverage_of_counts(count_label_tokens(examples, vocab_size), token_map)


def coverage_of_counts(counts: torch.Tensor, token_map: torch.Tensor) -> float:
    """Fraction of the counted labels whose token is in `token_map` (1.0 when nothing was counted)."""
    total = int(counts.sum())
    return float(counts[token_map.cpu()].sum()) / total if total else 1.0
