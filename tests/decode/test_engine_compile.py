"""The engine's decoder block is a nested compile region: a compiled forward traces it once for every layer
after the first (the first, with no previous block's output to add, is traced inline)."""

import pytest
import torch
from conftest import random_medusa, tiny_llama

from fastmedusa.decode import get_engine
from fastmedusa.decode.engine import DecodeEngine


def _inputs(engine, length: int):
    tokens = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
    rows = torch.arange(length)[None]
    mask = torch.tril(torch.ones(length, engine.max_len, dtype=torch.bool))[None]
    return tokens, rows, rows, mask


def _clear_caches(engine) -> None:
    for w in engine.layers:
        w.k_cache.zero_()
        w.v_cache.zero_()


def _compiled_forward(engine, inputs) -> tuple[int, int, torch.Tensor]:
    """(invoke_subgraph calls, distinct subgraphs) in dynamo's graph of engine.forward, and the output of the
    graph run through AOTAutograd (functionalization of the in-place cache writes, as inductor sees them)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=nop)(gm, example_inputs)

    out = torch.compile(engine.forward, backend=backend, fullgraph=True)(*inputs)
    calls = [n for gm in graphs for n in gm.graph.nodes if "invoke_subgraph" in str(n.target)]
    return len(calls), len({n.args[0].target for n in calls}), out


@pytest.mark.parametrize("layers", [3, 6])  # (a region used only once is inlined)
def test_layers_traced_once_and_equal_eager(layers):
    model = tiny_llama(3, num_hidden_layers=layers)
    engine = get_engine(model, 64)
    inputs = _inputs(engine, 7)
    _clear_caches(engine)
    with torch.no_grad():
        eager = engine(*inputs)
    eager_caches = [(w.k_cache.clone(), w.v_cache.clone()) for w in engine.layers]
    _clear_caches(engine)  # the compiled forward must write every layer's K/V itself
    with torch.no_grad():
        calls, distinct, compiled = _compiled_forward(engine, inputs)
    assert calls == layers - 1, "every layer after the first goes through the nested region"
    assert distinct == 1, "one traced block serves them all"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for w, (k, v) in zip(engine.layers, eager_caches):
        assert k.abs().sum() > 0
        torch.testing.assert_close(w.k_cache, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.v_cache, v, rtol=1e-5, atol=1e-5)


def test_unrolled_when_regional_is_off(monkeypatch):
    model = tiny_llama(3, num_hidden_layers=3)
    monkeypatch.setenv("FASTMEDUSA_REGIONAL_COMPILE", "0")
    engine = get_engine(model, 64)
    assert not engine.regional
    with torch.no_grad():
        calls, _, _ = _compiled_forward(engine, _inputs(engine, 4))
    assert calls == 0


def _tree_like_inputs(engine, bsz: int, length: int, prefix: int):
    """A batch of `length` new tokens after a `prefix`-slot prefix, each seeing the prefix and a random
    subset of the new tokens (itself included): the shape of a tree verify pass."""
    gen = torch.Generator().manual_seed(bsz * 100 + length)
    tokens = torch.randint(0, 97, (bsz, length), generator=gen)
    rows = (prefix + torch.arange(length)).expand(bsz, length)
    slots = torch.arange(engine.max_len)
    mask = (slots[None, None, :] < prefix).expand(bsz, length, engine.max_len).clone()
    sees = torch.rand(bsz, length, length, generator=gen) < 0.5
    sees |= torch.eye(length, dtype=torch.bool)
    mask[:, :, prefix : prefix + length] = sees
    return tokens, rows, rows, mask


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # groups of 4, 2 and plain multi-head attention
def test_attention_layouts_agree(monkeypatch, kv_heads):
    """fastmedusa's Triton kernel (interpreted here), SDPA's grouped-query attention and the folded queries
    compute the same forward and the same cache writes, under a tree-like mask at batch 2."""
    outs = {}
    for layout in ("triton", "gqa", "fold"):
        monkeypatch.setenv("FASTMEDUSA_ATTENTION", layout)
        model = tiny_llama(5, num_key_value_heads=kv_heads)
        engine = get_engine(model, 64, batch_size=2)
        assert engine.attention == layout
        _clear_caches(engine)
        with torch.no_grad():
            prefix = engine(*_inputs_batch(engine, 2, 9))
            tree = engine(*_tree_like_inputs(engine, 2, 6, 9))
        outs[layout] = (prefix, tree, [w.k_cache.clone() for w in engine.layers])
    for other in ("triton", "fold"):
        for a, b in zip(outs["gqa"][:2], outs[other][:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(outs["gqa"][2], outs[other][2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_layout_sends_long_forwards_to_sdpa(monkeypatch):
    """Forwards of more than MAX_TREE_TOKENS tokens (a prefill) run SDPA in the layout `sdpa_layout` picks."""
    from fastmedusa.ops.tree_attention import MAX_TREE_TOKENS

    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    engine = get_engine(tiny_llama(3, num_key_value_heads=2), MAX_TREE_TOKENS + 8)
    mask = torch.ones(1, 4, engine.max_len, dtype=torch.bool)
    assert engine._attention_inputs(mask, 4)[0] == "triton"
    long_mask = torch.ones(1, MAX_TREE_TOKENS + 1, engine.max_len, dtype=torch.bool)
    layout, bias, kv_end = engine._attention_inputs(long_mask, MAX_TREE_TOKENS + 1)
    assert (layout, kv_end) == (engine.sdpa_attention, None) and bias.dtype == engine.dtype


def _inputs_batch(engine, bsz: int, length: int):
    tokens = torch.randint(0, 97, (bsz, length), generator=torch.Generator().manual_seed(length))
    rows = torch.arange(length).expand(bsz, length)
    mask = torch.tril(torch.ones(length, engine.max_len, dtype=torch.bool)).expand(bsz, length, engine.max_len)
    return tokens, rows, rows, mask


def test_unknown_attention_layout(monkeypatch):
    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "paged")
    with pytest.raises(ValueError, match="FASTMEDUSA_ATTENTION='paged'.*'auto'.*'triton'.*'gqa'.*'fold'"):
        get_engine(tiny_llama(3), 64)


def test_triton_layout_needs_cuda_or_the_interpreter(monkeypatch):
    from fastmedusa.decode.engine import attention_layout

    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton needs a CUDA device"):
        attention_layout(torch.device("cpu"))


def test_auto_attention_layout(monkeypatch):
    """"auto": the Triton kernel on CUDA, SDPA's grouped queries elsewhere. The SDPA layout (for prefills, or
    every forward under gqa/fold) is grouped-query SDPA wherever SDPA runs it on a fused kernel, folded
    queries where it would fall back to its math path (asked of SDPA itself on CUDA; on the CPU its flash
    kernel takes grouped queries)."""
    import fastmedusa.decode.engine as engine_module
    from fastmedusa.decode.engine import attention_layout, sdpa_layout

    monkeypatch.delenv("FASTMEDUSA_ATTENTION", raising=False)
    cpu, cuda, shape = torch.device("cpu"), torch.device("cuda"), (9, 3, 64, 256)
    assert attention_layout(cpu, torch.float32, shape) == "gqa"
    assert sdpa_layout(cpu, torch.float32, shape) == "gqa"
    assert engine_module._fused_gqa_backend(cpu, torch.float32, *shape)  # what the probe sees here
    monkeypatch.setattr(engine_module, "_fused_gqa_backend", lambda *a: False)  # e.g. fp32 or an older GPU
    assert sdpa_layout(cuda, torch.bfloat16, shape) == "fold"
    assert attention_layout(cuda, torch.float64, shape) == "fold"  # no Triton kernels for float64: SDPA's layout
    assert attention_layout(cuda, torch.bfloat16, shape) == "triton"
    assert sdpa_layout(cuda, torch.bfloat16, (4, 4, 64, 256)) == "gqa"  # no grouped queries: any backend
    monkeypatch.setattr(engine_module, "_fused_gqa_backend", lambda *a: True)
    assert sdpa_layout(cuda, torch.bfloat16, shape) == "gqa"
    engine = get_engine(tiny_llama(3), 64)
    assert (engine.attention, engine.sdpa_attention, engine.fused_move) == ("gqa", "gqa", False)
    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "fold")
    assert attention_layout(cpu, torch.float32, shape) == "fold"
    assert sdpa_layout(cuda, torch.bfloat16, shape) == "fold"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_layouts_agree_on_gpu(monkeypatch, dtype):
    """On the GPU the layouts run different kernels (bf16: the Triton kernel, cuDNN's grouped-query attention,
    folded queries): the same forward under a tree-like mask, eager and compiled."""
    torch._dynamo.reset()  # engine.forward is one code object for every layout and dtype: stay under the limit
    outs = {}
    for layout in ("triton", "gqa", "fold"):
        monkeypatch.setenv("FASTMEDUSA_ATTENTION", layout)
        model = tiny_llama(5, num_key_value_heads=1, head_dim=64, hidden_size=256).to("cuda", dtype)
        engine = get_engine(model, 64, batch_size=2)
        _clear_caches(engine)
        with torch.no_grad():
            engine(*[t.cuda() for t in _inputs_batch(engine, 2, 9)])
            tree = [t.cuda() for t in _tree_like_inputs(engine, 2, 6, 9)]
            eager = engine(*tree)
            compiled = torch.compile(engine.forward, fullgraph=True)(*tree)
        outs[layout] = (eager, compiled)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=6e-2, atol=6e-2)
    for other in ("triton", "fold"):
        for a, b in zip(outs["gqa"], outs[other]):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_decoding_works_without_triton():
    """Triton is an optional dependency: without it the engine imports, takes SDPA and indexed K/V moves, and
    decodes (a fresh interpreter in which `import triton` fails)."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys
