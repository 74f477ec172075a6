"""Every Triton kernel of the library compiled for an H100 (sm_90) on the CPU, in each dtype it runs in.

Triton's interpreter runs a kernel's Python: a branch that cannot compile for some dtype passes every CPU test
and fails on the GPU (it happened: an atomic compiled against an fp16 tensor in the attention kernel). Here
each launcher is called with small inputs, in the configurations it picks on a GPU (tile sizes, warps,
stages), while its launches are recorded instead of run; then each distinct launch is compiled for sm_90 as
Triton's JIT would specialize it (argument dtypes, the launcher's constexprs, integers equal to 1 as constants,
16-divisibility hints), down to a cubin with the ptxas that Triton ships, and its shared memory is checked
against an H100's per-block limit. The compile runs in a fresh process: after the
interpreter has run a kernel, some of `triton.language` stays patched for it in that process, and a compile
there can fail where the GPU's does not.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")
nvidia = pytest.importorskip("triton.backends.nvidia.compiler")

from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from fastmedusa.ops.kv_move import launch_move_kv  # noqa: E402
from fastmedusa.ops.linear_argmax import _default_block, linear_argmax_triton  # noqa: E402
from fastmedusa.ops.tree_attention import launch_tree_attention, visible_end  # noqa: E402
from fastmedusa.ops.triton_kl import kl_step_triton, teacher_lse_triton  # noqa: E402
from fastmedusa.ops.triton_softmax import softmax_grad_triton  # noqa: E402
from fastmedusa.ops.triton_topk import CUDA_CHUNK, topk_indices_triton  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAUNCH_OPTIONS = ("num_warps", "num_stages")
H100_SHARED_BYTES = 232_448  # the most shared memory one block may opt in to on sm_90


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    return annotation is triton.language.constexpr or (isinstance(annotation, str) and "constexpr" in annotation)


class LaunchRecorder:
    """Records (kernel function, arguments) of every launch instead of running it (outputs stay unwritten)."""

    def __init__(self, monkeypatch) -> None:
        self.launches: list[tuple] = []

        def recording_run(kernel, *args, grid, warmup, **kwargs):
            self.launches.append((kernel.fn, args, dict(kwargs)))

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
        monkeypatch.setattr(JITFunction, "run", recording_run)

    def signatures(self) -> list[tuple]:
        """(function, signature, constexprs, attrs, options) per distinct launch, specialized as the JIT does
        on CUDA: a tensor as a typed pointer (with a 16-byte alignment hint where its address allows), an int
        equal to 1 as a constant, an int divisible by 16 with that hint."""
        seen, out = set(), []
        for fn, args, kwargs in self.launches:
            kwargs = dict(kwargs)
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            parameters = list(inspect.signature(fn).parameters.values())
            values = dict(zip([p.name for p in parameters], args)) | kwargs
            signature, constexprs, attrs = {}, {}, {}
            for i, p in enumerate(parameters):
                value = values[p.name]
                if _is_constexpr(p) or value is None:
                    signature[p.name], constexprs[i] = "constexpr", value
                    continue
                kind, attr = native_specialize_impl(nvidia.CUDABackend, value, False, True, True)
                signature[p.name] = kind
                if kind == "constexpr":
                    constexprs[i] = value
                elif attr:
                    attrs[i] = attr
            key = (fn, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
                   tuple(sorted(attrs.items())), tuple(sorted(options.items())))  # fmt: skip
            if key not in seen:
                seen.add(key)
                out.append((fn, signature, constexprs, attrs, options))
        return out


def _encode(value):
    """A constexpr as JSON: Triton dtypes by name."""
    if isinstance(value, triton.language.dtype):
        return {"tl": value.name}
    return value


COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def decode(v):
        return triton.language.str_to_ty(v["tl"], None) if isinstance(v, dict) else v

    results = []
    for job in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
        constexprs = {(int(i),): decode(v) for i, v in job["constexprs"]}
        attrs = {(int(i),): CUDABackend.parse_attr(a) for i, a in job["attrs"]}
        source = ASTSource(JITFunction(kernel.fn), job["signature"], constexprs, attrs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=job["options"])
            results.append({"name": job["name"], "cubin_bytes": len(compiled.asm["cubin"]),
                            "shared": compiled.metadata.shared})
        except Exception as e:
            results.append({"name": job["name"], "error": str(e).strip()[-600:]})
    print(json.dumps(results))
    """
)


