"""Draft-vocabulary heads: loss and gradients against a float64 reference that maps targets explicitly,
top-k misses outside the map, lossless greedy decoding, the token map's round trip, and bad input."""

import pytest
import torch
from safetensors.torch import load_file

from fastmedusa.model import MedusaConfig, MedusaModel
from fastmedusa.model.heads import check_token_map
from fastmedusa.model.medusa_model import HEADS_WEIGHTS_NAME

VOCAB, DRAFT = 256, 40


def _token_map(seed: int = 0) -> torch.Tensor:
    """Distinct ids in a shuffled order: nothing may assume the map is sorted."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:DRAFT]


def _labels(token_map: torch.Tensor, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    """Half the labels inside the draft vocabulary, the rest anywhere, a few ignored."""
    g = torch.Generator().manual_seed(seed)
    inside = token_map[torch.randint(0, DRAFT, shape, generator=g)]
    anywhere = torch.randint(0, VOCAB, shape, generator=g)
    labels = torch.where(torch.rand(shape, generator=g) < 0.5, inside, anywhere)
    labels[:, :3] = -100
    return labels


def _draft_model(make_llama, shared: bool = False, num_layers: int = 0, dtype=torch.float64) -> MedusaModel:
    config = MedusaConfig(num_heads=3, num_layers=num_layers, shared_lm_head=shared, draft_vocab_size=DRAFT)
    model = MedusaModel.from_base(make_llama(vocab_size=VOCAB).to(dtype), config, _token_map())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _reference_losses(hidden, weights, labels, token_map):
    """Float64, one position at a time: head k scores t against labels[t + k + 2] mapped to its draft row
    by searching the map; positions whose target is ignored or outside the map are skipped."""
    row_of = {int(tok): i for i, tok in enumerate(token_map.tolist())}
    losses = []
    for k, w in enumerate(weights):
        shift, terms = k + 2, []
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - shift):
                target = int(labels[b, t + shift])
                if target == -100 or target not in row_of:
                    continue
                logits = hidden[b, t].double() @ w.double().T
                terms.append(torch.logsumexp(logits, 0) - logits[row_of[target]])
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses)


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("shared", [False, True])
def test_draft_loss_and_grads_match_float64_reference(make_llama, impl, shared):
    dtype = torch.float32 if impl == "triton" else torch.float64  # the Triton interpreter runs fp32
    model = _draft_model(make_llama, shared=shared, dtype=dtype)
    model.set_stage(2 if shared else 1)  # a shared projection trains only with the LM head (stage 2)
    heads, token_map = model.medusa_heads, model.medusa_heads.token_map
    labels = _labels(token_map)
    hidden = torch.randn(2, 16, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
    _, losses = heads(hidden, labels, impl=impl)
    losses.sum().backward()

    if shared:
        lm = model.base.get_output_embeddings().weight.detach().double().requires_grad_(True)
        ref_weights = [lm[token_map.tolist()]] * 3  # gathered independently of the heads' code
        ref_params = [lm]
        got_grads = [model.base.get_output_embeddings().weight.grad]
    else:
        ref_weights = [h[0].weight.detach().double().requires_grad_(True) for h in heads.medusa_head]
        ref_params = ref_weights
        got_grads = [h[0].weight.grad for h in heads.medusa_head]
    ref = _reference_losses(hidden.double(), ref_weights, labels, token_map)
    ref.sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(losses.double(), ref.detach(), **tol)
    for got, want in zip(got_grads, ref_params):
        torch.testing.assert_close(got.double(), want.grad, **tol)
    if shared:  # the gather's gradient lands on the map's rows of the LM head only
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[token_map] = False
        assert torch.count_nonzero(got_grads[0][outside]) == 0


def test_projections_start_from_the_lm_head_rows_of_the_map(make_llama):
    base = make_llama(vocab_size=VOCAB)
    token_map = _token_map()
    model = MedusaModel.from_base(base, MedusaConfig(num_heads=2, draft_vocab_size=DRAFT), token_map)
    lm = base.get_output_embeddings().weight
    for head in model.medusa_heads.medusa_head:
        assert head[1].weight.shape == (DRAFT, 32)
        assert torch.equal(head[1].weight, lm[token_map])
    shared = MedusaModel.from_base(
        make_llama(vocab_size=VOCAB), MedusaConfig(num_heads=2, shared_lm_head=True, draft_vocab_size=DRAFT)
    )
    weights = shared.medusa_heads.projection_weights()
    assert weights[0] is weights[1] and weights[0].shape == (DRAFT, 32)  # gathered once for all heads
    hidden = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # one GEMM over the stacked towers = each tower times the gathered rows of the LM head
        logits = shared.medusa_heads.head_logits(hidden)
        towers = shared.medusa_heads.head_hidden_states(hidden)
    assert logits.shape == (2, 2, 3, DRAFT)
    for k in range(2):
        rows = shared.medusa_heads.base_lm_head.weight[shared.medusa_heads.token_map]
        want = towers[k].double() @ rows.double().t()
        torch.testing.assert_close(logits[k].double(), want, rtol=1e-5, atol=1e-5)


def test_topk_counts_targets_outside_the_map_as_misses(make_llama):
    model = _draft_model(make_llama, num_layers=1)
    heads, token_map = model.medusa_heads, model.medusa_heads.token_map
    labels = _labels(token_map, shape=(3, 20))
    hidden = torch.randn(3, 20, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    hits, counts = heads.topk_correct(hidden, labels, ks=(1, 5))
    with torch.no_grad():
        logits = heads.head_logits(hidden)  # (K, B, T, DRAFT)
    for k in range(3):
        shift, want_hits, want_count = k + 2, [0, 0], 0
        for b in range(3):
            for t in range(20 - shift):
                target = int(labels[b, t + shift])
                if target == -100:
                    continue
                want_count += 1
                ranked = [int(token_map[i]) for i in logits[k, b, t].argsort(descending=True)[:5]]
                want_hits[0] += target == ranked[0]
                want_hits[1] += target in ranked
        assert counts[k] == want_count
        assert hits[k].tolist() == want_hits
    outside, labelled = heads.outside_draft_count(labels)
    assert labelled == int((labels != -100).sum())
    assert outside == sum(int(x) not in set(token_map.tolist()) for x in labels[labels != -100])


def test_greedy_decoding_with_draft_heads_equals_plain_greedy(make_llama):
    from fastmedusa.decode import generate

    model = _draft_model(make_llama, num_layers=1, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = generate(model, ids, max_new_tokens=30, medusa=False)
        medusa = generate(model, ids, max_new_tokens=30)
    assert torch.equal(medusa.sequences, plain.sequences)
    drafted = model.medusa_heads.draft_topk(torch.randn(4, 32), 10)
    assert drafted.shape == (3, 4, 10)
    assert set(drafted.unique().tolist()) <= set(model.medusa_heads.token_map.tolist())


def test_token_map_round_trips_through_save_and_load(make_llama, tmp_path):
    model = _draft_model(make_llama, num_layers=1, dtype=torch.float32)
    model.save_heads(tmp_path)
    saved = load_file(str(tmp_path / HEADS_WEIGHTS_NAME))
    assert torch.equal(saved["token_map"], model.medusa_heads.token_map)  # top-level key, as vLLM reads it
    assert MedusaConfig.from_pretrained(tmp_path).draft_vocab_size == DRAFT
    fresh = MedusaModel.from_base(make_llama(vocab_size=VOCAB), MedusaConfig.from_pretrained(tmp_path))
    fresh.load_heads(tmp_path)
    assert torch.equal(fresh.medusa_heads.token_map, model.medusa_heads.token_map)
    for (name, a), b in zip(
        model.medusa_heads.state_dict().items(), fresh.medusa_heads.state_dict().values()
    ):
        assert torch.equal(a, b), name
    labels = _labels(model.medusa_heads.token_map)  # the inverse map follows the loaded map
    assert torch.equal(fresh.medusa_heads.head_labels(labels), model.medusa_heads.head_labels(labels))
    full = MedusaModel.from_base(make_llama(vocab_size=VOCAB), MedusaConfig(num_heads=3, num_layers=1))
    with pytest.raises(ValueError, match="draft_vocab_size=40, model has None"):
        full.load_heads(tmp_path)


@pytest.mark.parametrize(
    "token_map, match",
    [
        (torch.tensor([1, 2, 2, *range(10, 47)]), "lists id 2 more than once"),
        (torch.tensor([*range(39), VOCAB]), f"id {VOCAB}, outside the vocabulary"),
        (torch.tensor([-1, *range(1, 40)]), "id -1, outside the vocabulary"),
        (torch.arange(39), "has 39 ids but draft_vocab_size is 40"),
        (torch.arange(40.0), "1-D integer tensor"),
    ],
)
def test_bad_token_maps_are_clear_errors(make_llama, token_map, match):
    with pytest.raises(ValueError, match=match):
        MedusaModel.from_base(make_llama(vocab_size=VOCAB), MedusaConfig(draft_vocab_size=DRAFT), token_map)
    with pytest.raises(ValueError, match=match):
        check_token_map(token_map, VOCAB, DRAFT)


def test_bad_draft_sizes_are_clear_errors(make_llama, tmp_path):
    with pytest.raises(ValueError, match="draft_vocab_size=5: pass an integer >= 10"):
        MedusaConfig(draft_vocab_size=5)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        MedusaModel.from_base(make_llama(vocab_size=VOCAB), MedusaConfig(draft_vocab_size=VOCAB + 1))
    model = _draft_model(make_llama, dtype=torch.float32)
    with pytest.raises(ValueError, match="top 41 tokens of each head, but the heads score 40"):
        model.medusa_heads.draft_topk(torch.randn(2, 32), DRAFT + 1)
    model.save_heads(tmp_path)  # a saved map with a duplicate fails when loaded
    state = load_file(str(tmp_path / HEADS_WEIGHTS_NAME))
    state["token_map"][1] = state["token_map"][0]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / HEADS_WEIGHTS_NAME))
    with pytest.raises(ValueError, match="more than once"):
        _draft_model(make_llama, dtype=torch.float32).load_heads(tmp_path)


def test_misused_token_maps_fail_before_any_work(make_llama, tmp_path):
    """Three misuses that used to fail late or with a misleading message, each now one clear ValueError."""
    from fastmedusa.decode import generate

    full = MedusaModel.from_base(make_llama(vocab_size=VOCAB), MedusaConfig(num_heads=2))
    with pytest.raises(ValueError, match="score the full vocabulary"):  # was an IndexError in the next generate
        full.medusa_heads.set_token_map(torch.arange(16))
    # a tree drafting more tokens than the draft vocabulary holds: refused before the step compiles
    model = _draft_model(make_llama, dtype=torch.float32)
    for compile in (False, True):
        with pytest.raises(ValueError, match="top 41 tokens of each head, but the heads score 40"):
            generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, tree=[[0], [DRAFT]], compile=compile)
    # a draft vocabulary of every token: the vLLM layout cannot mark it (truncated_vocab_size == vocab_size)
    config = MedusaConfig(num_heads=2, shared_lm_head=True, draft_vocab_size=VOCAB)
    everything = MedusaModel.from_base(make_llama(vocab_size=VOCAB), config, torch.randperm(VOCAB))
    with pytest.raises(ValueError, match=f"draft vocabulary holds all {VOCAB} tokens"):
        everything.save_heads(tmp_path / "vllm", layout="vllm")
    everything.save_heads(tmp_path / "medusa")  # FasterDecoding's layout keeps draft_vocab_size: it round-trips
    again = MedusaModel.from_base(make_llama(vocab_size=VOCAB), config)
    again.load_heads(tmp_path / "medusa")
    assert torch.equal(again.medusa_heads.token_map, everything.medusa_heads.token_map)


def test_a_saved_map_that_disagrees_with_its_config_says_so(make_llama, tmp_path):
    model = _draft_model(make_llama, dtype=torch.float32)
    model.save_heads(tmp_path)
    state = load_file(str(tmp_path / HEADS_WEIGHTS_NAME))
    state["token_map"] = state["token_map"][:-1]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / HEADS_WEIGHTS_NAME))
    with pytest.raises(ValueError, match="token_map holds 39 ids but the config's draft_vocab_size is 40"):
        _draft_model(make_llama, dtype=torch.float32).load_heads(tmp_path)
