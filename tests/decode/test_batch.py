"""Batches: a left-padded (B, P) batch gives each row what it gives alone (fp32), plain and Medusa."""

import math

import pytest
import torch
from conftest import VOCAB, BatchOracleHeads, OracleHeads, hf_greedy, left_pad, random_medusa, tiny_llama

from fastmedusa.decode import generate


def ragged_prompts(lengths, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, n), generator=gen) for n in lengths]


def check_rows(out, prompts, references, pad_id, prompt_pad=0):
    """Row i of a batched output = references[i] (new tokens), then pad_id; the prompt part unchanged."""
    ids, _ = left_pad(prompts, prompt_pad)
    width = ids.shape[1]
    assert torch.equal(out.sequences[:, :width], ids)
    for row, ref in enumerate(references):
        ref = ref.reshape(-1).tolist()
        assert out.row_new_token_ids(row).tolist() == ref, f"row {row}"
        assert out.new_tokens_per_row[row] == len(ref)
        assert (out.sequences[row, width + len(ref) :] == pad_id).all()
    assert out.new_tokens == sum(len(r.reshape(-1)) for r in references)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_batch_rows_equal_hf_batch_1(kind):
    model = tiny_llama(7, kind=kind)
    prompts = ragged_prompts([5, 1, 9, 3])
    refs = [hf_greedy(model, p, 20)[0, p.shape[1] :] for p in prompts]
    ids, mask = left_pad(prompts, pad_id=3)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, medusa=False)
    check_rows(out, prompts, refs, pad_id=0, prompt_pad=3)
    assert out.steps == 20 and out.steps_per_row == [20] * 4 and out.tokens_per_step == 1.0


def test_plain_batch_rows_stop_at_their_eos(llama):
    prompts = ragged_prompts([4, 7, 2, 6, 1], seed=1)
    alone = [generate(llama, p, max_new_tokens=30, medusa=False).new_token_ids for p in prompts]
    eos = int(alone[1][6])  # row 1 stops at its 7th token; others where (if) they emit it
    refs = []
    for a in alone:
        hits = (a == eos).nonzero()
        refs.append(a[: int(hits[0]) + 1] if hits.numel() else a)
    ids, mask = left_pad(prompts)
    out = generate(llama, ids, attention_mask=mask, max_new_tokens=30, medusa=False, eos_token_id=eos,
                   pad_token_id=VOCAB + 1)  # fmt: skip
    check_rows(out, prompts, refs, pad_id=VOCAB + 1)
    assert out.sequences.shape[1] == ids.shape[1] + max(len(r) for r in refs)
    single = generate(llama, ids[1:2, -7:], max_new_tokens=30, medusa=False, eos_token_id=eos)
    assert single.new_token_ids.tolist() == refs[1].tolist()


@pytest.mark.parametrize("tree", ["chain_2", "mc_sim_7b_31"])
def test_medusa_batch_random_heads_equals_plain(llama, tree):
    model = random_medusa(llama, num_heads=3)
    prompts = ragged_prompts([3, 8, 1, 5], seed=2)
    refs = [generate(model, p, max_new_tokens=25, medusa=False).new_token_ids for p in prompts]
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=25, tree=tree)
    check_rows(out, prompts, refs, pad_id=0)
    assert len(out.accept_lengths) == 4
    assert out.steps_per_row == [1 + len(a) for a in out.accept_lengths]


@pytest.mark.parametrize("pad_id", [-1, VOCAB], ids=["negative", "vocab_size"])
def test_pad_ids_outside_the_vocabulary_are_never_embedded(llama, pad_id):
    """The mask hides pad slots, yet their ids went through the embedding (an IndexError on the CPU, a
    device-side assert on CUDA): any pad id now decodes like pad id 0, and the prompt part keeps its ids."""
    model = random_medusa(llama, num_heads=3)
    prompts = ragged_prompts([3, 8, 1], seed=4)
    refs = [generate(model, p, max_new_tokens=10, medusa=False).new_token_ids for p in prompts]
    ids, mask = left_pad(prompts, pad_id=pad_id)
    for medusa in (False, True):
        out = generate(model, ids, attention_mask=mask, max_new_tokens=10, medusa=medusa)
        check_rows(out, prompts, refs, pad_id=0, prompt_pad=pad_id)


