"""Tests of model.py: checkpoints against an independent forward, the dense cache, generation, bad input."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
from conftest import reference_forward, write_tiny_checkpoint

# -----------------------------------------------------------------------------
# model.py: loading, cache, generation, bad input


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias_untied", "llama_sharded", "qwen3_tied",
                                  "qwen3_untied_wide_heads"])
def test_tiny_checkpoints_match_independent_forward(tmp_path, kind):
    opts = {"llama_gqa": dict(),
            "qwen2_bias_untied": dict(arch="Qwen2ForCausalLM", tie=False, n_head=6, n_kv_head=2),
            "llama_sharded": dict(shards=3, n_kv_head=1),
            "qwen3_tied": dict(arch="Qwen3ForCausalLM"),
            # Qwen3's head_dim is its own: here H * D = 96 heads' width on a C = 48 model
            "qwen3_untied_wide_heads": dict(arch="Qwen3ForCausalLM", tie=False, n_head=6, n_kv_head=3,
                                            head_dim=16, hidden=48)}[kind]
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


@settings(max_examples=60, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), T=st.integers(1, 9), n_past=st.integers(0, 12),
       spare=st.sampled_from([0, 0, 5]), scale=st.sampled_from([1.0, 3.0, 30.0]), seed=st.integers(0, 2**16))
def test_sdpa_attention_equals_reference_attention(Hkv, G, T, n_past, spare, scale, seed):
    """The fused paths against the reference `attention`: a single token (T = 1), a fresh prefill
    (is_causal), a later chunk (past keys and the chunk's own keys as two calls merged by their
    lse; T larger or smaller than the past), and the explicit-mask call; K and V as views of a
    cache buffer with `spare` unused rows (strided, as KVCache.attend passes them), and logits
    large enough that one key takes nearly all the mass."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv, G, T, 16, generator=g) * scale
    buf_k, buf_v = torch.randn(2, Hkv, n_past + T + spare, 16, generator=g)
    k, v = buf_k[:, :n_past + T], buf_v[:, :n_past + T]  # (Hkv, S, D) views, strided when spare > 0
    want = model.attention(q, k, v, n_past)
    # the explicit broadcast equals Hugging Face's repeat_kv: query head h*G+g reads KV head h
    kr, vr = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)  # (H, S, D)
    logits = q.reshape(Hkv * G, T, 16) @ kr.transpose(1, 2) / 4.0
    causal = torch.arange(n_past + T)[None, :] > torch.arange(T)[:, None] + n_past
    hf = (logits.masked_fill(causal, float("-inf")).softmax(-1) @ vr).view(Hkv, G, T, 16)
    torch.testing.assert_close(want, hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.attention_sdpa(q, k, v, n_past), want, atol=1e-5, rtol=1e-5)
    if T > 1:
        torch.testing.assert_close(model.attention_sdpa_mask(q, k, v, n_past), want, atol=1e-5, rtol=1e-5)
    if T > 1 and n_past > 0:  # the path attention_sdpa takes here on a CPU, called directly
        torch.testing.assert_close(model.attention_past_new(q, k, v, n_past), want, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_prefill_in_any_chunks_equals_the_reference_cache(tiny, chunks):
    """The dense cache's fused attention (is_causal for the first chunk, past + own keys merged by
    lse for the later ones, one token at a time) against the reference attention over the same
    tokens, fed in chunks of any sizes: the same logits of every token and the same cached keys."""
    m, tok, _ = tiny
    ids = torch.tensor(tok.encode("A small train crossed the valley while the market opened.") * 3)
    ids = ids[:sum(chunks)]
    want = m(ids, m.new_cache(backend="reference"))  # (T, V), one forward
    cache, got, i = m.new_cache(backend="auto"), [], 0
    for n in chunks:
        if i < len(ids):
            got.append(m(ids[i:i + n], cache))
        i += n
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=0)
    ref_cache = m.new_cache(backend="reference")
    m(ids, ref_cache)
    for l in range(m.cfg.n_layer):
        torch.testing.assert_close(cache.keys(l), ref_cache.keys(l), atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.values(l), ref_cache.values(l), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_incremental_decode_and_chunked_prefill_equal_one_forward(tiny, backend):
    m, tok, _ = tiny
    ids = torch.tensor(tok.encode("A small train crossed the valley while the market opened.") * 3)
    full = m(ids, m.new_cache(backend="reference"))  # (T, V)
    cache = m.new_cache(backend=backend)
    steps = [m(ids[:7], cache)] + [m(ids[t:t + 1], cache) for t in range(7, len(ids))]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)
    chunked = m.new_cache(backend=backend)
    last = model.prefill(m, ids, chunked, chunk_size=5)
    torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=0)
    for l in range(m.cfg.n_layer):
        torch.testing.assert_close(chunked.keys(l), cache.keys(l), atol=1e-5, rtol=0)