def compile_for_hopper(launches: list[tuple]) -> list[dict]:
    """Compile each recorded launch for sm_90 in a fresh process; per launch its cubin size or its error."""
    try:
        assert nvidia.get_ptxas(90).path
    except RuntimeError as e:  # a Triton build without its CUDA toolchain: nothing here can assemble for sm_90
        pytest.skip(f"Triton has no ptxas for sm_90 here: {e}")
    jobs = []
    for fn, signature, constexprs, attrs, options in launches:
        module = sys.modules[fn.__module__]
        name = next(n for n, v in vars(module).items() if getattr(v, "fn", None) is fn)
        jobs.append({"module": fn.__module__, "name": name, "signature": signature, "options": options,
                     "constexprs": [(i, _encode(v)) for i, v in constexprs.items()],
                     "attrs": [(i, a) for i, a in attrs.items()]})  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


ATTENTION_CASES = [  # (B, T, heads, kv_heads, slots, head_dim)
    (1, 1, 9, 3, 70, 64),  # a greedy step, one split, SmolLM2's heads
    (1, 65, 9, 3, 150, 64),  # a 65-node tree, one split
    (1, 65, 9, 3, 600, 64),  # a tree over a cache in splits
    (16, 65, 9, 3, 600, 64),  # a wide launch: 64-slot tiles, 2 warps, 2 stages
    (1, 1, 32, 8, 4096, 128),  # an 8B-shaped step (head_dim 128) over a long cache
    (2, 5, 8, 1, 100, 96),  # one KV head, a head_dim that is not a power of two
    (1, 65, 8, 4, 600, 256),  # head_dim 256 (Gemma-like), a tree over a split cache
]