def test_medusa_batch_oracle_heads_accept_long_paths_per_row(llama):
    prompts = ragged_prompts([6, 2, 9], seed=3)
    references = [hf_greedy(llama, p, 64) for p in prompts]
    probabilities = [(0.95, 0.05), (0.5, 0.3), (0.0, 0.0)]  # rows accept long, medium and no paths
    heads = BatchOracleHeads(
        [
            OracleHeads(llama, r, num_heads=4, p_top1=a, p_top2=b)
            for r, (a, b) in zip(references, probabilities)
        ]
    )
    ids, mask = left_pad(prompts)
    new1 = references[1][0, 2:].tolist()  # row 1 stops early, at an EOS that may sit inside a path
    eos = next(t for j, t in enumerate(new1) if j >= 20 and t not in new1[:j])
    out = generate(llama, ids, attention_mask=mask, max_new_tokens=40, heads=heads, tree="mc_sim_7b_63",
                   eos_token_id=eos)  # fmt: skip
    refs = []
    for p, r in zip(prompts, references):
        new = r[0, p.shape[1] : p.shape[1] + 40]
        hits = (new == eos).nonzero()
        refs.append(new[: int(hits[0]) + 1] if hits.numel() else new)
    check_rows(out, prompts, refs, pad_id=eos)
    mean = [sum(a) / len(a) for a in out.accept_lengths]
    assert mean[0] > 2.5 and 0.5 < mean[1] < mean[0] and mean[2] == 0
    assert out.steps_per_row[2] == 40 and out.steps_per_row[0] < 15
    assert out.tokens_per_step == out.new_tokens / sum(out.steps_per_row)


def test_triton_attention_batch_equals_hf_greedy(monkeypatch):
    """The engine on fastmedusa's attention kernel (interpreted here; the default on CUDA): a left-padded batch
    whose rows accept long tree paths gives every row HF's own greedy tokens (prefill and steps alike)."""
    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    model = tiny_llama(4, num_key_value_heads=2)  # a fresh model: engines are cached on the model
    prompts = ragged_prompts([5, 1, 8], seed=6)
    references = [hf_greedy(model, p, 24) for p in prompts]
    heads = BatchOracleHeads([OracleHeads(model, r, num_heads=3, p_top1=0.9, p_top2=0.05) for r in references])
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=24, heads=heads, tree="mc_sim_7b_31")
    check_rows(out, prompts, [r[0, p.shape[1] :] for p, r in zip(prompts, references)], pad_id=0)
    assert model.__dict__["_fastmedusa_engine"].attention == "triton"
    assert out.tokens_per_step > 2


def test_fused_argmax_batch_equals_hf_greedy(monkeypatch):
    """Greedy tokens from the fused LM head + argmax kernel (interpreted here; the default on CUDA), in the
    prefill, the plain steps and the verify passes: every row of a left-padded batch gets HF's greedy tokens,
    with and without the tree."""
    from fastmedusa.ops import linear_argmax

    monkeypatch.setattr(linear_argmax, "FUSED_ARGMAX", "on")
    model = tiny_llama(6, num_key_value_heads=2)  # a fresh model: engines are cached on the model
    prompts = ragged_prompts([4, 7], seed=8)
    references = [hf_greedy(model, p, 20) for p in prompts]
    new = [r[0, p.shape[1] :] for p, r in zip(prompts, references)]
    heads = BatchOracleHeads([OracleHeads(model, r, num_heads=3, p_top1=0.9, p_top2=0.05) for r in references])
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, heads=heads, tree="mc_sim_7b_31")
    check_rows(out, prompts, new, pad_id=0)
    assert out.tokens_per_step > 2
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=20, medusa=False)
    check_rows(plain, prompts, new, pad_id=0)
    assert model.__dict__["_fastmedusa_engine"].fused_argmax


def test_triton_attention_split_context_equals_hf_greedy(monkeypatch):
    """A context past one split of the cache (256 slots): each decode step's attention is cut into splits,
    merged by the kernel's last split; rows of different lengths give HF's greedy tokens all the same."""
    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    model = tiny_llama(5, num_key_value_heads=2)  # a fresh model: engines are cached on the model
    prompts = ragged_prompts([300, 130], seed=7)
    references = [hf_greedy(model, p, 16) for p in prompts]
    heads = BatchOracleHeads([OracleHeads(model, r, num_heads=3, p_top1=0.9, p_top2=0.05) for r in references])
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=16, heads=heads, tree="mc_sim_7b_31")
    check_rows(out, prompts, [r[0, p.shape[1] :] for p, r in zip(prompts, references)], pad_id=0)
    engine = model.__dict__["_fastmedusa_engine"]
    assert engine.attention == "triton" and engine.max_len > 256


