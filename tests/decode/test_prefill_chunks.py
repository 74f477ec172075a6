"""The prompt goes through the cache in chunks of a static shape (left-padded to a multiple of the chunk):
every chunk size, every prompt length and every attention layout gives HF's own greedy tokens (fp32)."""

import importlib
import logging

import pytest
import torch
from conftest import VOCAB, BatchOracleHeads, OracleHeads, hf_greedy, left_pad, random_medusa, tiny_llama

from fastmedusa.decode import generate, generate_many
from fastmedusa.decode.generate import pad_to_chunks, prefill_chunk


def prompts_of(lengths, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, n), generator=gen) for n in lengths]


def new_tokens(out, row: int) -> list[int]:
    return out.row_new_token_ids(row).tolist()


@pytest.mark.parametrize("chunk", [0, 1, 7, 16, 64])
def test_plain_batch_equals_hf_for_every_chunk_size(monkeypatch, chunk):
    """Rows of 1..40 tokens: one chunk, several chunks, a last chunk mostly pad, chunks that are all pad for
    the short rows; chunk 0 is the single eager forward."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", str(chunk))
    model = tiny_llama(11)
    prompts = prompts_of([40, 1, 17, 33], seed=chunk)
    ids, mask = left_pad(prompts, pad_id=5)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, medusa=False)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)  # the caller's prompt, not the padded one
    assert out.prompt_length == ids.shape[1]
    for row, p in enumerate(prompts):
        assert new_tokens(out, row) == hf_greedy(model, p, 12)[0, p.shape[1] :].tolist(), f"row {row}"


@pytest.mark.parametrize("layout", ["triton", "gqa", "fold"])
def test_medusa_long_prompt_in_chunks_equals_hf(monkeypatch, layout):
    """A 150-token prompt in 10 chunks of 16 (Medusa, long accepted paths), on each attention layout."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "16")
    monkeypatch.setenv("FASTMEDUSA_ATTENTION", layout)
    model = tiny_llama(12, num_attention_heads=4, num_key_value_heads=2)  # fresh: engines are cached per model
    prompts = prompts_of([150, 23], seed=3)
    references = [hf_greedy(model, p, 24) for p in prompts]
    heads = BatchOracleHeads([OracleHeads(model, r, num_heads=3, p_top1=0.9, p_top2=0.05) for r in references])
    ids, mask = left_pad(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=24, heads=heads, tree="mc_sim_7b_31")
    assert model.__dict__["_fastmedusa_engine"].attention == layout
    for row, (p, r) in enumerate(zip(prompts, references)):
        assert new_tokens(out, row) == r[0, p.shape[1] :].tolist(), f"row {row}"
    assert out.tokens_per_step > 2


def test_repeated_calls_reuse_the_prefill_step(monkeypatch):
    """Prompts of other lengths reuse the one compiled prefill step of their batch size."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "8")
    model = tiny_llama(13)
    for n in (3, 8, 21, 30):
        p = prompts_of([n], seed=n)[0]
        out = generate(model, p, max_new_tokens=6, medusa=False, max_len=256)
        assert new_tokens(out, 0) == hf_greedy(model, p, 6)[0, n:].tolist()
    engine = model.__dict__["_fastmedusa_engine"]
    assert [k for k in engine.compiled if isinstance(k, tuple) and k[1:2] == ("prefill",)] == [
        ("runner", "prefill", 8, False, "step")
    ]


def test_no_room_for_the_padding_falls_back_to_one_forward(monkeypatch):
    """A cache exactly as long as prompt + new tokens has no slot for the pad: the prompt runs in one forward,
    with the same tokens."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "64")
    model = tiny_llama(14)
    p = prompts_of([10], seed=1)[0]
    out = generate(model, p, max_new_tokens=6, medusa=False, max_len=16)
    assert new_tokens(out, 0) == hf_greedy(model, p, 6)[0, 10:].tolist()
    engine = model.__dict__["_fastmedusa_engine"]
    assert not any(isinstance(k, tuple) and k[1:2] == ("prefill",) for k in engine.compiled)


def test_pad_to_chunks():
    ids = torch.arange(1, 11)[None].repeat(2, 1)  # (2, 10)
    offsets = torch.tensor([0, 4])
    padded, off, chunked = pad_to_chunks(ids, offsets, 4, room=2)
    assert chunked and padded.shape == (2, 12) and off.tolist() == [2, 6]
    real = ids.clone()
    real[1, :4] = 0  # a row's own pad slots are fed id 0 too: the embedding never reads a pad id
    assert torch.equal(padded[:, 2:], real) and (padded[:, :2] == 0).all()
    assert pad_to_chunks(ids, offsets, 4, room=1)[2] is False  # 2 pad slots do not fit 1
    assert pad_to_chunks(ids, offsets, 5, room=0)[2] is True  # already a multiple: nothing to pad
    assert pad_to_chunks(ids, offsets, 0, room=100)[2] is False


