"""Tests of kvzip.py: the reconstruction prompts, the scorer against a first-principles
recomputation, eviction, the packed cache, generation and reuse, bad input, and the default model."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import kvzip
import model
import quant
import tasks
from conftest import HERE, TINY_CONTEXT, reference_forward, tiny_context


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


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_qwen3"])
def test_scores_equal_first_principles_recomputation(request, checkpoint, backend):
    """Three chunks; every score recomputed from an independent full forward of
    prefix + context + reconstruction input with one dense mask over all keys (no chunking, no cache).
    On a CPU "auto" is the fused path (fused.ScoringCache), "reference" the observe hook + the spec.
    Llama (GQA) and Qwen3 (q/k norms before RoPE: the scores see the normalized keys)."""
    m, tok, w = request.getfixturevalue(checkpoint)
    context = tiny_context(tok, 52)
    kv = kvzip.prefill(m, tok, context, chunk_size=20, backend=backend)
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
    # the bytes really shrink: packed K/V plus the small offsets, plus a CPU cache's decode plans
    ckv = kv.prune(0.3)
    elem = 2 * m.cfg.head_dim * 4  # K and V of one pair, float32
    assert ckv.nbytes == int(ckv.head_lengths().sum()) * elem + L * (Hkv + 1) * 8 + plan_bytes(ckv)
    assert plan_bytes(ckv) > 0 and plan_bytes(kv.prune(0.3, bits=8)) == 0  # only 16-bit caches have plans
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


def plan_tensors(ckv):
    """Every tensor of the cache's decode plans (fused.DecodePlan; a CPU cache in the model's dtype)."""
    return [t for p in ckv.plans or [] if p is not None for t in (p.mask, p.heads, p.extra_k, p.extra_v, p.extra_mask, p.extra_heads)]


def plan_bytes(ckv):
    """The plans' storage, counted here on its own (not through DecodePlan.nbytes)."""
    return sum(t.untyped_storage().nbytes() for t in plan_tensors(ckv))


def stored_tensors(ckv):
    """Every tensor the compressed cache holds for the context (a Quantized block: codes, scales, zeros)."""
    parts = lambda x: [x.data, x.scale, x.zero] if isinstance(x, quant.Quantized) else [x]  # noqa: E731
    return [t for x in ckv.k + ckv.v for t in parts(x)] + ckv.offsets + plan_tensors(ckv)


def snapshot(ckv):
    return [t.clone() for t in stored_tensors(ckv)], ckv.seq_len, ckv.nbytes


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
    for ctx in ("", "   \n"):
        with pytest.raises(ValueError, match="empty context"):
            kvzip.prefill(m, tok, ctx)
    with pytest.raises(ValueError, match="context must be a str, got NoneType"):
        kvzip.prefill(m, tok, None)
    with pytest.raises(ValueError, match="context too long"):
        kvzip.prefill(m, tok, "the fox " * m.cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="does not fit"):
        kvzip.generate(m, tok, "the fox", kv, max_new_tokens=m.cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="empty query"):
        kvzip.generate(m, tok, "  ", kvzip.prefill(m, tok, "Some context here.", score=False))


def test_type_checks_say_what_they_found(tiny, tiny_kv):
    m, tok, _ = tiny
    with pytest.raises(ValueError, match="context must be a str, got bytes"):
        kvzip.prefill(m, tok, b"hello")
    with pytest.raises(ValueError, match="context must be a str, got list"):
        kvzip.prefill(m, tok, ["hello"])
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\].*Python float, got a torch.Tensor"):
        tiny_kv.prune(torch.tensor(0.3))
    with pytest.raises(ValueError, match="got a bool"):
        tiny_kv.prune(True)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 8, got 4"):
        kvzip.prefill(m, tok, "some words", chunk_size=4)
    for n in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {n!r}"):
            kvzip.generate(m, tok, "the fox", tiny_kv, max_new_tokens=n)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            kvzip.generate_ids(m, tok, tok.encode("the fox"), tiny_kv, max_new_tokens=n)
    # every one of these is a ValueError and an errors.InputError, which the command lines report in one line
    with pytest.raises(kvzip.InputError):
        tiny_kv.prune(2.0)


def held_bytes(ckv):
    """Bytes of every buffer the compressed cache holds (storage, not the rows in use)."""
    return (sum(t.untyped_storage().nbytes() for t in ckv.k + ckv.v + ckv.offsets + ckv.tail_k + ckv.tail_v)
            + plan_bytes(ckv))