def _attention(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for bsz, seq, heads, kv_heads, slots, hd in ATTENTION_CASES:
        q = torch.randn(bsz, seq, heads, hd, generator=gen).to(dtype)
        k, v = (torch.randn(bsz, kv_heads, slots, hd, generator=gen).to(dtype) for _ in range(2))
        mask = torch.zeros(bsz, seq, slots, dtype=torch.bool)
        mask[:, :, : slots - seq] = True
        mask[:, :, slots - seq :] = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        launch_tree_attention(q, k, v, mask, visible_end(mask), torch.empty_like(q))


def _move_kv(dtype: torch.dtype) -> None:
    caches = [torch.randn(2, 3, 40, 64).to(dtype) for _ in range(4)]
    src = torch.tensor([[5, 9, 12], [7, 8, 20]])
    launch_move_kv(caches, src, torch.tensor([[5, 6, 7], [7, 8, 9]]))


def _topk(dtype: torch.dtype) -> None:
    topk_indices_triton(torch.randn(4, 49152).to(dtype), 10, chunk=CUDA_CHUNK)  # the GPU's slices


def _softmax_grad(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 9000).to(dtype)  # above 8192: the GPU's block size (tensors look like CUDA ones)
    targets = torch.tensor([1, -100, 5, 8999, 0, 3])
    _, lse = softmax_grad_triton(logits.clone(), targets, None, None)  # forward: loss and lse
    softmax_grad_triton(logits.clone(), targets, lse, 0.5)  # backward: dlogits in place, one scale
    softmax_grad_triton(logits.clone(), targets, lse, torch.full((6,), 0.25))  # a scale per row


def _kl(dtype: torch.dtype) -> None:
    teacher, student = torch.randn(5, 9000).to(dtype), torch.randn(5, 9000).to(dtype)
    lse = teacher_lse_triton(teacher)
    kl_step_triton(student.clone(), teacher, None, lse, 0.5)
    kl_step_triton(student.clone(), teacher, torch.tensor([0, 1, 1, 3, 4]), lse, None)


def _linear_argmax(dtype: torch.dtype) -> None:
    """The GPU's tiles by row count (a plain step, a 63-node tree, a batch of trees), with and without a bias,
    and larger tiles that fit an H100's shared memory (the GPU tests' overrides)."""
    weight, bias = torch.randn(49152, 576).to(dtype), torch.randn(49152).to(dtype)
    for rows in (1, 64, 1024):
        x = torch.randn(rows, 576).to(dtype)
        linear_argmax_triton(x, weight, bias, _default_block(rows, torch.device("cuda")))
        linear_argmax_triton(x, weight, None, _default_block(rows, torch.device("cuda")))
    for block in ((128, 128, 64, 8, 3), (64, 256, 64, 8, 3)):
        linear_argmax_triton(torch.randn(300, 576).to(dtype), weight, None, block)


LAUNCHERS = {"tree_attention": _attention, "move_kv": _move_kv, "topk": _topk, "softmax_grad": _softmax_grad,
             "kl": _kl, "linear_argmax": _linear_argmax}  # fmt: skip
LOOKS_LIKE_CUDA = {"softmax_grad", "kl"}  # launchers that pick their block size by `tensor.is_cuda`


def record(monkeypatch, launchers, dtypes) -> LaunchRecorder:
    """The launches of `launchers` in `dtypes`, recorded, never run (so `is_cuda` may say True: only the
    launchers' choice of block size sees it)."""
    recorder = LaunchRecorder(monkeypatch)
    for name in launchers:
        with pytest.MonkeyPatch.context() as cuda:
            if name in LOOKS_LIKE_CUDA:
                cuda.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            for dtype in dtypes:
                LAUNCHERS[name](dtype)
    return recorder


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_kernels_compile_for_hopper(monkeypatch, launcher):
    launches = record(monkeypatch, [launcher], DTYPES).signatures()
    assert len(launches) >= len(DTYPES), f"{launcher} launched no Triton kernel in some dtype"
    results = compile_for_hopper(launches)
    failed = [r for r in results if "error" in r or not r["cubin_bytes"]]
    assert not failed, "\n\n".join(f"{r['name']}: {r.get('error')}" for r in failed)
    too_big = [(r["name"], launch[1], r["shared"]) for r, launch in zip(results, launches)
               if r["shared"] > H100_SHARED_BYTES]  # fmt: skip
    assert not too_big, f"shared memory above an H100's {H100_SHARED_BYTES} bytes per block: {too_big}"


def test_every_kernel_is_covered():
    """Each Triton kernel of the library has a launcher above (a new kernel must be added here); jit functions
    that kernels call (device functions) compile with them."""
    import fastmedusa.ops as ops

    jitted = set()
    for path in sorted(Path(ops.__file__).parent.glob("*.py")):
        module = importlib.import_module(f"fastmedusa.ops.{path.stem}")
        jitted |= {v.fn for v in vars(module).values() if isinstance(getattr(v, "fn", None), types.FunctionType)
                   and hasattr(v, "arg_names")}  # fmt: skip
    sources = {fn: inspect.getsource(fn) for fn in jitted}
    called = {fn for fn in jitted if any(f"{fn.__name__}(" in src for other, src in sources.items() if other is not fn)}
    kernels = jitted - called
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = record(monkeypatch, LAUNCHERS, [torch.float32])
    assert kernels and kernels == {fn for fn, *_ in recorder.launches}


def test_an_uncompilable_kernel_is_caught(monkeypatch):
    """The check itself: the attention kernel with its merge compiled against an fp16 counter pointer (the
    mistake that slipped through the interpreter) is reported, not passed."""
    recorder = LaunchRecorder(monkeypatch)
    _attention(torch.float16)
    fn, signature, constexprs, attrs, options = next(
        launch for launch in recorder.signatures() if launch[1]["counter_ptr"] == "*i32"
    )
    (result,) = compile_for_hopper([(fn, signature | {"counter_ptr": "*fp16"}, constexprs, attrs, options)])
    assert "atomic" in result.get("error", "") and "fp16" in result["error"]
