"""Trees from joint head outcomes: the acceptance model, its measurement, tree.json, and the cross-check."""

import itertools
import json
import random

import pytest
import torch
from conftest import OracleHeads, Wrapped, hf_greedy, random_medusa, tiny_llama

from fastmedusa.bench.heads import cross_check, measure_halves
from fastmedusa.decode import (
    build_tree,
    expected_accept_length,
    read_tree_json,
    resolve_tree,
    write_tree_json,
)
from fastmedusa.decode.accuracy import HeadAcceptance, expected_by_heads, measure_head_acceptance
from fastmedusa.decode.trees import (
    AcceptanceModel,
    chains_from_json,
    chains_to_json,
    measured_accept_length,
    path_probability,
)


def correlated_positions(n: int, heads: int, ranks: int, seed: int) -> list[list[int]]:
    """Per position, the rank at which each head held the right token (`ranks` = missed). A latent
    "easy context" makes the heads right together, as real heads are."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        easy = rng.random() < 0.5
        row = []
        for _ in range(heads):
            u = rng.random()
            if u < (0.8 if easy else 0.15):
                row.append(0)
            elif u < (0.9 if easy else 0.35):
                row.append(rng.randrange(1, ranks))
            else:
                row.append(ranks)
        rows.append(row)
    return rows


def chains_and_accuracies(rows: list[list[int]], ranks: int) -> tuple[dict, list[list[float]]]:
    """What the measurement stores, computed here by counting: chains cut at the first miss, and marginals."""
    chains: dict = {}
    for row in rows:
        cut = []
        for r in row:
            if r == ranks:
                break
            cut.append(r)
        chains[tuple(cut)] = chains.get(tuple(cut), 0) + 1
    heads = len(rows[0])
    acc = [[sum(row[k] == r for row in rows) / len(rows) for r in range(ranks)] for k in range(heads)]
    return chains, acc


def simulated_tokens_per_step(tree, rows: list[list[int]]) -> float:
    """Greedy acceptance walked position by position: the deepest node whose every rank matches."""
    nodes = {tuple(p) for p in tree}
    total = 0
    for row in rows:
        depth = 0
        while depth < len(row) and tuple(row[: depth + 1]) in nodes:
            depth += 1
        total += 1 + depth
    return total / len(rows)


def test_without_chains_the_model_is_the_independent_product():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]
    model = AcceptanceModel(acc)
    for path in ([0], [2], [0, 1], [1, 0, 2]):
        assert model(path) == pytest.approx(path_probability(path, acc), rel=1e-15)
    assert not model.joint


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshrunk_joint_estimate_is_the_measured_acceptance(seed):
    rows = correlated_positions(500, heads=4, ranks=3, seed=seed)
    chains, acc = chains_and_accuracies(rows, 3)
    model = AcceptanceModel(acc, chains, prior_weight=0.0)
    trees = [build_tree(acc, n, chains=chains) for n in (1, 5, 17, 40)] + [build_tree(acc, 17)]
    for tree in trees:
        expected = 1.0 + sum(model(p) for p in tree)
        assert expected == pytest.approx(simulated_tokens_per_step(tree, rows), rel=1e-12)
        assert measured_accept_length(tree, chains) == pytest.approx(simulated_tokens_per_step(tree, rows), rel=1e-12)


def test_shrinkage_follows_its_formula():
    acc = [[0.3, 0.1], [0.5, 0.2]]
    chains = {(0,): 3, (): 7}  # 10 positions: head 1 right at rank 0 three times, head 2 never right
    model = AcceptanceModel(acc, chains, prior_weight=8.0)
    p0 = (3 + 8 * 0.3) / (10 + 8)
    assert model([0]) == pytest.approx(p0)
    assert model([1]) == pytest.approx((0 + 8 * 0.1) / (10 + 8))
    assert model([0, 0]) == pytest.approx(p0 * (0 + 8 * 0.5) / (3 + 8))
    assert model([1, 1]) == pytest.approx(model([1]) * (8 * 0.2) / (0 + 8))  # never reached: the marginal


def test_joint_trees_go_deeper_and_win_on_fresh_positions():
    ranks, heads = 4, 4
    fit = correlated_positions(3000, heads, ranks, seed=10)
    fresh = correlated_positions(3000, heads, ranks, seed=11)
    chains, acc = chains_and_accuracies(fit, ranks)
    joint, independent = build_tree(acc, 4, chains=chains), build_tree(acc, 4)
    assert simulated_tokens_per_step(joint, fresh) > simulated_tokens_per_step(independent, fresh) + 0.1
    for n in (8, 15, 31, 63):  # larger trees hold most of the same nodes: never worse beyond sampling noise
        joint, independent = build_tree(acc, n, chains=chains), build_tree(acc, n)
        assert simulated_tokens_per_step(joint, fresh) > simulated_tokens_per_step(independent, fresh) - 0.01
    assert [0, 0, 0, 0] in build_tree(acc, 4, chains=chains)  # the correlated chain, not the wide fan
    assert [0, 0, 0, 0] not in build_tree(acc, 4)
    # the independent product underrates such heads; the joint estimate does not
    tree = build_tree(acc, 31, chains=chains)
    measured = simulated_tokens_per_step(tree, fresh)
    assert expected_accept_length(tree, acc) < measured - 0.2
    assert abs(expected_accept_length(tree, acc, chains) - measured) < 0.1


def test_every_leading_slice_of_a_joint_tree_is_a_tree():
    rows = correlated_positions(400, heads=3, ranks=5, seed=3)
    chains, acc = chains_and_accuracies(rows, 5)
    tree = build_tree(acc, 60, chains=chains)
    for n in range(1, len(tree) + 1):
        nodes = {tuple(p) for p in tree[:n]}
        assert all(len(p) == 1 or p[:-1] in nodes for p in nodes)
    probs = [AcceptanceModel(acc, chains)(p) for p in tree]
    assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize("p_top1,p_top2", [(1.0, 0.0), (0.0, 1.0), (0.6, 0.25)])
def test_measured_chains_match_the_oracle(p_top1, p_top2):
    base = tiny_llama(0)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    sequence = hf_greedy(base, ids, 24)
    heads = OracleHeads(base, sequence, num_heads=3, p_top1=p_top1, p_top2=p_top2)
    measured = measure_head_acceptance(Wrapped(base, heads), [ids], 24, ranks=4, progress=False)
    # the reference: each position's ranks read from the oracle's own logits
    start, length, expected = ids.shape[1] - 1, sequence.shape[1], {}
    for t in range(start, length - 3 - 1):
        chain = []
        for k in range(3):
            top = heads._logits(t, k).topk(4).indices.tolist()
            target = int(sequence[0, t + k + 2])
            if target not in top:
                break
            chain.append(top.index(target))
        expected[tuple(chain)] = expected.get(tuple(chain), 0) + 1
    assert measured.chains == expected
    assert measured.chain_positions == int(measured.positions_scored[-1]) == 21
    if p_top1 == 1.0:
        assert measured.chains == {(0, 0, 0): 21}


def test_sampled_chains_are_scored_against_plain_sampling():
    """At temperature > 0 the heads are scored against the model's sampled continuation (the tokens exact
    acceptance compares nodes with), seeded per prompt whatever the batch: oracle heads that know plain
    sampling's tokens are right at every position, and wrong where greedy would be scored instead."""
    from fastmedusa.decode import generate

    base = tiny_llama(0)
    prompts = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 7, 4)]
    sampled = generate(base, prompts[1], max_new_tokens=24, medusa=False, temperature=1.3, seed=[11 + 1])
    greedy = hf_greedy(base, prompts[1], 24)
    assert not torch.equal(sampled.sequences, greedy)  # the check below tells the two apart
    heads = OracleHeads(base, sampled.sequences, num_heads=3, p_top1=1.0, p_top2=0.0)
    model = Wrapped(base, heads)
    measured = measure_head_acceptance(model, [prompts[1]], 24, ranks=4, progress=False, temperature=1.3, seed=12)
    assert measured.chains == {(0, 0, 0): 21}
    assert measure_head_acceptance(model, [prompts[1]], 24, ranks=4, progress=False).chains != {(0, 0, 0): 21}
    # prompt i draws with seed + i in any batch: prompt 1 of three, in batches of 1 or 3, is the one above
    random_heads = random_medusa(base, num_heads=2)
    one_by_one = measure_head_acceptance(random_heads, prompts, 24, ranks=5, progress=False, batch_size=1,
                                         temperature=1.3, seed=11)  # fmt: skip
    together = measure_head_acceptance(random_heads, prompts, 24, ranks=5, progress=False, batch_size=3,
                                       temperature=1.3, seed=11)  # fmt: skip
    assert one_by_one.chains == together.chains
    assert torch.equal(one_by_one.rank_accuracies, together.rank_accuracies)


