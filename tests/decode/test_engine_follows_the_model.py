"""The engine `generate` keeps on a model decodes the model as it is now: after weight changes that no version
counter sees, and whether calls run inside `torch.inference_mode()` or not (fp32, against HF greedy)."""

import pytest
import torch
from conftest import VOCAB, hf_greedy, random_medusa, tiny_llama

from fastmedusa.decode import generate, generate_many

IDS = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
NEW = 12


def _new_tokens(model, **kwargs) -> list[int]:
    return generate(model, IDS, max_new_tokens=NEW, **kwargs).new_token_ids.tolist()


def _hf_new_tokens(hf) -> list[int]:
    return hf_greedy(hf, IDS, NEW)[0, IDS.shape[1] :].tolist()


def _fused_adamw_step(model) -> None:
    """One stage-2 step of AdamW(fused=True), the trainer's optimizer on CUDA: it writes the weights without
    counting a version."""
    model.set_stage(2)
    weight = model.base.model.layers[0].self_attn.q_proj.weight
    version = weight._version
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    model.eval()
    assert weight._version == version  # the case this file is about


def _write_through_data(model) -> None:
    for p in model.base.parameters():
        p.data.mul_(1.5)


def _biases_through_data(model) -> None:
    for layer in model.base.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.add_(0.5)


@pytest.mark.parametrize(
    ("kind", "change"),
    [("llama", _fused_adamw_step), ("llama", _write_through_data), ("qwen2", _fused_adamw_step),
     ("qwen2", _biases_through_data)],  # fmt: skip
)
def test_weights_changed_without_a_version_count_are_decoded(kind, change):
    """Qwen2's q/k/v biases are fused like the weights (fused optimizers change them too)."""
    model = random_medusa(tiny_llama(0, kind=kind), num_heads=3)
    before = _hf_new_tokens(model.base)
    assert _new_tokens(model) == before  # builds and keeps the engine
    change(model)
    expected = _hf_new_tokens(model.base)
    assert expected != before  # else a stale engine would pass too
    assert _new_tokens(model) == expected
    assert _new_tokens(model, medusa=False) == expected


def test_a_first_call_inside_inference_mode_leaves_later_calls_working():
    model = random_medusa(tiny_llama(0), num_heads=3)
    expected = _hf_new_tokens(model.base)
    with torch.inference_mode():
        assert _new_tokens(model) == expected
    assert _new_tokens(model) == expected
    assert _new_tokens(model, medusa=False) == expected
    with torch.inference_mode():
        assert _new_tokens(model, medusa=False) == expected


def test_generate_many_after_a_first_call_inside_inference_mode():
    model = random_medusa(tiny_llama(0), num_heads=3)
    expected = _hf_new_tokens(model.base)
    with torch.inference_mode():
        out = generate_many(model, [IDS[0]], NEW)
    assert out.new_token_ids[0].tolist() == expected
    assert generate_many(model, [IDS[0]], NEW).new_token_ids[0].tolist() == expected
    assert _new_tokens(model) == expected


def test_parametrized_weights_are_refused():
    """A parametrized weight is computed at each access: the engine would decode the values it read first."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    model = random_medusa(tiny_llama(0), num_heads=3)
    parametrize.register_parametrization(model.base.model.layers[1].mlp.up_proj, "weight", Scale())
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj has parametrized weights, .*remove_parametrizations"):
        _new_tokens(model)


def test_a_model_of_inference_tensors_decodes():
    with torch.inference_mode():
        model = random_medusa(tiny_llama(0), num_heads=3)
    expected = _hf_new_tokens(model.base)
    assert _new_tokens(model) == expected
    with torch.inference_mode():
        assert _new_tokens(model) == expected
