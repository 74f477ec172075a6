"""The default tree shrinks with the batch: a verify pass holds at most VERIFY_TOKEN_BUDGET tokens."""

import pytest
import torch
from conftest import VOCAB, random_medusa, tiny_llama

from fastmedusa.decode import build_tree, generate, resolve_tree, write_tree_json
from fastmedusa.decode.trees import (
    MC_SIM_7B_63,
    PRESETS,
    VERIFY_TOKEN_BUDGET,
    default_tree_nodes,
    leading_subtree,
    validate_paths,
)

ACC = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]


def test_default_tree_nodes_fill_whole_tiles_within_the_budget():
    expected = {1: 255, 2: 127, 4: 63, 5: 31, 16: 15, 17: 7, 64: 3, 128: 1, 129: 0, 1000: 0}
    assert {b: default_tree_nodes(b) for b in expected} == expected
    for b in range(1, 300):
        n = default_tree_nodes(b)
        assert b * (n + 1) <= VERIFY_TOKEN_BUDGET or n == 0
        assert n == 0 or (n + 1) & n == 0  # 2^k - 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        default_tree_nodes(0)


def test_leading_subtree():
    for n in (7, 15, 31):
        assert leading_subtree(MC_SIM_7B_63, n) == PRESETS[f"mc_sim_7b_{n}"]
    # a child listed before its parent waits for it: the result is always a tree
    assert leading_subtree([[0, 0], [0], [1], [0, 0], [1, 0]], 3) == [[0], [1], [0, 0]]
    assert leading_subtree([[1, 1], [0]], 5) == [[0]]


def test_resolve_default_by_batch(tmp_path):
    # no tree.json: mc_sim_7b_63 pruned to the heads, then its leading nodes
    assert resolve_tree(None, 4, batch_size=16) == validate_paths(PRESETS["mc_sim_7b_15"], 4)
    assert resolve_tree(None, 4, batch_size=2) == validate_paths(MC_SIM_7B_63, 4)
    assert resolve_tree(None, 4, batch_size=200) == []
    # a measured tree.json: its best tree of that size
    write_tree_json(tmp_path, ACC, num_nodes=40)
    from fastmedusa.decode import read_tree_json

    info = read_tree_json(tmp_path, 3)
    assert resolve_tree(None, 3, info, batch_size=16) == validate_paths(build_tree(ACC, 15), 3)
    assert resolve_tree(None, 3, info, batch_size=1) == validate_paths(build_tree(ACC, 40), 3)
    # explicit trees are used as given, whatever the batch
    assert len(resolve_tree("mc_sim_7b_31", 3, info, batch_size=64)) == 31
    assert len(resolve_tree("auto:20", 3, info, batch_size=64)) == 20


def test_generate_default_tree_at_batch_sizes():
    model = random_medusa(tiny_llama(2), num_heads=3)
    g = torch.Generator().manual_seed(3)
    for batch, nodes in ((16, 16), (64, 4), (130, 0)):
        ids = torch.randint(0, VOCAB, (batch, 5), generator=g)
        mask = torch.ones_like(ids)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=6)
        plain = generate(model, ids, attention_mask=mask, max_new_tokens=6, medusa=False)
        assert out.tree_nodes == nodes  # with the root; 0: plain decoding
        assert torch.equal(out.sequences, plain.sequences)
    explicit = generate(model, ids[:16], attention_mask=mask[:16], max_new_tokens=6, tree="mc_sim_7b_31")
    assert explicit.tree_nodes == 32