def test_compressed_cache_holds_what_it_reports_after_a_long_query(tiny, tiny_kv):
    m, tok, _ = tiny
    ckv = tiny_kv.prune(0.3)
    base = ckv.seq_len
    assert held_bytes(ckv) == ckv.nbytes
    long_query = tiny_context(tok, 300, seed=7)  # a query longer than the compressed context itself
    kvzip.generate(m, tok, long_query, ckv, max_new_tokens=3)  # keep=False: truncates back to the context
    assert ckv.seq_len == base and ckv.n_tail == 0
    assert held_bytes(ckv) == ckv.nbytes  # the tail's buffers were released, not just marked unused
    # a kept turn: the tail rows in use are reported; the buffer holds at most its reserved room
    kvzip.generate(m, tok, "the dog", ckv, max_new_tokens=4, template=False, keep=True)
    assert ckv.nbytes < held_bytes(ckv)
    ckv.truncate(base)
    assert held_bytes(ckv) == ckv.nbytes
    # and it still answers as a fresh compressed cache does
    assert kvzip.generate(m, tok, "the dog", ckv, 4) == kvzip.generate(m, tok, "the dog", tiny_kv.prune(0.3), 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the Triton backend runs compiled")
def test_triton_backend_on_a_cpu_says_how_to_run_it():
    """Without TRITON_INTERPRET=1 (which conftest sets for this process), asking for the Triton
    backend on a CPU explains the two ways to run it, instead of Triton's "0 active drivers"."""
    code = ("import torch, kvzip\n"
            "q, k = torch.randn(1, 1, 3, 16), torch.randn(1, 2 + 4 + 3, 16)\n"
            "kvzip.chunk_scores(q, k, 2, 4, backend='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: backend='triton' needs a CUDA GPU") and "TRITON_INTERPRET=1" in last


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


def test_demo_marks_answers_right_or_wrong(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """python kvzip.py on the tiny checkpoint: the built-in needle task (smaller here, for time)
    prints each key and right/WRONG for both caches, and the byte arithmetic; with --context and
    --query there is no answer key, so it says whether the two answers are the same or where they
    part; --expect gives one, and --raw asks the query as text to complete."""
    folder, _ = tiny_checkpoint
    monkeypatch.setattr(kvzip, "DEMO_TASK", dict(kvzip.DEMO_TASK, n_tokens=200, n_needles=2))
    kvzip.main(["--model", str(folder), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    task = tasks.needle_task(200, 2, seed=kvzip.DEMO_TASK["seed"], tok=model.load(folder)[1])
    for probe, key in task["probes"]:
        assert f"Q: {probe}   (expected {key})" in out
    marks = re.findall(r"^  (full|compressed) cache *(right|WRONG): ", out, flags=re.M)
    assert [c for c, _ in marks] == ["full", "compressed"] * 2
    n_full = sum(c == "full" and m == "right" for c, m in marks)
    n_comp = sum(c == "compressed" and m == "right" for c, m in marks)
    assert f"right: full cache {n_full}/2, compressed cache {n_comp}/2 at ratio 0.3" in out
    assert "prefix (template + KVzip's instruction) is never evicted" in out
    assert "prefill and scoring by reconstruction" in err and "answering 2/2" in err  # progress lines
    assert not re.search(r"^\[ *[0-9.]+ s\]", out, flags=re.M)  # stdout holds the results alone

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(TINY_CONTEXT, encoding="utf-8")
    kvzip.main(["--model", str(folder), "--context", str(ctx), "--query", "Where is the mill?",
                "--max-new-tokens", "3", "--ratio", "0.5"])
    out = capsys.readouterr().out
    assert "Q: Where is the mill?\n" in out and "(expected" not in out
    assert not re.search(r"(right|WRONG): ", out) and "right: full cache" not in out
    assert re.search(r"^  -> (the same answer|the answers part at word \d+: full )", out, flags=re.M)

    calls = []
    monkeypatch.setattr(kvzip, "generate", lambda *a, template=True, **k: calls.append(template) or "the mill")
    kvzip.main(["--model", str(folder), "--context", str(ctx), "--query", "The mill is by", "--raw",
                "--expect", "mill"])
    out = capsys.readouterr().out
    assert calls == [False, False]  # --raw: both caches asked without the chat template
    assert "Q: The mill is by   (expected mill)" in out and "right: full cache 1/1, compressed cache 1/1" in out
    assert "  -> the same answer" in out


def test_demo_says_where_two_answers_part():
    assert kvzip._parting("17963. The wind", " 17963.  The wind\n") == "the same answer"
    assert kvzip._parting("17963. The wind is", "97259. The wind") == (
        'the answers part at word 1: full "17963. The wind is" | compressed "97259. The wind"')
    assert kvzip._parting("a b c", "a b") == 'the answers part at word 3: full "c" | compressed "(the answer ends)"'
    long = "word " * 60  # shown in full, wrapped under its label
    lines = kvzip._wrapped("  full cache      : ", long).splitlines()
    assert len(lines) > 1 and all(len(x) <= 100 for x in lines) and " ".join(lines).split().count("word") == 60


# -----------------------------------------------------------------------------
# The quantized compressed cache (bits 8 and 4)

@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_prune_stores_codes_and_counts_every_byte(tiny, bits):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 60, seed=2), chunk_size=25)
    L, Hkv, D = m.cfg.n_layer, m.cfg.n_kv_head, m.cfg.head_dim
    plain, ckv = kv.prune(0.3), kv.prune(0.3, bits=bits)
    assert (plain.bits, ckv.bits) == (16, bits)
    assert torch.equal(ckv.head_lengths(), plain.head_lengths())  # same pairs kept
    group = min(32, D)
    for l in range(L):
        for name in ("k", "v"):
            qx, dense = getattr(ckv, name)[l], getattr(plain, name)[l]  # Quantized, (N_l, D)
            assert isinstance(qx, quant.Quantized) and (qx.bits, qx.group) == (bits, group)
            ref = quant.quantize(dense, bits)  # the very rows of the 16-bit cache, quantized
            assert torch.equal(qx.data, ref.data) and torch.equal(qx.scale, ref.scale)
            assert torch.equal(qx.zero, ref.zero)
    # nbytes: codes (bits per value) + fp16 scale and zero per group + int64 offsets, exactly
    rows = int(ckv.head_lengths().sum())  # kept pairs over all layers and heads
    codes, params = 2 * rows * D * bits // 8, 2 * rows * (D // group) * 2 * 2
    assert ckv.nbytes == codes + params + L * (Hkv + 1) * 8
    # ... and the dense tail of new tokens, in the model's dtype, once some are stored
    ids = torch.tensor(kvzip.query_ids(tok, "the fox"))
    m(ids, ckv)
    assert ckv.nbytes == codes + params + L * (Hkv + 1) * 8 + 2 * L * Hkv * len(ids) * D * 4
    assert ckv.tail_k[0].dtype == m.dtype


@settings(max_examples=30, deadline=None)
@example(Hkv=3, G=3, n_p=1, n_c=21, T=1, n_old=3, bits=4, seed=4451)  # the rounding case in the comment below
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 3]), n_p=st.integers(0, 3), n_c=st.integers(1, 40),
       T=st.sampled_from([1, 3]), n_old=st.integers(0, 3), bits=st.sampled_from([8, 4]),
       seed=st.integers(0, 2**16))
