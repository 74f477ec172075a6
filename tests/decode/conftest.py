"""Tiny random Llama-family models and Medusa head stand-ins for the decode tests (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmedusa.model import MedusaConfig, MedusaModel

VOCAB = 97


def tiny_llama(seed: int = 0, *, kind: str = "llama", tie: bool = False, **overrides) -> nn.Module:
    """A 2-layer GQA model with a wide init, so logits are spread out and greedy has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        tie_word_embeddings=tie,
    )
    shape.update(overrides)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))  # q/k/v carry biases
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)  # HF zero-inits them; random biases test that they are used
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return model.eval()


def random_medusa(hf_model: nn.Module, num_heads: int = 3, seed: int = 1) -> MedusaModel:
    """MedusaModel with every head parameter random (not the zero/copied init)."""
    model = MedusaModel.from_base(hf_model, MedusaConfig(num_heads=num_heads, num_layers=1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def hf_greedy(hf_model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """HF generate, greedy, exactly max_new_tokens new tokens."""
    return hf_model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )


class OracleHeads(nn.Module):
    """Heads that know the base model's greedy continuation and are right with set probabilities.

    The position is recovered from the hidden state (nearest hidden state of the reference sequence);
    head k's right token (the one at t+k+2) is put at rank 0 with probability p_top1, at rank 1 with
    p_top2, else out of the top-10. Seeded per (position, head), so repeated calls agree. This drives
    long accepted paths through the decoder, which random heads almost never do.
    """

    def __init__(
        self, hf_model: nn.Module, sequence: torch.Tensor, num_heads: int = 4, p_top1=0.7, p_top2=0.2
    ):
        super().__init__()
        self.num_heads = num_heads
        self.sequence = sequence.reshape(-1)
        with torch.no_grad():
            out = hf_model.get_decoder()(input_ids=self.sequence[None])
        self.reference = out.last_hidden_state[0]  # (L, H)
        self.vocab = hf_model.config.vocab_size
        self.p = (p_top1, p_top2)

    def _logits(self, position: int, head: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * position + head)
        logits = torch.randn(self.vocab, generator=gen)
        target_at = position + head + 2
        if target_at >= self.sequence.numel():
            return logits
        target = int(self.sequence[target_at])
        u = torch.rand((), generator=gen).item()
        top = logits.max()
        if u < self.p[0]:
            logits[target] = top + 2.0
        elif u < self.p[0] + self.p[1]:
            decoy = (target + 1 + int(torch.randint(self.vocab - 1, (), generator=gen))) % self.vocab
            logits[decoy], logits[target] = top + 2.0, top + 1.0
        else:
            logits[target] = logits.min() - 1.0
        return logits

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        positions = torch.cdist(flat, self.reference.float()).argmin(-1)
        out = torch.stack(
            [torch.stack([self._logits(int(t), k) for t in positions]) for k in range(self.num_heads)]
        )
        return out.reshape(self.num_heads, *hidden.shape[:-1], self.vocab)

    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        return self.head_logits(hidden).topk(k, dim=-1).indices  # full-vocabulary heads: rows are token ids


class BatchOracleHeads(nn.Module):
    """Oracle heads for several prompts at once: each hidden state goes to the oracle of the prompt whose
    reference sequence holds its nearest hidden state."""

    def __init__(self, oracles: list[OracleHeads]):
        super().__init__()
        self.oracles = oracles
        self.num_heads = oracles[0].num_heads

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        dist = torch.stack([torch.cdist(flat, o.reference.float()).min(-1).values for o in self.oracles])
        owner = dist.argmin(0)  # (M,)
        out = torch.stack(
            [self.oracles[int(i)].head_logits(h[None])[:, 0] for i, h in zip(owner, flat)], dim=1
        )
        return out.reshape(self.num_heads, *hidden.shape[:-1], out.shape[-1])

    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        return self.head_logits(hidden).topk(k, dim=-1).indices


class Wrapped(nn.Module):
    """A MedusaModel-like pair (base + given heads) for the head-accuracy measurement."""

    def __init__(self, base: nn.Module, heads: nn.Module):
        super().__init__()
        self.base, self.medusa_heads = base, heads

    def backbone_hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_decoder()(input_ids=ids).last_hidden_state


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest): each (1, P) prompt right-aligned after pad_id padding."""
    width = max(p.shape[-1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[-1] :] = p.reshape(-1)
        mask[row, width - p.shape[-1] :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama(0)
