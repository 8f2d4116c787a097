"""Tests of Gemma 3 in model.py: tiny random checkpoints in Hugging Face layout against an
independent float64 forward written here (sliding window and its edge, the four norms of
(1 + weight), q/k norm, query_pre_attn_scalar, local and global RoPE bases), the dense cache on a
context longer than the window, the window cache (WindowKVCache: sliding layers that free what
leaves their window) against the dense one, bad configs, and KVzip on a hybrid model (only the
global layers scored and evicted)."""
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvzip
import model
from conftest import write_tokenizer
from errors import InputError

SLIDE, FULL = "sliding_attention", "full_attention"
TEXT = "A small train crossed the valley while the market opened. The quick brown fox jumps over the dog."


def gemma_text_config(vocab: int, **over) -> dict:
    """A tiny Gemma 3 text config: D = 16 heads on a 32-wide model, query_pre_attn_scalar 24 (not D),
    a 6-token window on layers 0 and 1 (pattern 3: layer 2 is full), RoPE bases far apart."""
    cfg = dict(model_type="gemma3_text", vocab_size=vocab, hidden_size=32, intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=24,
               sliding_window=6, sliding_window_pattern=3, final_logit_softcapping=None,
               attn_logit_softcapping=None, attention_bias=False, tie_word_embeddings=True)
    cfg.update(over)
    return cfg


def write_tiny_gemma(path, layout="causal", seed=0, **over):
    """config.json, tokenizer.json and random weights of a tiny Gemma 3 in Hugging Face layout.
    layout: "causal" (Gemma3ForCausalLM), or a Gemma3ForConditionalGeneration config with the text
    settings under text_config and the text model's tensors under "language_model.model."
    ("multimodal_old") or "model.language_model." ("multimodal_new"). Returns (the text settings,
    the weights under their Gemma3ForCausalLM names)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    text = gemma_text_config(write_tokenizer(path / "tokenizer.json"), **over)
    if layout == "causal":
        cfg = dict(architectures=["Gemma3ForCausalLM"], **text)
    else:
        cfg = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", text_config=text,
                   vision_config=dict(model_type="siglip_vision_model", hidden_size=16))
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    C, I, H, Hkv, D = 32, 64, 4, 2, 16
    V = text["vocab_size"]
    # Gemma stores its norm weights as offsets from 1: small values around 0
    w = {"model.embed_tokens.weight": rnd(V, C, std=0.3), "model.norm.weight": rnd(C, std=0.1)}
    if not text["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(V, C)
    for i in range(text["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + name: rnd(C, std=0.1) for name in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                         "pre_feedforward_layernorm.weight",
                                                         "post_feedforward_layernorm.weight")})
        w.update({p + "self_attn.q_proj.weight": rnd(H * D, C), p + "self_attn.k_proj.weight": rnd(Hkv * D, C),
                  p + "self_attn.v_proj.weight": rnd(Hkv * D, C), p + "self_attn.o_proj.weight": rnd(C, H * D),
                  p + "self_attn.q_norm.weight": rnd(D, std=0.3), p + "self_attn.k_norm.weight": rnd(D, std=0.3),
                  p + "mlp.gate_proj.weight": rnd(I, C), p + "mlp.up_proj.weight": rnd(I, C),
                  p + "mlp.down_proj.weight": rnd(C, I)})
    prefix = {"causal": "model.", "multimodal_old": "language_model.model.",
              "multimodal_new": "model.language_model."}[layout]
    head = "lm_head." if layout != "multimodal_old" else "language_model.lm_head."
    stored = {(prefix + n[len("model."):] if n.startswith("model.") else head + n[len("lm_head."):]): t
              for n, t in w.items()}
    save_file(stored, str(path / "model.safetensors"))
    return text, w


def gemma_reference(w, c, ids, window=None, swap_bases=False, collect=None):
    """Gemma 3's forward in float64 from the raw weights and the text settings c, cache-free:
    logits (T, V). window / swap_bases change the sliding window or swap the two RoPE bases,
    to show that the comparison with the model notices either. collect, a dict, receives each
    layer's post-RoPE (q (H, T, D), k (Hkv, T, D)), for recomputing KVzip's scores."""
    w = {k: v.double() for k, v in w.items()}
    T, C, H, Hkv, D = len(ids), c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    W = c["sliding_window"] if window is None else window
    types = c.get("layer_types") or [SLIDE if (i + 1) % c["sliding_window_pattern"] else FULL
                                     for i in range(c["num_hidden_layers"])]
    local, glob = c["rope_local_base_freq"], c["rope_theta"]
    if swap_bases:
        local, glob = glob, local
    factor = (c.get("rope_scaling") or {}).get("factor", 1.0)

    def norm(x, weight):  # RMSNorm times (1 + weight)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * (1 + weight)

    def rope(x, theta, slow=1.0):  # rotate-half; positions divided by `slow` (linear scaling)
        inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D) / slow
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]  # query and key positions
    emb = w["model.embed_tokens.weight"]
    x = emb[torch.tensor(ids)] * math.sqrt(C)
    for layer, kind in enumerate(types):
        p = f"model.layers.{layer}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, H, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, Hkv, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, Hkv, D).transpose(0, 1)
        q = norm(q, w[p + "self_attn.q_norm.weight"]).transpose(0, 1)  # (H, T, D)
        k = norm(k, w[p + "self_attn.k_norm.weight"]).transpose(0, 1)  # (Hkv, T, D)
        if kind == SLIDE:
            q, k = rope(q, local), rope(k, local)
            seen = (j <= i) & (i - j < W)  # the last W positions, the query's own included
        else:
            q, k = rope(q, glob, factor), rope(k, glob, factor)
            seen = j <= i
        if collect is not None:
            collect[layer] = (q, k)
        kr, vr = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)  # (H, T, D)
        att = (q @ kr.transpose(1, 2) * c["query_pre_attn_scalar"] ** -0.5).masked_fill(~seen, float("-inf"))
        o = (att.softmax(-1) @ vr).transpose(0, 1).reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        x = x + norm(o, w[p + "post_attention_layernorm.weight"])
        h = norm(x, w[p + "pre_feedforward_layernorm.weight"])
        m = (gelu_tanh(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
        x = x + norm(m, w[p + "post_feedforward_layernorm.weight"])
    return norm(x, w["model.norm.weight"]) @ w.get("lm_head.weight", emb).T


def rel_err(logits, ref):
    return ((logits.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The tiny Gemma 3 loaded: (model, tokenizer, text settings, weights)."""
    d = tmp_path_factory.mktemp("tiny_gemma3")
    c, w = write_tiny_gemma(d)
    m, tok = model.load(d)
    return m, tok, c, w