@pytest.mark.parametrize("value", ["-1", "abc", "1.5"])
def test_bad_chunk_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", value)
    with pytest.raises(ValueError, match="FASTMEDUSA_PREFILL_CHUNK"):
        prefill_chunk()


def _finishing_rows(model, lengths, new_tokens, accuracy=(1.0, 0.2)):
    """Two rows whose heads are right with probability 1.0 and 0.2: row 0 accepts whole paths up to the end,
    so its last step accepts more tokens than max_new_tokens leaves."""
    prompts = prompts_of(lengths, seed=3)
    refs = [hf_greedy(model, p, new_tokens + 8) for p in prompts]
    heads = BatchOracleHeads(
        [OracleHeads(model, r, num_heads=3, p_top1=a, p_top2=0.0) for r, a in zip(refs, accuracy)]
    )
    return prompts, refs, heads


@pytest.mark.parametrize("chunk", ["0", "16"])
def test_rows_that_end_mid_path_stay_inside_a_cache_of_exactly_the_needed_length(monkeypatch, chunk):
    """A row whose last step accepts past max_new_tokens used to move its cache position past the end anyway,
    and its frozen steps then wrote the tree beyond the slots reserved: an out-of-bounds index with the cache
    exactly as long as prompt + new tokens + tree."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", chunk)
    model = tiny_llama(12)
    prompts, refs, heads = _finishing_rows(model, [20, 9], 23)
    ids, mask = left_pad(prompts)
    needed = ids.shape[1] + 23 + 32  # mc_sim_7b_31: 31 paths + the root
    out = generate(model, ids, attention_mask=mask, max_new_tokens=23, heads=heads, tree="mc_sim_7b_31",
                   max_len=needed)  # fmt: skip
    for row, (p, r) in enumerate(zip(prompts, refs)):
        assert new_tokens(out, row) == r[0, p.shape[1] : p.shape[1] + 23].tolist(), f"row {row}"


def test_sampling_is_the_same_in_chunks_and_in_one_forward(monkeypatch):
    """Temperature > 0: the padding moves slots, not positions, so a seeded batch samples the same tokens."""
    model = tiny_llama(15)
    prompts = prompts_of([37, 5, 20], seed=4)
    ids, mask = left_pad(prompts)
    outs = []
    for chunk in ("0", "8"):
        monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", chunk)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=10, medusa=False, temperature=0.8, seed=7)
        outs.append(out.sequences)
    assert torch.equal(outs[0], outs[1])


def test_default_chunks_only_where_the_step_is_captured(monkeypatch):
    monkeypatch.delenv("FASTMEDUSA_PREFILL_CHUNK", raising=False)
    assert prefill_chunk(captured=True) == 64 and prefill_chunk(captured=False) == 0
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "16")
    assert prefill_chunk(captured=False) == 16  # set explicitly: chunks everywhere


def test_small_input_forms():
    """Seeds past 64 bits' product range, and an EOS id given as a 0-d tensor."""
    from fastmedusa.decode.generate import row_seeds

    assert row_seeds(2**62, 2, "cpu").tolist() == row_seeds(2**62 & 0xFFFFFFFF, 2, "cpu").tolist()
    model = tiny_llama(16)
    p = prompts_of([6], seed=2)[0]
    ref = hf_greedy(model, p, 8)[0, 6:].tolist()
    out = generate(model, p, max_new_tokens=8, medusa=False, eos_token_id=torch.tensor(ref[3]))
    assert new_tokens(out, 0) == ref[: ref.index(ref[3]) + 1]


def test_a_tree_may_pass_the_position_limit_but_the_kept_tokens_may_not():
    """The tree's scratch slots may lie past max_position_embeddings (a kept token is verified from the positions
    before it): prompt + max_new_tokens up to the limit decodes with the full tree, equal to HF greedy; one
    token more is a clear error that names the limit, not the tree."""
    model = tiny_llama(17, max_position_embeddings=64)
    heads = random_medusa(model, num_heads=3).medusa_heads
    p = prompts_of([10], seed=1)[0]
    out = generate(model, p, max_new_tokens=54, heads=heads)  # mc_sim_7b_63 pruned to 3 heads: 64 + 10 + 54 slots
    assert new_tokens(out, 0) == hf_greedy(model, p, 54)[0, 10:].tolist()
    assert out.steps < 54  # the tree was used
    plain = generate(model, p, max_new_tokens=54, medusa=False)
    assert new_tokens(plain, 0) == new_tokens(out, 0)
    for medusa in (True, False):
        with pytest.raises(ValueError, match=r"prompt \(10 tokens\) \+ max_new_tokens \(55\) = 65 exceeds the model's "
                           "max_position_embeddings 64: shorten") as error:
            generate(model, p, max_new_tokens=55, heads=heads, medusa=medusa)
        assert "tree" not in str(error.value)
    with pytest.raises(ValueError, match=r"the longest prompt \(10 tokens\) .* max_position_embeddings 64"):
        generate_many(model, [p, p[:4]], 55, heads=heads)
    many = generate_many(model, [p, p[:4]], 54, heads=heads)
    assert many.new_token_ids[0].tolist() == new_tokens(out, 0)


