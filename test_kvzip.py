"""Tests of kvzip.py: the reconstruction prompts, the scorer against a first-principles
recomputation, eviction, the packed cache, generation and reuse, bad input, and the default model."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvzip
import model
import tasks
from conftest import TINY_CONTEXT, reference_forward, tiny_context



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
    seq0 = kvzip.prefix_ids(tok) + tok.encode(context)
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
    with pytest.raises(ValueError, match="empty query"):
        kvzip.generate(m, tok, "  ", kvzip.prefill(m, tok, "Some context here.", score=False))


def test_default_model_keeps_every_pass_key_at_ratio_0_3(smol):
    m, tok = smol
    task = tasks.needle_task(1500, n_needles=4, seed=0, tok=tok)
    kv = kvzip.prefill(m, tok, task["context"])
    ckv = kv.prune(0.3)
    full_ok = [tasks.check_answer(kvzip.generate(m, tok, p, kv, 8, template=False), a) for p, a in task["probes"]]
    comp_ok = [tasks.check_answer(kvzip.generate(m, tok, p, ckv, 8, template=False), a) for p, a in task["probes"]]
    assert sum(full_ok) >= 2, full_ok  # the 135M model retrieves most labelled keys with the full cache
    assert all(c for f, c in zip(full_ok, comp_ok) if f), (full_ok, comp_ok)
    expected = (kv.n_prefix + 0.3 * kv.n_context) / (kv.n_prefix + kv.n_context)
    assert abs(ckv.nbytes / kv.nbytes - expected) < 0.05 * expected


# -----------------------------------------------------------------------------
# Scoring variants (the paper's ablations), head scores and head-level eviction

@pytest.mark.parametrize("chunk_size,scorer", [(20, "logits"), (13, "softmax"), (13, "logits"), (64, "softmax")])
def test_scoring_variants_equal_first_principles_recomputation(tiny, chunk_size, scorer):
    """Other chunk sizes and the softmax-free scorer, recomputed from an independent dense forward
    of prefix + context + each reconstruction input (as in the test above)."""
    m, tok, w = tiny
    context = tiny_context(tok, 40, seed=5)
    kv = kvzip.prefill(m, tok, context, chunk_size=chunk_size, scorer=scorer)
    n_p, n_c, G, Hkv = kv.n_prefix, kv.n_context, m.cfg.group, m.cfg.n_kv_head
    seq0 = kvzip.prefix_ids(tok) + kv.context_ids
    chunks = kvzip.reconstruction_inputs(tok, kv.context_ids, chunk_size)
    assert len(chunks) == math.ceil(n_c / chunk_size)
    for start, end, rec in chunks:
        _, qs, ks = reference_forward(w, m.cfg, seq0 + rec)
        n_all, n_q = len(seq0) + len(rec), len(rec)
        key = torch.arange(n_all)[None, :]
        row = torch.arange(n_all - n_q, n_all)[:, None]
        visible = (key < n_p) | ((key >= n_p + start) & (key < n_p + end)) | ((key >= n_p + n_c) & (key <= row))
        for l in range(m.cfg.n_layer):
            logits = (qs[l][:, -n_q:] @ ks[l].repeat_interleave(G, 0).transpose(1, 2)) / math.sqrt(m.cfg.head_dim)
            if scorer == "softmax":
                logits = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # (H, n_q, n_all)
            expect = logits[:, :, n_p + start:n_p + end].reshape(Hkv, G * n_q, -1).amax(1)
            torch.testing.assert_close(kv.scores[l, :, start:end], expect, atol=1e-5, rtol=1e-4)
    if scorer == "logits":  # the variant really differs from Eq. 2
        assert not torch.allclose(kv.scores, kvzip.prefill(m, tok, context, chunk_size=chunk_size).scores)


def test_head_scores_are_the_max_over_positions_and_contexts(tiny):
    m, tok, _ = tiny
    contexts = [tiny_context(tok, 30, seed=6), tiny_context(tok, 45, seed=7)]
    hs = kvzip.head_scores(m, tok, contexts, chunk_size=20)
    assert hs.shape == (m.cfg.n_layer, m.cfg.n_kv_head) and hs.dtype == torch.float32
    per = [kvzip.prefill(m, tok, c, chunk_size=20).scores for c in contexts]  # (L, Hkv, n_c) each
    for l in range(m.cfg.n_layer):
        for h in range(m.cfg.n_kv_head):
            assert hs[l, h] == max(float(s[l, h, j]) for s in per for j in range(s.shape[-1]))
    with pytest.raises(ValueError, match="contexts"):
        kvzip.head_scores(m, tok, "one string, not a list")


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 4), H=st.integers(1, 4), n_c=st.integers(1, 12), ratio=st.floats(0.01, 1.0),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_head_keep_mask_keeps_the_top_whole_heads(L, H, n_c, ratio, ties, seed):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randint(0, 3, (L, H), generator=g).float() if ties else torch.rand(L, H, generator=g)
    keep = kvzip.head_keep_mask(hs, ratio, n_c)
    per_head = keep.sum(-1)  # (L, H)
    assert ((per_head == 0) | (per_head == n_c)).all()  # whole heads only
    kept = per_head == n_c
    assert int(kept.sum()) == round(ratio * L * H)
    assert abs(int(kept.sum()) - ratio * L * H) <= 0.5  # within half a head of the ratio
    if kept.any() and (~kept).any():
        assert hs[kept].min() >= hs[~kept].max()  # the top-ranked heads
    flat = torch.zeros(L, H)  # all tied: the lowest (layer, head) indices win
    assert kvzip.head_keep_mask(flat, ratio, n_c).any(-1).flatten().nonzero().flatten().tolist() == \
        list(range(round(ratio * L * H)))


def test_head_level_prune_keeps_whole_heads_without_scoring(tiny, tiny_kv):
    m, tok, _ = tiny
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    kv = kvzip.prefill(m, tok, TINY_CONTEXT, score=False)  # no reconstruction pass at all
    assert kv.scores is None
    n_p, n_c = kv.n_prefix, kv.n_context
    hs = torch.tensor([[0.3, 0.9], [0.5, 0.1]])
    for ratio, want in [(0.5, [[False, True], [True, False]]), (0.3, [[False, True], [False, False]]),
                        (0.1, [[False, False], [False, False]]), (1.0, [[True, True], [True, True]])]:
        ckv = kv.prune(ratio, level="head", head_scores=hs)
        lengths = ckv.head_lengths() - n_p  # (L, Hkv)
        assert torch.equal(lengths, torch.tensor(want).long() * n_c), (ratio, lengths)
        assert ckv.kept_ratio == sum(map(sum, want)) / (L * Hkv)
        assert abs(ckv.kept_ratio - ratio) <= 0.5 / (L * Hkv) + 1e-9  # within half a head
        for l in range(L):
            for h in range(Hkv):  # the prefix is always kept, in every head
                rows = ckv.k[l][ckv.offsets[l][h]:ckv.offsets[l][h] + n_p]
                assert torch.equal(rows, kv.cache.keys(l)[h, :n_p])
    # the same compressed cache as pair-level pruning with the head score at every position
    ckv = kv.prune(0.5, level="head", head_scores=hs)
    pair = kv.prune(0.5, scores=hs[:, :, None].expand(L, Hkv, n_c).contiguous())
    assert all(torch.equal(a, b) for a, b in zip(ckv.k + ckv.v, pair.k + pair.v))
    assert tiny_kv.prune(0.3).kept_ratio == round(0.3 * L * Hkv * tiny_kv.n_context) / (L * Hkv * tiny_kv.n_context)


def test_head_level_bad_input_gives_clear_errors(tiny_kv):
    kv = tiny_kv
    L, Hkv = len(kv.cache.k), kv.cache.k[0].shape[0]
    with pytest.raises(ValueError, match="level must be one of"):
        kv.prune(0.5, level="token")
    with pytest.raises(ValueError, match="needs head_scores"):
        kv.prune(0.5, level="head")
    for bad in (torch.rand(L, Hkv + 1), torch.rand(L), torch.rand(L + 1, Hkv), [[0.1] * Hkv] * L):
        with pytest.raises(ValueError, match="head_scores must have shape"):
            kv.prune(0.5, level="head", head_scores=bad)
    with pytest.raises(ValueError, match="apply to level=.pair. only"):
        kv.prune(0.5, level="head", head_scores=torch.rand(L, Hkv), uniform=True)
    with pytest.raises(ValueError, match="only with level='head'"):
        kv.prune(0.5, head_scores=torch.rand(L, Hkv))
    with pytest.raises(ValueError, match="scorer must be one of"):
        kvzip.prefill(None, None, "text", scorer="probabilities")


def test_head_scores_file_round_trip_and_model_mismatch(tiny, tmp_path, tmp_path_factory):
    from conftest import write_tiny_checkpoint
    m, tok, _ = tiny
    hs = torch.rand(m.cfg.n_layer, m.cfg.n_kv_head)
    path = tmp_path / "heads.safetensors"
    kvzip.save_head_scores(path, hs, m)
    assert torch.equal(kvzip.load_head_scores(path, m), hs)
    with pytest.raises(ValueError, match="head scores must have shape"):
        kvzip.save_head_scores(tmp_path / "bad.safetensors", hs[:, :1], m)
    # another shape (3 layers), and the same shape with other weights: both refused, both named
    for folder, kwargs in [("three_layers", dict(n_layer=3)), ("other_weights", dict(seed=1))]:
        d = tmp_path_factory.mktemp(folder)
        write_tiny_checkpoint(d, **kwargs)
        other, _ = model.load(d)
        with pytest.raises(ValueError, match="another model") as e:
            kvzip.load_head_scores(path, other)
        msg = str(e.value)
        ident, theirs = kvzip.model_identity(m), kvzip.model_identity(other)
        assert ident["weights_sha256"] in msg and theirs["weights_sha256"] in msg
        assert f"{ident['n_layer']} layers" in msg and f"{theirs['n_layer']} layers" in msg