CASES = {
    "pattern": dict(),  # layer types from sliding_window_pattern 3: sliding, sliding, full
    "layer_types": dict(layer_types=[FULL, SLIDE, SLIDE, FULL], num_hidden_layers=4),
    "untied_linear_rope": dict(tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_parameters": dict(rope_parameters={FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                             SLIDE: {"rope_type": "default", "rope_theta": 1e4}},
                            rope_theta=None, rope_local_base_freq=None),
    "window_1": dict(sliding_window=1),  # a sliding query sees only itself
    "multimodal_old": dict(),
    "multimodal_new": dict(),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_gemma3_checkpoints_match_independent_forward(tmp_path, kind):
    layout = kind if kind.startswith("multimodal") else "causal"
    c, w = write_tiny_gemma(tmp_path, layout=layout, **CASES[kind])
    m, tok = model.load(tmp_path)
    if kind == "rope_parameters":  # what the reference reads from the flat fields
        c = dict(c, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"factor": 4.0})
    ids = tok.encode(TEXT)
    assert len(ids) > 4 * c["sliding_window"]  # the window really cuts the context
    logits = m(torch.tensor(ids), m.new_cache())
    ref = gemma_reference(w, c, ids)
    # float32 rounding; a wrong norm, scale, RoPE base or window gives errors of order 1e-2 or more
    assert rel_err(logits, ref) < 1e-4
    assert (m.lm_head.weight is m.embed.weight) == c["tie_word_embeddings"]
    want = c.get("layer_types") or [SLIDE, SLIDE, FULL]
    assert list(m.cfg.layer_types) == want


def test_the_comparison_notices_an_off_by_one_window_and_swapped_rope_bases(gemma):
    """The reference with the window one shorter or longer, or with the local and global RoPE bases
    swapped, is far from the model: the comparison above pins the window's edge and the bases."""
    m, tok, c, w = gemma
    ids = tok.encode(TEXT)
    logits = m(torch.tensor(ids), m.new_cache())
    assert rel_err(logits, gemma_reference(w, c, ids)) < 1e-4
    for changed in (dict(window=c["sliding_window"] - 1), dict(window=c["sliding_window"] + 1),
                    dict(swap_bases=True)):
        assert rel_err(logits, gemma_reference(w, c, ids, **changed)) > 1e-3, changed


@pytest.mark.parametrize("fn", [model.attention, model.attention_sdpa, model.attention_sdpa_mask])
def test_sliding_window_edge(fn):
    """With q = 0 every visible key gets the same weight, and with V the identity the output row of
    query i is those weights: 1/n on keys max(0, i - window + 1) .. i, 0 elsewhere."""
    S, W = 12, 4
    for n_past in (0, 5):
        q = torch.zeros(1, 2, S - n_past, S)  # (Hkv, G, T, D)
        eye = torch.eye(S)[None]  # k = v = identity rows: key s is e_s
        out = fn(q, eye, eye, n_past, window=W)[0, 0]  # (T, S)
        for t in range(S - n_past):
            i = n_past + t
            want = torch.zeros(S)
            want[max(0, i - W + 1):i + 1] = 1 / min(W, i + 1)
            torch.testing.assert_close(out[t], want)


