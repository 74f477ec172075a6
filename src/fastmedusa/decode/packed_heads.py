"""Medusa heads stacked for decoding: each of a step's head GEMMs batched over the heads.

A decode step runs the heads on one hidden state per row. `MedusaHeads` does that head by head: per head one
small ResBlock GEMM per layer and one vocabulary projection, each a kernel of a few microseconds, or (the
projection) a read of a vocabulary x hidden matrix. Stacked, every ResBlock layer of all the heads is one
batched GEMM and the projections one more, so a step launches 2 GEMMs for the heads instead of 2K, and the
projection matrices stream through one kernel.

The stacks are copies (decode keeps the heads' weights twice), refreshed whenever the heads' parameters
change (an optimizer step, `load_state_dict`), in place, so captured CUDA graphs keep reading them. Large
projections are not copied (`PACK_MAX_BYTES`): for a model whose heads weigh gigabytes the step is long
enough that the saved launches do not matter, and the memory does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_MAX_BYTES = 1 << 30  # projections above this many bytes (all stacked heads) stay per-head GEMMs


def can_pack(heads: nn.Module) -> bool:
    """Only fastmedusa's own `MedusaHeads` (plain tensors, not sharded) are packed; any other module with
    `draft_topk` is called as it is."""
    from fastmedusa.model.heads import MedusaHeads

    if not isinstance(heads, MedusaHeads):
        return False
    return all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in heads.parameters())


class PackedHeads(nn.Module):
    """The first `depth` heads of a `MedusaHeads`, their weights stacked by head. `draft_topk` returns what
    `heads.draft_topk(hidden, k)[:depth]` returns, up to the rounding of batched against single GEMMs.

    Projections: per-head ones are stacked (`projection` (depth, N, H)) unless larger than `PACK_MAX_BYTES`
    (then one GEMM per head, on the heads' own weights); a shared LM head is used in place, or under a draft
    vocabulary its token_map rows are gathered once per refresh (`projection` (N, H)) instead of every step."""

    def __init__(self, heads: nn.Module, depth: int) -> None:
        super().__init__()
        config = heads.config
        if not 1 <= depth <= config.num_heads:
            raise ValueError(f"depth {depth} must be within the heads' 1..{config.num_heads}")
        self.__dict__["source"] = heads  # a reference, not a submodule: its weights are not ours
        self.depth, self.num_layers, self.shared = depth, config.num_layers, config.shared_lm_head
        self.vocab_rows, hidden = config.head_vocab_size, config.hidden_size
        weight = heads.base_lm_head.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer("block_weight", torch.empty(self.num_layers, depth, hidden, hidden, **factory))
        self.register_buffer("block_bias", torch.empty(self.num_layers, depth, 1, hidden, **factory))
        if self.shared:
            self.layout = "shared" if heads.token_map is None else "shared_rows"
        else:
            stack_bytes = depth * self.vocab_rows * hidden * weight.element_size()
            self.layout = "stacked" if stack_bytes <= PACK_MAX_BYTES else "per_head"
        shape = {"stacked": (depth, self.vocab_rows, hidden), "shared_rows": (self.vocab_rows, hidden)}
        self.register_buffer("projection", torch.empty(shape.get(self.layout, (0,)), **factory))
        self.register_buffer("token_map", None if heads.token_map is None else heads.token_map.clone())
        self._seen: tuple | None = None
        self.refresh()

    def _sources(self) -> list[torch.Tensor]:
        heads = self.source
        tensors = [t for head in heads.medusa_head[: self.depth] for t in head.parameters()]
        tensors.append(heads.base_lm_head.weight)
        return tensors if heads.token_map is None else [*tensors, heads.token_map]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the heads' weights in if they changed since the last copy (each tensor's version counter,
        which every in-place update bumps, and its address), into the same buffers."""
        seen = tuple((t.data_ptr(), t._version) for t in self._sources())
        if seen == self._seen:
            return
        heads = self.source
        for d, head in enumerate(heads.medusa_head[: self.depth]):
            for layer in range(self.num_layers):
                self.block_weight[layer, d].copy_(head[layer].linear.weight)
                self.block_bias[layer, d, 0].copy_(head[layer].linear.bias)
            if self.layout == "stacked":
                self.projection[d].copy_(head[self.num_layers].weight)
        if self.token_map is not None:
            self.token_map.copy_(heads.token_map)
        if self.layout == "shared_rows":
            self.projection.copy_(heads.base_lm_head.weight.index_select(0, heads.token_map))
        self._seen = seen

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(depth, ..., N) logits over the heads' vocabulary rows for hidden (..., H)."""
        lead = hidden.shape[:-1]
        x = hidden.reshape(1, -1, hidden.shape[-1]).expand(self.depth, -1, -1)  # (D, R, H)
        for layer in range(self.num_layers):
            x = x + F.silu(torch.baddbmm(self.block_bias[layer], x, self.block_weight[layer].transpose(1, 2)))
        if self.layout == "stacked":
            logits = torch.bmm(x, self.projection.transpose(1, 2))
        elif self.layout == "shared":  # one matrix for every head: one GEMM over the stacked towers
            logits = F.linear(x, self.source.base_lm_head.weight)
        elif self.layout == "shared_rows":
            logits = F.linear(x, self.projection)
        else:
            weights = self.source.projection_weights()
            logits = torch.stack([F.linear(x[d], weights[d]) for d in range(self.depth)])
        return logits.reshape(self.depth, *lead, logits.shape[-1])

    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Each head's k best tokens as vocabulary ids, best first: (depth, ..., k)."""
        if not 1 <= k <= self.vocab_rows:
            raise ValueError(
                f"the tree drafts the top {k} tokens of each head, but the heads score {self.vocab_rows} tokens: "
                "pick a tree with a smaller top-k or heads with a larger draft vocabulary"
            )
        top = self.head_logits(hidden).topk(k, dim=-1).indices
        return top if self.token_map is None else self.token_map[top]

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a compiled step reads from here (they keep their addresses)."""
        own = [
            t for t in (self.block_weight, self.block_bias, self.projection, self.token_map) if t is not None
        ]
        if self.layout == "shared":
            own.append(self.source.base_lm_head.weight)
        if self.layout == "per_head":
            own += self.source.projection_weights()[: self.depth]
        return own


def packed_heads(cache: dict, heads: nn.Module, depth: int) -> nn.Module:
    """The packed first `depth` heads, kept in `cache` (the engine's) per heads object and depth and refreshed
    from the heads' current weights; `heads` itself when it cannot be packed."""
    if not can_pack(heads):
        return heads
    key = ("packed_heads", id(heads), depth)
    packed = cache.get(key)
    if packed is None or packed.source is not heads:
        packed = cache[key] = PackedHeads(heads, depth)
    packed.refresh()
    return packed
