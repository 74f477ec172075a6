"""Trees by default: tree.json (measured accuracies + a tree), auto:N, auto, and their errors."""

import json

import pytest
import torch
from conftest import OracleHeads, Wrapped, hf_greedy, random_medusa, tiny_llama

from fastmedusa.decode import (
    build_tree,
    choose_tree_size,
    expected_accept_length,
    generate,
    measure_heads_tree,
    read_tree_json,
    resolve_tree,
    write_tree_json,
)

ACC = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]


def test_write_read_resolve(tmp_path):
    path = write_tree_json(tmp_path, ACC, [10, 9, 8], num_nodes=12)
    info = read_tree_json(tmp_path, 3)
    assert path == tmp_path / "tree.json" and info["tree_nodes"] == 12 and info["num_heads"] == 3
    assert info["expected_tokens_per_step"] == pytest.approx(expected_accept_length(build_tree(ACC, 12), ACC))
    assert resolve_tree(None, 3, info) == resolve_tree(build_tree(ACC, 12), 3)
    assert len(resolve_tree("auto:20", 3, info)) == 20
    assert resolve_tree("auto:20", 3, info) == resolve_tree(build_tree(ACC, 20), 3)
    assert read_tree_json(tmp_path / "nothing_here", 3) is None


def test_tree_errors(tmp_path):
    write_tree_json(tmp_path, ACC, num_nodes=8)
    with pytest.raises(ValueError, match="measured for 3 Medusa heads but these heads have 4"):
        read_tree_json(tmp_path, 4)
    with pytest.raises(ValueError, match="tree for 3 Medusa heads but these heads have 2"):
        resolve_tree(str(tmp_path / "tree.json"), 2)
    with pytest.raises(ValueError, match="no tree.json"):
        resolve_tree("auto:8", 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        resolve_tree("auto:x", 3, read_tree_json(tmp_path))
    (tmp_path / "tree.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_tree_json(tmp_path, 3)
    for paths in ([[0], [-1]], [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], [[0, 1]]):  # negative, too deep, orphan
        (tmp_path / "tree.json").write_text(json.dumps({"paths": paths}))
        with pytest.raises(ValueError, match=r"tree\.json: .* -- delete it, or measure it again"):
            read_tree_json(tmp_path, 3)
    (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]}))
    with pytest.raises(ValueError, match="4 deep but the heads are 3 -- delete it") as error:
        read_tree_json(tmp_path, 3)
    assert "--tree" not in str(error.value)  # no flag was given: the file is what to fix
    for accuracies in ([[0.5, 0.2], [0.4], [0.3, 0.1]], [[0.5, 0.2], [5, 0.1]], [[float("nan"), 0.2]], [[True]]):
        (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0]], "rank_accuracies": accuracies}))
        with pytest.raises(ValueError, match=r"tree\.json: rank_accuracies must be per-head lists of equal length"):
            read_tree_json(tmp_path)
    (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0]], "num_heads": 3, "rank_accuracies": [[0.5] * 10]}))
    with pytest.raises(ValueError, match="says num_heads 3 but holds rank_accuracies for 1 head: delete the file"):
        read_tree_json(tmp_path, 3)


def test_empty_trees_name_their_file(tmp_path):
    write_tree_json(tmp_path, ACC, num_nodes=8)
    info = json.loads((tmp_path / "tree.json").read_text())
    (tmp_path / "tree.json").write_text(json.dumps({**info, "paths": []}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'tree.json'} holds an empty list of paths: delete it"):
        read_tree_json(tmp_path, 3)
    bare = tmp_path / "bare.json"
    bare.write_text("[]")
    with pytest.raises(ValueError, match=f"tree file {bare} holds no paths"):
        resolve_tree(str(bare), 3)
    with pytest.raises(FileNotFoundError, match="no such file; pass an existing JSON list of paths"):
        resolve_tree(str(tmp_path / "missing.json"), 3)


def test_generate_uses_the_heads_tree_json(llama, tmp_path):
    model = random_medusa(llama, num_heads=3)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    assert generate(model, ids, max_new_tokens=6).tree_nodes == 1 + len(resolve_tree(None, 3))
    model.heads_dir = tmp_path
    write_tree_json(tmp_path, ACC, num_nodes=9)
    plain = generate(model, ids, max_new_tokens=12, medusa=False)
    out = generate(model, ids, max_new_tokens=12)
    assert out.tree_nodes == 10 and torch.equal(out.sequences, plain.sequences)
    assert generate(model, ids, max_new_tokens=12, tree="auto:5").tree_nodes == 6
    write_tree_json(tmp_path, ACC[:2], num_nodes=4)
    with pytest.raises(ValueError, match="measured for 2 Medusa heads"):
        generate(model, ids, max_new_tokens=4)


def test_measure_heads_tree_with_oracle_heads(tmp_path):
    base = tiny_llama(0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (1, n), generator=gen) for n in (5, 3)]
    # one oracle per prompt would need routing; a single prompt repeated keeps the oracle exact
    reference = hf_greedy(base, prompts[0], 30)
    heads = OracleHeads(base, reference, num_heads=3, p_top1=0.0, p_top2=1.0)
    path = measure_heads_tree(Wrapped(base, heads), [prompts[0], prompts[0]], tmp_path, new_tokens=24,
                              ranks=4, num_nodes=6)  # fmt: skip
    info = json.loads(path.read_text())
    assert info["rank_accuracies"] == [[0.0, 1.0, 0.0, 0.0]] * 3
    assert info["paths"][:3] == [[1], [1, 1], [1, 1, 1]]  # the sure path first
    assert info["expected_tokens_per_step"] >= 4.0 and info["positions_scored"] == [46, 44, 42]


