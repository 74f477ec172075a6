import itertools
import math

import pytest
import torch

from fastmedusa.decode.trees import (
    MC_SIM_7B_63,
    PRESETS,
    build_tree,
    build_tree_buffers,
    chain_tree,
    expected_accept_length,
    load_tree,
    path_probability,
    prune_tree,
    resolve_tree,
    save_tree,
    validate_paths,
)

# root, then [0], [1], [0,0], [0,1], [1,0] in (depth, path) order: node ids 1..5
SMALL = [[1, 0], [0], [0, 1], [1], [0, 0]]


def test_small_tree_buffers():
    tb = build_tree_buffers(SMALL, num_heads=2)
    assert tb.paths == [(0,), (1,), (0, 0), (0, 1), (1, 0)]
    assert tb.num_nodes == 6 and tb.topk == 2 and tb.depth == 2
    expected_mask = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # root
            [1, 1, 0, 0, 0, 0],  # [0]
            [1, 0, 1, 0, 0, 0],  # [1]
            [1, 1, 0, 1, 0, 0],  # [0,0]
            [1, 1, 0, 0, 1, 0],  # [0,1]
            [1, 0, 1, 0, 0, 1],  # [1,0]
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tb.attention_mask, expected_mask)
    # flat candidates = [root, head1 top0, head1 top1, head2 top0, head2 top1]
    assert tb.tree_indices.tolist() == [0, 1, 2, 3, 4, 3]
    assert tb.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert tb.parents.tolist() == [0, 0, 0, 1, 1, 2]
    assert tb.retrieve_indices.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert tb.path_valid.all()


def test_padding_of_short_paths():
    tb = build_tree_buffers([[0], [1], [0, 0]])
    assert tb.retrieve_indices.tolist() == [[0, 2, 0], [0, 1, 3]]
    assert tb.path_valid.tolist() == [[True, True, False], [True, True, True]]


def test_mask_is_ancestry_for_mc_sim_7b_63():
    tb = build_tree_buffers(MC_SIM_7B_63, num_heads=4)
    assert tb.num_nodes == 64 and tb.depth == 4 and tb.topk == 10
    index = {p: i + 1 for i, p in enumerate(tb.paths)}
    for p, i in index.items():
        ancestors = {0, i} | {index[p[:d]] for d in range(1, len(p))}
        assert set(torch.nonzero(tb.attention_mask[i]).flatten().tolist()) == ancestors
    leaves = {p for p in tb.paths if not any(q[: len(p)] == p and len(q) > len(p) for q in tb.paths)}
    assert tb.retrieve_indices.shape[0] == len(leaves)


@pytest.mark.parametrize("n", range(1, len(MC_SIM_7B_63) + 1))
def test_every_leading_slice_of_mc_sim_is_a_tree(n):
    validate_paths(MC_SIM_7B_63[:n])


def test_validation_errors():
    with pytest.raises(ValueError, match="4 deep but the model has 3 Medusa heads"):
        build_tree_buffers(MC_SIM_7B_63, num_heads=3)
    with pytest.raises(ValueError, match="no parent"):
        validate_paths([[0], [1, 0]])
    with pytest.raises(ValueError, match="twice"):
        validate_paths([[0], [0]])
    with pytest.raises(ValueError, match="no paths"):
        validate_paths([])
    with pytest.raises(ValueError, match="negative"):
        validate_paths([[-1]])
    with pytest.raises(ValueError, match="unknown tree"):
        resolve_tree("no_such_tree", 4)


def test_bad_tree_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tree file .*missing.json: no such file"):
        resolve_tree(str(tmp_path / "missing.json"), 4)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="tree file .*text.json is not JSON"):
        resolve_tree(str(tmp_path / "text.json"), 4)
    for bad in ('[["a"]]', '{"paths": [[0], 1]}', '{"paths": [[true]]}', '{"nodes": []}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="tree file .*bad.json holds no list of paths of integer ranks"):
            resolve_tree(str(tmp_path / "bad.json"), 4)


def test_resolve_tree_forms(tmp_path):
    assert len(resolve_tree(None, 4)) == 63
    assert all(len(p) <= 3 for p in resolve_tree(None, 3))
    assert resolve_tree("chain_3", 3) == [(0,), (0, 0), (0, 0, 0)]
    assert len(resolve_tree("mc_sim_7b_15", 4)) == 15
    assert set(PRESETS) >= {"mc_sim_7b_63", "mc_sim_7b_31", "mc_sim_7b_15", "mc_sim_7b_7"}
    file = save_tree(tmp_path / "t.json", SMALL, expected_accept_length=1.5)
    assert load_tree(file) == SMALL
    assert resolve_tree(str(file), 2) == validate_paths(SMALL)
    with pytest.raises(FileNotFoundError):
        load_tree(tmp_path / "missing.json")


def test_chain_and_prune():
    assert chain_tree(2) == [[0], [0, 0]]
    assert prune_tree([[0], [0, 0], [0, 0, 0]], 2) == [[0], [0, 0]]


def _all_paths(depth: int, ranks: int):
    for d in range(1, depth + 1):
        yield from itertools.product(range(ranks), repeat=d)


def test_build_tree_takes_the_likeliest_paths():
    gen = torch.Generator().manual_seed(0)
    acc = torch.rand(3, 4, generator=gen) * 0.25  # (heads, ranks); sums < 1 per head
    budget = 12
    tree = build_tree(acc, budget)
    assert len(tree) == budget
    validate_paths(tree, num_heads=3)
    ranked = sorted(_all_paths(3, 4), key=lambda p: -path_probability(p, acc.tolist()))
    assert {tuple(p) for p in tree} == set(ranked[:budget])
    for n in range(1, budget + 1):  # each leading slice is a valid tree too
        validate_paths(tree[:n])


def test_build_tree_beats_a_fixed_tree_on_its_own_accuracies():
    acc = torch.tensor(
        [[0.6, 0.1, 0.05] + [0.01] * 7, [0.4, 0.1, 0.05] + [0.01] * 7] + [[0.3] + [0.02] * 9] * 2,
        dtype=torch.float64,
    )
    built = build_tree(acc, 31)
    fixed = MC_SIM_7B_63[:31]
    assert expected_accept_length(built, acc) >= expected_accept_length(fixed, acc)
    chain = expected_accept_length(chain_tree(4), acc)
    assert math.isclose(chain, 1 + 0.6 + 0.6 * 0.4 + 0.6 * 0.4 * 0.3 + 0.6 * 0.4 * 0.3 * 0.3)


def test_build_tree_depth_and_input_checks():
    assert max(len(p) for p in build_tree([[0.9, 0.1]] * 4, 20, max_depth=2)) == 2
    with pytest.raises(ValueError, match="num_heads, num_ranks"):
        build_tree([0.5, 0.2], 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_tree([[1.5]], 4)


def test_a_tree_file_that_is_not_text_is_named(tmp_path):
    file = tmp_path / "tree.json"
    file.write_bytes(b"\xff\xfe{not text")
    with pytest.raises(ValueError, match=r"tree file .*tree.json is not UTF-8 text"):
        load_tree(file)
