"""Medusa heads: K small residual towers on the last hidden state, each with a vocabulary projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.data.chat import IGNORE_INDEX
from fastmedusa.model.config import MedusaConfig


class ResBlock(nn.Module):
    """`x + SiLU(Linear(x))`, zero-initialised so a fresh head starts as the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


HEAD_LOSSES = ("ce", "kl")


def head_shifts(num_heads: int, with_lm_head: bool = False) -> list[int]:
    """Label shifts: the LM head scores t against t+1, Medusa head k (1-based) against t+k+1."""
    return ([1] if with_lm_head else []) + [k + 1 for k in range(1, num_heads + 1)]


def check_token_map(
    token_map: torch.Tensor, vocab_size: int, draft_vocab_size: int | None = None
) -> torch.Tensor:
    """A draft vocabulary's token map as int64 (N,): distinct ids in [0, vocab_size), N as configured."""
    token_map = torch.as_tensor(token_map)
    if token_map.dim() != 1 or token_map.dtype.is_floating_point or token_map.dtype == torch.bool:
        raise ValueError(
            f"token_map must be a 1-D integer tensor of token ids, got {token_map.dtype} {tuple(token_map.shape)}"
        )
    token_map = token_map.long()
    if draft_vocab_size is not None and token_map.numel() != draft_vocab_size:
        raise ValueError(
            f"token_map has {token_map.numel()} ids but draft_vocab_size is {draft_vocab_size}: "
            "pass a map of exactly draft_vocab_size ids"
        )
    if token_map.numel() and (int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size):
        bad = int(token_map.min()) if int(token_map.min()) < 0 else int(token_map.max())
        raise ValueError(f"token_map holds id {bad}, outside the vocabulary [0, {vocab_size}): fix the map")
    unique = token_map.unique()
    if unique.numel() != token_map.numel():
        sorted_ids = token_map.sort().values
        dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
        raise ValueError(f"token_map lists id {dup} more than once: each draft row must be a distinct token")
    return token_map


def check_heads_fit_lm_head(config: MedusaConfig, lm_weight: torch.Tensor) -> None:
    """Heads whose config states another vocabulary or hidden size than the base model's LM head were trained for
    another base model. Shared-LM-head heads hold no projection whose shape would show it: their config must."""
    vocab, hidden = lm_weight.shape
    if config.vocab_size not in (None, vocab) or config.hidden_size not in (None, hidden):
        raise ValueError(
            f"heads config (vocab {config.vocab_size}, hidden {config.hidden_size}) does not match the base "
            f"model's lm_head (vocab {vocab}, hidden {hidden}): these heads were trained for another base model; "
            "load them on that one (base_model_name_or_path in their config.json)"
        )


