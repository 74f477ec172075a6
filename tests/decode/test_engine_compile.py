"""The engine's decoder block is a nested compile region: a compiled forward traces it once for every layer
after the first (the first, with no previous block's output to add, is traced inline)."""

import pytest
import torch
from conftest import tiny_llama

from fastmedusa.decode import get_engine


def _subgraph_calls(engine, tokens, rows, pos, mask) -> tuple[int, int, torch.Tensor]:
    """(invoke_subgraph calls, distinct subgraphs) in dynamo's graph of engine.forward, and its output."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(engine.forward, backend=backend, fullgraph=True)(tokens, rows, pos, mask)
    calls = [n for gm in graphs for n in gm.graph.nodes if "invoke_subgraph" in str(n.target)]
    return len(calls), len({n.args[0].target for n in calls}), out


@pytest.mark.parametrize("layers", [3, 6])  # (a region used once is inlined)
def test_layers_traced_once_and_equal_eager(layers):
    model = tiny_llama(3, num_hidden_layers=layers)
    engine = get_engine(model, 64)
    tokens = torch.randint(0, 97, (1, 7))
    rows = torch.arange(7)[None]
    mask = torch.tril(torch.ones(7, engine.max_len, dtype=torch.bool))[None]
    eager = engine(tokens, rows, rows, mask)
    keys = [w.k_cache.clone() for w in engine.layers]
    calls, distinct, compiled = _subgraph_calls(engine, tokens, rows, rows, mask)
    assert calls == layers - 1, "every layer after the first goes through the nested region"
    assert distinct == 1, "one traced block serves them all"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for w, k in zip(engine.layers, keys):  # the compiled forward wrote the same K into every layer's cache
        torch.testing.assert_close(w.k_cache, k)


def test_unrolled_when_regional_is_off(monkeypatch):
    model = tiny_llama(3, num_hidden_layers=3)
    monkeypatch.setenv("FASTMEDUSA_REGIONAL_COMPILE", "0")
    engine = get_engine(model, 64)
    tokens = torch.randint(0, 97, (1, 4))
    rows = torch.arange(4)[None]
    mask = torch.tril(torch.ones(4, engine.max_len, dtype=torch.bool))[None]
    calls, _, _ = _subgraph_calls(engine, tokens, rows, rows, mask)
    assert calls == 0