def test_quantized_packed_attention_equals_dequantize_then_attend(Hkv, G, n_p, n_c, T, n_old, bits, seed):
    """The torch decode path over a quantized cache (each head dequantized on the fly) against the
    existing packed attention over the dequantized buffers; head 0 keeps no context pair and, with
    n_p = 0, no row at all (tail only)."""
    g = torch.Generator().manual_seed(seed)
    D, S = 32, n_p + n_c
    cache = model.KVCache(1, Hkv, D, S, torch.float32, "cpu")
    cache.attend(0, torch.zeros(Hkv, 1, S, D), 2 * torch.randn(Hkv, S, D, generator=g), torch.randn(Hkv, S, D, generator=g))
    cache.advance(S)
    keep = torch.rand(1, Hkv, n_c, generator=g) < 0.6
    keep[0, 0] = False
    ckv = kvzip.CompressedKV.from_full(cache, n_p, keep, bits=bits)
    kd, vd = quant.dequantize(ckv.k[0]), quant.dequantize(ckv.v[0])  # (N, D): the whole cache, test only
    new_k, new_v = torch.randn(Hkv, n_old + T, D, generator=g), torch.randn(Hkv, n_old + T, D, generator=g)
    q = torch.randn(Hkv, G, n_old + T, D, generator=g)
    ckv.reserve(n_old + T)
    if n_old:
        ckv.attend(0, q[:, :, :n_old], new_k[:, :n_old], new_v[:, :n_old])
        ckv.advance(n_old)
    got = ckv.attend(0, q[:, :, n_old:], new_k[:, n_old:], new_v[:, n_old:])  # (Hkv, G, T, D)
    tk, tv = ckv.tail_k[0][:, :n_old + T], ckv.tail_v[0][:, :n_old + T]
    want = kvzip.packed_attention(q[:, :, n_old:], kd, vd, ckv._bounds[0], tk, tv)
    # float32 against float32, summed in different orders: the reference itself can be 1.2e-6 off
    # the float64 value (seed 4451 below), so 1e-6 would fail on rounding; a dequantization error
    # would be a step of the grid, ~1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_twice_from_a_quantized_cache(tiny, bits):
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 50, seed=4), chunk_size=20)
    ckv = kv.prune(0.4, bits=bits)
    before = snapshot(ckv)
    first = kvzip.generate(m, tok, "where is the market?", ckv, max_new_tokens=10)
    after = snapshot(ckv)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1:] == after[1:]
    assert kvzip.generate(m, tok, "where is the market?", ckv, max_new_tokens=10) == first
    assert all(torch.equal(a, b) for a, b in zip(before[0], snapshot(ckv)[0]))


@pytest.mark.parametrize("bits", [3, 2, 32, 0, "4", 8.0, True, None])
def test_bad_bits_is_a_clear_error_before_any_work(tiny, tiny_kv, bits, monkeypatch):
    called = []
    monkeypatch.setattr(kvzip, "keep_mask", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"bits must be 16 \(not quantized\), 8 or 4, got " + repr(bits)):
        tiny_kv.prune(0.3, bits=bits)
    assert not called


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
    with pytest.raises(kvzip.InputError, match="head scores .*folder .* does not exist"):
        kvzip.save_head_scores(tmp_path / "no" / "hs.safetensors", hs, m)
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
