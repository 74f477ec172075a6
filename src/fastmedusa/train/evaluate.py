"""Held-out evaluation: per-head loss, KL to the base model and top-1/top-5, token-weighted over every
held-out batch. The KL is reported whatever loss trains: it says how close each head is to the base model's
own distribution, the soft version of the acceptance the decoder sees.

Stage 1 on one process: the frozen backbone gives the same hidden states at every evaluation, so they are
computed once and kept in a `HiddenCache` keyed by batch index, up to a byte budget. Batches past the
budget are recomputed each time; the key (not the order of arrival) says which batch a tensor belongs
to, so a skipped batch can never be handed another batch's hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastmedusa.data.chat import IGNORE_INDEX
from fastmedusa.train.distributed import gathered_heads

Batch = dict[str, torch.Tensor]
# Stage 1: up to 2 GiB of held-out hidden states instead of re-running the backbone at every evaluation
# (SmolLM2-135M, H=576, fp32: 2 GiB holds ~930k positions; Llama-3-8B, H=4096, bf16: ~262k).
EVAL_CACHE_BYTES = 2 << 30


class HiddenCache:
    """Backbone hidden states of held-out batches, keyed by the batch's index, within `budget_bytes`."""

    def __init__(self, budget_bytes: int = EVAL_CACHE_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.entries: dict[int, torch.Tensor] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, index: int) -> torch.Tensor | None:
        return self.entries.get(index)

    def put(self, index: int, hidden: torch.Tensor) -> bool:
        """Keep `hidden` for batch `index` if it fits in the budget; returns whether it was kept."""
        size = hidden.numel() * hidden.element_size()
        if index in self.entries or self.nbytes + size > self.budget_bytes:
            return False
        self.entries[index] = hidden
        self.nbytes += size
        return True


def pad_rows_to_multiple(batch: Batch, multiple: int) -> Batch:
    """Append copies of the last row with no labels until the rows split evenly over `multiple` processes.

    Held-out sets rarely fill the last batch; a padded row counts for nothing (labels IGNORE_INDEX)."""
    rows = batch["input_ids"].shape[0]
    missing = -rows % multiple
    if not missing:
        return batch
    padded = {k: torch.cat([v, v[-1:].expand(missing, *v.shape[1:])]) for k, v in batch.items()}
    padded["labels"][rows:] = IGNORE_INDEX
    return padded


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    num_heads: int,
    impl: str,
    loss: str = "ce",
    backend,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    cache: HiddenCache | None = None,
) -> dict | None:
    """Per-head loss (`loss`: "ce" or "kl"), KL to the base model and top-1/top-5 over `batches`; None
    without batches.

    `cache` (stage 1, one process only: under FSDP the heads run outside the model's forward, on shards)
    reuses the backbone's hidden states between calls. Over several processes each evaluates its rows of
    every batch (padded with unlabelled rows to split evenly) and the sums are reduced."""
    if not batches:
        return None
    model.eval()
    loss_sum = torch.zeros(num_heads, dtype=torch.float64)
    kl_sum = torch.zeros(num_heads, dtype=torch.float64)
    hits_sum = torch.zeros(num_heads, 2, dtype=torch.long)
    count_sum = torch.zeros(num_heads, dtype=torch.long)
    lm_sum, lm_count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    outside = torch.zeros(2, dtype=torch.long)  # labelled tokens outside the draft vocabulary, labelled
    heads = model.medusa_heads
    for i, batch in enumerate(batches):
        batch = pad_rows_to_multiple(batch, backend.world_size)
        batch = {k: v.to(device, non_blocking=True) for k, v in backend.shard_batch(batch).items()}
        labels = batch["labels"]
        with autocast(), gathered_heads(model):
            if cache is not None:
                hidden = cache.get(i)
                if hidden is None:
                    hidden = model.backbone_hidden_states(batch["input_ids"], batch.get("attention_mask"))
                    cache.put(i, hidden)
                _, head_losses = heads(hidden, labels, impl=impl, loss=loss)
            else:
                out = model(batch["input_ids"], batch.get("attention_mask"), labels, impl=impl, loss=loss)
                hidden, head_losses = out.hidden_states, out.head_losses
                n_lm = int((labels[:, 1:] != IGNORE_INDEX).sum())
                if out.lm_loss is not None and n_lm:
                    lm_sum += float(out.lm_loss) * n_lm
                    lm_count += n_lm
            hits, counts = heads.topk_correct(hidden, labels)
            outside += torch.tensor(heads.outside_draft_count(labels))
            kl = head_losses if loss == "kl" else heads.kl_divergence(hidden, labels, impl=impl)
        # a head with no labelled position here has a NaN mean loss: it weighs 0, not NaN
        loss_sum += torch.where(counts > 0, head_losses.double().cpu() * counts, 0.0)
        kl_sum += torch.where(counts > 0, kl.double().cpu() * counts, 0.0)
        hits_sum += hits.cpu()
        count_sum += counts.cpu()
    reduce = backend.all_reduce
    loss_sum, kl_sum = reduce(loss_sum), reduce(kl_sum)
    hits_sum, count_sum = reduce(hits_sum), reduce(count_sum)
    lm_sum, lm_count = float(reduce(lm_sum)), int(reduce(lm_count))
    denom = count_sum.clamp(min=1)
    result = {
        "head_loss": (loss_sum / denom).tolist(),
        "head_kl": (kl_sum / denom).tolist(),
        "top1": (hits_sum[:, 0] / denom).tolist(),
        "top5": (hits_sum[:, 1] / denom).tolist(),
        "positions": count_sum.tolist(),
    }
    if lm_count:
        result["lm_loss"] = lm_sum / lm_count
    if heads.token_map is not None:  # scored as misses by top-k, not scored by the loss
        outside = reduce(outside)
        result["outside_draft_frac"] = int(outside[0]) / max(int(outside[1]), 1)
    return result