def test_sampling_is_reproducible_per_row(llama):
    prompts = ragged_prompts([4, 6, 2], seed=4)
    ids, mask = left_pad(prompts)
    batch = generate(llama, ids, attention_mask=mask, max_new_tokens=16, medusa=False, temperature=1.0,
                     seed=[11, 12, 13])  # fmt: skip
    again = generate(llama, ids, attention_mask=mask, max_new_tokens=16, medusa=False, temperature=1.0,
                     seed=[11, 12, 13])  # fmt: skip
    assert torch.equal(batch.sequences, again.sequences)
    for row, (p, s) in enumerate(zip(prompts, [11, 12, 13])):
        alone = generate(llama, p, max_new_tokens=16, medusa=False, temperature=1.0, seed=[s])
        assert alone.new_token_ids.tolist() == batch.row_new_token_ids(row).tolist()
    other = generate(
        llama, ids, attention_mask=mask, max_new_tokens=16, medusa=False, temperature=1.0, seed=5
    )
    assert not torch.equal(other.sequences, batch.sequences)


def test_sampling_follows_the_distribution():
    """Gumbel-max with the counter-based noise: token frequencies match softmax(logits / T)."""
    from fastmedusa.decode.generate import sample_token

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seeds = torch.arange(4000)
    tokens = sample_token(logits, 0.7, seeds, torch.full((4000,), 3))
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    assert (freq - expected).abs().max() < 0.03


def test_typical_acceptance_with_oracle_heads_accepts_long_typical_paths(llama):
    """Oracle heads propose each row's plain *sampled* continuation (same seed). Sampling noise is a function
    of (seed, position), so a root Medusa samples after an accepted path is the token plain sampling drew
    there: with only those tokens in the tree (a chain), the output equals plain sampling token for token.
    Typical acceptance takes long paths, and every accepted speculated token passes the criterion under an
    independent fp64 computation (also in a wide tree, whose other tokens may pass and change the text)."""
    temperature, eps, delta = 0.7, 0.09, 0.3
    prompts = ragged_prompts([5, 3], seed=5)
    sampled = [
        generate(llama, p, max_new_tokens=64, medusa=False, temperature=temperature, seed=[s]).sequences
        for p, s in zip(prompts, [1, 2])
    ]
    ids, mask = left_pad(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=40, temperature=temperature, seed=[1, 2],
              typical_epsilon=eps, typical_delta=delta)  # fmt: skip
    exact = BatchOracleHeads([OracleHeads(llama, r, num_heads=4, p_top1=1.0, p_top2=0.0) for r in sampled])
    out = generate(llama, ids, heads=exact, tree="chain_4", **kw)
    check_rows(out, prompts, [r[0, p.shape[1] : p.shape[1] + 40] for p, r in zip(prompts, sampled)], pad_id=0)
    assert out.tokens_per_step > 2.0 and max(max(a) for a in out.accept_lengths) >= 3
    check_typical(llama, prompts, out, temperature, eps, delta)
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=4, p_top1=0.8, p_top2=0.1) for r in sampled])
    out = generate(llama, ids, heads=heads, tree="mc_sim_7b_63", **kw)
    assert out.tokens_per_step > 1.5
    check_typical(llama, prompts, out, temperature, eps, delta)


@pytest.mark.parametrize("tree", ["chain_4", "mc_sim_7b_63"])
def test_exact_acceptance_equals_plain_sampling_per_row(llama, tree):
    """acceptance="exact": a speculated token passes only if it is the token the model samples at its parent,
    with plain sampling's noise for that position. The output is then plain sampling's, token for token, in
    every row of a batch, whatever the heads propose; oracle heads that mostly propose the sampled
    continuation get long paths accepted (p_top1 < 1: wrong guesses must be rejected, not emitted)."""
    temperature, seeds = 0.9, [21, 22, 23]
    prompts = ragged_prompts([5, 3, 8], seed=6)
    sampled = [
        generate(llama, p, max_new_tokens=64, medusa=False, temperature=temperature, seed=[s]).sequences
        for p, s in zip(prompts, seeds)
    ]
    ids, mask = left_pad(prompts)
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=4, p_top1=0.8, p_top2=0.1) for r in sampled])
    out = generate(llama, ids, attention_mask=mask, max_new_tokens=40, temperature=temperature, seed=seeds,
                   heads=heads, tree=tree, acceptance="exact")  # fmt: skip
    check_rows(out, prompts, [r[0, p.shape[1] : p.shape[1] + 40] for p, r in zip(prompts, sampled)], pad_id=0)
    assert out.tokens_per_step > 1.8 and max(max(a) for a in out.accept_lengths) >= 3
    # the heads' wrong guesses reach the verify pass: a rule that accepts every proposed token (typical with a
    # zero threshold) emits some of them, so the check above can fail
    anything = generate(llama, ids, attention_mask=mask, max_new_tokens=40, temperature=temperature, seed=seeds,
                        heads=heads, tree=tree, typical_epsilon=0.0, typical_delta=0.0)  # fmt: skip
    assert not torch.equal(anything.sequences, out.sequences)


