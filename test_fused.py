"""Tests of fused.py, the CPU's fast paths, each against the readable reference in kvzip.py on
random inputs (hypothesis): Eq. 2 from the rows' log-sum-exp, the scoring cache inside the
forward's attention, the per-head fused decode (several tokens, quantized caches), and one token
over a DecodePlan; and the fused scores against the reference path on the default model."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fused
import kvzip
import model
import quant
import tasks


@settings(max_examples=60, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), n_q=st.integers(1, 40), n_prefix=st.integers(0, 6),
       n_chunk=st.integers(1, 300), std=st.sampled_from([0.5, 3.0, 6.0]), seed=st.integers(0, 2**16))
def test_scores_from_lse_equal_the_reference_scorer(Hkv, G, n_q, n_prefix, n_chunk, std, seed):
    """The fused path's last step, exp(max(logit - lse)), against the spec's softmax-then-max,
    with each row's lse over K' computed here from the full logits; std 6 gives |logits| up to ~60."""
    g = torch.Generator().manual_seed(seed)
    D = 16
    q = torch.randn(Hkv, G, n_q, D, generator=g) * std
    k = torch.randn(Hkv, n_prefix + n_chunk + n_q, D, generator=g) * std
    qs = q / math.sqrt(D)
    logits = qs @ k.unsqueeze(1).transpose(-1, -2)  # (Hkv, G, n_q, |K'|)
    future = torch.arange(k.shape[1])[None, :] - (n_prefix + n_chunk) > torch.arange(n_q)[:, None]
    lse = logits.masked_fill(future, float("-inf")).logsumexp(-1)  # (Hkv, G, n_q)
    got = fused.chunk_scores_from_lse(qs, k[:, n_prefix:n_prefix + n_chunk], lse, block=64)
    want = kvzip.chunk_scores_reference(q, k, n_prefix, n_chunk)
    max_logit = logits.abs().max().item()
    torch.testing.assert_close(got, want, atol=1e-5 + 8 * torch.finfo(torch.float32).eps * max_logit, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), n_p=st.integers(0, 5), n_c=st.integers(1, 40),
       T=st.integers(1, 12), cut=st.floats(0, 1), width=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_scoring_cache_equals_dense_attention_and_the_reference_scorer(Hkv, G, n_p, n_c, T, cut, width, seed):
    """One layer of ScoringCache (the fused path) against the dense cache's attention over
    [cache ; input] and the reference scorer on K' = [prefix ; chunk ; input], for a chunk anywhere
    in the context (other chunks before, after, both or neither) and any prefix length."""
    g = torch.Generator().manual_seed(seed)
    D = 16
    start = min(int(cut * n_c), n_c - 1)
    end = start + 1 + int(width * (n_c - start - 1))
    cache = model.KVCache(1, Hkv, D, n_p + n_c + T, torch.float32, "cpu")
    cache.attend(0, torch.zeros(Hkv, 1, n_p + n_c, D), torch.randn(Hkv, n_p + n_c, D, generator=g) * 2,
                 torch.randn(Hkv, n_p + n_c, D, generator=g))
    cache.advance(n_p + n_c)
    q = torch.randn(Hkv, G, T, D, generator=g) * 2
    k, v = torch.randn(Hkv, T, D, generator=g) * 2, torch.randn(Hkv, T, D, generator=g)
    scores = torch.zeros(1, Hkv, n_c)
    got = fused.ScoringCache(cache, n_p, start, end, scores).attend(0, q, k, v)
    keys = torch.cat([cache.keys(0)[:, :n_p], cache.keys(0)[:, n_p + start:n_p + end], k], dim=1)
    want_scores = kvzip.chunk_scores_reference(q, keys, n_p, end - start)
    want = model.attention(q, torch.cat([cache.keys(0), k], 1), torch.cat([cache.values(0), v], 1), n_p + n_c)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0, :, start:end], want_scores, atol=1e-5, rtol=1e-4)
    assert not scores[0, :, :start].any() and not scores[0, :, end:].any()  # only this chunk is written
    assert cache.seq_len == n_p + n_c  # the input was not stored


def test_default_model_fused_scores_equal_the_reference_path(smol):
    """The CPU's default scoring path (fused into the forward's attention) against the reference
    path (observe hook + the spec's probability matrix) on a real 2,000-token context."""
    m, tok = smol
    kv = kvzip.prefill(m, tok, tasks.needle_task(2000, n_needles=4, seed=0, tok=tok)["context"], score=False)
    fast = kvzip.score_context(m, tok, kv, backend="auto").clone()
    reference = kvzip.score_context(m, tok, kv, backend="reference")
    assert kv.n_context > 1900
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), T=st.sampled_from([1, 1, 4]), n_old=st.integers(0, 5),
       lengths=st.lists(st.integers(0, 70), min_size=3, max_size=3), threads=st.sampled_from([1, 2, 3]),
       bits=st.sampled_from([16, 16, 8, 4]), no_tail=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_packed_attention_equals_packed_attention(Hkv, G, T, n_old, lengths, threads, bits, no_tail, seed):
    """The CPU's decode path for several new tokens and for quantized caches (torch's fused
    attention per head, kept rows cut into two pieces per thread for a single token, the rows left
    over as one-key sets) against the readable packed_attention: heads of any length, empty ones
    included, tails with and without older rows, no tail at all (bench.py's full-cache decode: one
    token, every head with rows), quantized caches, several thread counts."""
    g = torch.Generator().manual_seed(seed)
    D, lengths = 32, lengths[:Hkv]
    if no_tail:  # the new token is already a packed row: nothing in the tail, no empty head
        T, lengths = 1, [max(1, n) for n in lengths]
    n_tail = 0 if no_tail else n_old + T
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    kp, vp = torch.randn(bounds[-1], D, generator=g) * 2, torch.randn(bounds[-1], D, generator=g)
    if bits != 16:
        kp, vp = quant.quantize(kp, bits), quant.quantize(vp, bits)
    tk, tv = torch.randn(Hkv, n_tail, D, generator=g), torch.randn(Hkv, n_tail, D, generator=g)
    q = torch.randn(Hkv, G, T, D, generator=g) * 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused.packed_attention_fused(q, kp, vp, bounds, tk, tv)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, kvzip.packed_attention(q, kp, vp, bounds, tk, tv), atol=1e-5, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(Hkv=st.integers(1, 4), G=st.sampled_from([1, 2, 4]),
       lengths=st.lists(st.sampled_from([0, 1, 2, 5, 30, 70]), min_size=4, max_size=4),
       n_tail=st.integers(0, 3), n_pieces=st.sampled_from([1, 2, 3, 7, 256]), seed=st.integers(0, 2**16))
