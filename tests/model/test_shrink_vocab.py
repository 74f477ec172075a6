"""Full-vocabulary heads cut to a draft vocabulary after training: the kept rows score exactly what the full
heads scored for those tokens (float64, checked against the heads' weights by hand), drafts never leave the map,
greedy decoding stays lossless, the result loads as ordinary draft-vocabulary heads, and bad input is refused."""

import json

import pytest
import torch

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.draft_vocab import restrict_heads
from fastmedusa.model.export import export_heads, read_heads

VOCAB, HIDDEN = 256, 32


def _full_model(make_llama, shared: bool = False, num_layers: int = 1, dtype=torch.float64) -> MedusaModel:
    config = MedusaConfig(num_heads=3, num_layers=num_layers, shared_lm_head=shared)
    model = MedusaModel.from_base(make_llama(vocab_size=VOCAB).to(dtype), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _shuffled_map(size: int, seed: int = 0) -> torch.Tensor:
    """Distinct ids in a shuffled order: nothing may assume the map is sorted."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:size]


def _reference_logits(state: dict, hidden: torch.Tensor, num_heads: int, num_layers: int) -> torch.Tensor:
    """(K, R, V) float64 head logits from the checkpoint's tensors, written out: x + SiLU(W x + b), then P x."""
    out = []
    for k in range(num_heads):
        x = hidden.double()
        for j in range(num_layers):
            w, b = state[f"{k}.{j}.linear.weight"].double(), state[f"{k}.{j}.linear.bias"].double()
            z = x @ w.T + b
            x = x + z * torch.sigmoid(z)
        out.append(x @ state[f"{k}.{num_layers}.weight"].double().T)
    return torch.stack(out)


def _saved(model: MedusaModel, path) -> object:
    model.save_heads(path)
    return read_heads(path)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_kept_rows_score_what_the_full_heads_scored(make_llama, tmp_path, shared, num_layers):
    model = _full_model(make_llama, shared=shared, num_layers=num_layers)
    full = _saved(model, tmp_path / "full")
    token_map = _shuffled_map(37)
    small = restrict_heads(full, token_map)
    assert small.config.draft_vocab_size == 37 and small.config.shared_lm_head == shared
    assert torch.equal(small.token_map, token_map)
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = _reference_logits(full.state, hidden, 3, num_layers)[..., token_map]
    loaded = MedusaModel.from_base(make_llama(vocab_size=VOCAB).to(torch.float64), small.config)
    export_heads(tmp_path / "full", tmp_path / "small", token_map=token_map)
    loaded.load_heads(tmp_path / "small")
    torch.testing.assert_close(loaded.medusa_heads.head_logits(hidden), expected, rtol=1e-12, atol=1e-12)
    # drafts: the best kept tokens, as ids of the full vocabulary
    masked = torch.full((3, 5, VOCAB), float("-inf"), dtype=torch.float64)
    masked[..., token_map] = _reference_logits(full.state, hidden, 3, num_layers)[..., token_map]
    assert torch.equal(loaded.medusa_heads.draft_topk(hidden, 10), masked.topk(10, dim=-1).indices)


def test_full_heads_are_left_as_they_were(make_llama, tmp_path):
    full = _saved(_full_model(make_llama), tmp_path / "full")
    before = {k: v.clone() for k, v in full.state.items()}
    restrict_heads(full, _shuffled_map(20))
    assert full.token_map is None and full.config.draft_vocab_size is None
    assert all(torch.equal(before[k], full.state[k]) for k in before)


def test_greedy_decoding_with_shrunk_heads_equals_plain_greedy(make_llama, tmp_path):
    """Lossless decoding with shrunk heads, and the decode engine's stacked drafter proposes the best kept tokens
    as vocabulary ids (checked against the heads' weights by hand)."""
    from fastmedusa.decode import generate
    from fastmedusa.decode.packed_heads import PackedHeads

    model = _full_model(make_llama, dtype=torch.float32)
    full = _saved(model, tmp_path / "full")
    token_map = _shuffled_map(24, seed=3)
    export_heads(tmp_path / "full", tmp_path / "small", token_map=token_map)
    small = MedusaModel.from_base(model.base, MedusaConfig.from_pretrained(tmp_path / "small"))
    small.load_heads(tmp_path / "small")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for row in ids:
            plain = generate(model, row[None], max_new_tokens=24, medusa=False)
            medusa = generate(small, row[None], max_new_tokens=24)
            assert torch.equal(medusa.sequences, plain.sequences)
        hidden = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(6))
        drafted = PackedHeads(small.medusa_heads).draft_topk(hidden, 5)
    masked = torch.full((3, 4, VOCAB), float("-inf"), dtype=torch.float64)
    masked[..., token_map] = _reference_logits(full.state, hidden, 3, 1)[..., token_map]
    assert torch.equal(drafted, masked.topk(5, dim=-1).indices)


def test_the_export_drops_what_was_measured_on_all_rows(make_llama, tmp_path):
    """tree.json and eval.json describe the full heads: a shrunk copy must not inherit them."""
    from fastmedusa.decode.accuracy import write_tree_json

    model = _full_model(make_llama, dtype=torch.float32)
    model.save_heads(tmp_path / "full")
    write_tree_json(tmp_path / "full", torch.full((3, 10), 0.05), torch.full((3,), 100), 8)
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "full" / "eval.json").write_text(json.dumps({"labels": {"top1": [0.5]}}))
    export_heads(tmp_path / "full", tmp_path / "small", token_map=_shuffled_map(30))
    names = {p.name for p in (tmp_path / "small").iterdir()}
    assert "tree.json" not in names and "eval.json" not in names and "notes.txt" in names
    export_heads(tmp_path / "full", tmp_path / "copy")  # a plain export still carries the tree
    assert (tmp_path / "copy" / "tree.json").is_file()


def test_bad_shrinks_are_clear_errors(make_llama, tmp_path):
    full = _saved(_full_model(make_llama), tmp_path / "full")
    with pytest.raises(ValueError, match="not smaller than the heads' 256"):
        restrict_heads(full, torch.randperm(VOCAB))
    with pytest.raises(ValueError, match="draft_vocab_size=5: pass an integer >= 10"):
        restrict_heads(full, torch.arange(5))
    with pytest.raises(ValueError, match="lists id 3 more than once"):
        restrict_heads(full, torch.tensor([3, 3, *range(10, 30)]))
    with pytest.raises(ValueError, match=f"id {VOCAB}, outside the vocabulary"):
        restrict_heads(full, torch.tensor([*range(20), VOCAB]))
    small = restrict_heads(full, _shuffled_map(40))
    with pytest.raises(ValueError, match="already project onto a draft vocabulary of 40 tokens"):
        restrict_heads(small, torch.arange(20))
