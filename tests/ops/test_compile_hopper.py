"""Every Triton kernel of the library compiled for an H100 (sm_90) on the CPU, in each dtype it runs in.

Triton's interpreter runs a kernel's Python: a branch that cannot compile for some dtype passes every CPU test
and fails on the GPU (it happened: an atomic compiled against an fp16 tensor in the attention kernel). Here
each launcher is called with small inputs while its launches are recorded instead of run; then each distinct
launch is compiled for sm_90 with the arguments the launcher passed (their dtypes, its constexprs, warps and
stages), down to a cubin with the ptxas that Triton ships. The compile runs in a fresh process: after the
interpreter has run a kernel, some of `triton.language` stays patched for it in that process, and a compile
there can fail where the GPU's does not.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

from triton.runtime.jit import JITFunction  # noqa: E402

from fastmedusa.ops.kv_move import launch_move_kv  # noqa: E402
from fastmedusa.ops.tree_attention import launch_tree_attention, visible_end  # noqa: E402
from fastmedusa.ops.triton_kl import kl_step_triton, teacher_lse_triton  # noqa: E402
from fastmedusa.ops.triton_softmax import softmax_grad_triton  # noqa: E402
from fastmedusa.ops.triton_topk import topk_indices_triton  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1",
                torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}  # fmt: skip
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    return annotation is triton.language.constexpr or (isinstance(annotation, str) and "constexpr" in annotation)


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, float):
        return "fp32"
    return "i32" if -(2**31) <= value < 2**31 else "i64"


class LaunchRecorder:
    """Records (kernel function, arguments) of every launch instead of running it (outputs stay unwritten)."""

    def __init__(self, monkeypatch) -> None:
        self.launches: list[tuple] = []

        def recording_run(kernel, *args, grid, warmup, **kwargs):
            self.launches.append((kernel.fn, args, dict(kwargs)))

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
        monkeypatch.setattr(JITFunction, "run", recording_run)

    def signatures(self) -> list[tuple]:
        """(function, signature, constexprs, options) per distinct launch."""
        seen, out = set(), []
        for fn, args, kwargs in self.launches:
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            parameters = list(inspect.signature(fn).parameters.values())
            values = dict(zip([p.name for p in parameters], args)) | kwargs
            signature, constexprs = {}, {}
            for i, p in enumerate(parameters):
                value = values[p.name]
                if _is_constexpr(p) or value is None:
                    signature[p.name], constexprs[(i,)] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    signature[p.name] = "*" + TRITON_TYPES[value.dtype]
                else:
                    signature[p.name] = _scalar_type(value)
            key = (fn, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
                   tuple(sorted(options.items())))  # fmt: skip
            if key not in seen:
                seen.add(key)
                out.append((fn, signature, constexprs, options))
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
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def decode(v):
        return triton.language.str_to_ty(v["tl"], None) if isinstance(v, dict) else v

    results = []
    for job in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
        constexprs = {(int(i),): decode(v) for i, v in job["constexprs"]}
        source = ASTSource(JITFunction(kernel.fn), job["signature"], constexprs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=job["options"])
            results.append({"name": job["name"], "cubin_bytes": len(compiled.asm["cubin"])})
        except Exception as e:
            results.append({"name": job["name"], "error": str(e).strip()[-600:]})
    print(json.dumps(results))
    """
)


def compile_for_hopper(launches: list[tuple]) -> list[dict]:
    """Compile each recorded launch for sm_90 in a fresh process; per launch its cubin size or its error."""
    jobs = []
    for fn, signature, constexprs, options in launches:
        module = sys.modules[fn.__module__]
        name = next(n for n, v in vars(module).items() if getattr(v, "fn", None) is fn)
        jobs.append({"module": fn.__module__, "name": name, "signature": signature, "options": options,
                     "constexprs": [(i[0], _encode(v)) for i, v in constexprs.items()]})  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], input=json.dumps(jobs), capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the compile process failed:\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if any("ptxas" in r.get("error", "").lower() and "not found" in r["error"].lower() for r in results):
        pytest.skip("Triton cannot assemble for sm_90 here (no ptxas)")
    return results


def _attention(dtype: torch.dtype) -> None:
    """One split (a short cache) and several (a long one), one token and a 65-node tree."""
    gen = torch.Generator().manual_seed(0)
    for seq, slots in ((1, 70), (65, 150), (65, 600)):
        q = torch.randn(1, seq, 9, 64, generator=gen).to(dtype)
        k, v = (torch.randn(2, 3, slots, 64, generator=gen).to(dtype) for _ in range(2))
        mask = torch.zeros(1, seq, slots, dtype=torch.bool)
        mask[:, :, : slots - seq] = True
        mask[:, :, slots - seq :] = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        launch_tree_attention(q, k, v, mask, visible_end(mask), torch.empty_like(q))


def _move_kv(dtype: torch.dtype) -> None:
    caches = [torch.randn(2, 3, 40, 64).to(dtype) for _ in range(4)]
    src = torch.tensor([[5, 9, 12], [7, 8, 20]])
    launch_move_kv(caches, src, torch.tensor([[5, 6, 7], [7, 8, 9]]))


def _topk(dtype: torch.dtype) -> None:
    topk_indices_triton(torch.randn(4, 3000).to(dtype), 10, chunk=1024)


def _softmax_grad(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 1000).to(dtype)
    targets = torch.tensor([1, -100, 5, 999, 0, 3])
    _, lse = softmax_grad_triton(logits.clone(), targets, None, None)  # forward: loss and lse
    softmax_grad_triton(logits.clone(), targets, lse, 0.5)  # backward: dlogits in place, one scale
    softmax_grad_triton(logits.clone(), targets, lse, torch.full((6,), 0.25))  # a scale per row


def _kl(dtype: torch.dtype) -> None:
    teacher, student = torch.randn(5, 700).to(dtype), torch.randn(5, 700).to(dtype)
    lse = teacher_lse_triton(teacher)
    kl_step_triton(student.clone(), teacher, None, lse, 0.5)
    kl_step_triton(student.clone(), teacher, torch.tensor([0, 1, 1, 3, 4]), lse, None)


LAUNCHERS = {"tree_attention": _attention, "move_kv": _move_kv, "topk": _topk, "softmax_grad": _softmax_grad,
             "kl": _kl}  # fmt: skip


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_kernels_compile_for_hopper(monkeypatch, launcher):
    recorder = LaunchRecorder(monkeypatch)
    for dtype in DTYPES:
        LAUNCHERS[launcher](dtype)
    launches = recorder.signatures()
    assert len(launches) >= len(DTYPES), f"{launcher} launched no Triton kernel in some dtype"
    failed = [r for r in compile_for_hopper(launches) if "error" in r or not r["cubin_bytes"]]
    assert not failed, "\n\n".join(f"{r['name']}: {r.get('error')}" for r in failed)


def test_an_uncompilable_kernel_is_caught(monkeypatch):
    """The check itself: the attention kernel with its merge compiled against an fp16 counter pointer (the
    mistake that slipped through the interpreter) is reported, not passed."""
    recorder = LaunchRecorder(monkeypatch)
    _attention(torch.float16)
    fn, signature, constexprs, options = next(
        launch for launch in recorder.signatures() if launch[1]["counter_ptr"] == "*i32"
    )
    (result,) = compile_for_hopper([(fn, signature | {"counter_ptr": "*fp16"}, constexprs, options)])
    assert "atomic" in result.get("error", "") and "fp16" in result["error"]
