"""Engine vs HF generate, Medusa greedy vs plain greedy (lossless), typical acceptance, bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, OracleHeads, hf_greedy, left_pad, random_medusa, tiny_llama

from fastmedusa.decode import build_tree, generate, get_engine
from fastmedusa.decode.generate import node_acceptance
from fastmedusa.model import MedusaConfig, MedusaModel

TREES = ["chain_1", "chain_3", "mc_sim_7b_7", "mc_sim_7b_31", [[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]]]


def prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB, (1, int(torch.randint(1, 12, (), generator=gen))), generator=gen)
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("llama", {}),
        ("llama", {"tie": True, "num_key_value_heads": 4}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
        ("qwen2", {}),
    ],
    ids=["llama-gqa", "tied-mha", "linear-rope", "qwen2-bias"],
)
def test_engine_greedy_matches_hf_generate(kind, overrides):
    tie = overrides.pop("tie", False)
    model = tiny_llama(3, kind=kind, tie=tie, **overrides)
    for ids in prompts(3, seed=1):
        ref = hf_greedy(model, ids, 24)
        out = generate(model, ids, max_new_tokens=24, medusa=False)
        assert torch.equal(out.sequences, ref)
        assert out.steps == 24 and out.tokens_per_step == 1.0


@pytest.mark.parametrize("tree", TREES, ids=str)
def test_medusa_greedy_equals_plain_greedy_with_random_heads(llama, tree):
    model = random_medusa(llama, num_heads=3)
    for ids in prompts(4, seed=2):
        plain = generate(model, ids, max_new_tokens=30, medusa=False)
        med = generate(model, ids, max_new_tokens=30, tree=tree)
        assert torch.equal(med.sequences, plain.sequences)
        assert med.new_tokens == 30 and med.steps == 1 + len(med.accept_lengths[0])


def test_medusa_on_qwen2_with_bias():
    base = tiny_llama(4, kind="qwen2")
    model = random_medusa(base, num_heads=2)
    for ids in prompts(3, seed=3):
        plain = generate(model, ids, max_new_tokens=20, medusa=False)
        assert torch.equal(generate(model, ids, max_new_tokens=20, tree="chain_2").sequences, plain.sequences)


def oracle(llama, ids: torch.Tensor, length: int = 64, **p) -> tuple[torch.Tensor, OracleHeads]:
    reference = hf_greedy(llama, ids, length)
    return reference, OracleHeads(llama, reference, num_heads=4, **p)


def test_long_accepted_paths_stay_lossless(llama):
    total_steps, total_tokens = 0, 0
    for ids in prompts(3, seed=4):
        reference, heads = oracle(llama, ids)
        for tree in ("mc_sim_7b_63", "chain_4", build_tree([[0.7, 0.2]] * 4, 20)):
            out = generate(llama, ids, max_new_tokens=48, heads=heads, tree=tree)
            assert torch.equal(out.sequences, reference[:, : ids.shape[1] + 48])
            total_steps, total_tokens = total_steps + out.steps, total_tokens + out.new_tokens
            assert max(out.accept_lengths[0]) >= 3  # whole paths of the 4-deep trees were accepted
    assert total_tokens / total_steps > 2.0


def test_max_new_tokens_reached_mid_path(llama):
    ids = prompts(1, seed=5)[0]
    reference, heads = oracle(llama, ids, p_top1=0.95, p_top2=0.05)
    cut_mid_path = 0
    for max_new in range(1, 25):
        out = generate(llama, ids, max_new_tokens=max_new, heads=heads, tree="chain_4")
        assert torch.equal(out.sequences, reference[:, : ids.shape[1] + max_new])
        produced = 1 + sum(a + 1 for a in out.accept_lengths[0])  # before truncation
        cut_mid_path += produced > max_new
    assert cut_mid_path >= 5


def test_eos_inside_an_accepted_path(llama):
    ids = prompts(1, seed=6)[0]
    reference, heads = oracle(llama, ids, p_top1=0.95, p_top2=0.05)
    new = reference[0, ids.shape[1] :].tolist()
    inside = 0
    for j in range(1, 30):
        eos = new[j]
        first = new.index(eos)
        out = generate(
            llama, ids, max_new_tokens=40, heads=heads, tree="mc_sim_7b_31", eos_token_id=[eos, VOCAB + 5]
        )
        plain = generate(llama, ids, max_new_tokens=40, medusa=False, eos_token_id=eos)
        assert out.new_token_ids.tolist() == new[: first + 1] == plain.new_token_ids.tolist()
        # EOS was emitted before the end of its step's accepted tokens: the step was cut short
        produced = 1 + sum(a + 1 for a in out.accept_lengths[0])
        inside += produced > out.new_tokens
    assert inside >= 5


def test_eos_as_first_token(llama):
    ids = prompts(1, seed=7)[0]
    first = generate(llama, ids, max_new_tokens=5, medusa=False).new_token_ids[0].item()
    out = generate(random_medusa(llama), ids, max_new_tokens=5, eos_token_id=first)
    assert out.new_token_ids.tolist() == [first] and out.steps == 1


def test_node_acceptance_rules():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    parents = torch.tensor([0, 0, 0])
    tokens = torch.tensor([0, 0, 1])
    assert node_acceptance(logits, tokens, parents, 0.0, 0.09, 0.3).tolist() == [True, True, False]
    # greedy with the argmax the step already took: the same rule (parent 0's argmax is token 0)
    taken = torch.tensor([0, 1, 0])
    assert node_acceptance(logits, tokens, parents, 0.0, 0.09, 0.3, taken).tolist() == [True, True, False]
    other = torch.tensor([1, 0, 0])  # the given argmax, not a new one, decides
    assert node_acceptance(logits, tokens, parents, 0.0, 0.09, 0.3, other).tolist() == [False, False, True]
    # typical: p(x) > min(eps, delta * exp(-H(p))) with p the parent's softmax at temperature T
    temperature, eps, delta = 0.5, 0.09, 0.3
    probs = torch.softmax(logits[0] / temperature, -1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum()
    threshold = min(eps, delta * math.exp(-entropy.item()))
    for token in range(4):
        ok = node_acceptance(logits, torch.tensor([0, token, token]), parents, temperature, eps, delta)
        assert ok[1].item() == (probs[token].item() > threshold)


def test_engine_is_reused_across_calls(llama):
    ids = prompts(1)[0]
    generate(llama, ids, max_new_tokens=4, medusa=False)
    engine = get_engine(llama, 10)
    generate(llama, ids, max_new_tokens=8, medusa=False)
    assert get_engine(llama, 10) is engine
    assert "_fastmedusa_engine" not in dict(llama.named_modules())  # not registered as a submodule


def test_decoding_follows_weights_changed_after_the_engine_was_built():
    """An optimiser step or load_state_dict on the backbone after a first generate: the engine's fused q/k/v
    and gate/up copies are refreshed in place (it used to decode with a mix of old and new weights); a
    replaced parameter builds a new engine."""
    llama = tiny_llama(3)
    model = random_medusa(llama)
    ids = prompts(1)[0]
    assert (
        generate(model, ids, max_new_tokens=12).new_token_ids.tolist()
        == hf_greedy(llama, ids, 12)[0, ids.shape[1] :].tolist()
    )
    engine = get_engine(llama, 10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in llama.model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    want = hf_greedy(llama, ids, 12)[0, ids.shape[1] :].tolist()
    for medusa in (True, False):
        assert generate(model, ids, max_new_tokens=12, medusa=medusa).new_token_ids.tolist() == want
    assert get_engine(llama, 10) is engine  # refreshed in place: compiled steps and graphs stay valid
    mlp = llama.model.layers[0].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach() * -1.5)
    want = hf_greedy(llama, ids, 12)[0, ids.shape[1] :].tolist()
    assert generate(model, ids, max_new_tokens=12).new_token_ids.tolist() == want
    assert get_engine(llama, 10) is not engine


def test_stats_and_medusa_model_generate(llama):
    model = random_medusa(llama)
    out = model.generate(prompts(1)[0], max_new_tokens=12, tree="chain_2")
    assert out.tokens_per_step == out.new_tokens / out.steps
    assert out.tokens_per_s > 0 and "tokens/step" in out.summary()


def test_bad_input(llama):
    model = random_medusa(llama, num_heads=2)
    ids = prompts(1)[0]
    with pytest.raises(ValueError, match="no attention_mask"):
        generate(model, ids.repeat(2, 1), max_new_tokens=4)
    with pytest.raises(ValueError, match="3 deep but the model has 2"):
        generate(model, ids, max_new_tokens=4, tree="chain_3")
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        generate(model, torch.zeros(1, 100, dtype=torch.long), max_new_tokens=50, max_len=128)
    limit = llama.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_len .--max-len. {10**12} is more KV cache than this model can use"):
        generate(model, ids, max_new_tokens=4, max_len=10**12)  # refused before allocating terabytes
    with pytest.raises(ValueError, match=f"max_position_embeddings {limit} . 256 scratch slots for a tree = {limit + 256}"):
        generate(model, ids, max_new_tokens=4, max_len=limit + 257, medusa=False)
    assert generate(model, ids, max_new_tokens=4, max_len=limit + 256, medusa=False).new_tokens == 4
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.zeros(1, 1000, dtype=torch.long), max_new_tokens=100, medusa=False)
    with pytest.raises(ValueError, match="needs Medusa heads"):
        generate(llama, ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, max_new_tokens=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_len": 100.5}, ValueError, "max_len must be an integer >= 1 or None, got 100.5"),
        ({"max_len": "100"}, ValueError, "max_len must be an integer >= 1 or None, got '100'"),
        ({"max_batch_size": 4.5}, ValueError, "max_batch_size must be an integer >= 1 or None, got 4.5"),
        ({"compile": "no"}, TypeError, "compile='no': pass True, False or None"),
        ({"compact": "no"}, TypeError, "compact='no': pass True, False or None"),
        ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens must be an integer >= 1, got 2.0"),
    ],
)
def test_arguments_of_the_wrong_kind_name_themselves(llama, kwargs, error, message):
    """A float would be silently cut and a string flag taken as true: both are refused, naming the argument."""
    model = random_medusa(llama, num_heads=2)
    with pytest.raises(error, match=message):
        generate(model, prompts(1)[0], **{"max_new_tokens": 4, **kwargs})


def test_integers_of_any_kind(llama):
    """max_new_tokens / max_len / max_batch_size take numpy and 0-d tensor integers, as eos_token_id does."""
    model = random_medusa(llama, num_heads=2)
    ids = prompts(1)[0]
    ref = generate(model, ids, max_new_tokens=5, tree="chain_2")
    out = generate(model, ids, max_new_tokens=np.int64(5), tree="chain_2", max_len=torch.tensor(256), max_batch_size=np.int32(2))
    assert out.sequences.tolist() == ref.sequences.tolist()


def test_heads_for_another_base_model(llama):
    other = MedusaModel.from_base(tiny_llama(5, hidden_size=32), MedusaConfig(num_heads=2))
    with pytest.raises(ValueError, match="hidden_size=32 but the base model has 64"):
        generate(llama, prompts(1)[0], max_new_tokens=4, heads=other.medusa_heads)


@pytest.mark.slow
def test_compiled_steps_match_eager(llama):
    """torch.compile(fullgraph=True) traces both steps without graph breaks (CUDA adds CUDA graphs on top)."""
    model = random_medusa(llama, num_heads=2)
    ids = prompts(1, seed=9)[0]
    plain = generate(model, ids, max_new_tokens=12, medusa=False)
    assert torch.equal(
        generate(model, ids, max_new_tokens=12, medusa=False, compile=True).sequences, plain.sequences
    )
    assert torch.equal(
        generate(model, ids, max_new_tokens=12, tree="chain_2", compile=True).sequences, plain.sequences
    )
    batch, mask = left_pad([ids, ids[:, :3]])
    eager = generate(
        model, batch, attention_mask=mask, max_new_tokens=12, tree="chain_2", temperature=0.8, seed=1
    )
    compiled = generate(
        model,
        batch,
        attention_mask=mask,
        max_new_tokens=12,
        tree="chain_2",
        temperature=0.8,
        seed=1,
        compile=True,
    )
    assert torch.equal(compiled.sequences, eager.sequences)
    sampled = dict(attention_mask=mask, max_new_tokens=12, temperature=0.8, seed=1)
    exact = generate(model, batch, tree="chain_2", acceptance="exact", compile=True, **sampled)
    assert torch.equal(exact.sequences, generate(model, batch, medusa=False, **sampled).sequences)
    truncated = sampled | dict(top_k=20, top_p=0.9)  # the sort of top-p inside a compiled step
    for acceptance in ("exact", "typical"):
        compiled = generate(model, batch, tree="chain_2", acceptance=acceptance, compile=True, **truncated)
        eager = generate(model, batch, tree="chain_2", acceptance=acceptance, **truncated)
        assert torch.equal(compiled.sequences, eager.sequences)
