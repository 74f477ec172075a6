"""The Python API's bad input: each call below fails at once with one error naming the argument and the fix,
never a traceback from inside torch, a silently cut float, or a tree that accepts nothing."""

import pytest
import torch
from conftest import VOCAB, random_medusa, tiny_llama

from fastmedusa.decode import generate, generate_many

IDS = torch.tensor([[1, 5, 7, 9]])


@pytest.fixture(scope="module")
def model():
    return random_medusa(tiny_llama(0), num_heads=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": torch.tensor([[1, VOCAB]])}, ValueError, f"token id {VOCAB}, outside the model's vocabulary"),
        ({"input_ids": torch.tensor([[1, -3]])}, ValueError, "token id -3, outside the model's vocabulary"),
        ({"eos_token_id": "</s>"}, TypeError, r"eos_token_id='</s>' .*pass its id, e.g. tokenizer.eos_token_id"),
        ({"eos_token_id": 2.7}, TypeError, "eos_token_id=2.7 must be a token id"),
        ({"eos_token_id": [2, None]}, TypeError, "eos_token_id=.* must be a token id or a list"),
        ({"eos_token_id": 500}, ValueError, r"eos_token_id=500 is outside the model's vocabulary \[0, 97\)"),
        ({"pad_token_id": "x"}, TypeError, "pad_token_id='x': pass a token id"),
        ({"seed": 1.5}, TypeError, "seed=1.5 must be an int"),
        ({"temperature": "0.7"}, TypeError, r"temperature='0.7' \(--temperature\): pass a number"),
        ({"temperature": None}, TypeError, "temperature=None"),
        ({"temperature": 1.0, "typical_epsilon": -0.5}, ValueError, r"typical_epsilon=-0.5 .*pass a finite number"),
        ({"medusa": "no"}, TypeError, "medusa='no': pass True"),
        ({"tree": [0, 1]}, TypeError, "tree path 0 is not a list of ranks"),
        ({"tree": 5}, TypeError, "tree must be a list of paths"),
        ({"tree": [["a"]]}, TypeError, "holds something other than integer ranks"),
        ({"tree": [[0.7]]}, TypeError, "holds something other than integer ranks"),
        ({"tree": "/"}, IsADirectoryError, "tree / is a directory"),
        ({"attention_mask": [[1, 1, 1, 1]]}, TypeError, "attention_mask must be a tensor"),
        ({"attention_mask": torch.ones(2, 2)}, ValueError, r"attention_mask of shape \(2, 2\) does not match"),
        ({"heads": torch.nn.Linear(2, 2)}, TypeError, "heads must be Medusa heads"),
    ],
)
def test_generate_bad_arguments(model, kwargs, error, message):
    call = {"input_ids": IDS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        generate(model, **call)


def test_a_hub_id_as_the_model_says_how_to_load_it():
    with pytest.raises(TypeError, match="model must be a MedusaModel .*got str: load one with"):
        generate("HuggingFaceTB/SmolLM2-135M", IDS, max_new_tokens=4)


def test_heads_in_another_dtype_than_the_base_model():
    model = random_medusa(tiny_llama(3), num_heads=2)
    model.base.to(torch.float64)
    with pytest.raises(ValueError, match="the Medusa heads are float32 but the base model is float64"):
        generate(model, IDS, max_new_tokens=4)
    assert generate(model, IDS, max_new_tokens=4, medusa=False).sequences.shape == (1, 8)  # no heads used


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([1, 2, 3], r"prompts is one flat list of token ids: pass a list of prompts, e.g. \[\[1, 2, 3\]\]"),
        (torch.tensor([[1, 2], [3, 4]]), "prompts is one 2-D tensor: pass a list of 1-D prompts"),
        ([[1, 2], [3, VOCAB + 3]], f"token id {VOCAB + 3}, outside the model's vocabulary"),
    ],
)
def test_generate_many_bad_prompts(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate_many(model, prompts, 4)


def test_valid_kinds_still_pass(model):
    """Integer and number kinds a user may hold: tensors and numpy arrays of ids, 0-d tensors, numpy scalars,
    nested id lists (generation_config), thresholds above 1 (epsilon only caps the threshold)."""
    import numpy as np

    out = generate(model, IDS, max_new_tokens=4, eos_token_id=torch.tensor([3, 4]), seed=[7], temperature=0.5,
                   tree=[[torch.tensor(0)], [0, 0]])  # fmt: skip
    assert out.sequences.shape[0] == 1
    kinds = dict(eos_token_id=np.array([[3, 4]]), seed=np.array([7]), pad_token_id=torch.tensor(0),
                 temperature=torch.tensor(0.5), typical_epsilon=1.5, typical_delta=np.float64(2.0),
                 medusa=np.True_)  # fmt: skip
    again = generate(model, IDS, max_new_tokens=4, tree=[[0], [0, 0]], **kinds)
    assert torch.equal(again.sequences, generate(model, IDS, max_new_tokens=4, tree=[[0], [0, 0]], eos_token_id=[3, 4],
                                                 seed=[7], temperature=0.5, typical_epsilon=1.5,
                                                 typical_delta=2.0).sequences)  # fmt: skip


@pytest.mark.parametrize(("tree", "message"), [("auto:²", "node count after 'auto:'"), ("chain_²", "unknown tree")])
def test_tree_names_with_non_ascii_digits(model, tree, message):
    with pytest.raises(ValueError, match=message):
        generate(model, IDS, max_new_tokens=4, tree=tree)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-7])