def test_prefill_compile_setting(monkeypatch):
    """FASTMEDUSA_PREFILL_COMPILE is auto by default (compile once PREFILL_COMPILE_AFTER chunks ran eagerly);
    1 compiles on first use, 0 never; anything else is refused with the accepted values."""
    from fastmedusa.decode.generate import PREFILL_COMPILE_AFTER, prefill_compiled

    monkeypatch.delenv("FASTMEDUSA_PREFILL_COMPILE", raising=False)
    assert not prefill_compiled(0)
    assert not prefill_compiled(PREFILL_COMPILE_AFTER - 1)
    assert prefill_compiled(PREFILL_COMPILE_AFTER)
    monkeypatch.setenv("FASTMEDUSA_PREFILL_COMPILE", "1")
    assert prefill_compiled(0)
    monkeypatch.setenv("FASTMEDUSA_PREFILL_COMPILE", "0")
    assert not prefill_compiled(10 * PREFILL_COMPILE_AFTER)
    monkeypatch.setenv("FASTMEDUSA_PREFILL_COMPILE", "yes")
    with pytest.raises(ValueError, match="FASTMEDUSA_PREFILL_COMPILE='yes': use auto .* 1 .* or 0"):
        prefill_compiled(0)


def test_auto_prefill_compiles_once_enough_chunks_ran_eagerly(monkeypatch, caplog):
    """By default the chunk step starts eager and the engine counts its chunks; the first call after the count
    reaches the threshold compiles the step. Tokens are HF's before and after the switch."""
    gen_module = importlib.import_module("fastmedusa.decode.generate")  # the package exports a function so named

    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "8")
    monkeypatch.delenv("FASTMEDUSA_PREFILL_COMPILE", raising=False)
    monkeypatch.setattr(gen_module, "PREFILL_COMPILE_AFTER", 3)
    model = tiny_llama(16)
    p = prompts_of([11], seed=3)[0]  # 2 chunks of 8 after left padding
    want = hf_greedy(model, p, 5)[0, 11:].tolist()
    out = generate(model, p, max_new_tokens=5, medusa=False, max_len=64, compile=True)
    assert new_tokens(out, 0) == want
    engine = model.__dict__["_fastmedusa_engine"]
    assert engine.eager_prefill_chunks == 2
    assert not any(k[:2] == ("runner", "prefill") and True in k for k in engine.compiled)  # not compiled yet
    assert new_tokens(generate(model, p, max_new_tokens=5, medusa=False, max_len=64, compile=True), 0) == want
    assert engine.eager_prefill_chunks == 4  # the threshold (3) is now passed: the next call compiles
    with caplog.at_level(logging.INFO, logger="fastmedusa.decode.generate"):
        assert new_tokens(generate(model, p, max_new_tokens=5, medusa=False, max_len=64, compile=True), 0) == want
    assert "the prefill step compiles on its first run" in caplog.text  # a user can tell why this call is slow
    assert engine.eager_prefill_chunks == 4  # compiled chunks are not counted
    assert any(k[:3] == ("runner", "prefill", 8) and k[-2:] == (True, "step") for k in engine.compiled)


def test_uncompiled_prefill_under_compiled_steps_gives_the_same_tokens(monkeypatch):
    """With FASTMEDUSA_PREFILL_COMPILE=0 the chunk step runs eagerly while the decode steps compile: same tokens,
    and the prefill runner is keyed as uncompiled."""
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "8")
    monkeypatch.setenv("FASTMEDUSA_PREFILL_COMPILE", "0")
    model = tiny_llama(15)
    p = prompts_of([11], seed=2)[0]
    out = generate(model, p, max_new_tokens=6, medusa=False, max_len=64, compile=True)
    assert new_tokens(out, 0) == hf_greedy(model, p, 6)[0, 11:].tolist()
    engine = model.__dict__["_fastmedusa_engine"]
    assert ("runner", "prefill", 8, False, "step") in engine.compiled
    assert any(k[:2] == ("runner", "plain") and k[-2:] == (True, "step") for k in engine.compiled)  # compiled
