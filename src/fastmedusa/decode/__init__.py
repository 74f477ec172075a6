"""Medusa tree decoding: trees, a static-KV-cache engine for Llama-family models, and the generation loop."""

from fastmedusa.decode.accuracy import (
    choose_tree_size,
    expected_by_heads,
    measure_heads_tree,
    measure_rank_accuracies,
    read_tree_json,
    write_tree_json,
)
from fastmedusa.decode.engine import DecodeEngine, get_engine
from fastmedusa.decode.generate import GenerationOutput, generate
from fastmedusa.decode.many import ManyOutput, generate_many
from fastmedusa.decode.trees import (
    MC_SIM_7B_63,
    PRESETS,
    TreeBuffers,
    build_tree,
    build_tree_buffers,
    chain_tree,
    expected_accept_length,
    load_tree,
    prune_tree,
    resolve_tree,
    save_tree,
)

__all__ = [
    "expected_by_heads",
    "MC_SIM_7B_63",
    "PRESETS",
    "DecodeEngine",
    "GenerationOutput",
    "ManyOutput",
    "TreeBuffers",
    "build_tree",
    "build_tree_buffers",
    "chain_tree",
    "choose_tree_size",
    "expected_accept_length",
    "generate",
    "generate_many",
    "get_engine",
    "load_tree",
    "measure_heads_tree",
    "measure_rank_accuracies",
    "prune_tree",
    "read_tree_json",
    "resolve_tree",
    "save_tree",
    "write_tree_json",
]
