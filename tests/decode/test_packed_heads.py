"""Decode-time heads stacked by head (`PackedHeads`): the same logits and drafts as `MedusaHeads` for every
head layout, refreshed when the heads' weights change, and used by `generate`."""

import pytest
import torch
from conftest import random_medusa, tiny_llama

import fastmedusa.decode.packed_heads as packing
from fastmedusa.decode import generate
from fastmedusa.decode.packed_heads import PackedHeads, packed_heads
from fastmedusa.model import MedusaConfig, MedusaModel

VOCAB, DRAFT = 97, 30


def _heads(shared: bool, draft: bool, num_layers: int, num_heads: int = 4) -> MedusaModel:
    config = MedusaConfig(
        num_heads=num_heads,
        num_layers=num_layers,
        shared_lm_head=shared,
        draft_vocab_size=DRAFT if draft else None,
    )
    token_map = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))[:DRAFT] if draft else None
    model = MedusaModel.from_base(tiny_llama(3), config, token_map)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _explicit_logits(heads, hidden: torch.Tensor, depth: int) -> torch.Tensor:
    """Head by head, written out: x <- x + silu(x W^T + b) per ResBlock, then x times the head's rows (its own
    projection, or the LM head's rows of the draft tokens)."""
    lm = heads.base_lm_head.weight
    out = []
    for head in heads.medusa_head[:depth]:
        x = hidden
        for block in list(head)[: heads.config.num_layers]:
            x = x + torch.nn.functional.silu(x @ block.linear.weight.T + block.linear.bias)
        if heads.config.shared_lm_head:
            rows = lm if heads.token_map is None else lm[heads.token_map]
        else:
            rows = head[heads.config.num_layers].weight
        out.append(x @ rows.T)
    return torch.stack(out)


@pytest.mark.parametrize("shared", [False, True], ids=["own-projections", "shared-lm-head"])
@pytest.mark.parametrize("draft", [False, True], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_packed_equals_heads(shared, draft, num_layers):
    heads = _heads(shared, draft, num_layers).medusa_heads
    hidden = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    packed = PackedHeads(heads)
    for depth in (1, 3, 4):
        logits = packed.depth_view(depth).head_logits(hidden)
        assert logits.shape == (depth, 3, 5, DRAFT if draft else VOCAB)
        torch.testing.assert_close(logits, _explicit_logits(heads, hidden, depth), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, heads.head_logits(hidden)[:depth], rtol=1e-5, atol=1e-5)
        assert torch.equal(
            packed.depth_view(depth).draft_topk(hidden, 3), heads.draft_topk(hidden, 3)[:depth]
        )
    expected = {
        (False, False): "stacked",
        (False, True): "stacked",
        (True, False): "shared",
        (True, True): "shared_rows",
    }
    assert packed.layout == expected[(shared, draft)]


def test_large_projections_stay_per_head(monkeypatch):
    monkeypatch.setattr(packing, "PACK_MAX_BYTES", 1024)
    heads = _heads(False, False, 1).medusa_heads
    packed = PackedHeads(heads)
    assert packed.layout == "per_head" and packed.projection.numel() == 0
    hidden = torch.randn(2, 64)
    torch.testing.assert_close(packed.head_logits(hidden), heads.head_logits(hidden), rtol=1e-5, atol=1e-5)


def _set_all(heads, value_of) -> None:
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(value_of(p))


@pytest.mark.parametrize(
    "update",
    ["in-place", "data", "fused-adamw", "load_state_dict"],
)
def test_every_call_drafts_with_the_current_weights(update):
    """However the heads change (fused optimizers and `.data` writes leave version counters alone), the next
    call's stacks hold the new weights, at the same addresses (captured graphs keep reading them)."""
    model = _heads(False, True, 1)
    heads = model.medusa_heads
    cache: dict = {}
    drafter = packed_heads(cache, heads, 4)
    addresses = [t.data_ptr() for t in drafter.static_tensors()]
    hidden = torch.randn(2, 64)
    before = drafter.head_logits(hidden)
    if update == "in-place":
        _set_all(heads, lambda p: p * -1.5)
    elif update == "data":
        for p in heads.parameters():
            p.data.mul_(-1.5)
    elif update == "fused-adamw":
        opt = torch.optim.AdamW(heads.parameters(), lr=0.1, fused=True)
        for p in heads.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    else:
        heads.load_state_dict(
            {k: v * -1.5 for k, v in heads.state_dict().items() if k != "token_map"}, strict=False
        )
    assert torch.allclose(drafter.head_logits(hidden), before)  # between calls the stacks are the old weights
    again = packed_heads(cache, heads, 4)
    assert again is drafter and [t.data_ptr() for t in again.static_tensors()] == addresses
    after = again.head_logits(hidden)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, heads.head_logits(hidden), rtol=1e-5, atol=1e-5)


def test_one_copy_per_heads_whatever_the_depth():
    heads = _heads(False, False, 1).medusa_heads
    cache: dict = {}
    views = [packed_heads(cache, heads, d) for d in (1, 2, 4, 2)]
    assert len([k for k in cache if k[0] == "packed_heads"]) == 1
    assert views[1] is views[3] and views[0].packed is views[2].packed
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(
        views[1].head_logits(hidden), heads.head_logits(hidden)[:2], rtol=1e-5, atol=1e-5
    )


def test_heads_made_under_inference_mode():
    with torch.inference_mode():
        model = _heads(False, False, 1)
        drafter = packed_heads({}, model.medusa_heads, 3)
        hidden = torch.randn(2, 64)
        torch.testing.assert_close(drafter.head_logits(hidden), model.medusa_heads.head_logits(hidden)[:3])


def test_heads_moved_alone_fail_clearly():
    heads = _heads(False, False, 1).medusa_heads
    cache: dict = {}
    packed_heads(cache, heads, 2)
    heads.double()
    with pytest.raises(
        ValueError, match="heads are now torch.float64 .* move the heads and the base model together"
    ):
        packed_heads(cache, heads, 2)


def test_other_head_modules_are_used_as_they_are():
    class Drafter(torch.nn.Module):
        num_heads = 2

        def draft_topk(self, hidden, k):
            return torch.zeros(2, *hidden.shape[:-1], k, dtype=torch.long)

    drafter = Drafter()
    assert packed_heads({}, drafter, 2) is drafter


def test_generate_sees_new_head_weights():
    """The engine keeps packed copies between calls: after the heads change, generate drafts with the new
    weights (the accepted lengths of a model built with those heads from the start), still lossless."""
    base = tiny_llama(3)
    model = random_medusa(base, num_heads=3, seed=1)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = generate(model, ids, max_new_tokens=24, medusa=False)
    first = generate(model, ids, max_new_tokens=24, tree="mc_sim_7b_31")
    other = random_medusa(tiny_llama(3), num_heads=3, seed=9)
    with torch.no_grad():
        for p, q in zip(model.medusa_heads.parameters(), other.medusa_heads.parameters()):
            p.copy_(q)
    second = generate(model, ids, max_new_tokens=24, tree="mc_sim_7b_31")
    reference = generate(other, ids, max_new_tokens=24, tree="mc_sim_7b_31")
    assert torch.equal(first.sequences, plain.sequences) and torch.equal(second.sequences, plain.sequences)
    assert second.accept_lengths == reference.accept_lengths
    assert first.accept_lengths != second.accept_lengths
