"""A static-KV-cache decoder for Llama-family Hugging Face models (Llama, Mistral, Qwen2, SmolLM2).

gpt-fast's recipe on weights read from the HF module tree: the KV cache is preallocated for `max_len`
positions, tokens are written at explicit positions, and every forward attends to the whole cache with an
explicit boolean mask. Shapes therefore depend only on the number of new tokens, so a step compiles once
(CUDA graphs) and a tree verify pass is the same forward with a tree mask.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from fastmedusa.ops.dtypes import KERNEL_DTYPES

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _decoder(hf_model: nn.Module) -> nn.Module:
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "embed_tokens"):
        raise ValueError(
            f"{type(hf_model).__name__} has no Llama-style decoder (embed_tokens, layers, norm): the decode engine "
            f"supports {', '.join(SUPPORTED_MODEL_TYPES)} models; use HF generate for other architectures"
        )
    return decoder


def check_supported(hf_model: nn.Module) -> None:
    """The engine re-implements the Llama block: refuse models whose block differs."""
    config = hf_model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"the decode engine supports {SUPPORTED_MODEL_TYPES} models, not {model_type!r}: "
            "use medusa=False with HF generate for other architectures"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the decode engine needs hidden_act='silu', the model has {config.hidden_act!r}")
    rotary = getattr(_decoder(hf_model), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is None or rope_type in ("dynamic", "longrope"):
        raise ValueError(
            f"rope type {rope_type!r} is not supported by the decode engine (default/linear/llama3/yarn are)"
        )
    from torch.nn.utils import parametrize

    # a parametrized weight (pruning masks, weight_norm, some LoRA wrappers) is computed afresh at each access:
    # the engine, which reads each weight's tensor once, would keep decoding the values it saw first
    if (name := next((n for n, m in hf_model.named_modules() if parametrize.is_parametrized(m)), None)) is not None:
        raise ValueError(
            f"{name} has parametrized weights, which the decode engine cannot follow: remove the parametrization "
            "first (torch.nn.utils.parametrize.remove_parametrizations, or merge the adapter into the weights)"
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama RMSNorm, including its rounding: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cat_optional(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor | None:
    """Concatenate biases of fused projections; a missing one becomes zeros (None if all are missing)."""
    if all(t is None for t in tensors):
        return None
    return torch.cat([t if t is not None else w.new_zeros(w.shape[0]) for t, w in zip(tensors, like)])


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _layer(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    input_norm: torch.Tensor,
    wqkv: torch.Tensor,
    bqkv: torch.Tensor | None,
    wo: torch.Tensor,
    bo: torch.Tensor | None,
    post_norm: torch.Tensor,
    wgate_up: torch.Tensor,
    bgate_up: torch.Tensor | None,
    wdown: torch.Tensor,
    bdown: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn_mask: torch.Tensor,
    kv_end: torch.Tensor | None,
    batch_rows: torch.Tensor,
    cache_rows: torch.Tensor,
    nh: int,
    nkv: int,
    hd: int,
    eps: float,
    attention: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Llama block: writes this layer's K/V at `cache_rows`, attends under `attn_mask`.

    The residual stream is x + delta (B, T, H), delta being the previous block's MLP output (None for the
    first block), and the block returns its own (x, delta): the add then sits in the same compiled region as
    the norm that reads it, so the two still fuse into one kernel as in an unrolled graph. Weights come in as
    arguments, not as a module, so every layer is the same function of same-shaped tensors: under
    `_layer_region` torch.compile traces and compiles it once for every layer after the first (the first,
    which has no delta, is traced inline). `attention` (see `attention_layout`): "triton", fastmedusa's
    kernel on the boolean mask (B, T, slots), reading slots below `kv_end`; "fold", SDPA with the query groups
    folded into the query length; "gqa", SDPA's own grouped-query attention (both on an additive mask)."""
    x = x if delta is None else x + delta
    bsz, seq = x.shape[:2]
    groups = nh // nkv
    h = rms_norm(x, input_norm, eps)
    q, k, v = F.linear(h, wqkv, bqkv).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(bsz, seq, nh, hd)
    k = k.view(bsz, seq, nkv, hd)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    # advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, nkv, hd)
    k_cache[batch_rows, :, cache_rows] = k
    v_cache[batch_rows, :, cache_rows] = v.view(bsz, seq, nkv, hd)
    if attention == "triton":
        from fastmedusa.ops.tree_attention import tree_attention  # Triton is optional: imported when used

        o = tree_attention(q, k_cache, v_cache, attn_mask, kv_end).view(bsz, seq, nh * hd)
    elif attention == "fold":
        qg = q.view(bsz, seq, nkv, groups, hd).permute(0, 2, 3, 1, 4).reshape(bsz, nkv, groups * seq, hd)
        o = F.scaled_dot_product_attention(qg, k_cache[:bsz], v_cache[:bsz], attn_mask=attn_mask)
        o = o.view(bsz, nkv, groups, seq, hd).permute(0, 3, 1, 2, 4).reshape(bsz, seq, nh * hd)
    else:  # q as a (B, nh, T, hd) view of its (B, T, nh, hd) rows: the output comes back in that layout too
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache[:bsz], v_cache[:bsz], attn_mask=attn_mask, enable_gqa=groups > 1
        )
        o = o.transpose(1, 2).reshape(bsz, seq, nh * hd)
    x = x + F.linear(o, wo, bo)
    h = rms_norm(x, post_norm, eps)
    gate, up = F.linear(h, wgate_up, bgate_up).chunk(2, dim=-1)
    return x, F.linear(F.silu(gate) * up, wdown, bdown)