def test_choose_tree_size_maximises_expected_tokens_per_s(llama):
    model = random_medusa(llama, num_heads=3)
    best, rows = choose_tree_size(model, ACC, torch.tensor([1, 2, 3]), candidates=(2, 8), steps=6)
    assert [r["nodes"] for r in rows] == [0, 2, 8]  # plain decoding competes
    assert best == max(rows, key=lambda r: r["expected_tokens_per_s"])["nodes"]
    assert all(r["step_ms"] > 0 for r in rows) and rows[0]["expected_tokens_per_step"] == 1.0
    assert all(r["expected_tokens_per_step"] > 1 for r in rows[1:])
    _, trees_only = choose_tree_size(model, ACC, torch.tensor([1, 2, 3]), candidates=(2,), steps=6,
                                     include_plain=False)  # fmt: skip
    assert [r["nodes"] for r in trees_only] == [2]


def test_auto_tree_decodes_plainly_where_plain_decoding_wins(llama, tmp_path, monkeypatch):
    """tree="auto" where the measurement finds no tree faster than plain decoding (as at batch 64 on an H100):
    the call decodes without the heads, and gives plain greedy's tokens."""
    import sys

    model = random_medusa(llama, num_heads=3)
    write_tree_json(tmp_path, ACC, [10, 9, 8], num_nodes=12)
    model.heads_dir = tmp_path
    calls = []

    def plain_wins(*args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return 0, [{"nodes": 0}]

    monkeypatch.setattr(sys.modules["fastmedusa.decode.generate"], "choose_tree_size", plain_wins)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = generate(model, ids, max_new_tokens=8, tree="auto")
    plain = generate(model, ids, max_new_tokens=8, medusa=False)
    assert calls == [1] and torch.equal(out.sequences, plain.sequences)
    assert out.steps == 8 and out.accept_lengths == [[]] and out.tree_nodes == 0


def test_auto_tree_uses_the_measured_size(llama, tmp_path, monkeypatch):
    import sys

    model = random_medusa(llama, num_heads=3)
    write_tree_json(tmp_path, ACC, [10, 9, 8], num_nodes=12)
    model.heads_dir = tmp_path
    monkeypatch.setattr(sys.modules["fastmedusa.decode.generate"], "choose_tree_size", lambda *a, **k: (6, []))
    ids = torch.tensor([[5, 6, 7, 8]])
    out = generate(model, ids, max_new_tokens=8, tree="auto")
    plain = generate(model, ids, max_new_tokens=8, medusa=False)
    assert out.tree_nodes == 7 and torch.equal(out.sequences, plain.sequences)  # 6 paths + the root; lossless


def test_default_tree_sizes_fill_whole_tiles():
    """A verify pass is the tree's nodes plus the root: the default size and auto's candidates make it a power of
    two (64 tokens, not 65, which would start a new GEMM and attention tile)."""
    import inspect

    from fastmedusa.decode.accuracy import DEFAULT_TREE_NODES

    candidates = inspect.signature(choose_tree_size).parameters["candidates"].default
    for nodes in (DEFAULT_TREE_NODES, *candidates[:-2]):
        assert (nodes + 1) & nodes == 0, nodes
    assert all((n + 1) % 32 == 0 for n in candidates[-2:])