def inverse_token_map(token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: the draft index of each token id, IGNORE_INDEX for tokens outside the map."""
    inverse = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long, device=token_map.device)
    inverse[token_map] = torch.arange(token_map.numel(), device=token_map.device)
    return inverse


def draft_labels(labels: torch.Tensor, draft_index: torch.Tensor) -> torch.Tensor:
    """Labels (token ids, IGNORE_INDEX = not scored) as draft-vocabulary indices; IGNORE_INDEX outside it.

    A gather of B*T integers: the hidden states and weights are untouched, so every loss impl works."""
    from fastmedusa.ops.cross_entropy import check_label_values

    labels = labels.long()
    check_label_values(labels, draft_index.numel(), IGNORE_INDEX)  # ids of the full vocabulary, or ignored
    valid = labels != IGNORE_INDEX
    mapped = draft_index[labels.clamp(0, draft_index.numel() - 1)]
    return torch.where(valid, mapped, IGNORE_INDEX)


def check_draft_k(k: int, rows: int) -> None:
    """A tree's top-k must fit the heads' vocabulary rows."""
    if not 1 <= k <= rows:
        raise ValueError(
            f"the tree drafts the top {k} tokens of each head, but the heads score {rows} tokens: "
            "pick a tree with a smaller top-k or heads with a larger draft vocabulary"
        )


def topk_token_ids(logits: torch.Tensor, k: int, token_map: torch.Tensor | None) -> torch.Tensor:
    """The k best rows of head logits (..., N), best first, as vocabulary ids (through a draft token_map).

    On CUDA (k <= 32) the fused Triton top-k (two kernels, ties to the lowest row), else torch.topk."""
    from fastmedusa.ops import topk_indices

    top = topk_indices(logits, k)
    return top if token_map is None else token_map[top]


class MedusaHeads(nn.Module):
    """The K Medusa heads, stored under FasterDecoding/Medusa's names (`medusa_head.{i}.{j}.linear.weight`,
    `medusa_head.{i}.{num_layers}.weight`) so heads move between the two projects.

    The base model's LM head is held as a plain reference, not a submodule: it belongs to the base
    model (its parameters are saved and sharded with it). The heads call the loss kernel with its
    weight inside their own forward, so under FSDP the weight has been gathered by then.

    With `config.draft_vocab_size` N, each head scores N tokens only: `token_map` (N,) lists their ids
    (sorted by id when counted by `fastmedusa.data.vocab`; any order of distinct ids works), a buffer
    saved with the weights; a per-head projection is (N, H), initialised from the LM head rows of those
    ids; a shared projection gathers those rows of the LM head once per call. `draft_index` (V,), the
    inverse map (not saved, rebuilt whenever the map is loaded), turns label ids into draft rows; labels
    outside the map are not scored by the heads' loss and count as misses in `topk_correct`.
    Without a draft vocabulary `token_map` is None and everything is full-vocabulary.
    """

    def __init__(
        self, config: MedusaConfig, lm_head: nn.Module, token_map: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        lm_weight = lm_head.weight
        vocab, hidden = lm_weight.shape  # only what the config leaves open: a stated size is checked below
        config.vocab_size = vocab if config.vocab_size is None else config.vocab_size
        config.hidden_size = hidden if config.hidden_size is None else config.hidden_size
        check_heads_fit_lm_head(config, lm_weight)
        config.__post_init__()  # vocab_size is known now: a draft vocabulary larger than it fails here
        self.config = config
        self.__dict__["base_lm_head"] = lm_head  # a reference, deliberately not registered
        factory = {"device": lm_weight.device, "dtype": lm_weight.dtype}
        self.register_buffer("token_map", None)
        self.register_buffer("draft_index", None, persistent=False)
        if config.draft_vocab_size is not None:
            if token_map is None:  # placeholder until a saved map is loaded (or for speed benchmarks)
                token_map = torch.arange(config.draft_vocab_size)
            self.set_token_map(token_map)
        elif token_map is not None:
            raise ValueError(
                "a token_map was given but config.draft_vocab_size is None: set draft_vocab_size"
            )
        self.medusa_head = nn.ModuleList()
        for _ in range(config.num_heads):
            layers: list[nn.Module] = [
                ResBlock(config.hidden_size).to(**factory) for _ in range(config.num_layers)
            ]
            if not config.shared_lm_head:
                proj = nn.Linear(config.hidden_size, config.head_vocab_size, bias=False, **factory)
                with torch.no_grad():
                    rows = (
                        lm_weight
                        if self.token_map is None
                        else lm_weight[self.token_map.to(lm_weight.device)]
                    )
                    proj.weight.copy_(rows)
                layers.append(proj)
            self.medusa_head.append(nn.Sequential(*layers))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    # -- draft vocabulary --------------------------------------------------------------
    def set_token_map(self, token_map: torch.Tensor) -> None:
        """Install a draft vocabulary's token map (checked) and its inverse. The projections are not
        re-gathered: pass the map to the constructor to initialise them from the LM head's rows."""
        if self.config.draft_vocab_size is None:
            raise ValueError(
                "these heads score the full vocabulary (draft_vocab_size is None): a token map applies only to "
                "heads built with MedusaConfig(draft_vocab_size=N) and N projection rows"
            )
        token_map = check_token_map(token_map, self.config.vocab_size, self.config.draft_vocab_size)
        device = self.token_map.device if self.token_map is not None else self.base_lm_head.weight.device
        self.token_map = token_map.to(device)
        self.draft_index = inverse_token_map(self.token_map, self.config.vocab_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the saved map replaces ours (checked), and the inverse follows it: also under DCP loads
        key = prefix + "token_map"
        if key in state_dict and self.token_map is not None:
            check_token_map(state_dict[key], self.config.vocab_size, self.config.draft_vocab_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict and self.token_map is not None:
            self.draft_index = inverse_token_map(self.token_map, self.config.vocab_size)

    def head_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the heads' loss scores: draft rows under a draft vocabulary, else the labels."""
        if self.draft_index is None:
            return labels
        return draft_labels(labels, self.draft_index.to(labels.device))

    def outside_draft_count(self, labels: torch.Tensor) -> tuple[int, int]:
        """(labelled positions whose token is outside the draft vocabulary, labelled positions)."""
        labelled = labels != IGNORE_INDEX
        if self.draft_index is None:
            return 0, int(labelled.sum())
        outside = labelled & (self.head_labels(labels) == IGNORE_INDEX)
        return int(outside.sum()), int(labelled.sum())

    @torch.no_grad()
    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Each head's k best tokens as vocabulary ids, best first: (K, ..., k) int64.

        What decoding drafts: the top-k of the (draft-sized) head logits, mapped back through token_map."""
        check_draft_k(k, self.config.head_vocab_size)
        return topk_token_ids(self.head_logits(hidden), k, self.token_map)

    def head_hidden_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each head's ResBlock tower applied to `hidden` (..., H): K tensors (..., H)."""
        towers = []
        for head in self.medusa_head:
            x = hidden
            for block in head[: self.config.num_layers]:
                x = block(x)
            towers.append(x)
        return towers

    def projection_weights(self) -> list[torch.Tensor]:
        """Each head's (N, H) vocabulary projection (N = draft or full vocabulary). Shared: the base LM
        head's weight, or under a draft vocabulary its token_map rows, gathered once for all heads."""
        if self.config.shared_lm_head:
            weight = self.base_lm_head.weight
            if self.token_map is not None:
                weight = weight.index_select(0, self.token_map.to(weight.device))  # (N, H), one gather
            return [weight] * self.num_heads
        return [head[self.config.num_layers].weight for head in self.medusa_head]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every head, (K, ..., N) over the heads' vocabulary (draft rows under a draft vocabulary:
        `draft_topk` maps them to token ids). For decoding (few positions), never for training."""
        weights, towers = self.projection_weights(), self.head_hidden_states(hidden)
        if self.config.shared_lm_head:  # one matrix for every head: one GEMM over the stacked towers reads it once
            return F.linear(torch.stack(towers), weights[0])
        return torch.stack([F.linear(h, w) for h, w in zip(towers, weights)])

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        with_lm_loss: bool = False,
        impl: str = "auto",
        loss: str = "ce",
        lm_teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunk_rows: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each head's mean loss, without materialising tokens x vocab logits.

        hidden (B, T, H) from the backbone, labels (B, T) token-aligned (-100 = ignored). loss "ce": head k
        learns the label at t+k+1; "kl": head k learns the base model's distribution for that token
        (`kl_divergence`). Returns (lm_loss or None, head_losses (K,)). Under a draft vocabulary the heads'
        CE scores draft rows (labels outside it are not scored). The LM loss (stage 2) is over the full
        vocabulary: the base LM head's cross-entropy on the labels, or with `lm_teacher` = (hidden states
        (B, T, H), LM head weight (V, H)) of a frozen reference model, KL(reference || model) for each
        labelled next token (`lm_distillation_loss`). `chunk_rows`: rows of logits per chunk of the fused
        losses (None: automatic; fewer rows, less memory).
        """
        from fastmedusa.ops import linear_cross_entropy, medusa_cross_entropy

        if loss not in HEAD_LOSSES:
            raise ValueError(
                f"loss={loss!r} is not one of {HEAD_LOSSES}: pass ce (labels) or kl (the base model)"
            )
        towers = self.head_hidden_states(hidden)
        if loss == "kl":
            losses = self.kl_divergence(hidden, labels, impl=impl, towers=towers, chunk_rows=chunk_rows)
        else:
            losses = medusa_cross_entropy(
                towers,
                self.projection_weights(),
                self.head_labels(labels),
                shifts=head_shifts(self.num_heads),
                impl=impl,
                chunk_rows=chunk_rows,
            )
        if not with_lm_loss:
            return None, losses
        if lm_teacher is not None:
            lm_loss = self.lm_distillation_loss(hidden, labels, *lm_teacher, impl=impl, chunk_rows=chunk_rows)
        else:
            lm_loss = linear_cross_entropy(
                hidden, self.base_lm_head.weight, labels, shift=1, impl=impl, chunk_rows=chunk_rows
            )
        return lm_loss.clone(), losses  # a clone: FSDP2 cannot track a view returned by a sharded module

    def lm_distillation_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        *,
        impl: str = "auto",
        chunk_rows: int | None = None,
    ) -> torch.Tensor:
        """Mean KL(reference || model) of the next-token distribution at each position whose next label is
        scored: the Medusa paper's LM loss for stage 2 on self-distilled data. The model's LM head at t
        (`hidden`, gradients reach it and the backbone) against a frozen reference model's at t
        (`teacher_hidden`, `teacher_weight`, no gradient): it keeps the whole distribution where the
        original model had it, where cross-entropy on sampled answers only pulls toward one token."""
        from fastmedusa.ops import medusa_kl_divergence

        return medusa_kl_divergence(
            [hidden], [self.base_lm_head.weight], teacher_hidden.detach(), teacher_weight.detach(), labels,
            shifts=[1], impl=impl, chunk_rows=chunk_rows,
        )[0]  # fmt: skip

    def kl_divergence(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        impl: str = "auto",
        towers: list[torch.Tensor] | None = None,
        chunk_rows: int | None = None,
    ) -> torch.Tensor:
        """Per-head mean KL(base model || head) at each head's labelled positions: (K,).

        The teacher is the base LM head on the same hidden states, both detached: head k at t is compared
        with softmax(lm_head(hidden[t+k])), the base model's distribution for token t+k+1. In stage 1 the
        backbone is frozen, so this is exactly the base model. In stage 2 the backbone trains too and the
        teacher is its current (detached) state: a frozen copy would double the backbone's memory and its
        forward time, and the LM cross-entropy keeps the base model close to what it was. Detaching keeps
        the KL from pulling the backbone toward the heads. Under a draft vocabulary the teacher is the
        base model's distribution renormalised over the draft tokens (the LM head's token_map rows): the
        heads cannot put mass outside them. `towers`: the heads' hidden states when already computed.
        """
        from fastmedusa.ops import medusa_kl_divergence

        towers = self.head_hidden_states(hidden) if towers is None else towers
        teacher = self.base_lm_head.weight.detach()
        if self.token_map is not None:
            teacher = teacher.index_select(0, self.token_map.to(teacher.device))  # (N, H), one gather
        return medusa_kl_divergence(
            towers,
            self.projection_weights(),
            hidden.detach(),
            teacher,
            labels,
            shifts=head_shifts(self.num_heads),
            impl=impl,
            chunk_rows=chunk_rows,
        )

    @torch.no_grad()
    def topk_correct(
        self, hidden: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head top-k hits, computed chunk by chunk: (K, len(ks)) hits and (K,) scored positions.

        Under a draft vocabulary a labelled position whose token is outside it is scored and is a miss."""
        from fastmedusa.ops import topk_correct

        hits, counts = [], []
        shifts = head_shifts(self.num_heads)
        mapped = self.head_labels(labels)
        for h, w, s in zip(self.head_hidden_states(hidden), self.projection_weights(), shifts):
            c, _ = topk_correct(h, w, mapped, shift=s, ks=tuple(ks))
            hits.append(torch.as_tensor(c, device="cpu"))
            counts.append(int((labels[..., s:] != IGNORE_INDEX).sum()))
        return torch.stack(hits), torch.tensor(counts)
