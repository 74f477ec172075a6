"""generate_many: prompts through a fixed number of slots, refilled as rows end; each prompt gets its own output."""

import numpy as np
import pytest
import torch
from conftest import VOCAB, BatchOracleHeads, OracleHeads, hf_greedy, random_medusa, tiny_llama
from test_batch import ragged_prompts

from fastmedusa.decode import generate, generate_many
from fastmedusa.decode.generate import row_seeds


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(4)


def fixed_batch_steps(counts: list[int], batch: int) -> int:
    """Forwards of plain decoding in consecutive batches: each batch runs until its longest row is done."""
    return sum(max(counts[i : i + batch]) for i in range(0, len(counts), batch))


def test_plain_refill_gives_each_prompt_its_own_output(llama):
    prompts = ragged_prompts([3, 5, 2, 7, 4, 6, 1, 8, 5, 2, 6], seed=7)
    alone = [generate(llama, p, max_new_tokens=30, medusa=False).new_token_ids for p in prompts]
    eos = int(torch.bincount(torch.cat(alone), minlength=VOCAB).argmax())  # rows end at different steps
    refs = []
    for a in alone:
        hits = (a == eos).nonzero()
        refs.append(a[: int(hits[0]) + 1] if hits.numel() else a)
    assert len({len(r) for r in refs}) >= 4
    out = generate_many(llama, [p[0] for p in prompts], 30, batch_size=4, medusa=False, eos_token_id=eos)
    assert [t.tolist() for t in out.new_token_ids] == [r.tolist() for r in refs]
    assert out.steps_per_prompt == [len(r) for r in refs] and out.accept_lengths == [[]] * len(prompts)
    assert out.steps < fixed_batch_steps([len(r) for r in refs], 4), "refilled slots: fewer forwards"
    assert out.batch_size == 4 and out.new_tokens == sum(len(r) for r in refs) and "11 prompts" in out.summary()


def test_medusa_refill_is_lossless_per_prompt(llama):
    """Oracle heads of mixed accuracy: rows end at very different steps without EOS; every prompt still gets
    its own greedy continuation, and refilling needs fewer forwards than fixed batches of the same prompts."""
    prompts = ragged_prompts([6, 2, 9, 4, 7, 3, 5, 8, 2, 6], seed=3)
    references = [hf_greedy(llama, p, 40) for p in prompts]
    accuracy = [0.95, 0.0, 0.9, 0.95, 0.0, 0.9, 0.95, 0.1, 0.95, 0.9]
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=3, p_top1=a, p_top2=0.0)
                              for r, a in zip(references, accuracy)])  # fmt: skip
    out = generate_many(llama, [p[0] for p in prompts], 24, batch_size=4, heads=heads, tree="mc_sim_7b_15")
    for p, r, got in zip(prompts, references, out.new_token_ids):
        assert got.tolist() == r[0, p.shape[1] : p.shape[1] + 24].tolist()
    assert out.tree_nodes == 16
    assert [1 + len(a) for a in out.accept_lengths] == out.steps_per_prompt
    assert all(sum(min(a + 1, 24) for a in acc) + 1 >= 24 for acc in out.accept_lengths)
    assert out.tokens_per_step > 1.5
    per_batch = []
    for i in range(0, len(prompts), 4):
        chunk = prompts[i : i + 4]
        width = max(q.shape[1] for q in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, q in enumerate(chunk):
            ids[row, width - q.shape[1] :], mask[row, width - q.shape[1] :] = q[0], 1
        per_batch.append(generate(llama, ids, attention_mask=mask, max_new_tokens=24, heads=heads,
                                  tree="mc_sim_7b_15", compact=False).steps)  # fmt: skip
    assert out.steps < sum(per_batch), (out.steps, per_batch)


def test_sampled_prompts_draw_what_they_draw_alone(llama):
    prompts = ragged_prompts([4, 6, 2, 5, 3], seed=4)
    out = generate_many(llama, [p[0] for p in prompts], 12, batch_size=2, medusa=False, temperature=1.0, seed=9)
    seeds = row_seeds(9, len(prompts), torch.device("cpu")).tolist()
    for p, s, got in zip(prompts, seeds, out.new_token_ids):
        alone = generate(llama, p, max_new_tokens=12, medusa=False, temperature=1.0, seed=[s])
        assert got.tolist() == alone.new_token_ids.tolist()


def test_exact_acceptance_through_refilled_slots_is_plain_sampling(llama):
    """Medusa with acceptance="exact" (and nucleus sampling) through refilled slots: each prompt gets its plain
    sampled tokens."""
    prompts = ragged_prompts([4, 6, 2, 5, 3], seed=11)
    kw = dict(temperature=0.8, top_p=0.9)
    sampled = [generate(llama, p, max_new_tokens=40, medusa=False, seed=[30 + i], **kw).sequences
               for i, p in enumerate(prompts)]  # fmt: skip
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=3, p_top1=0.8, p_top2=0.1) for r in sampled])
    out = generate_many(llama, [p[0] for p in prompts], 20, batch_size=2, heads=heads, tree="mc_sim_7b_15",
                        seed=[30 + i for i in range(5)], acceptance="exact", **kw)  # fmt: skip
    for p, r, got in zip(prompts, sampled, out.new_token_ids):
        assert got.tolist() == r[0, p.shape[1] : p.shape[1] + 20].tolist()
    assert out.tokens_per_step > 1.5