def test_mlp_in_row_blocks_equals_one_block(tiny, monkeypatch):
    """Long inputs go through the MLP in blocks of MLP_ROWS rows (bounded activations): the same
    logits as one block, with a block size that leaves a short last block."""
    m, tok, _ = tiny
    ids = torch.tensor(tok.encode("A small train crossed the valley while the market opened.") * 2)
    whole = m(ids, m.new_cache())
    monkeypatch.setattr(model, "MLP_ROWS", 7)
    assert len(ids) % 7 != 0
    torch.testing.assert_close(m(ids, m.new_cache()), whole, atol=1e-5, rtol=0)


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


def test_rope_parameters_read_as_rope_theta_and_rope_scaling():
    """Newer transformers configs give RoPE as one rope_parameters object; its base and scaling are
    used, not the 10,000 default."""
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    old = model.ModelConfig.from_hf(dict(base, rope_theta=500000.0, rope_scaling=scaling))
    new = model.ModelConfig.from_hf(dict(base, rope_parameters={**scaling, "rope_theta": 500000.0}))
    assert (new.rope_theta, new.rope_scaling["factor"]) == (old.rope_theta, old.rope_scaling["factor"]) == (5e5, 8.0)
    plain = model.ModelConfig.from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (plain.rope_theta, plain.rope_scaling) == (1e6, None)
    with pytest.raises(ValueError, match="rope_parameters must be a JSON object"):
        model.ModelConfig.from_hf(dict(base, rope_parameters=[1e6]))


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


def test_generate_stops_at_stop_token(tiny):
    m, tok, _ = tiny
    ids = tok.chat("Hello there.")
    cache = m.new_cache()
    out = model.generate(m, ids, cache, max_new_tokens=5)
    assert len(out) == 5 and cache.seq_len == len(ids) + 4  # the last token's K/V is never needed
    first = out[0]
    assert model.generate(m, ids, m.new_cache(), 5, stop_ids={first}) == []


def test_malformed_checkpoint_files_are_named(tmp_path):
    """Each malformed file raises errors.InputError (a ValueError) naming its path and the problem."""
    from errors import InputError
    d = tmp_path / "ck"
    write_tiny_checkpoint(d)
    good = {name: (d / name).read_bytes() for name in ("config.json", "tokenizer.json", "model.safetensors")}
    cases = [("model.safetensors", (2**40).to_bytes(8, "little") + b"{}", "not a safetensors file"),
             ("model.safetensors", good["model.safetensors"][:200], "truncated"),
             ("model.safetensors", good["model.safetensors"][:-1], "truncated"),
             ("config.json", b'{"architectures": [', "not valid JSON"),
             ("config.json", b"\xff\xfe", "not valid JSON"),
             ("config.json", b'"LlamaForCausalLM"', "expected a JSON object, got str"),
             ("config.json", json.dumps({**json.loads(good["config.json"]), "hidden_size": "64"}).encode(),
              "hidden_size must be a positive integer, got '64'"),
             ("tokenizer.json", b"{", "not a valid tokenizer file")]
    for name, data, words in cases:
        (d / name).write_bytes(data)
        with pytest.raises(InputError, match=words) as e:
            model.load(d)
        assert str(d / name) in str(e.value)
        (d / name).write_bytes(good[name])
    model.load(d)  # restored: loads again


def test_generate_refuses_a_bad_max_new_tokens(tiny):
    m, tok, _ = tiny
    for n in (-3, 0, 1.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            model.generate(m, tok.chat("hi"), m.new_cache(), n)