@settings(max_examples=60, deadline=None)
@given(Hkv=st.integers(1, 2), G=st.sampled_from([1, 3]), T=st.integers(1, 9), n_past=st.integers(0, 12),
       window=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_sdpa_attention_in_a_window_equals_reference(Hkv, G, T, n_past, window, seed):
    """The fused paths with a sliding window (keys dropped before the first query's window, then a
    band mask or none) against the reference's explicit mask: windows shorter and longer than the
    context, a single token, a fresh prefill and a later chunk."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv, G, T, 16, generator=g) * 3
    k, v = torch.randn(2, Hkv, n_past + T, 16, generator=g)
    want = model.attention(q, k, v, n_past, window=window)
    torch.testing.assert_close(model.attention_sdpa(q, k, v, n_past, window=window), want, atol=1e-5, rtol=1e-5)
    if T > 1:
        torch.testing.assert_close(model.attention_sdpa_mask(q, k, v, n_past, window=window), want,
                                   atol=1e-5, rtol=1e-5)
    if window >= n_past + T:  # a window longer than the context changes nothing
        torch.testing.assert_close(want, model.attention(q, k, v, n_past), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gemma3_incremental_decode_and_chunked_prefill_equal_one_forward(gemma, backend):
    """On a context several windows long, in the window cache: one token at a time, and prefill in
    chunks shorter and longer than the window, give one forward's logits (in the dense cache) and
    the same cached keys."""
    m, tok, c, _ = gemma
    ids = torch.tensor(tok.encode(TEXT))
    assert len(ids) > 4 * c["sliding_window"]
    full = m(ids, m.new_cache(backend="reference", dense=True))  # (T, V)
    cache = m.new_cache(backend=backend)  # the window cache
    steps = [m(ids[:3], cache)] + [m(ids[t:t + 1], cache) for t in range(3, len(ids))]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)
    for chunk in (4, 7, 11):
        chunked = m.new_cache(backend=backend)
        last = model.prefill(m, ids, chunked, chunk_size=chunk)
        torch.testing.assert_close(last[0], full[-1], atol=1e-5, rtol=0)
        for layer in range(m.cfg.n_layer):
            torch.testing.assert_close(chunked.keys(layer), cache.keys(layer), atol=1e-5, rtol=0)


def test_gemma3_rollback_and_generate(gemma):
    m, tok, _, _ = gemma
    ids = tok.encode(TEXT)
    cache = m.new_cache()
    model.prefill(m, ids, cache)
    with model.rollback(cache):
        first = m(torch.tensor([5, 9, 11]), cache)
    again = m(torch.tensor([5, 9, 11]), cache)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
    out = model.generate(m, ids, m.new_cache(), max_new_tokens=12)
    assert len(out) == 12


def test_gemma3_defaults_fill_a_sparse_text_config():
    """A multimodal config's text_config may state only what differs from Gemma3TextConfig's
    defaults (as the 4B checkpoint's does): the rest is filled in as Hugging Face does."""
    cfg = model.ModelConfig.from_hf({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152}})
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262_208)
    assert cfg.query_pre_attn_scalar == 256 and cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-6
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == [5, 11, 17, 23, 29]  # every 6th
    assert cfg.windows[0] == 1024 and cfg.windows[5] is None
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.rope_scaling["factor"] == 8.0


def test_gemma3_layer_settings(gemma):
    m, _, c, _ = gemma
    cfg = m.cfg
    assert cfg.windows == [6, 6, None] and cfg.has_sliding_layers
    assert cfg.query_pre_attn_scalar == 24 and cfg.hidden_act == "gelu_tanh" and cfg.qk_norm
    D = cfg.head_dim
    torch.testing.assert_close(m.inv_freq_local, 1e4 ** (-torch.arange(0, D, 2).float() / D))
    torch.testing.assert_close(m.inv_freq, 1e6 ** (-torch.arange(0, D, 2).float() / D))


def test_gemma3_embedding_scale_is_rounded_to_the_weights_dtype(tmp_path):
    """Hugging Face multiplies the embeddings by sqrt(C) rounded to the weights' dtype (in bfloat16,
    sqrt(32) = 5.657 becomes 5.656): the bfloat16 model's embeddings take exactly that factor."""
    write_tiny_gemma(tmp_path)
    m, _ = model.load(tmp_path, dtype=torch.bfloat16, device="cpu")
    seen = {}
    m.layers[0].attn_norm.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    ids = torch.tensor([3, 7, 11])
    m(ids, m.new_cache())
    factor = torch.tensor(math.sqrt(32), dtype=torch.float32).to(torch.bfloat16)
    assert factor.item() != math.sqrt(32)
    torch.testing.assert_close(seen["x"], m.embed(ids) * factor, atol=0, rtol=0)