def test_exact_acceptance_with_random_heads_equals_plain_sampling(llama):
    """Random heads: most speculated tokens are rejected; every emitted token is still plain sampling's."""
    model = random_medusa(llama, num_heads=3)
    prompts = ragged_prompts([4, 9], seed=8)
    ids, mask = left_pad(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=24, temperature=1.3, seed=[5, 6])
    plain = generate(model, ids, medusa=False, **kw)
    exact = generate(model, ids, tree="mc_sim_7b_31", acceptance="exact", **kw)
    assert torch.equal(exact.sequences, plain.sequences)
    assert exact.tree_nodes == 32 and all(len(a) > 0 for a in exact.accept_lengths)


def test_exact_acceptance_rule_against_hand_computed_samples():
    """The rule by itself: node i passes iff its token is the Gumbel-max sample at its parent, computed here
    without the library's noise helpers' sampling code (numpy-free float64 argmax over the same noise)."""
    from fastmedusa.decode.generate import gumbel_noise, node_acceptance, sample_token

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    parents = torch.tensor([0, 0, 0, 1, 2])
    seeds = torch.tensor([4, 9])
    positions = torch.tensor([[7, 8, 8, 9, 9], [2, 3, 3, 4, 4]])  # a node's depth + 1 after the root's
    drawn = sample_token(logits, 0.8, seeds[:, None], positions)  # (2, 5)
    for b in range(2):
        for i in range(5):
            noise = gumbel_noise(seeds[b : b + 1], positions[b, i : i + 1], 11)[0].double()
            assert int(drawn[b, i]) == int(torch.argmax(logits[b, i] / 0.8 + noise))
    tokens = drawn.gather(1, parents.expand(2, 5)).clone()
    tokens[0, 3] = (tokens[0, 3] + 1) % 11  # node 3 of row 0 is not its parent's sample
    ok = node_acceptance(None, tokens, parents, 0.0, 0.09, 0.3, drawn)
    expected = torch.ones(2, 5, dtype=torch.bool)
    expected[0, 3] = False
    assert torch.equal(ok, expected)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (7, 0.6), (1, 1.0), (0, 0.01), (0, 1.0)])
