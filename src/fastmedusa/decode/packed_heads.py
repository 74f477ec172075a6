"""Medusa heads stacked for decoding: each of a step's head GEMMs batched over the heads.

A decode step runs the heads on one hidden state per row. `MedusaHeads` does that head by head: per head one
small ResBlock GEMM per layer and one vocabulary projection, each a kernel of a few microseconds, or (the
projection) a read of a vocabulary x hidden matrix. Stacked, every ResBlock layer of all the heads is one
batched GEMM and the projections one more: L + 1 GEMMs for L ResBlock layers instead of K (L + 1), and the
projection matrices stream through one kernel.

The stacks are copies (decode keeps the heads' weights twice, once per heads object whatever the tree),
written again at the start of every `generate` call, in place, so captured CUDA graphs keep reading them and
each call drafts with the heads' current weights however they were changed (an optimizer step, fused or not,
`load_state_dict`, writes through `.data`). The copy is a device-to-device copy of the heads' size, small next
to a call's decoding. Large projections are not copied (`PACK_MAX_BYTES`): for a model whose heads weigh
gigabytes the step is long enough that the saved launches do not matter, and the memory does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.model.heads import MedusaHeads, check_draft_k, topk_token_ids

PACK_MAX_BYTES = 1 << 30  # projections above this many bytes (all stacked heads) stay per-head GEMMs


def can_pack(heads: nn.Module) -> bool:
    """Only fastmedusa's own `MedusaHeads` (plain tensors, not sharded) are packed; any other module with
    `draft_topk` is called as it is."""
    if not isinstance(heads, MedusaHeads):
        return False
    return all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in heads.parameters())


def _weight_like(heads: nn.Module) -> torch.Tensor:
    """A tensor with the heads' own dtype and device (the LM head's when the heads hold no weights)."""
    return next(heads.medusa_head.parameters(), heads.base_lm_head.weight)


class PackedHeads(nn.Module):
    """All heads of a `MedusaHeads`, their weights stacked by head; `head_logits(hidden, depth)` and
    `draft_topk(hidden, k, depth)` run the first `depth` of them (views of the same stacks) and return what
    `MedusaHeads.head_logits(hidden)[:depth]` / `draft_topk(hidden, k)[:depth]` return, up to the rounding
    of batched against single GEMMs. The stacks take the heads' own dtype and device.

    Projections: per-head ones are stacked (`projection` (K, N, H)) unless larger than `PACK_MAX_BYTES`
    (then one GEMM per head, on the heads' own weights); a shared LM head is used in place, or under a draft
    vocabulary its token_map rows are gathered once per refresh (`projection` (N, H)) instead of every step."""

    def __init__(self, heads: nn.Module) -> None:
        super().__init__()
        config = heads.config
        self.__dict__["source"] = heads  # a reference, not a submodule: its weights are not ours
        self.num_heads, self.num_layers, self.shared = (
            config.num_heads,
            config.num_layers,
            config.shared_lm_head,
        )
        self.vocab_rows, hidden = config.head_vocab_size, config.hidden_size
        like = _weight_like(heads)
        factory = {"device": like.device, "dtype": like.dtype}
        k, layers = self.num_heads, self.num_layers
        self.register_buffer("block_weight", torch.empty(layers, k, hidden, hidden, **factory))
        self.register_buffer("block_bias", torch.empty(layers, k, 1, hidden, **factory))
        if self.shared:
            self.layout = "shared" if heads.token_map is None else "shared_rows"
        else:
            stack_bytes = k * self.vocab_rows * hidden * like.element_size()
            self.layout = "stacked" if stack_bytes <= PACK_MAX_BYTES else "per_head"
        shape = {"stacked": (k, self.vocab_rows, hidden), "shared_rows": (self.vocab_rows, hidden)}
        self.register_buffer("projection", torch.empty(shape.get(self.layout, (0,)), **factory))
        self.register_buffer("token_map", None if heads.token_map is None else heads.token_map.clone())
        self.views: dict[int, PackedDepth] = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the heads' current weights into the stacks, in place (their addresses never change)."""
        heads = self.source
        like = _weight_like(heads)
        if (like.dtype, like.device) != (self.block_weight.dtype, self.block_weight.device):
            raise ValueError(
                f"the Medusa heads are now {like.dtype} on {like.device}, but they were {self.block_weight.dtype} "
                f"on {self.block_weight.device} when decoding first used them: move the heads and the base model "
                "together (MedusaModel.to), or pass a new heads object"
            )
        for d, head in enumerate(heads.medusa_head):
            for layer in range(self.num_layers):
                self.block_weight[layer, d].copy_(head[layer].linear.weight)
                self.block_bias[layer, d, 0].copy_(head[layer].linear.bias)
            if self.layout == "stacked":
                self.projection[d].copy_(head[self.num_layers].weight)
        if self.token_map is not None:
            self.token_map.copy_(heads.token_map)
        if self.layout == "shared_rows":
            self.projection.copy_(heads.base_lm_head.weight.index_select(0, heads.token_map))

    def head_logits(self, hidden: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(depth, ..., N) logits of the first `depth` heads (all by default) over their vocabulary rows."""
        depth = self.num_heads if depth is None else depth
        lead, size = hidden.shape[:-1], hidden.shape[-1]
        rows = hidden.reshape(-1, size)  # (R, H)
        x = rows.expand(depth, -1, -1)  # (D, R, H)
        for layer in range(self.num_layers):
            weight, bias = self.block_weight[layer, :depth], self.block_bias[layer, :depth]
            if layer == 0:  # every head reads the same rows: one GEMM over the heads' stacked (D*H, H) weights
                y = F.linear(rows, weight.reshape(depth * size, size)).view(-1, depth, size).transpose(0, 1)
            else:  # bias outside the GEMM: baddbmm copied it into the output first (one more kernel)
                y = torch.bmm(x, weight.transpose(1, 2))
            x = x + F.silu(y + bias)
        if self.layout == "stacked":
            logits = torch.bmm(x, self.projection[:depth].transpose(1, 2))
        elif self.layout == "shared":  # one matrix for every head: one GEMM over the stacked towers
            logits = F.linear(x, self.source.base_lm_head.weight)
        elif self.layout == "shared_rows":
            logits = F.linear(x, self.projection)
        else:
            weights = self.source.projection_weights()
            logits = torch.stack([F.linear(x[d], weights[d]) for d in range(depth)])
        return logits.reshape(depth, *lead, logits.shape[-1])

    def draft_topk(self, hidden: torch.Tensor, k: int, depth: int | None = None) -> torch.Tensor:
        """The first `depth` heads' k best tokens as vocabulary ids, best first: (depth, ..., k)."""
        check_draft_k(k, self.vocab_rows)
        return topk_token_ids(self.head_logits(hidden, depth), k, self.token_map)

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a compiled step reads from here (they keep their addresses)."""
        own = [
            t for t in (self.block_weight, self.block_bias, self.projection, self.token_map) if t is not None
        ]
        if self.layout == "shared":
            own.append(self.source.base_lm_head.weight)
        if self.layout == "per_head":
            own += self.source.projection_weights()
        return own

    def depth_view(self, depth: int) -> PackedDepth:
        """The first `depth` heads, as a drafter for a tree of that depth (one per depth, sharing the stacks)."""
        if not 1 <= depth <= self.num_heads:
            raise ValueError(f"depth {depth} must be within the heads' 1..{self.num_heads}")
        if depth not in self.views:
            self.views[depth] = PackedDepth(self, depth)
        return self.views[depth]


class PackedDepth(nn.Module):
    """A drafter for a tree of `depth` levels: the first `depth` heads of a `PackedHeads`."""

    def __init__(self, packed: PackedHeads, depth: int) -> None:
        super().__init__()
        self.__dict__["packed"] = packed  # not a submodule: the views share its stacks
        self.depth = depth
        self.num_heads = depth

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.packed.head_logits(hidden, self.depth)

    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        return self.packed.draft_topk(hidden, k, self.depth)

    def static_tensors(self) -> list[torch.Tensor]:
        return self.packed.static_tensors()


def packed_heads(cache: dict, heads: nn.Module, depth: int) -> nn.Module:
    """The first `depth` heads, stacked: one `PackedHeads` per heads object, kept in `cache` (the engine's)
    and refreshed from the heads' current weights at every call; `heads` itself when it cannot be packed."""
    if not can_pack(heads):
        return heads
    key = ("packed_heads", id(heads))
    packed = cache.get(key)
    if packed is None or packed.source is not heads:
        packed = cache[key] = PackedHeads(heads)
    else:
        packed.refresh()
    return packed.depth_view(depth)