def test_temperature_check_scores_both_trees_on_the_sampled_half():
    """`bench heads --temperature`: trees built from each half's greedy and sampled measurements, scored on
    the other half's sampled chains; heads whose sampled chains go deep get deep sampled-built trees."""
    from fastmedusa.bench.heads import temperature_check

    def half(rows: list[tuple[int, ...]]) -> HeadAcceptance:
        chains: dict = {}
        for chain in rows:
            chains[chain] = chains.get(chain, 0) + 1
        acc = torch.zeros(2, 3, dtype=torch.float64)
        for chain, n in chains.items():
            for k, r in enumerate(chain):
                acc[k, r] += n / len(rows)
        return HeadAcceptance(acc, torch.tensor([len(rows)] * 2), chains)

    greedy = [half([(0, 0)] * 6 + [()] * 4), half([(0, 0)] * 5 + [()] * 5)]  # greedy: rank 0 twice
    sampled = [half([(1, 2)] * 6 + [()] * 4), half([(1, 2)] * 7 + [()] * 3)]  # sampling: ranks 1 then 2
    rows = temperature_check(greedy, sampled, [2])
    # 2 nodes: the greedy-built tree [0], [0, 0] accepts nothing of (1, 2); the sampled-built [1], [1, 2] all
    assert rows[0]["greedy_built_tokens_per_step"] == pytest.approx(1.0)
    assert rows[0]["sampled_built_tokens_per_step"] == pytest.approx(1 + (2 * 0.7 + 2 * 0.6) / 2)
    assert rows[0]["sampled_gain"] > 0
    # halves whose trees differ: each tree is scored on the other half's sampled chains, never on its own
    sampled = [half([(1, 2)] * 6 + [()] * 4), half([(1, 2)] * 3 + [(2,)] * 5 + [()] * 2)]
    trees = [build_tree(h.rank_accuracies, 2, chains=h.chains) for h in sampled]
    assert trees[0] != trees[1]
    crossed = (measured_accept_length(trees[0], sampled[1].chains) + measured_accept_length(trees[1], sampled[0].chains)) / 2
    own = (measured_accept_length(trees[0], sampled[0].chains) + measured_accept_length(trees[1], sampled[1].chains)) / 2
    assert crossed != pytest.approx(own)
    assert temperature_check(greedy, sampled, [2])[0]["sampled_built_tokens_per_step"] == pytest.approx(crossed)


