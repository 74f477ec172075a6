"""`MedusaConfig` sizes, `from_base` leaving the caller's config alone, and draft-vocabulary labels checked."""

import pytest
import torch

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.heads import draft_labels, inverse_token_map


def test_a_stated_size_that_is_not_the_models_is_refused_not_overwritten(make_llama):
    with pytest.raises(ValueError, match=r"heads config \(vocab 256, hidden 99\) does not match the base model"):
        MedusaModel.from_base(make_llama(), MedusaConfig(num_heads=2, hidden_size=99))
    for field, value in (("hidden_size", -3), ("vocab_size", 0)):
        with pytest.raises(ValueError, match=f"{field}={value}: pass a positive size"):
            MedusaConfig(**{field: value})


def test_one_config_serves_two_base_models(make_llama):
    config = MedusaConfig(num_heads=2)
    small = MedusaModel.from_base(make_llama(vocab_size=256), config)
    large = MedusaModel.from_base(make_llama(vocab_size=300), config)
    assert config.vocab_size is None and config.hidden_size is None  # the caller's config is not filled in
    assert (small.medusa_config.vocab_size, large.medusa_config.vocab_size) == (256, 300)


@pytest.mark.parametrize("bad", [-7, 256, 1000])
def test_draft_labels_refuse_ids_outside_the_vocabulary(bad):
    index = inverse_token_map(torch.arange(40), 256)
    labels = torch.tensor([[3, 50, -100, bad]])
    with pytest.raises(ValueError, match=f"label {bad} is outside \\[0, 256\\) and is not ignore_index"):
        draft_labels(labels, index)
    assert draft_labels(labels[:, :3], index).tolist() == [[3, -100, -100]]  # 50: outside the map, not scored