def test_truncated_logits_match_hugging_face_warpers(top_k, top_p):
    """top-k / top-p keep the tokens Hugging Face's own warpers keep (temperature, then top-k, then top-p)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from fastmedusa.decode.generate import scaled_logits

    gen = torch.Generator().manual_seed(top_k + int(100 * top_p))
    logits = torch.randn(6, 50, generator=gen) * 3
    got = scaled_logits(logits, 0.8, top_k, top_p)
    ref = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    kept = ~torch.isinf(got)
    torch.testing.assert_close(got[kept], ref[kept])
    assert kept.sum(-1).min() >= 1 and (top_k == 0 or kept.sum(-1).max() <= top_k)


def test_top_p_sampling_follows_the_truncated_distribution():
    from fastmedusa.decode.generate import sample_token

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]]).repeat(6000, 1)
    probs = torch.softmax(logits[0].double(), -1)  # 0.44, 0.27, 0.16, 0.06, 0.02: the nucleus of 0.75 is 3 tokens
    tokens = sample_token(logits, 1.0, torch.arange(6000), torch.full((6000,), 2), top_p=0.75)
    freq = torch.bincount(tokens, minlength=5).double() / 6000
    expected = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(2, dtype=torch.float64)])
    assert (freq - expected).abs().max() < 0.03 and freq[3:].sum() == 0
    tokens = sample_token(logits, 1.0, torch.arange(6000), torch.full((6000,), 2), top_k=2)
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize("acceptance", ["exact", "typical"])
def test_top_k_top_p_decoding_draws_only_from_the_truncated_distribution(llama, acceptance):
    """Medusa sampling with top-k and top-p: exact acceptance equals plain sampling with the same truncation
    token for token; typical acceptance emits only tokens inside the top-k and the nucleus of the model's own
    fp64 distribution at their position (speculated ones included), checked here without the library."""
    temperature, top_k, top_p, seeds = 1.0, 12, 0.7, [3, 4]
    prompts = ragged_prompts([6, 3], seed=9)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampled = [generate(llama, p, max_new_tokens=48, medusa=False, seed=[s], **kw).sequences
               for p, s in zip(prompts, seeds)]  # fmt: skip
    ids, mask = left_pad(prompts)
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=3, p_top1=0.8, p_top2=0.1) for r in sampled])
    out = generate(llama, ids, attention_mask=mask, max_new_tokens=32, seed=seeds, heads=heads,
                   tree="mc_sim_7b_31", acceptance=acceptance, **kw)  # fmt: skip
    if acceptance == "exact":
        check_rows(out, prompts, [r[0, p.shape[1] : p.shape[1] + 32] for p, r in zip(prompts, sampled)], pad_id=0)
    assert out.tokens_per_step > 1.5
    for row, p in enumerate(prompts):
        new = out.row_new_token_ids(row)
        with torch.no_grad():
            z = llama(torch.cat([p[0], new])[None]).logits[0, p.shape[1] - 1 : -1].double() / temperature
        for logits_at, token in zip(z, new.tolist()):
            order = logits_at.argsort(descending=True).tolist()
            probs = torch.softmax(logits_at[order[:top_k]], -1).tolist()  # HF: top-k, then top-p of what is left
            nucleus, mass = [], 0.0
            for t, q in zip(order, probs):
                if mass >= top_p:
                    break
                nucleus.append(t)
                mass += q
            assert token in nucleus


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(top_k=-1), r"top_k=-1 \(--top-k\): pass a number of tokens"),
        (dict(top_k=2.5), r"top_k=2.5"),
        (dict(top_p=0.0), r"top_p=0.0 \(--top-p\): pass a probability above 0 and at most 1"),
        (dict(top_p=1.5), r"top_p=1.5"),
        (dict(top_p=float("nan")), r"top_p=nan"),
        (dict(top_p="0.9"), r"top_p='0.9'"),
    ],
)
def test_bad_top_k_top_p_are_refused(llama, kw, message):
    from fastmedusa.decode import generate_many

    with pytest.raises(ValueError, match=message):
        generate(llama, torch.tensor([[1, 2, 3]]), max_new_tokens=2, medusa=False, temperature=0.5, **kw)
    with pytest.raises(ValueError, match=message):
        generate_many(llama, [[1, 2, 3]], 2, medusa=False, temperature=0.5, **kw)


@pytest.mark.parametrize("bad", ["Exact", "rejection", None, 1])
def test_unknown_acceptance_rule_is_refused(llama, bad):
    with pytest.raises(ValueError, match="acceptance=.*pass 'typical'.*or 'exact'"):
        generate(random_medusa(llama, num_heads=2), torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=0.5,
                 acceptance=bad)  # fmt: skip


def check_typical(llama, prompts, out, temperature, eps, delta):
    for row, p in enumerate(prompts):
        new = out.row_new_token_ids(row)
        seq = torch.cat([p[0], new])[None]
        with torch.no_grad():
            z = llama(seq).logits[0, p.shape[1] - 1 : -1].double() / temperature  # (new, V)
        probs = torch.softmax(z, -1)
        entropy = -(probs * torch.log(probs)).sum(-1)
        threshold = torch.clamp(delta * torch.exp(-entropy), max=eps)
        p_token = probs.gather(-1, new[:, None])[:, 0]
        # which emitted tokens were speculated: per step, `a` accepted then one root
        speculated, position = [], 1
        for a in out.accept_lengths[row]:
            speculated += range(position, min(position + a, len(new)))
            position += a + 1
        assert len(speculated) > 10
        assert (p_token[speculated] > threshold[speculated]).all()


def test_typical_threshold_rule_against_float64():
    from fastmedusa.decode.generate import node_acceptance

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen) * 2
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    parents = torch.tensor([0, 0, 1, 1, 2])
    temperature, eps, delta = 0.8, 0.2, 0.5
    got = node_acceptance(logits, tokens, parents, temperature, eps, delta)
    for b in range(2):
        for i in range(5):
            p = torch.softmax(logits[b, parents[i]].double() / temperature, -1)
            h = -(p * p.log()).sum().item()
            assert got[b, i].item() == (p[tokens[b, i]].item() > min(eps, delta * math.exp(-h)))
    greedy = node_acceptance(logits, tokens, parents, 0.0, eps, delta)
    assert torch.equal(greedy, tokens == logits.argmax(-1)[:, parents])


def test_batch_bad_input(llama):
    prompts = ragged_prompts([3, 5], seed=6)
    ids, mask = left_pad(prompts)
    with pytest.raises(ValueError, match="no attention_mask"):
        generate(llama, ids, max_new_tokens=4, medusa=False)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left padding"):
        generate(llama, ids, attention_mask=right, max_new_tokens=4, medusa=False)
    with pytest.raises(ValueError, match="all padding"):
        generate(llama, ids, attention_mask=torch.zeros_like(mask), max_new_tokens=4, medusa=False)
    with pytest.raises(ValueError, match="does not match input_ids"):
        generate(llama, ids, attention_mask=mask[:, 1:], max_new_tokens=4, medusa=False)
    with pytest.raises(ValueError, match="built for 1 rows"):
        generate(llama, ids, attention_mask=mask, max_new_tokens=4, medusa=False, max_batch_size=1)
    with pytest.raises(ValueError, match="one per row"):
        generate(llama, ids, attention_mask=mask, max_new_tokens=4, medusa=False, temperature=1.0, seed=[1])
    for kw, name in (({"temperature": -1.0}, "temperature=-1.0"), ({"temperature": float("nan")}, "temperature=nan"),
                     ({"temperature": float("inf")}, "temperature=inf"),
                     ({"typical_epsilon": -0.1}, "typical_epsilon=-0.1")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} .*pass a finite number, 0 or more"):
            generate(llama, ids, attention_mask=mask, max_new_tokens=4, medusa=False, **kw)


@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_finished_rows_stop_costing_work(llama, monkeypatch, medusa):
    """Rows finishing at different EOS positions: the step shrinks to the unfinished rows (power-of-two
    batches), and every row still equals its batch-1 output."""
    from fastmedusa.decode.engine import DecodeEngine

    prompts = ragged_prompts([3, 5, 2, 7, 4, 6, 1, 8], seed=7)
    alone = [generate(llama, p, max_new_tokens=40, medusa=False).new_token_ids for p in prompts]
    counts = torch.bincount(torch.cat(alone), minlength=VOCAB)
    eos = int(counts.argmax())  # the most frequent token: most rows stop early, at different positions
    refs = []
    for a in alone:
        hits = (a == eos).nonzero()
        refs.append(a[: int(hits[0]) + 1] if hits.numel() else a)
    assert len({len(r) for r in refs}) >= 4
    sizes = []
    forward = DecodeEngine.forward
    monkeypatch.setattr(
        DecodeEngine, "forward", lambda self, t, *a: sizes.append(t.shape[0]) or forward(self, t, *a)
    )
    model = random_medusa(llama, num_heads=3) if medusa else llama
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=40, medusa=medusa, eos_token_id=eos,
                   tree="chain_2" if medusa else None)  # fmt: skip
    check_rows(out, prompts, refs, pad_id=eos)
    assert sizes[0] == 8 and min(sizes) < 8 and all(s in (2, 4, 8) for s in sizes)
    assert out.steps_per_row == (
        [len(r) for r in refs] if not medusa else [1 + len(a) for a in out.accept_lengths]
    )
    same = generate(model, ids, attention_mask=mask, max_new_tokens=40, medusa=medusa, eos_token_id=eos,
                    tree="chain_2" if medusa else None, compact=False)  # fmt: skip
    assert torch.equal(same.sequences, out.sequences)


def test_precomputed_noise_keys_give_the_same_samples():
    """Compiled steps pass `token_keys` in as a buffer; the noise, and so every sample, is unchanged by it."""
    from fastmedusa.decode.generate import gumbel_noise, token_keys

    seeds, positions = torch.tensor([0, 7, 2**32 - 1]), torch.tensor([0, 5, 2**31 + 3])
    assert torch.equal(gumbel_noise(seeds, positions, 1000), gumbel_noise(seeds, positions, 1000, token_keys(1000)))
    assert int(token_keys(49152).max()) < 2**32


def test_noise_is_finite_and_top_k_one_sampling_is_argmax():
    """The uniforms behind the Gumbel noise must lie strictly inside (0, 1) in fp32. When the top 24-bit value
    rounded to 1.0, one token in 2^24 got +inf noise: about 1 sampled token in 340 (V = 49,152) was a uniformly
    random one, and a masked token (-inf + inf = NaN) won even under top_k=1. 4,096 fresh (seed, position)
    draws over 49,152 tokens would have met that about 12 times."""
    from fastmedusa.decode.generate import gumbel_noise, open_unit_interval, sample_token

    edges = open_unit_interval(torch.tensor([0, 2**23 - 1]))
    assert 0 < edges[0] and edges[1] < 1 and torch.isfinite(-torch.log(-torch.log(edges))).all()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh draws each run
    vocab = 49152
    for _ in range(16):
        seeds = torch.randint(0, 2**31 - 1, (256,), generator=gen)
        positions = torch.randint(0, 1 << 20, (256,), generator=gen)
        noise = gumbel_noise(seeds, positions, vocab)
        assert torch.isfinite(noise).all() and noise.max() < 16.7 and noise.min() > -2.9
        logits = torch.randn(256, vocab, generator=gen) * 3
        sampled = sample_token(logits, 1.5, seeds, positions, top_k=1)
        assert torch.equal(sampled, logits.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("medusa", [False, True])
def test_sampling_compiles_on_gpu_and_matches_eager(medusa):
    """Inductor once failed to compile any sampling step for CUDA (an int64 hash constant traced into a Triton
    index expression). Compiled sampling must build and draw the eager path's tokens."""
    model = random_medusa(tiny_llama()).cuda().eval()
    ids = torch.randint(1, VOCAB, (2, 12), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, medusa=medusa, temperature=0.8, seed=3)
    compiled = generate(model, ids, compile=True, **kw)
    eager = generate(model, ids, compile=False, **kw)
    assert compiled.sequences.shape == eager.sequences.shape
    if not medusa:  # fp32 plain sampling: identical noise and logits up to kernel rounding
        assert (compiled.sequences == eager.sequences).float().mean() > 0.9
    else:  # exact acceptance, compiled and captured, draws plain sampling's tokens (up to kernel rounding)
        exact = generate(model, ids, compile=True, acceptance="exact", **kw)
        plain = generate(model, ids, compile=True, **(kw | {"medusa": False}))
        assert (exact.sequences == plain.sequences).float().mean() > 0.9


