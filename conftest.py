"""
Shared test fixtures: tiny random checkpoints in Hugging Face layout, an independent reference
forward, the embedded default model, the Triton interpreter switch, and passive OpenMP waiting
(errors.passive_openmp; an OMP_WAIT_POLICY set by the user wins).

Everything runs on the CPU. Without CUDA, the Triton kernels run through Triton's interpreter:
TRITON_INTERPRET=1 is set here, before any test module imports triton. Tests that need other
checkpoints build tiny random ones (safetensors, a tokenizer trained in the test); nothing is
downloaded.
"""
import os

import errors

errors.passive_openmp()  # the tests and the command lines they start: idle OpenMP threads sleep

import torch  # noqa: E402 (after the OpenMP setting above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import kvzip  # noqa: E402
import model  # noqa: E402
import tasks  # noqa: E402

HERE = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Fixtures: tiny random checkpoints in Hugging Face layout

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TRAIN_TEXT = [
    "Given the context, answer to the following question or request without explanation.",
    "Repeat the previous context exactly. Repeat the part of the previous context exactly, starting with",
    "You are a helpful assistant. system user assistant",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "A small train crossed the valley while the market in town opened its doors.",
]


def write_tokenizer(path: Path):
    """A tiny byte-level BPE trained here (no downloads), with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHATML_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_TRAIN_TEXT * 4, trainer)
    tk.save(str(path))
    return tk.get_vocab_size()


def write_tiny_checkpoint(path: Path, arch="LlamaForCausalLM", n_head=4, n_kv_head=2, head_dim=16,
                          n_layer=2, tie=True, shards=1, seed=0, max_pos=4096, hidden=None, **extra):
    """Write config.json, tokenizer.json and random weights (one file or `shards` shards + index).
    hidden: the width C (default n_head * head_dim; Qwen3 checkpoints may differ, and then write
    head_dim into config.json)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path / "tokenizer.json")
    C, inter = hidden or n_head * head_dim, 96
    if C != n_head * head_dim:
        extra = dict(extra, head_dim=head_dim)
    cfg = dict(architectures=[arch], vocab_size=vocab, hidden_size=C, intermediate_size=inter,
               num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=max_pos,
               tie_word_embeddings=tie, hidden_act="silu", **extra)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1):  # ~1/sqrt(C): each layer keeps activations at unit scale
        return torch.randn(*shape, generator=g) * std

    D, Hkv = head_dim, n_kv_head
    w = {"model.embed_tokens.weight": rnd(vocab, C, std=0.3), "model.norm.weight": 1 + rnd(C, std=0.1)}
    if not tie:
        w["lm_head.weight"] = rnd(vocab, C)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + rnd(C, std=0.1),
                  p + "post_attention_layernorm.weight": 1 + rnd(C, std=0.1),
                  p + "self_attn.q_proj.weight": rnd(n_head * D, C),
                  p + "self_attn.k_proj.weight": rnd(Hkv * D, C),
                  p + "self_attn.v_proj.weight": rnd(Hkv * D, C),
                  p + "self_attn.o_proj.weight": rnd(C, n_head * D),
                  p + "mlp.gate_proj.weight": rnd(inter, C),
                  p + "mlp.up_proj.weight": rnd(inter, C),
                  p + "mlp.down_proj.weight": rnd(C, inter)})
        if arch == "Qwen3ForCausalLM":
            w.update({p + "self_attn.q_norm.weight": 1 + rnd(D, std=0.3), p + "self_attn.k_norm.weight": 1 + rnd(D, std=0.3)})
        if arch == "Qwen2ForCausalLM":
            w.update({p + "self_attn.q_proj.bias": rnd(n_head * D), p + "self_attn.k_proj.bias": rnd(Hkv * D),
                      p + "self_attn.v_proj.bias": rnd(Hkv * D)})
    if shards == 1:
        save_file(w, str(path / "model.safetensors"))
    else:
        names = sorted(w)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: w[n] for n in names[s::shards]}
            save_file(part, str(path / fname))
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return w


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A Llama-style GQA checkpoint (4 query heads, 2 KV heads) on disk: (folder, hf_weights)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    return d, write_tiny_checkpoint(d)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """The tiny checkpoint loaded: (model, tokenizer, hf_weights)."""
    d, w = tiny_checkpoint
    m, tok = model.load(d)
    return m, tok, w


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A Qwen3 checkpoint loaded: q/k RMSNorms, and a head_dim of its own (6 query heads, 3 KV heads
    of D = 16 on a 48-wide model). (model, tokenizer, hf_weights)."""
    d = tmp_path_factory.mktemp("tiny_qwen3")
    w = write_tiny_checkpoint(d, arch="Qwen3ForCausalLM", n_head=6, n_kv_head=3, head_dim=16, hidden=48)
    m, tok = model.load(d)
    return m, tok, w


def reference_forward(w, cfg, ids):
    """An independent, cache-free forward from the raw Hugging Face weights, written from the
    equations (repeat_interleave GQA, dense causal mask). Returns logits (T, V) and, per layer,
    the post-RoPE q (H, T, D) and k (Hkv, T, D)."""
    T, H, Hkv, D = len(ids), cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def norm(x, wt):
        return wt * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x):  # x (heads, T, D), rotate-half with inv_freq from the config
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
        ang = torch.arange(T).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    qs, ks = [], []
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k = lin(h, p + "self_attn.q_proj").view(T, H, D), lin(h, p + "self_attn.k_proj").view(T, Hkv, D)
        if p + "self_attn.q_norm.weight" in w:  # Qwen3: RMSNorm of each head's q and k, before RoPE
            q, k = norm(q, w[p + "self_attn.q_norm.weight"]), norm(k, w[p + "self_attn.k_norm.weight"])
        q, k = rope(q.transpose(0, 1)), rope(k.transpose(0, 1))
        v = lin(h, p + "self_attn.v_proj").view(T, Hkv, D).transpose(0, 1)
        qs.append(q), ks.append(k)
        kr, vr = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)  # (H, T, D)
        att = (q @ kr.transpose(1, 2)) / math.sqrt(D)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        x = x + lin((att @ vr).transpose(0, 1).reshape(T, H * D), p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"),
                    p + "mlp.down_proj")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T, qs, ks


@pytest.fixture(scope="session")
def smol():
    """The embedded default model (converted from its GGUF on first use)."""
    return model.load()


@pytest.fixture(scope="session")
def converted(smol):
    """The folder model.load() converted the embedded GGUF into."""
    return model.default_model_dir()


@pytest.fixture(scope="session")
def gguf_tok(converted):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


WORDS = ("the quick brown fox jumps over the lazy dog near the river bank at dawn while a small train "
         "crossed the valley and the market in town opened its doors").split()


def tiny_context(tok, n_tokens, seed=0):
    """Random word soup of about n_tokens tokens for the tiny tokenizer."""
    g = torch.Generator().manual_seed(seed)
    words = []
    while len(tok.encode(" ".join(words))) < n_tokens:
        words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=g))])
    return " ".join(words)


TINY_CONTEXT = tasks.haystack(90, seed=3)  # ~120 tokens with the tiny tokenizer


@pytest.fixture(scope="session")
def tiny_kv(tiny):
    """The tiny model's FullKV of a ~120-token haystack, scored; tests must leave it as they found it."""
    m, tok, _ = tiny
    return kvzip.prefill(m, tok, TINY_CONTEXT)