def test_decode_plan_equals_packed_attention(Hkv, G, lengths, n_tail, n_pieces, seed):
    """One token over a DecodePlan (equal pieces across head boundaries, the hidden rows in extra
    pieces): heads of any length, empty ones, pieces holding several heads, with and without a tail."""
    lengths = lengths[:Hkv]
    if n_tail == 0:
        lengths = [max(1, n) for n in lengths]  # every head needs a row to attend to
    g = torch.Generator().manual_seed(seed)
    D = 16
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    kp, vp = torch.randn(bounds[-1], D, generator=g) * 2, torch.randn(bounds[-1], D, generator=g)
    tk, tv = torch.randn(Hkv, n_tail, D, generator=g), torch.randn(Hkv, n_tail, D, generator=g)
    q = torch.randn(Hkv, G, 1, D, generator=g) * 2
    plan = fused.DecodePlan(kp, vp, bounds, n_pieces=n_pieces)
    got = fused.packed_decode(q, kp, vp, plan, tk, tv)
    torch.testing.assert_close(got, kvzip.packed_attention(q, kp, vp, bounds, tk, tv), atol=1e-5, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(Hkv=st.integers(1, 4), G=st.sampled_from([1, 2, 4]),
       lengths=st.lists(st.sampled_from([0, 1, 2, 5, 30, 70]), min_size=4, max_size=4),
       n_tail=st.integers(0, 3), bits=st.sampled_from([8, 4]), D=st.sampled_from([16, 32, 64]),
       group=st.sampled_from([4, 8, 32]), block=st.sampled_from([1, 3, 16, 64, 1000]),
       threads=st.sampled_from([1, 2, 3]), std=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 2**16))