# Hierarchical compilation: inside a compiled step the block is traced and compiled once and stamped out for
# every layer, instead of (for SmolLM2) 30 unrolled copies going through dynamo and inductor. Eager: a call.
# (torch releases without nested_compile_region compile the unrolled stack.)
_nested_region = getattr(torch.compiler, "nested_compile_region", None)
_layer_region = _layer if _nested_region is None else _nested_region(_layer)


ATTENTION_LAYOUTS = ("auto", "triton", "gqa", "fold")


def attention_layout(
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    shape: tuple[int, int, int, int] | None = None,
) -> str:
    """How the engine runs attention (`FASTMEDUSA_ATTENTION`), read when an engine is built:
    - "triton": fastmedusa's kernel (`fastmedusa.ops.tree_attention`) for decode steps and tree verify passes
      (up to `MAX_TREE_TOKENS` new tokens; a longer prefill goes to SDPA as "auto" would pick for it): one
      launch per layer, grouped queries read in the projection's row layout, the boolean mask read as is,
      only the slots in use read. On an H100 it made SmolLM2's greedy step 14% and its Medusa step 7.5%
      faster (bench/results/decode_triton_kernels_h100). CUDA only (or Triton's interpreter,
      TRITON_INTERPRET=1);
    - "gqa": SDPA's own grouped-query attention (`enable_gqa`) on the queries as a (B, heads, T, hd) view of
      the projection's rows; with a fused backend the output comes back in the row layout, so nothing is
      copied;
    - "fold": the query heads of each KV head folded into the query length, (B, kv_heads, groups*T, hd). With
      T > 1 (a tree verify pass) that costs a permute copy of the attention output per layer, and the mask is
      tiled `groups` times; but every SDPA backend runs it;
    - "auto" (default): "triton" on CUDA (fp32/fp16/bf16; SDPA's layout for other dtypes), "gqa" elsewhere.
    `sdpa_layout` says which SDPA layout serves forwards that the kernel does not take.
    With a device (and dtype, shape (heads, kv_heads, head_dim, max_len)), returns the layout "auto"
    resolves to there."""
    layout = os.environ.get("FASTMEDUSA_ATTENTION", "auto")
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(
            f"FASTMEDUSA_ATTENTION={layout!r}: use 'auto' (the default), 'triton', 'gqa' or 'fold'"
        )
    if layout == "triton" and device is not None and device.type != "cuda" and not _triton_interpreted():
        raise ValueError(
            "FASTMEDUSA_ATTENTION=triton needs a CUDA device (or Triton's interpreter, TRITON_INTERPRET=1): "
            "use 'auto' or 'gqa' on the CPU"
        )
    if layout == "triton" and not triton_available():
        raise ValueError("FASTMEDUSA_ATTENTION=triton needs Triton: pip install 'fastmedusa[triton]', or use 'auto'")
    if layout != "auto" or device is None:
        return layout
    if device.type != "cuda":
        return "gqa"
    if dtype in KERNEL_DTYPES and triton_available():
        return "triton"
    return sdpa_layout(device, dtype, shape, "auto") if shape is not None else "gqa"