def test_measurements_merge():
    base = tiny_llama(1)
    model = random_medusa(base, num_heads=2)
    a_ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    b_ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(2))
    a = measure_head_acceptance(model, [a_ids], 12, ranks=5, progress=False)
    b = measure_head_acceptance(model, [b_ids], 16, ranks=5, progress=False)
    both = a.merged(b)
    together = measure_head_acceptance(model, [a_ids], 12, ranks=5, progress=False)
    assert isinstance(both, HeadAcceptance)
    assert both.positions_scored.tolist() == [x + y for x, y in zip(a.positions_scored.tolist(), b.positions_scored.tolist())]
    for chain in set(a.chains) | set(b.chains):
        assert both.chains[chain] == a.chains.get(chain, 0) + b.chains.get(chain, 0)
    # hit counts add up: accuracy x positions of the merge is the sum of the parts'
    for k in range(2):
        for r in range(5):
            hits = round(float(a.rank_accuracies[k, r] * a.positions_scored[k] + b.rank_accuracies[k, r] * b.positions_scored[k]))
            assert round(float(both.rank_accuracies[k, r] * both.positions_scored[k])) == hits
    assert a.merged(HeadAcceptance(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long))).chains == together.chains


def test_tree_json_keeps_the_chains(tmp_path):
    rows = correlated_positions(600, heads=3, ranks=4, seed=5)
    chains, acc = chains_and_accuracies(rows, 4)
    write_tree_json(tmp_path, acc, [600] * 3, num_nodes=15, chains=chains)
    info = read_tree_json(tmp_path, 3)
    assert info["tree_model"] == "joint" and info["chain_positions"] == 600
    assert chains_from_json(info["accepted_chains"]) == chains
    assert resolve_tree(None, 3, info) == resolve_tree(build_tree(acc, 15, chains=chains), 3)
    assert resolve_tree("auto:9", 3, info) == resolve_tree(build_tree(acc, 9, chains=chains), 3)
    assert info["expected_tokens_per_step"] == pytest.approx(
        expected_accept_length(build_tree(acc, 15, chains=chains), acc, chains)
    )
    assert info["expected_tokens_per_step_independent"] < info["expected_tokens_per_step"]
    # an older tree.json (no chains) still reads, and builds independent trees
    write_tree_json(tmp_path, acc, num_nodes=15)
    old = read_tree_json(tmp_path, 3)
    assert old["tree_model"] == "independent" and "accepted_chains" not in old
    assert resolve_tree("auto:9", 3, old) == resolve_tree(build_tree(acc, 9), 3)