BAD_CONFIGS = [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar must be a positive number"),
    (dict(layer_types=[SLIDE, FULL]), "layer_types must give"),
    (dict(layer_types=[SLIDE, "local", FULL]), "layer_types must give"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(sliding_window=None), "sliding_window must be a positive integer"),
    (dict(sliding_window_pattern=0), "sliding_window_pattern must be a positive integer"),
    (dict(rope_theta=None), "rope_theta must be a positive number"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling 'linear' lacks factor"),
    (dict(rope_parameters={FULL: {"rope_type": "default"}, SLIDE: {"rope_type": "linear", "factor": 2.0}}),
     "rope_parameters.sliding_attention type 'linear'"),
]


@pytest.mark.parametrize("over, words", BAD_CONFIGS, ids=[w for _, w in BAD_CONFIGS])
def test_gemma3_bad_configs_are_refused_naming_the_field(tmp_path, over, words):
    write_tiny_gemma(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **over}))
    with pytest.raises(InputError, match=words) as e:
        model.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_gemma3_vision_tower_weights_and_a_bad_text_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    write_tiny_gemma(tmp_path, layout="multimodal_new")
    w = load_file(str(tmp_path / "model.safetensors"))
    w["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="vision_tower.*vision tower weights are not supported"):
        model.load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "text_config": [1]}))
    with pytest.raises(InputError, match="text_config must be a JSON object, got list"):
        model.load(tmp_path)


# -----------------------------------------------------------------------------
# KVzip on a hybrid model: only the global layers scored and evicted, the windows kept whole

CONTEXT = " ".join([TEXT] * 4)  # ~130 tokens: about twenty windows of the tiny model


@pytest.fixture(scope="module")
def gemma_kv(gemma):
    """The tiny Gemma 3's FullKV of CONTEXT, scored; tests must leave it as they found it."""
    m, tok, _, _ = gemma
    return kvzip.prefill(m, tok, CONTEXT)


def dense_full_kv(m, tok, backend="reference"):
    """The FullKV of CONTEXT on a dense cache (every position of every layer held, the window
    masked), scored: what the window cache must agree with."""
    p_ids, ctx = kvzip.prefix_ids(tok), tok.encode(CONTEXT)
    cache = m.new_cache(capacity=len(p_ids) + len(ctx) + 64, backend=backend, dense=True)
    model.prefill(m, p_ids + ctx, cache)
    kv = kvzip.FullKV(cache, None, len(p_ids), ctx, backend, prefix_ids=p_ids)
    kvzip.score_context(m, tok, kv)
    return kv