def test_cuda_graphs_mode_is_checked(llama, monkeypatch):
    from fastmedusa.decode.generate import cuda_graphs_mode

    monkeypatch.delenv("FASTMEDUSA_CUDA_GRAPHS", raising=False)
    assert cuda_graphs_mode() == "step"  # the default: each whole step captured as one graph
    monkeypatch.setenv("FASTMEDUSA_CUDA_GRAPHS", "off")
    assert cuda_graphs_mode() == "off"
    monkeypatch.setenv("FASTMEDUSA_CUDA_GRAPHS", "always")
    with pytest.raises(ValueError, match="FASTMEDUSA_CUDA_GRAPHS='always'"):
        generate(llama, torch.tensor([[1, 2, 3]]), max_new_tokens=2, medusa=False)


@pytest.mark.gpu
@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_step_graphs_equal_compile_graphs_on_gpu(monkeypatch, medusa):
    """FASTMEDUSA_CUDA_GRAPHS=step (the default: each whole step captured and replayed) gives the tokens,
    per-row counts and accepted lengths of torch.compile's own graphs (FASTMEDUSA_CUDA_GRAPHS=compile), with
    finished rows compacted and on a second call that replays the captured graphs."""
    model = random_medusa(tiny_llama()).cuda().eval()
    prompts = [p.cuda() for p in ragged_prompts([3, 5, 2, 7, 4, 6, 1, 8], seed=7)]
    ids, mask = left_pad(prompts)
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=40, medusa=False, compile=True)
    eos = int(torch.bincount(plain.sequences[:, ids.shape[1] :].reshape(-1)).argmax())
    kw = dict(attention_mask=mask, max_new_tokens=40, medusa=medusa, eos_token_id=eos, compile=True)
    results = {}
    for mode in ("compile", "step", "step"):
        monkeypatch.setenv("FASTMEDUSA_CUDA_GRAPHS", mode)
        results.setdefault(mode, []).append(generate(model, ids, **kw))
    reference = results["compile"][0]
    for out in results["step"]:
        assert torch.equal(out.sequences, reference.sequences)
        assert out.new_tokens_per_row == reference.new_tokens_per_row
        assert out.accept_lengths == reference.accept_lengths
    runners = [v for k, v in model.base.__dict__["_fastmedusa_engine"].compiled.items() if k[0] == "runner"]
    assert any(r.captured for r in runners)


