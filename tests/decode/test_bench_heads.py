"""`bench heads` scoring: an oracle head's rank accuracies come out exactly as constructed."""

import pytest
import torch
from conftest import OracleHeads, Wrapped, hf_greedy, random_medusa, tiny_llama

from fastmedusa.bench.heads import tree_report
from fastmedusa.decode import load_tree, measure_rank_accuracies


@pytest.mark.parametrize("p_top1,p_top2,rank", [(1.0, 0.0, 0), (0.0, 1.0, 1)])
def test_oracle_rank_accuracy(p_top1, p_top2, rank):
    base = tiny_llama(0)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    heads = OracleHeads(base, hf_greedy(base, ids, 24), num_heads=3, p_top1=p_top1, p_top2=p_top2)
    acc, counts = measure_rank_accuracies(Wrapped(base, heads), [ids], 24, ranks=4, progress=False)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[:, rank] = 1.0
    assert torch.equal(acc, expected)
    # head k+1 at t >= P-1 targets t+k+2: continuation tokens 2+k .. 24 of the 24 new ones
    assert counts.tolist() == [24 - 1 - k for k in range(3)]


def test_random_heads_and_tree_files(tmp_path):
    base = tiny_llama(1)
    model = random_medusa(base, num_heads=2)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    acc, _ = measure_rank_accuracies(model, [ids, ids[:, :3]], 16, ranks=5, progress=False)
    assert acc.shape == (2, 5) and (acc >= 0).all() and (acc.sum(1) <= 1).all()
    flat, _ = measure_rank_accuracies(model, [ids[0], ids[0, :3]], 16, ranks=5, progress=False)  # 1-D prompts
    assert flat.tolist() == acc.tolist()
    with pytest.raises(ValueError, match=r"prompt 1 is \(2, 6\): give each prompt as a 1-D tensor"):
        measure_rank_accuracies(model, [ids, ids.repeat(2, 1)], 16, progress=False)
    rows = tree_report(acc, [4, 8], tmp_path, {"rank_accuracies": acc.tolist()})
    built = [r for r in rows if r["tree"].startswith("built")]
    assert [r["nodes"] for r in built] == [4, 8]
    assert len(load_tree(built[1]["file"])) == 8
    assert built[1]["expected_tokens_per_step"] >= built[0]["expected_tokens_per_step"] >= 1.0