def test_a_temperature_too_small_to_divide_by_is_refused(model, temperature):
    with pytest.raises(ValueError, match="too small to divide logits by .*pass 0 for greedy"):
        generate(model, IDS, max_new_tokens=4, temperature=temperature)


def test_the_heads_alone_or_another_module_as_the_model(model):
    with pytest.raises(TypeError, match="model is the Medusa heads alone: pass the MedusaModel"):
        generate(model.medusa_heads, IDS, max_new_tokens=4)
    with pytest.raises(TypeError, match="got a Linear without get_input_embeddings"):
        generate(torch.nn.Linear(2, 2), IDS, max_new_tokens=4)


def test_heads_on_another_device_than_the_base_model_at_their_first_call():
    model = random_medusa(tiny_llama(3), num_heads=2)
    model.medusa_heads.to("meta")  # the CPU-only stand-in for a second device
    with pytest.raises(ValueError, match="the Medusa heads are on meta but the base model is on cpu"):
        generate(model, IDS, max_new_tokens=4)


class _Drafts(torch.nn.Module):
    """Heads of another class than fastmedusa's: `draft_topk` returns whatever `make(batch, k)` builds."""

    def __init__(self, make, num_heads: object = 2) -> None:
        super().__init__()
        self.make, self.num_heads = make, num_heads

    def draft_topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        return self.make(hidden.shape[0], k)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda b, k: torch.zeros(1, b, k, dtype=torch.long), ValueError, r"returned shape \(1, 1, 10\); the tree needs"),
        (lambda b, k: torch.zeros(2, b, k + 1, dtype=torch.long), ValueError, r"returned shape \(2, 1, 11\)"),
        (lambda b, k: torch.zeros(2, b, k), TypeError, "returned torch.float32 values; it must return integer"),
        (lambda b, k: [[0] * k] * 2, TypeError, "returned a list; it must return a tensor"),
        (lambda b, k: torch.full((2, b, k), VOCAB), ValueError, f"token id {VOCAB}, outside the base model's"),
    ],
)
def test_other_heads_returning_the_wrong_drafts(model, make, error, message):
    with pytest.raises(error, match=message):
        generate(model.base, IDS, max_new_tokens=4, heads=_Drafts(make))
    with pytest.raises(error, match=message):
        generate_many(model.base, [IDS[0]], max_new_tokens=4, heads=_Drafts(make))


def test_other_heads_must_say_how_many_they_are(model):
    heads = _Drafts(lambda b, k: torch.zeros(2, b, k, dtype=torch.long), num_heads="2")
    with pytest.raises(TypeError, match="heads.num_heads is '2'"):
        generate(model.base, IDS, max_new_tokens=4, heads=heads)
    heads.num_heads = 0
    with pytest.raises(ValueError, match="heads.num_heads is 0: Medusa heads number 1 or more"):
        generate(model.base, IDS, max_new_tokens=4, heads=heads)
    good = _Drafts(lambda b, k: torch.zeros(2, b, k, dtype=torch.long))
    assert generate(model.base, IDS, max_new_tokens=4, heads=good).sequences.shape == (1, 8)