def test_medusa_batch_compacts_without_eos(llama, monkeypatch):
    """Without EOS, Medusa rows still reach max_new_tokens at different steps (each accepts its own lengths):
    by default the batch shrinks as they finish (down to 2 rows), and every row keeps its greedy output."""
    from fastmedusa.decode.engine import DecodeEngine

    prompts = ragged_prompts([6, 2, 9, 4, 7, 3, 5, 8], seed=3)
    references = [hf_greedy(llama, p, 48) for p in prompts]
    accuracy = [0.95, 0.0, 0.9, 0.95, 0.95, 0.0, 0.9, 0.95]  # six rows accept long paths, two next to none
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=3, p_top1=a, p_top2=0.0)
                              for r, a in zip(references, accuracy)])  # fmt: skip
    sizes = []
    forward = DecodeEngine.forward
    monkeypatch.setattr(
        DecodeEngine, "forward", lambda self, t, *a: sizes.append(t.shape[0]) or forward(self, t, *a)
    )
    ids, mask = left_pad(prompts)
    out = generate(llama, ids, attention_mask=mask, max_new_tokens=30, heads=heads, tree="mc_sim_7b_15")
    check_rows(out, prompts, [r[0, p.shape[1] : p.shape[1] + 30] for p, r in zip(prompts, references)], pad_id=0)
    steps = out.steps_per_row
    assert max(steps) > 2 * min(steps), steps
    assert sizes[0] == 8 and min(sizes) == 2, "the step shrank to the two slow rows, and not below 2"
    sizes.clear()
    fixed = generate(llama, ids, attention_mask=mask, max_new_tokens=30, heads=heads, tree="mc_sim_7b_15",
                     compact=False)  # fmt: skip
    assert set(sizes) == {8} and torch.equal(fixed.sequences, out.sequences)
    assert fixed.accept_lengths == out.accept_lengths and fixed.steps_per_row == out.steps_per_row


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["apart", "shared"])
def test_compiled_compaction_equals_eager(mode, monkeypatch):
    """Compiled steps (the decoder block as one nested compile region; "apart": the full batch's step, then
    one step with a dynamic batch dimension for every compacted size; "shared": that one dynamic step for
    the full batch too) give the eager path's tokens and accepted lengths."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FASTMEDUSA_BATCH_COMPILE", mode)
    torch._dynamo.reset()  # count this mode's compiles: graphs of the same shapes serve any model's weights

    def fresh_model():  # its own engine and KV cache: the compiled run cannot lean on the eager run's writes
        return random_medusa(tiny_llama(4, num_hidden_layers=3), num_heads=2)

    model = fresh_model()
    prompts = ragged_prompts([3, 6, 2, 5, 4, 7, 1, 3], seed=12)  # rows end after 6-24 steps
    ids, mask = left_pad(prompts)
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=24, medusa=False)
    eos = int(torch.bincount(plain.sequences[:, ids.shape[1] :].reshape(-1)).argmax())
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=eos, tree="chain_2")
    eager = generate(model, ids, **kw)
    assert len(set(eager.new_tokens_per_row)) > 1, "rows end at different steps, so the batch shrinks"

    graphs = counters["stats"]["unique_graphs"]
    compiled_model = fresh_model()
    compiled = generate(compiled_model, ids, compile=True, **kw)
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    engine = compiled_model.base.__dict__["_fastmedusa_engine"]
    runner = next(v for k, v in engine.compiled.items() if k[0] == "runner" and k[1] == "medusa")
    compacted = sorted(size for size, shrunk in runner.states if shrunk)
    assert len(compacted) >= 2, f"the batch should shrink at least twice here (states {sorted(runner.states)})"
    assert min(compacted) >= 2, "compaction stops at two rows"
    assert all(hasattr(t, "_dynamo_dynamic_indices") for t in runner.states[(compacted[0], True)].values())
    assert torch.equal(compiled.sequences, eager.sequences)
    assert compiled.accept_lengths == eager.accept_lengths
    graphs = counters["stats"]["unique_graphs"]
    half = generate(compiled_model, ids[:4], compile=True, **(kw | {"attention_mask": mask[:4]}))
    assert torch.equal(half.sequences, generate(model, ids[:4], **(kw | {"attention_mask": mask[:4]})).sequences)
    if mode == "shared":  # one compile: the full batch of 8 ran the dynamic step, and so does a batch of 4
        assert new_graphs == 1 and (8, True) in runner.states and (8, False) not in runner.states
        assert counters["stats"]["unique_graphs"] == graphs and (4, False) not in runner.states
        return
    assert new_graphs == 2, f"one compile for the full batch, one for all {len(compacted)} smaller sizes"
    # a later full batch of a size compaction used runs its own static step, not the compacted one
    assert counters["stats"]["unique_graphs"] - graphs == 1 and (4, False) in runner.states
    assert not any(hasattr(t, "_dynamo_dynamic_indices") for t in runner.states[(4, False)].values())


def test_bad_batch_compile_mode(monkeypatch):
    from fastmedusa.decode.loop import batch_compile

    monkeypatch.setenv("FASTMEDUSA_BATCH_COMPILE", "dynamic")
    with pytest.raises(ValueError, match="FASTMEDUSA_BATCH_COMPILE='dynamic': use 'apart'"):
        batch_compile()