def test_quantized_decode_equals_dequantize_then_attend(Hkv, G, lengths, n_tail, bits, D, group, block,
                                                        threads, std, seed):
    """One token over an int8/int4 cache, block by block on several threads with the scales and
    zeros folded into the products, against the readable packed_attention, which dequantizes each
    head: heads of any length, empty ones, blocks shorter and longer than a head, one to several
    groups per row, with and without a tail, 1-3 threads (the thread count is put back)."""
    lengths = lengths[:Hkv]
    if n_tail == 0:
        lengths = [max(1, n) for n in lengths]  # every head needs a row to attend to
    g = torch.Generator().manual_seed(seed)
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    offset = torch.randn(1, D, generator=g) * std  # zeros far from 0: what the folded zero terms carry
    kp = quant.quantize(torch.randn(bounds[-1], D, generator=g) * std + offset, bits, group)
    vp = quant.quantize(torch.randn(bounds[-1], D, generator=g) + offset, bits, group)
    tk, tv = torch.randn(Hkv, n_tail, D, generator=g), torch.randn(Hkv, n_tail, D, generator=g)
    q = torch.randn(Hkv, G, 1, D, generator=g) * 2 / std
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused.quantized_decode(q, kp, vp, bounds, tk, tv, block=block)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, kvzip.packed_attention(q, kp, vp, bounds, tk, tv), atol=1e-5, rtol=1e-5)


def test_quantized_decode_odd_int4_group_and_a_failing_thread(monkeypatch):
    """An int4 group of odd size (no split halves), or K and V quantized unalike, take the per-head
    path, with the same result; an error on a worker thread reaches the caller, and the thread count is put back. The block
    loop is TorchScript on this torch (plain Python would take turns on the GIL)."""
    assert isinstance(fused.attend_blocks, torch.jit.ScriptFunction)
    g = torch.Generator().manual_seed(0)
    bounds = [0, 5, 9]
    kp, vp = (quant.quantize(torch.randn(9, 6, generator=g), 4, group=3) for _ in range(2))
    q, tk, tv = torch.randn(2, 2, 1, 6, generator=g), torch.randn(2, 1, 6, generator=g), torch.randn(2, 1, 6, generator=g)
    torch.testing.assert_close(fused.quantized_decode(q, kp, vp, bounds, tk, tv),
                               kvzip.packed_attention(q, kp, vp, bounds, tk, tv), atol=1e-5, rtol=1e-5)
    kp, vp = quant.quantize(torch.randn(9, 6, generator=g), 8, group=2), quant.quantize(torch.randn(9, 6, generator=g), 4)
    torch.testing.assert_close(fused.quantized_decode(q, kp, vp, bounds, tk, tv),  # K and V quantized unalike
                               kvzip.packed_attention(q, kp, vp, bounds, tk, tv), atol=1e-5, rtol=1e-5)
    kp, vp = (quant.quantize(torch.randn(9, 8, generator=g), 8) for _ in range(2))
    q, tk, tv = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)

    real = fused.attend_blocks

    def fail_on_thread_1(blocks, first, *args):  # thread 0 (the caller's) runs, thread 1 fails
        if first == 1:
            raise RuntimeError("worker failed")
        real(blocks, first, *args)

    monkeypatch.setattr(fused, "attend_blocks", fail_on_thread_1)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="worker failed"):
        fused.quantized_decode(q, kp, vp, bounds, tk, tv, block=2, workers=3)
    assert torch.get_num_threads() == before


def test_quantized_caches_generate_the_same_answers_with_either_backend(tiny, monkeypatch):
    """Greedy answers from an int8 and an int4 cache of the tiny model: the CPU's fast decode path
    ("auto": fused.quantized_decode for each new token, counted) against the reference path."""
    m, tok, _ = tiny
    calls = []
    fast = fused.quantized_decode
    monkeypatch.setattr(fused, "quantized_decode", lambda *a, **k: calls.append(1) or fast(*a, **k))
    kv = kvzip.prefill(m, tok, tasks.haystack(60, seed=5), chunk_size=30)
    for bits in (8, 4):
        answers = []
        for backend in ("auto", "reference"):
            ckv = kv.prune(0.4, bits=bits)
            ckv.backend = backend
            answers.append(kvzip.generate(m, tok, "where is the market?", ckv, max_new_tokens=12))
        assert answers[0] == answers[1]
    assert len(calls) >= 2 * 11 * m.cfg.n_layer  # every answer token after the first, every layer
