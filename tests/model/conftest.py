"""A tiny random Llama for the model tests: real HF code paths in milliseconds."""

from pathlib import Path

import pytest
import torch


def make_tiny_llama(vocab_size: int = 256, tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def make_llama():
    """The builder itself, for tests that need several models or other shapes."""
    return make_tiny_llama


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


class _RunsCode:
    """Unpickling this would call os.system: a weights-only load must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def code_pickle(tmp_path):
    """(an object whose unpickling runs a command, the file that command would create)."""
    marker = tmp_path / "code_ran"
    return _RunsCode(marker), marker