def test_refill_edge_cases_match_each_prompt_alone(llama):
    """Idle slots (9 prompts, 8 slots, 2 a refill), one slot, a refill batch wider than the first, EOS inside
    accepted Medusa paths, and `generate` on the same model afterwards."""
    prompts = ragged_prompts([3, 5, 2, 4, 3, 6, 2, 5, 30], seed=5)
    references = [hf_greedy(llama, p, 40) for p in prompts]
    heads = BatchOracleHeads([OracleHeads(llama, r, num_heads=3, p_top1=0.9, p_top2=0.05) for r in references])
    news = [r[0, p.shape[1] : p.shape[1] + 20] for p, r in zip(prompts, references)]
    eos = int(torch.bincount(torch.cat(news), minlength=VOCAB).argmax())
    refs = []
    for new in news:
        hits = (new == eos).nonzero()
        refs.append((new[: int(hits[0]) + 1] if hits.numel() else new).tolist())
    assert len({len(r) for r in refs}) >= 3
    flat = [p[0] for p in prompts]
    for batch in (8, 1, 3):
        out = generate_many(llama, flat, 20, batch_size=batch, heads=heads, tree="mc_sim_7b_15", eos_token_id=eos)
        assert [t.tolist() for t in out.new_token_ids] == refs, batch
        assert out.tokens_per_step > 1.5 and out.batch_size == batch
    alone = generate(llama, prompts[0], max_new_tokens=20, heads=heads, tree="mc_sim_7b_15", eos_token_id=eos)
    assert alone.new_token_ids.tolist() == refs[0]


def test_equal_rows_refill_all_slots_at_once(llama):
    """Plain decoding without EOS: every row ends at the same step, all slots refill in one pass, and the
    forwards are those of fixed batches; rows that end at their first token cost no step."""
    prompts = [p[0] for p in ragged_prompts([4] * 12, seed=8)]
    out = generate_many(llama, prompts, 10, batch_size=4, medusa=False)
    assert out.steps == fixed_batch_steps([10] * 12, 4)
    one = generate_many(llama, prompts, 1, batch_size=4, medusa=False)
    assert one.steps == 3 and [t.numel() for t in one.new_token_ids] == [1] * 12


def test_fewer_prompts_than_slots_and_one_token(llama):
    model = random_medusa(llama, num_heads=2)
    prompts = [[1, 2, 3], [4, 5]]
    out = generate_many(model, prompts, 1, batch_size=8, tree="chain_2")
    assert out.batch_size == 2 and [t.numel() for t in out.new_token_ids] == [1, 1] and out.steps == 1
    for p, got in zip(prompts, out.new_token_ids):
        assert got.tolist() == generate(model, torch.tensor([p]), max_new_tokens=1, medusa=False).new_token_ids.tolist()


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "non-empty list of token-id sequences"),
        ([[1, 2], []], {}, "prompt 1 is empty: every prompt needs at least one token"),
        ([[1.5, 2.0]], {}, "prompt 0 must be a non-empty 1-D sequence of integer"),
        ([[1, 2]], {"batch_size": 0}, "batch_size must be an integer >= 1"),
        ([[1, 2]], {"tree": "auto"}, 'no tree="auto"'),
        (["some text"], {}, "prompt 0 is text: give token ids"),
        ([[1, 2]], {"temperature": -1.0}, "temperature=-1.0"),
        ([[1, 2, 3, 4, 5, 6]], {"max_len": 8}, "does not fit the KV cache of 8 slots"),
        ([[1, 2]], {"max_len": 10**12}, "is more KV cache than this model can use"),
        ([[1, 2]], {"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ([[1, 2]], {"max_len": "64"}, "max_len must be an integer >= 1 or None, got '64'"),
        ([[1, 2], [3]], {"temperature": 0.5, "seed": [1, 2, 3]}, "seed has 3 entries for 2 prompts: give one per prompt"),
    ],
)
def test_generate_many_bad_input(llama, prompts, kwargs, message):
    model = random_medusa(llama, num_heads=2)
    with pytest.raises(ValueError, match=message):
        generate_many(model, prompts, 4, **kwargs)