@pytest.mark.parametrize(
    "chains,message",
    [
        ([[[0, 4], 3]], "does not fit 3 heads and ranks 0..3"),
        ([[[0, 0, 0, 0], 3]], "does not fit 3 heads"),
        ([[[0], -1]], "counts are integers >= 0"),
        ([[[0], 1.5]], "list of \\[ranks, count\\] pairs"),
        ({"0": 3}, "list of \\[ranks, count\\] pairs"),
    ],
)
def test_bad_chains_in_tree_json(tmp_path, chains, message):
    acc = [[0.5, 0.2, 0.1, 0.05]] * 3
    write_tree_json(tmp_path, acc, num_nodes=6)
    info = json.loads((tmp_path / "tree.json").read_text())
    info["accepted_chains"] = chains
    (tmp_path / "tree.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=message):
        read_tree_json(tmp_path, 3)


def test_chains_json_round_trip_and_prior_check():
    chains = {(0, 1): 4, (): 9, (2,): 4}
    rows = chains_to_json(chains)
    assert rows[0] == [[], 9] and chains_from_json(rows) == chains
    assert chains_from_json([[[0], 3], [[0], 4]]) == {(0,): 7}  # a chain listed twice counts twice
    with pytest.raises(ValueError, match="prior_weight"):
        AcceptanceModel([[0.5]], chains={(0,): 1}, prior_weight=-1.0)
    with pytest.raises(ValueError, match="rank 3"):
        expected_accept_length([[3]], [[0.5, 0.2]])


def test_expected_by_heads_cuts_the_chains():
    rows = correlated_positions(800, heads=3, ranks=3, seed=7)
    chains, acc = chains_and_accuracies(rows, 3)
    by_heads = expected_by_heads(acc, nodes=10, chains=chains)
    for k, row in enumerate(by_heads, start=1):
        cut = [r[:k] for r in rows]
        tree = build_tree([a for a in acc[:k]], 10, chains=chains_and_accuracies(cut, 3)[0])
        assert row["tree_nodes"] == len(tree)
        assert row["expected_tokens_per_step"] == pytest.approx(
            expected_accept_length(tree, acc[:k], chains_and_accuracies(cut, 3)[0]), abs=1e-3
        )
    assert [r["expected_tokens_per_step"] for r in by_heads] == sorted(r["expected_tokens_per_step"] for r in by_heads)


def test_all_paths_probabilities_sum_within_one():
    rows = correlated_positions(300, heads=2, ranks=3, seed=8)
    chains, acc = chains_and_accuracies(rows, 3)
    model = AcceptanceModel(acc, chains)
    for depth in (0, 1):
        for parent in itertools.product(range(3), repeat=depth):
            children = sum(model((*parent, r)) for r in range(3))
            assert children <= model(parent) + 1e-12


def _acceptance(rows: list[list[int]], ranks: int) -> HeadAcceptance:
    chains, acc = chains_and_accuracies(rows, ranks)
    heads = len(rows[0])
    return HeadAcceptance(torch.tensor(acc, dtype=torch.float64), torch.full((heads,), len(rows)), chains)


def test_cross_check_scores_each_half_with_the_other():
    halves = [_acceptance(correlated_positions(1500, 4, 4, seed=s), 4) for s in (20, 21)]
    rows = cross_check(halves, [4, 15])
    for row in rows:
        n = row["nodes"]
        for name, chains_used in (("joint", True), ("independent", False)):
            scores = [
                simulated_tokens_per_step(
                    build_tree(halves[a].rank_accuracies, n, chains=halves[a].chains if chains_used else None),
                    [list(c) + [4] * (4 - len(c)) for c, m in halves[b].chains.items() for _ in range(m)],
                )
                for a, b in ((0, 1), (1, 0))
            ]
            assert row[f"{name}_tokens_per_step"] == pytest.approx(sum(scores) / 2)
    assert rows[0]["joint_gain"] > 0.03  # 4 nodes: the correlated chain pays on the other half


def test_bench_heads_halves_fall_back_to_one_measurement():
    calls = []

    def measure(part, first):
        calls.append(len(part))
        assert part[0] == first + 1  # where the part starts among all prompts (sampling seeds count from it)
        if len(part) < 3:
            raise ValueError("some heads were never scored")
        return len(part)

    assert measure_halves(measure, [1, 2, 3, 4, 5, 6]) == [3, 3]
    assert measure_halves(measure, [1, 2, 3, 4]) == [4] and calls[-1] == 4  # a half too short: all at once
    assert measure_halves(measure, [1, 2, 3]) == [3]