def triton_available() -> bool:
    """Triton is an optional dependency (CUDA builds of torch bring it): the decode kernels need it."""
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sdpa_layout(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int], layout: str | None = None
) -> str:
    """The SDPA layout for forwards the Triton kernel does not take (or every forward, under "gqa"/"fold"):
    "gqa" where SDPA picks a fused kernel for grouped queries with a mask (on CUDA that is cuDNN's attention,
    and only where SDPA ranks it before its math path: bf16/fp16, torch >= 2.8, recent GPUs and cuDNN), else
    "fold": SDPA's unfused math path would copy every layer's whole KV cache. Asks SDPA which backend it
    would pick for a verify-pass-shaped call; shape is (heads, kv_heads, head_dim, max_len)."""
    layout = attention_layout() if layout is None else layout
    if layout in ("gqa", "fold"):
        return layout
    if device.type != "cuda" or shape[0] == shape[1]:  # no grouped queries: any backend
        return "gqa"
    return "gqa" if _fused_gqa_backend(device, dtype, *shape) else "fold"


def _fused_gqa_backend(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, max_len: int
) -> bool:
    """Whether SDPA would run a verify-pass-shaped call (queries as a transposed view, grouped, with an additive
    mask) on a fused kernel rather than its math path (`torch._fused_sdp_choice`; False if it cannot tell)."""
    from torch.nn.attention import SDPBackend

    try:
        q = torch.zeros(1, 2, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        kv = torch.zeros(1, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        mask = torch.zeros(1, 1, 2, max_len, device=device, dtype=dtype)
        choice = torch._fused_sdp_choice(q, kv, kv, mask, 0.0, False, scale=None, enable_gqa=True)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return int(choice) not in (int(SDPBackend.MATH), int(SDPBackend.ERROR))


def regional_compile() -> bool:
    """Whether compiled steps trace the decoder block once for all layers (default) or the unrolled stack
    (`FASTMEDUSA_REGIONAL_COMPILE=0`). Read when an engine is built."""
    raw = os.environ.get("FASTMEDUSA_REGIONAL_COMPILE", "1")
    if raw not in ("0", "1"):
        raise ValueError(
            f"FASTMEDUSA_REGIONAL_COMPILE={raw!r}: use 1 (the block compiled once, the default) or 0 (unrolled)"
        )
    return raw == "1" and _nested_region is not None


class LayerWeights(nn.Module):
    """One decoder layer's weights as buffers: the HF tensors, except q/k/v and gate/up fused (copies)."""

    @torch.no_grad()
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        tensors = {
            "input_norm": layer.input_layernorm.weight,
            "wqkv": torch.cat([m.weight for m in qkv]),
            "bqkv": _cat_optional([m.bias for m in qkv], [m.weight for m in qkv]),
            "wo": attn.o_proj.weight,
            "bo": attn.o_proj.bias,
            "post_norm": layer.post_attention_layernorm.weight,
            "wgate_up": torch.cat([m.weight for m in gate_up]),
            "bgate_up": _cat_optional([m.bias for m in gate_up], [m.weight for m in gate_up]),
            "wdown": mlp.down_proj.weight,
            "bdown": mlp.down_proj.bias,
        }
        for name, t in tensors.items():
            self.register_buffer(name, _detach(t), persistent=False)

    def copy_pairs(self, layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(row block of a fused copy, the layer's tensor it holds) for q/k/v and gate/up, weights and biases;
        a projection without a bias has zeros in its block (`_cat_optional`), which nothing needs to rewrite."""
        attn, mlp = layer.self_attn, layer.mlp
        pairs = []
        fused_modules = (("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("gate_up", [mlp.gate_proj, mlp.up_proj]))
        for name, modules in fused_modules:
            for kind in ("w", "b"):
                fused, start = getattr(self, kind + name), 0
                for m in modules:
                    part = m.weight if kind == "w" else m.bias
                    rows = m.weight.shape[0]
                    if fused is not None and part is not None:
                        pairs.append((fused[start : start + rows], part))
                    start += rows
        return pairs


class DecodeEngine(nn.Module):
    """Weights of an HF Llama-family model plus a static KV cache of `max_batch_size` rows x `max_len` slots.

    Every row of a batch has its own length: each forward writes each token at an explicit cache slot, gives
    it an explicit RoPE position, and attends under an explicit (B, T, max_len) mask. A left-padded prompt
    keeps its pad in the first slots of its row; the mask hides them and RoPE positions start at the first
    real token, so a row computes what it would alone.

    q/k/v and gate/up are fused into one matrix each (a copy: fewer, larger matmuls per layer, as in
    gpt-fast); the other weights are the HF tensors themselves. Build it once per model/device/dtype/max_len
    (`get_engine` caches it on the model). `get_engine` keeps it in step with the model: every call refreshes
    the fused copies (`sync_weights`), and replaced weights build a new engine (`weights_moved`).
    """

    def __init__(self, hf_model: nn.Module, max_len: int, max_batch_size: int = 1) -> None:
        super().__init__()
        check_supported(hf_model)
        config = hf_model.config
        decoder = _decoder(hf_model)
        embed = decoder.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        self.max_len = int(max_len)
        self.max_batch_size = int(max_batch_size)
        self.vocab_size, self.hidden_size = embed.shape
        attn0 = decoder.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(attn0, "head_dim", None) or self.hidden_size // self.num_heads
        self.eps = float(config.rms_norm_eps)
        self.num_layers = len(decoder.layers)
        for layer in decoder.layers:
            window = getattr(layer.self_attn, "sliding_window", None)
            if window is not None and window < self.max_len:
                raise ValueError(
                    f"the model uses sliding-window attention ({window} tokens) and max_len is {self.max_len}: "
                    f"the engine has no sliding-window mask; keep prompt + new tokens under {window}"
                )
        # Buffers, not plain attributes: torch.compile/CUDA graphs treat module buffers as static addresses
        # (plain tensors would be copied into the graph's input slots at every replay).
        out = hf_model.get_output_embeddings()
        self.register_buffer("embed", embed.detach(), persistent=False)
        self.register_buffer("lm_head", out.weight.detach(), persistent=False)
        self.register_buffer("lm_head_bias", _detach(getattr(out, "bias", None)), persistent=False)
        self.register_buffer("final_norm", decoder.norm.weight.detach(), persistent=False)
        self.layers = nn.ModuleList(LayerWeights(layer) for layer in decoder.layers)
        self._rope_tables(decoder.rotary_emb)
        # One K and one V buffer per layer, written in place with index_put_ on the whole buffer. (A single
        # (layers, B, ...) buffer written through `cache[i][...] = k` made inductor copy the whole cache of
        # every layer at every step: a view of a select cannot be re-inplaced. Measured on an H100 with a
        # 128-row cache: 48 ms per step, against ~2 ms with per-layer buffers.)
        shape = (self.max_batch_size, self.num_kv_heads, self.max_len, self.head_dim)
        for w in self.layers:
            w.register_buffer("k_cache", torch.zeros(shape, device=self.device, dtype=self.dtype), persistent=False)
            w.register_buffer("v_cache", torch.zeros(shape, device=self.device, dtype=self.dtype), persistent=False)
        rows = torch.arange(self.max_batch_size, device=self.device)[:, None]
        self.register_buffer("batch_rows", rows, persistent=False)  # the cache row of each batch row
        self.compiled: dict[object, object] = {}  # step functions, compiled once per shape/tree
        self.eager_prefill_chunks = 0  # prefill chunk steps run uncompiled (FASTMEDUSA_PREFILL_COMPILE=auto)
        self.regional = regional_compile()  # read once, when the engine is built (`get_engine` keeps it)
        attention_shape = (self.num_heads, self.num_kv_heads, self.head_dim, self.max_len)
        self.attention = attention_layout(self.device, self.dtype, attention_shape)  # read once, like `regional`
        self.sdpa_attention = sdpa_layout(self.device, self.dtype, attention_shape, self.attention)
        if self.attention == "triton":  # split counters now, not from a CUDA-graph pool in a step
            from fastmedusa.ops.tree_attention import reserve_split_counters

            reserve_split_counters(self.device, self.max_batch_size, self.num_heads, self.num_kv_heads)
        # accepted K/V moved by one kernel for all layers (`fastmedusa.ops.kv_move`): on CUDA, and on the CPU
        # under Triton's interpreter with the "triton" layout (tests); else indexed copies per layer
        on_cuda = self.device.type == "cuda" and self.dtype in KERNEL_DTYPES and triton_available()
        self.fused_move = on_cuda or self.attention == "triton"
        self.fused_argmax = fused_argmax_available(self.lm_head)
        self.weights_seen = weight_state(hf_model)
        # `sync_weights`'s copies: the fused matrices' row blocks and the model's tensors they hold
        self.fused_views_and_sources: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def weights_moved(self, hf_model: nn.Module) -> bool:
        """Whether a weight of `hf_model` is no longer the tensor the engine reads (a parameter replaced, e.g.
        by `load_state_dict(assign=True)`): then only a new engine decodes the model as it is now."""
        return weight_state(hf_model) != self.weights_seen

    @torch.no_grad()
    def sync_weights(self, hf_model: nn.Module) -> None:
        """Recompute the fused q/k/v and gate/up copies from the model's weights, in place; the engine shares
        every other weight with the model. Done at every call, not only when a tensor's version counter moved:
        a fused optimizer step (`AdamW(fused=True)`, the trainer's on CUDA) and writes through `.data` change
        weights without counting, and decoding then mixed old and new weights. The copy reads and writes those
        weights once: 2 x 139 MB for SmolLM2-135M in bf16, 2 x 9 GB for an 8B Llama."""
        if self.fused_views_and_sources is None:  # kept: a weight replaced by another tensor builds a new engine
            layers = zip(self.layers, _decoder(hf_model).layers)
            pairs = [(fused, part.detach()) for copies, layer in layers for fused, part in copies.copy_pairs(layer)]
            self.fused_views_and_sources = tuple(list(side) for side in zip(*pairs)) if pairs else ([], [])
        if self.fused_views_and_sources[0]:  # one multi-tensor copy: SmolLM2's 150 one by one took 3.1 ms (H200)
            torch._foreach_copy_(*self.fused_views_and_sources)

    @torch.no_grad()
    def _rope_tables(self, rotary: nn.Module) -> None:
        """cos/sin for every cache position, computed like HF (fp32, then cast to the model dtype)."""
        inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        positions = torch.arange(self.max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.register_buffer("rope_cos", (emb.cos() * scale).to(self.dtype), persistent=False)
        self.register_buffer("rope_sin", (emb.sin() * scale).to(self.dtype), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        cache_rows: torch.Tensor,
        rope_pos: torch.Tensor,
        mask: torch.Tensor,
        kv_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run tokens (B, T) of cache rows 0..B-1, writing token t of row b into cache slot cache_rows[b, t]
        with RoPE position rope_pos[b, t]; mask (B, T, max_len) bool, True = may attend. `kv_end` (B,): one
        past the last slot the row's mask allows, where the caller knows it (a decode step: the newest token's
        slot + 1), so that it is not reduced out of the mask; the Triton attention reads only slots below it.

        Returns the final-normed hidden states (B, T, H).
        """
        bsz, seq = tokens.shape
        if bsz > self.max_batch_size:
            raise ValueError(
                f"{bsz} rows for a KV cache of {self.max_batch_size}: build the engine with max_batch_size >= {bsz}"
            )
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(tokens, self.embed)  # (B, T, H)
        cos = self.rope_cos[rope_pos][:, :, None, :]  # (B, T, 1, hd)
        sin = self.rope_sin[rope_pos][:, :, None, :]
        layout, attn_mask, kv_end = self._attention_inputs(mask, seq, kv_end)
        batch_rows = self.batch_rows[:bsz]  # (B, 1): a buffer, not an arange kernel per step
        delta = None
        for w in self.layers:
            layer = _layer_region if self.regional and delta is not None else _layer
            x, delta = layer(
                x, delta, w.input_norm, w.wqkv, w.bqkv, w.wo, w.bo, w.post_norm, w.wgate_up, w.bgate_up, w.wdown,
                w.bdown, w.k_cache, w.v_cache, cos, sin, attn_mask, kv_end, batch_rows, cache_rows,
                nh, nkv, hd, self.eps, layout,
            )  # fmt: skip
        return rms_norm(x + delta, self.final_norm, self.eps)

    def _attention_inputs(
        self, mask: torch.Tensor, seq: int, kv_end: torch.Tensor | None = None
    ) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """(layout, mask, kv_end) for this forward's layers, built once per forward, not per layer.

        The Triton kernel reads the boolean mask and each row's end of visible slots. SDPA gets an additive
        mask (it would turn a boolean one into an additive one on every call: one more kernel per layer; the
        dtype's minimum, not -inf: exp underflows to 0 all the same); for "fold", tiled per query group."""
        if self.attention == "triton":
            from fastmedusa.ops.tree_attention import MAX_TREE_TOKENS, visible_end

            if seq <= MAX_TREE_TOKENS:
                # in the kernel's own layout, once per forward: a mask built through a transpose (a tree's)
                # read with its strides cost 0.7-0.85 us more per layer, and an int64 kv_end became one
                # conversion kernel per layer (H100, SmolLM2: about 25 and 34 us per step); compiled, both
                # are only the layout and dtype the producing kernel writes
                kv_end = visible_end(mask) if kv_end is None else kv_end.to(torch.int32)
                return "triton", mask.contiguous(), kv_end
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
        bias = bias.masked_fill(~mask, torch.finfo(self.dtype).min)
        groups = self.num_heads // self.num_kv_heads
        fold = self.sdpa_attention == "fold" and groups > 1
        attn_mask = (bias.repeat(1, groups, 1) if fold else bias)[:, None]  # (B, 1, [groups*]T, max_len)
        return ("fold" if fold else "gqa"), attn_mask, None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head, self.lm_head_bias)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of the logits of hidden (..., H): (...,) int64. Where `fused_argmax` (on CUDA by default,
        FASTMEDUSA_FUSED_ARGMAX=auto), one kernel that keeps each row's best logit and never writes the logits
        (`fastmedusa.ops.linear_argmax`); else F.linear then argmax. Why: in a profiled 64-node verify pass on
        an H100, cuBLAS's GEMM over the LM head took 32 us against 22 us for one row, and the argmax over the
        written logits another 10 us (bench/results/decode_draft_heads_h100)."""
        if self.fused_argmax:
            from fastmedusa.ops.linear_argmax import linear_argmax_op

            return linear_argmax_op(hidden, self.lm_head, self.lm_head_bias)
        return self.logits(hidden).argmax(-1)

    def gather_rows(self, rows: torch.Tensor) -> None:
        """Move the cache of batch rows `rows` (R,) to rows 0..R-1 (compaction when rows finish)."""
        size = rows.shape[0]
        for w in self.layers:
            w.k_cache[:size] = w.k_cache[rows]
            w.v_cache[:size] = w.v_cache[rows]

    def kv_buffers(self) -> list[torch.Tensor]:
        """Every layer's K buffer, then every layer's V buffer (the order of the fused move's table)."""
        return [w.k_cache for w in self.layers] + [w.v_cache for w in self.layers]

    def prepare_move_kv(self) -> None:
        """Build the fused move's address table now, eagerly. Built at a step's first call instead, it would be
        allocated from the CUDA-graph pool when torch.compile's CUDA graphs (FASTMEDUSA_CUDA_GRAPHS=compile) warm
        that step up, and they reject a live tensor in their pool that no graph output owns."""
        if self.fused_move:
            from fastmedusa.ops.kv_move import cache_table

            cache_table(self.kv_buffers())

    def move_kv(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy cache slots src[b] -> dst[b] of row b in every layer (accepted tree nodes into place).

        src, dst (B, D). With `fused_move` one kernel launch for every layer's K and V
        (`fastmedusa.ops.kv_move`), else two indexed copies per layer (the indexed view is (B, D, nkv, hd))."""
        if self.fused_move:
            from fastmedusa.ops.kv_move import move_kv as move_kv_slots

            move_kv_slots(self.kv_buffers(), src, dst)
            return
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for w in self.layers:
            w.k_cache[rows, :, dst] = w.k_cache[rows, :, src]
            w.v_cache[rows, :, dst] = w.v_cache[rows, :, src]


def fused_argmax_available(lm_head: torch.Tensor) -> bool:
    """Whether greedy tokens come from the fused linear + argmax kernel (FASTMEDUSA_FUSED_ARGMAX, read at
    import of `fastmedusa.ops.linear_argmax`: "auto" by default = CUDA with Triton, "off", "on")."""
    if not triton_available():
        return False
    from fastmedusa.ops.linear_argmax import fused_argmax_supported

    return fused_argmax_supported(lm_head, lm_head)


def weight_state(hf_model: nn.Module) -> list[int]:
    """The address of every parameter and buffer: what changes when a weight is replaced by another tensor.
    (Not their version counters: inference tensors have none, and fused optimizers do not count.)"""
    return [t.data_ptr() for t in (*hf_model.parameters(), *hf_model.buffers())]


def cached_engine(hf_model: nn.Module) -> DecodeEngine | None:
    """The engine `get_engine` keeps on `hf_model`, if one was built."""
    return hf_model.__dict__.get("_fastmedusa_engine")


def engine_fits(
    hf_model: nn.Module, min_len: int, max_len: int | None, batch_size: int, max_batch_size: int | None = None
) -> bool:
    """Whether `get_engine` with these arguments returns the engine already cached on `hf_model` (and its
    compiled steps) instead of building a new one."""
    engine = cached_engine(hf_model)
    embed = _decoder(hf_model).embed_tokens.weight
    return (
        engine is not None
        and engine.device == embed.device
        and engine.dtype == embed.dtype
        and engine.max_len >= min_len
        and (max_len is None or engine.max_len == max_len)
        and engine.max_batch_size >= batch_size
        and (max_batch_size is None or engine.max_batch_size == max_batch_size)
        and not engine.weights_moved(hf_model)
    )


def check_position_limit(hf_model: nn.Module, prompt_len: int, max_new_tokens: int, what: str = "prompt") -> None:
    """Prompt + new tokens must fit the model's positions. The tree's scratch slots may lie past them: a kept
    token is verified from the positions before it, and tokens past max_new_tokens are dropped."""
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"{what} ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds the model's max_position_embeddings {limit}: shorten the prompt or max_new_tokens"
        )


MAX_TREE_SLOTS = 256  # scratch slots past the model's positions that any tree may use (verify passes <= 256)


def max_useful_len(hf_model: nn.Module) -> int | None:
    """The most KV cache slots per row a call can use: the model's positions plus any tree's scratch slots."""
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    return None if limit is None else limit + MAX_TREE_SLOTS


def check_max_len(hf_model: nn.Module, max_len: int | None) -> None:
    """A KV cache longer than the model's positions plus a tree's scratch slots holds slots no call can use:
    refused before it is allocated (a few zeros too many would take all memory)."""
    most = max_useful_len(hf_model)
    if max_len is None or most is None or max_len <= most:
        return
    raise ValueError(
        f"max_len (--max-len) {max_len} is more KV cache than this model can use: its max_position_embeddings "
        f"{most - MAX_TREE_SLOTS} + {MAX_TREE_SLOTS} scratch slots for a tree = {most}; pass at most {most}, or "
        "leave it out (the cache then fits each call)"
    )


def get_engine(
    hf_model: nn.Module,
    min_len: int,
    max_len: int | None = None,
    batch_size: int = 1,
    max_batch_size: int | None = None,
) -> DecodeEngine:
    """The engine cached on `hf_model`, rebuilt only when the device/dtype changed or the cache is too small.

    A new engine gets `max_len` slots per row, or `min_len` rounded up to a multiple of 256 so that prompts
    of similar length reuse one engine (and its compiled steps); and `max_batch_size` rows, or `batch_size`
    rounded up to a power of two.
    """
    if max_batch_size is not None and batch_size > max_batch_size:
        raise ValueError(
            f"batch of {batch_size} rows does not fit the KV cache built for {max_batch_size} rows: "
            "raise max_batch_size or split the batch"
        )
    check_max_len(hf_model, max_len)
    embed = _decoder(hf_model).embed_tokens.weight
    engine = cached_engine(hf_model)
    if max_len is not None and max_len < min_len:
        raise ValueError(
            f"max_len {max_len} is shorter than prompt + new tokens + tree ({min_len}): raise max_len or "
            "shorten the prompt / max_new_tokens"
        )
    if engine_fits(hf_model, min_len, max_len, batch_size, max_batch_size):
        engine.sync_weights(hf_model)
        return engine
    if max_len is None:
        max_len = -(-min_len // 256) * 256
        limit = getattr(hf_model.config, "max_position_embeddings", None)
        if limit is not None:  # no more than the model's positions, except the tree's scratch slots past them
            max_len = max(min(max_len, limit), min_len)
    if max_batch_size is None:
        max_batch_size = 1 << (batch_size - 1).bit_length()
        if engine is not None and engine.device == embed.device and engine.dtype == embed.dtype:
            max_batch_size = max(max_batch_size, engine.max_batch_size)
    hf_model.__dict__["_fastmedusa_engine"] = None  # free the old cache before allocating the new one
    engine = DecodeEngine(hf_model, max_len, max_batch_size)
    hf_model.__dict__["_fastmedusa_engine"] = engine
    return engine