def test_generate_many_takes_integers_of_any_kind_and_one_row_prompts(llama):
    """numpy and 0-d tensor integers count as integers (as for eos_token_id and seed); a (1, P) tensor, what a
    tokenizer returns for one prompt, counts as one prompt; a string flag is refused, not taken as true."""
    model = random_medusa(llama, num_heads=2)
    prompts = [[1, 2, 3], [4, 5]]
    ref = generate_many(model, prompts, 4, batch_size=2, tree="chain_2")
    out = generate_many(model, [torch.tensor([p]) for p in prompts], np.int64(4), batch_size=torch.tensor(2), tree="chain_2")
    assert [t.tolist() for t in out.new_token_ids] == [t.tolist() for t in ref.new_token_ids]
    with pytest.raises(TypeError, match="compile='no': pass True, False or None"):
        generate_many(model, prompts, 4, compile="no")
    one_token = [torch.tensor([7]), torch.tensor([9]), np.array([11])]  # what `tokenizer(w).input_ids[0]` gives
    alone = [generate_many(model, [p.tolist()], 3, tree="chain_2").new_token_ids[0].tolist() for p in one_token]
    out = generate_many(model, one_token, 3, batch_size=2, tree="chain_2")
    assert [t.tolist() for t in out.new_token_ids] == alone


@pytest.mark.slow
def test_compiled_refill_equals_eager():
    """Compiled steps (the full width's, then the last rows' compacted step) give the eager tokens and
    accepted lengths while slots are refilled."""
    model = random_medusa(tiny_llama(5, num_hidden_layers=2), num_heads=2)
    prompts = [p[0] for p in ragged_prompts([3, 6, 2, 5, 4, 7, 1, 3, 5], seed=12)]
    plain = generate_many(model, prompts, 20, batch_size=4, medusa=False)
    eos = int(torch.bincount(torch.cat(plain.new_token_ids), minlength=VOCAB).argmax())
    for medusa in (False, True):
        kw = dict(batch_size=4, medusa=medusa, eos_token_id=eos, tree="chain_2" if medusa else None)
        eager = generate_many(model, prompts, 20, **kw)
        compiled = generate_many(random_medusa(tiny_llama(5, num_hidden_layers=2), num_heads=2), prompts, 20,
                                 compile=True, **kw)  # fmt: skip
        assert len({t.numel() for t in eager.new_token_ids}) > 2, "rows end at different steps"
        assert [t.tolist() for t in compiled.new_token_ids] == [t.tolist() for t in eager.new_token_ids]
        assert compiled.accept_lengths == eager.accept_lengths and compiled.steps == eager.steps


def test_engine_is_shared_with_generate():
    """A cached engine with rows enough is kept (its compiled steps too); a new one gets batch_size rows,
    which distill's fixed batches (`generate(max_batch_size=batch_size)`) then reuse."""
    from fastmedusa.decode.engine import cached_engine

    model = tiny_llama(6)
    ids = torch.randint(1, VOCAB, (8, 5))
    generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, medusa=False)
    first = cached_engine(model)
    generate_many(model, [[1, 2, 3]] * 9, 3, batch_size=4, medusa=False)
    assert cached_engine(model) is first
    fresh = tiny_llama(6)
    generate_many(fresh, [[1, 2, 3]] * 9, 3, batch_size=6, medusa=False)
    built = cached_engine(fresh)
    assert built.max_batch_size == 6
    rows = torch.randint(1, VOCAB, (6, 5))
    generate(fresh, rows, attention_mask=torch.ones_like(rows), max_new_tokens=3, medusa=False, max_batch_size=6)
    assert cached_engine(fresh) is built
    # a cached engine that cannot serve (here: too few KV slots) is replaced by one of batch_size rows too
    generate_many(fresh, [[1 + i % (VOCAB - 1) for i in range(300)]] * 7, 3, batch_size=6, medusa=False)
    assert cached_engine(fresh) is not built and cached_engine(fresh).max_batch_size == 6


def test_finished_plain_rows_stay_inside_a_cache_of_exactly_the_needed_length(llama):
    """A slot whose prompt ended keeps stepping (frozen) while a refilled slot decodes; it must stay at its own
    slot, not run past a cache sized for the longest prompt + max_new_tokens (it did: an IndexError on the CPU,
    an out-of-bounds cache write on CUDA). Prompt 1 ends at its 4th token, prompt 0 at max_new_tokens."""
    new = 24
    for seed in range(200):
        prompts = [p[0] for p in ragged_prompts([10, 4, 6], seed=seed)]
        alone = [generate(llama, p, max_new_tokens=new, medusa=False).new_token_ids.tolist() for p in prompts]
        eos = alone[1][3]
        if eos not in alone[1][:3] and eos not in alone[0] and eos not in alone[2]:
            break
    else:
        pytest.skip("no prompt set where only the second prompt ends early")
    refs = [alone[0], alone[1][:4], alone[2]]
    out = generate_many(llama, prompts, new, batch_size=2, medusa=False, eos_token_id=eos, max_len=10 + new)
    assert [t.tolist() for t in out.new_token_ids] == refs