def test_kvzip_scores_only_the_global_layers(gemma, gemma_kv):
    """Scores exist for the global layer only, (1, Hkv, n_c); the same from the window cache, the
    dense cache and the reference path (sliding layers attend within their window either way)."""
    m, tok, c, _ = gemma
    kv = gemma_kv
    assert kv.n_context > 4 * c["sliding_window"] and kv.layers == [2] == kvzip.scored_layers(m.cfg.windows)
    assert kv.scores.shape == (1, m.cfg.n_kv_head, kv.n_context) and torch.isfinite(kv.scores).all()
    assert (kv.scores > 0).all()
    dense = dense_full_kv(m, tok)
    torch.testing.assert_close(kv.scores, dense.scores, atol=1e-5, rtol=1e-4)
    ref = kvzip.prefill(m, tok, CONTEXT, backend="reference")
    torch.testing.assert_close(kv.scores, ref.scores, atol=1e-5, rtol=1e-4)
    # scoring rolled the reconstruction input back: the window cache answers as the dense one
    probe = torch.tensor(tok.encode(" the valley"))
    with model.rollback(kv.cache), model.rollback(dense.cache):
        torch.testing.assert_close(m(probe, kv), m(probe, dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_global_layer_scores_equal_first_principles_recomputation(gemma, backend):
    """Four chunks; the global layer's scores recomputed from the independent float64 forward of
    prefix + context + reconstruction input (sliding layers masked to their window there, no
    cache): softmax over K' = [prefix ; chunk ; input] with Gemma's query_pre_attn_scalar ** -0.5
    scaling, max over the input's rows and the group."""
    m, tok, c, w = gemma
    context = " ".join([TEXT] * 2)
    kv = kvzip.prefill(m, tok, context, chunk_size=20, backend=backend)
    n_p, n_c, Hkv, G = kv.n_prefix, kv.n_context, m.cfg.n_kv_head, m.cfg.group
    seq0 = kv.prefix_ids + kv.context_ids
    chunks = kvzip.reconstruction_inputs(tok, kv.context_ids, 20)
    assert len(chunks) == 4 and n_c > 4 * c["sliding_window"]
    for start, end, rec in chunks:
        seen = {}
        gemma_reference(w, c, seq0 + rec, collect=seen)
        q, k = seen[2]  # the global layer: (H, n_all, D), (Hkv, n_all, D)
        n_all, n_q = len(seq0) + len(rec), len(rec)
        key = torch.arange(n_all)[None, :]
        row = torch.arange(n_all - n_q, n_all)[:, None]  # absolute positions of the input's queries
        visible = (key < n_p) | ((key >= n_p + start) & (key < n_p + end)) | ((key >= n_p + n_c) & (key <= row))
        logits = q[:, -n_q:] @ k.repeat_interleave(G, 0).transpose(1, 2) * c["query_pre_attn_scalar"] ** -0.5
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # (H, n_q, n_all)
        expect = probs[:, :, n_p + start:n_p + end].reshape(Hkv, G * n_q, -1).amax(1)
        torch.testing.assert_close(kv.scores[0, :, start:end], expect.float(), atol=1e-5, rtol=1e-4)


def test_the_compressed_cache_keeps_the_windows_and_evicts_the_global_layer(gemma, gemma_kv):
    """At 0.3: the global layer keeps round(0.3 * Hkv * n_c) context pairs plus the prefix; each
    sliding layer holds no packed pairs and exactly the full cache's last window - 1 positions;
    nbytes counts exactly those rows (plus the offsets), and dense_nbytes what every layer holding
    every position would take."""
    m, tok, c, _ = gemma
    kv, W = gemma_kv, c["sliding_window"]
    Hkv, D, n_p, n_c = m.cfg.n_kv_head, m.cfg.head_dim, kv.n_prefix, kv.n_context
    ckv = kvzip.CompressedKV.from_full(kv.cache, n_p, kvzip.keep_mask(kv.scores, 0.3), backend="reference")
    dense = dense_full_kv(m, tok)
    kept = int(ckv.head_lengths()[2].sum())
    assert kept == Hkv * n_p + round(0.3 * Hkv * n_c)
    for layer in (0, 1):
        assert ckv.k[layer].shape[0] == 0 and ckv.n_window[layer] == W - 1
        last = slice(-(W - 1), None)  # the full cache's last window - 1 positions
        torch.testing.assert_close(ckv.tail_k[layer][:, :W - 1], dense.cache.keys(layer)[:, last], atol=1e-5, rtol=0)
        torch.testing.assert_close(ckv.tail_v[layer][:, :W - 1], dense.cache.values(layer)[:, last], atol=1e-5, rtol=0)
    row = 2 * D * 4  # K and V of one position of one head, float32
    offsets = sum(o.numel() * 8 for o in ckv.offsets)
    assert ckv.nbytes == row * (kept + 2 * Hkv * (W - 1)) + offsets
    assert kv.cache.nbytes == row * Hkv * (n_p + n_c + 2 * (W - 1))
    assert kv.dense_nbytes == dense.cache.nbytes == row * Hkv * 3 * (n_p + n_c)
    assert ckv.nbytes < kv.cache.nbytes < kv.dense_nbytes
    # the prune path (FullKV.prune) builds the same cache, and says what fraction it kept
    pruned = kv.prune(0.3)
    assert pruned.kept_ratio == round(0.3 * Hkv * n_c) / (Hkv * n_c)
    assert torch.equal(pruned.head_lengths(), ckv.head_lengths())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compressed_at_ratio_one_answers_as_the_full_cache(gemma, backend):
    """Everything kept: a query's logits and a greedy answer longer than the window equal the full
    cache's; the cache goes back to its context after each answer (the window too), so a second
    query still matches; keep=True then truncate too. At 0.3 the logits differ, so the comparison
    can fail."""
    m, tok, c, _ = gemma
    W = c["sliding_window"]
    kv = kvzip.prefill(m, tok, CONTEXT, backend=backend)
    ckv = kv.prune(1.0)
    for query in ("Where did the train go?", "What does the fox do?"):
        ids = kvzip.query_ids(tok, query)
        with model.rollback(kv.cache):
            full = m(torch.tensor(ids), kv)
        part = m(torch.tensor(ids), ckv)
        ckv.truncate(ckv.base_len)
        torch.testing.assert_close(part, full, atol=1e-4, rtol=0)
        a = kvzip.generate_ids(m, tok, ids, kv, max_new_tokens=3 * W)
        assert len(a) > W
        assert kvzip.generate_ids(m, tok, ids, ckv, max_new_tokens=3 * W) == a
        assert ckv.seq_len == ckv.base_len and ckv.n_tail == 0
    kept = kvzip.generate_ids(m, tok, ids, ckv, max_new_tokens=3 * W, keep=True)
    assert kept == a and ckv.seq_len == ckv.base_len + len(ids) + len(a) - 1
    ckv.truncate(ckv.base_len)
    assert kvzip.generate_ids(m, tok, ids, ckv, max_new_tokens=3 * W) == a
    small = kv.prune(0.3)
    evicted = m(torch.tensor(ids), small)
    small.truncate(small.base_len)
    assert (evicted - part).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["full", "compressed", "compressed-int4", "reference"])
def test_batched_answers_on_a_hybrid_model_equal_one_at_a_time(gemma, gemma_kv, which):
    """Queries longer than the window, answers of twice the window: the sliding layers' shared
    window and each query's own rows leave the window as the rows move on, in the batch as alone."""
    m, tok, c, _ = gemma
    W = c["sliding_window"]
    kv = {"full": lambda: gemma_kv, "compressed": lambda: gemma_kv.prune(0.5),
          "compressed-int4": lambda: gemma_kv.prune(0.5, bits=4),
          "reference": lambda: kvzip.prefill(m, tok, CONTEXT, backend="reference").prune(0.5)}[which]()
    queries = [kvzip.query_ids(tok, q) for q in ("Where did the train go?", "What does the fox do near the river bank?",
                                                  "Who?")]
    assert min(len(q) for q in queries[:2]) > W
    before = kv.nbytes
    one = [kvzip.generate_ids(m, tok, q, kv, 2 * W) for q in queries]
    assert kvzip.generate_ids_batched(m, tok, queries, kv, 2 * W) == one
    outs = kvzip.forward_batched(m, queries, kv)
    for q, out in zip(queries, outs):
        with model.rollback(kv):
            torch.testing.assert_close(out, m(torch.tensor(q), kv), atol=1e-5, rtol=1e-5)
    assert kv.seq_len == kv.n_prefix + kv.n_context if which == "full" else kv.seq_len == kv.base_len
    assert kv.nbytes == before


def test_head_level_uniform_and_baselines_on_the_global_layers(gemma, gemma_kv, tmp_path):
    """Head scores are (1, Hkv); head-level pruning keeps whole global heads; uniform budgets; every
    baseline scores (1, Hkv, n_c) and compresses to the same count; H2O's sums equal the global
    layer's attention computed here from one forward's queries and keys."""
    import baselines
    m, tok, _, _ = gemma
    kv = gemma_kv
    Hkv, n_p, n_c = m.cfg.n_kv_head, kv.n_prefix, kv.n_context
    hs = kvzip.head_scores(m, tok, [CONTEXT, TEXT])
    assert hs.shape == (1, Hkv)
    kvzip.save_head_scores(tmp_path / "hs.safetensors", hs, m)
    torch.testing.assert_close(kvzip.load_head_scores(tmp_path / "hs.safetensors", m), hs)
    by_head = kv.prune(0.5, level="head", head_scores=hs)
    assert sorted(by_head.head_lengths()[2].tolist()) == [n_p, n_p + n_c]
    uniform = kv.prune(0.3, uniform=True)
    assert (uniform.head_lengths()[2] - n_p).tolist() == [round(0.3 * n_c)] * Hkv
    with pytest.raises(ValueError, match=r"head_scores must have shape \(scored layers, n_kv_head\) = \(1, 2\)"):
        kv.prune(0.5, level="head", head_scores=torch.ones(3, Hkv))
    for method in baselines.METHODS:
        s = baselines.method_scores(method, m, tok, kv, "Where did the train go?")
        assert s.shape == (1, Hkv, n_c) and torch.isfinite(s).all(), method
        ckv = baselines.compress(kv, method, 0.3, s)
        assert int(ckv.head_lengths()[2].sum()) == Hkv * n_p + round(0.3 * Hkv * n_c), method
    # H2O by its definition, from the global layer's queries and keys of one forward
    q_ids = kvzip.query_ids(tok, "Where did the train go?")
    seen = {}
    model.prefill(m, kv.prefix_ids + kv.context_ids + q_ids, m.new_cache(dense=True), chunk_size=4096,
                  observe=lambda layer, q, k: seen.setdefault(layer, (q, k)))
    q, k = seen[2]  # (Hkv, G, T, D), (Hkv, T, D)
    T = k.shape[1]
    p = (q @ k.unsqueeze(1).transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)  # (Hkv, G, T, T)
    ctx = p[:, :, n_p:, n_p:n_p + n_c]  # rows from the first context token on, context keys
    seen_by = torch.arange(n_c, 0, -1) + len(q_ids)  # rows at or after each context key
    h2o = (ctx.sum(2) / seen_by).mean(1)[None]  # (1, Hkv, n_c)
    torch.testing.assert_close(baselines.h2o_scores(m, tok, kv, "Where did the train go?"), h2o,
                               atol=1e-5, rtol=1e-4)


def test_the_demo_on_a_hybrid_model(tmp_path, capsys):
    """python kvzip.py --model on the tiny Gemma 3: both caches answer, and the sizes say which
    layers were scored and what every layer holding every position would take."""
    folder = tmp_path / "g"
    write_tiny_gemma(folder)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT, encoding="utf-8")
    kvzip.main(["--model", str(folder), "--context", str(ctx), "--query", "Where did the train go?",
                "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "of the 3 layers 1 are global (scored, evicted" in out and "Every layer holding every position" in out
    assert re.search(r"^  -> (the same answer|the answers part at word \d+: full )", out, flags=re.M)


@pytest.mark.parametrize("bits", [16, 4])
def test_a_hybrid_compressed_cache_saved_and_loaded(gemma, gemma_kv, tmp_path, bits):
    """The file holds the sliding layers' windows beside the global layer's packed rows: loaded,
    the cache holds the same bytes and windows and gives the same logits. A window of the wrong
    shape is named."""
    from safetensors.torch import load_file, save_file
    m, tok, _, _ = gemma
    ckv = gemma_kv.prune(0.3, bits=bits)
    path = tmp_path / "c.kvz"
    ckv.save(path)
    got = kvzip.load_compressed(path, m)
    assert got.nbytes == ckv.nbytes and got.n_window == ckv.n_window and got.windows == ckv.windows
    for layer in (0, 1):
        assert torch.equal(got.tail_k[layer], ckv.tail_k[layer]) and torch.equal(got.tail_v[layer], ckv.tail_v[layer])
    ids = torch.tensor(kvzip.query_ids(tok, "Where did the train go?"))
    with model.rollback(ckv), model.rollback(got):
        assert torch.equal(m(ids, got), m(ids, ckv))
    tensors, meta = load_file(str(path)), kvzip.read_saved_header(path)[0]
    tensors["window_k.1"] = tensors["window_k.1"][:, 1:].contiguous()
    save_file(tensors, str(tmp_path / "bad.kvz"), metadata=meta)
    with pytest.raises(InputError, match=r"'window_k.1' is F32 \[2, 4, 16\], expected F32 \[2, 5, 16\]"):
        kvzip.load_compressed(tmp_path / "bad.kvz", m)


def windows_of(ckv):
    """Each sliding layer's window: (k, v) (Hkv, n_w, D), the first rows of its tail; None for a global layer."""
    return [None if w is None else (ckv.tail_k[l][:, :ckv.n_window[l]], ckv.tail_v[l][:, :ckv.n_window[l]])
            for l, w in enumerate(ckv.windows)]


@pytest.mark.parametrize("bits", [16, 4])
def test_online_on_a_hybrid_model(gemma, gemma_kv, tmp_path, bits):
    """KVzip online scores and evicts the global layers chunk by chunk while each sliding layer's
    window moves on: one chunk is offline prefill + prune byte for byte; many chunks at ratio 1.0
    equal it up to float rounding; at 0.3 the budget is the global layers' and layer 0's window
    (its keys depend on token and position only) is offline's; the cache answers, batched too,
    and saves."""
    from test_kvzip import stored_tensors
    m, tok, c, _ = gemma
    W, L_, Hkv = c["sliding_window"], len(gemma_kv.layers), m.cfg.n_kv_head
    one, offline = kvzip.prefill_online(m, tok, CONTEXT, 0.3, bits=bits), gemma_kv.prune(0.3, bits=bits)
    assert len(one.trace) == 1 and one.nbytes == offline.nbytes
    got, want = stored_tensors(one), stored_tensors(offline)
    got += [t for kv in windows_of(one) if kv for t in kv]
    want += [t for kv in windows_of(offline) if kv for t in kv]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    n_c = gemma_kv.n_context
    everything = kvzip.prefill_online(m, tok, CONTEXT, 1.0, chunk_size=20, bits=bits)
    assert len(everything.trace) == math.ceil(n_c / 20) >= 6
    assert everything.nbytes == gemma_kv.prune(1.0, bits=bits).nbytes
    for a, b in zip(windows_of(everything), windows_of(gemma_kv.prune(1.0))):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[0].shape == b[0].shape == (Hkv, W - 1, m.cfg.head_dim)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ckv = kvzip.prefill_online(m, tok, CONTEXT, 0.3, chunk_size=20, bits=bits)
    for step in ckv.trace:
        assert step["kept"] == round(0.3 * L_ * Hkv * step["end"])  # the global layers' budget
    assert ckv.scores.shape == (L_, Hkv, n_c) and sum(s["evicted_past"] for s in ckv.trace) > 0
    assert torch.equal(ckv.head_lengths()[gemma_kv.layers], gemma_kv.n_prefix + torch.isfinite(ckv.scores).sum(-1))
    torch.testing.assert_close(windows_of(ckv)[0], windows_of(offline)[0], atol=1e-5, rtol=1e-5)
    queries = [kvzip.query_ids(tok, q) for q in ("Where did the train go?", "What does the fox do?")]
    answers = [kvzip.generate_ids(m, tok, q, ckv, 2 * W) for q in queries]
    assert kvzip.generate_ids_batched(m, tok, queries, ckv, 2 * W) == answers
    ckv.save(tmp_path / "online.kvz")
    back = kvzip.load_compressed(tmp_path / "online.kvz", m)
    assert back.nbytes == ckv.nbytes
    assert [kvzip.generate_ids(m, tok, q, back, 2 * W) for q in queries] == answers


def test_a_gemma_without_sliding_layers(tmp_path):
    """A Gemma 3 without sliding layers is an ordinary model to KVzip: every layer scored."""
    write_tiny_gemma(tmp_path / "full", sliding_window_pattern=1)  # every layer full
    m_full, tok_full = model.load(tmp_path / "full")
    assert not m_full.cfg.has_sliding_layers
    kv = kvzip.prefill(m_full, tok_full, TEXT)
    assert kv.layers == [0, 1, 2] and kv.scores.shape == (3, 2, kv.n_context) and torch.isfinite(kv.scores).all()
    assert kv.dense_nbytes == kv.cache.nbytes


# -----------------------------------------------------------------------------
# The window cache: sliding layers free the positions that leave their window

def held_rows(m, n: int) -> list[int]:
    """Positions each layer holds after n tokens: all in a full layer, the last window - 1 in a sliding one."""
    return [n if w is None else min(n, w - 1) for w in m.cfg.windows]


def row_bytes(m) -> int:
    return 2 * m.cfg.n_kv_head * m.cfg.head_dim * 4  # K and V of one position of one layer, float32


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(1, 15), min_size=1, max_size=8), backend=st.sampled_from(["auto", "reference"]),
       inside=st.lists(st.integers(1, 9), max_size=3))
def test_window_cache_equals_the_dense_cache(gemma, chunks, backend, inside):
    """Fed in chunks of any sizes, shorter and longer than the window: the dense cache's logits;
    each sliding layer holds exactly the last window - 1 keys and values (the dense cache's), and
    nbytes counts exactly what is held. Then chunks run inside a rollback: the same logits, and
    afterwards the cache is as before the block."""
    m, tok, _, _ = gemma
    ids = torch.tensor(tok.encode(TEXT))
    window, dense = m.new_cache(backend=backend), m.new_cache(backend=backend, dense=True)
    assert isinstance(window, model.WindowKVCache) and type(dense) is model.KVCache
    i = 0
    for n in chunks:
        x = ids[i:i + n]
        if len(x) == 0:
            break
        torch.testing.assert_close(m(x, window), m(x, dense), atol=1e-5, rtol=0)
        i += len(x)
        for layer, rows in enumerate(held_rows(m, i)):
            assert window.keys(layer).shape[1] == rows
            torch.testing.assert_close(window.keys(layer), dense.keys(layer)[:, i - rows:], atol=1e-5, rtol=0)
            torch.testing.assert_close(window.values(layer), dense.values(layer)[:, i - rows:], atol=1e-5, rtol=0)
        assert window.nbytes == row_bytes(m) * sum(held_rows(m, i))
    assert dense.nbytes == row_bytes(m) * i * m.cfg.n_layer
    held = [window.keys(layer).clone() for layer in range(m.cfg.n_layer)]
    with model.rollback(window), model.rollback(dense):
        for j, n in enumerate(inside):
            x = torch.arange(n) * 7 % 50 + j
            torch.testing.assert_close(m(x, window), m(x, dense), atol=1e-5, rtol=0)
    assert window.seq_len == i and window.nbytes == row_bytes(m) * sum(held_rows(m, i))
    for layer in range(m.cfg.n_layer):
        torch.testing.assert_close(window.keys(layer), held[layer], atol=0, rtol=0)


def test_window_cache_bytes_stay_bounded(gemma):
    """A context about twenty windows long, prefilled in chunks, then decoded: the sliding layers'
    buffers never exceed window - 1 rows plus room for max(chunk, window) tokens, where a full
    layer's grows with the context; nbytes is exact throughout."""
    m, tok, c, _ = gemma
    W, chunk = c["sliding_window"], 8
    ids = torch.tensor(tok.encode(" ".join([TEXT] * 6)))
    assert len(ids) > 20 * W
    sliding = [layer for layer, w in enumerate(m.cfg.windows) if w is not None]
    cache = m.new_cache()
    model.prefill(m, ids, cache, chunk_size=chunk)
    assert all(cache.k[layer].shape[1] <= W - 1 + max(chunk, W) for layer in sliding)
    assert cache.nbytes == row_bytes(m) * sum(held_rows(m, len(ids)))
    for t in range(3 * W):
        m(torch.tensor([5 + t % 7]), cache)
        assert all(cache.k[layer].shape[1] <= W - 1 + max(chunk, W) for layer in sliding)
    assert cache.nbytes == row_bytes(m) * sum(held_rows(m, len(ids) + 3 * W))
    full = [layer for layer in range(m.cfg.n_layer) if layer not in sliding]
    assert all(cache.keys(layer).shape[1] == len(ids) + 3 * W for layer in full)


def test_window_cache_rolls_back(gemma):
    """A rollback block that runs three windows of tokens keeps the window it returns to: afterwards
    the cache answers as the dense one does. A bare truncate to a length whose window was freed is
    refused."""
    m, tok, c, _ = gemma
    W = c["sliding_window"]
    ids = torch.tensor(tok.encode(TEXT))
    cache, dense = m.new_cache(), m.new_cache(dense=True)
    m(ids, cache), m(ids, dense)
    before = cache.nbytes
    with model.rollback(cache):
        for t in range(3 * W):
            m(torch.tensor([5 + t % 7]), cache)
        assert cache.nbytes > before  # the rows the truncate returns to are held meanwhile
    assert cache.seq_len == len(ids) and cache.nbytes == before
    probe = torch.tensor([9, 4, 11])
    torch.testing.assert_close(m(probe, cache), m(probe, dense), atol=1e-5, rtol=0)
    for t in range(3 * W):
        m(torch.tensor([5 + t % 7]), cache)
    with pytest.raises(ValueError, match=f"cannot truncate to {len(ids)} tokens: sliding layer 0 freed"):
        cache.truncate(len(ids))