sys.modules["triton"] = None
import torch
from conftest import random_medusa, tiny_llama
from fastmedusa.decode import generate, get_engine
model = tiny_llama(0)
out = generate(random_medusa(model, 2), torch.tensor([[5, 6, 7]]), max_new_tokens=6, tree="chain_2")
engine = get_engine(model, 16)
assert out.new_tokens == 6 and engine.attention == "gqa" and not engine.fused_move and not engine.fused_argmax
print("decoded")
"""
    here = Path(__file__).parent
    env = {"PYTHONPATH": f"{here}:{here.parents[1] / 'src'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "decoded" in done.stdout, done.stderr[-2000:]


def test_triton_layout_without_triton_is_a_clear_error(monkeypatch):
    import fastmedusa.decode.engine as engine_module

    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    monkeypatch.setattr(engine_module, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton: pip install 'fastmedusa\[triton\]'"):
        engine_module.attention_layout(torch.device("cpu"))


def test_medusa_step_builds_the_move_table_before_any_step_runs(monkeypatch):
    """The fused K/V move's address table is built when the Medusa step is built, eagerly: built at the step's
    first call, torch.compile's CUDA graphs would allocate it from their pool during warm-up and reject it
    (seen on an H100 with FASTMEDUSA_CUDA_GRAPHS=compile)."""
    from fastmedusa.decode.generate import make_medusa_step
    from fastmedusa.decode.trees import PRESETS, build_tree_buffers
    from fastmedusa.ops import kv_move

    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    monkeypatch.setattr(kv_move, "_tables", {})  # an earlier engine's freed buffers may share these addresses
    model = tiny_llama(21)
    engine = DecodeEngine(model, max_len=64)
    assert engine.fused_move
    key = tuple(t.data_ptr() for t in engine.kv_buffers())
    assert key not in kv_move._tables
    heads = random_medusa(model, num_heads=3).medusa_heads
    make_medusa_step(engine, heads, build_tree_buffers(PRESETS["mc_sim_7b_7"], 3), 0.0, 0.09, 0.3, None)
    assert kv_move._tables[key].tolist() == list(key)


@pytest.mark.parametrize("compile", [False, True])
def test_attention_gets_contiguous_mask_and_int32_ends(monkeypatch, compile):
    """A verify pass builds its tree mask through a transpose: the engine hands the kernel a contiguous mask
    (a strided one cost the kernel 0.7-0.85 us per layer on an H100) and int32 ends (an int64 one made the op
    convert it once per layer: one more kernel each), eager and compiled, greedy and Medusa steps alike."""
    import fastmedusa.ops.tree_attention as ta
    from fastmedusa.decode import generate

    monkeypatch.setenv("FASTMEDUSA_ATTENTION", "triton")
    monkeypatch.setenv("FASTMEDUSA_PREFILL_CHUNK", "8")
    seen = []  # what the op itself is handed (its input check runs inside it, eager or compiled)
    check = ta.check_tree_attention

    def recording_check(q, k_cache, v_cache, mask, kv_end):
        seen.append((q.shape[1], mask.is_contiguous(), kv_end.dtype))
        return check(q, k_cache, v_cache, mask, kv_end)

    monkeypatch.setattr(ta, "check_tree_attention", recording_check)
    model = random_medusa(tiny_llama(3))
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(0))
    tree = [[0], [1], [0, 0], [1, 0]]  # 4 nodes + the root: 5 tokens per verify pass
    out = generate(model, ids, max_new_tokens=6, medusa=True, tree=tree, compile=compile)
    assert out.steps > 1
    assert 5 in {tokens for tokens, _, _ in seen}, "the verify passes ran the Triton kernel"
    assert all(contiguous for _, contiguous, _ in seen), "every launch got a contiguous mask"
    assert all(dtype == torch.int32 for _, _, dtype in seen), "the op is handed int32 ends, not converting them"


def test_compiled_steps_skip_pointwise_autotuning(monkeypatch):
    """Compiled steps pass inductor autotune_pointwise=False unless FASTMEDUSA_COMPILE_AUTOTUNE=1; other values
    are refused with the setting named."""
    from fastmedusa.decode import generate
    from fastmedusa.decode.generate import step_compile_options

    monkeypatch.delenv("FASTMEDUSA_COMPILE_AUTOTUNE", raising=False)
    assert step_compile_options() == {"triton.autotune_pointwise": False}
    monkeypatch.setenv("FASTMEDUSA_COMPILE_AUTOTUNE", "1")
    assert step_compile_options() == {"triton.autotune_pointwise": True}
    monkeypatch.setenv("FASTMEDUSA_COMPILE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="FASTMEDUSA_COMPILE_AUTOTUNE='yes': use 0"):
        step_compile_options()
    monkeypatch.delenv("FASTMEDUSA_COMPILE_AUTOTUNE")
    options = []
    compile_fn = torch.compile

    def recording_compile(fn, **kwargs):
        options.append(kwargs.get("options"))
        return compile_fn(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = random_medusa(tiny_llama(5))
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    eager = generate(model, ids, max_new_tokens=5, medusa=True, compile=False)
    compiled = generate(model, ids, max_new_tokens=5, medusa=True, compile=True)
    assert options and all(o == {"triton.autotune_pointwise": False} for o in options)
    assert torch.equal(compiled.sequences, eager.sequences)


def test_engine_refuses_more_rows_than_its_cache():
    """The engine used directly (not through `generate`, which sizes it): a batch larger than the cache is one
    clear error, not rows written over each other in cache row 0."""
    engine = DecodeEngine(tiny_llama(3), 32, max_batch_size=1)
    tokens, rows, _, mask = _inputs_batch(engine, 2, 3)
    with pytest.raises(ValueError, match="2 rows for a KV cache of 1: build the engine with max_batch_size >= 2"):
        engine(tokens, rows, rows, mask)
