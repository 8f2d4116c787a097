"""Tests of baselines.py: each query-aware method against its definition, budgets, and that the
full cache is never written."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import baselines
import kvzip
import tasks
from conftest import TINY_CONTEXT, reference_forward


def _cache_copy(kv):
    n = kv.cache.seq_len
    return n, [t[:, :n].clone() for t in kv.cache.k + kv.cache.v]


def test_every_method_scores_the_right_shape_and_compresses(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    L, Hkv, n_c = m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context
    for method in baselines.METHODS:
        s = baselines.method_scores(method, m, tok, kv, "Where is the mill?")
        assert s.shape == (L, Hkv, n_c) and s.dtype == torch.float32, method
        assert torch.isfinite(s).all(), method
        ckv = baselines.compress(kv, method, 0.3, s)
        kept = int(ckv.head_lengths().sum()) - L * Hkv * kv.n_prefix
        assert kept == round(0.3 * (L * Hkv * n_c)), method


def test_query_aware_scoring_leaves_the_full_cache_bit_exact(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    n, before = _cache_copy(kv)
    scores = kv.scores.clone()
    baselines.snapkv_scores(m, tok, kv, "Where is the mill?")
    baselines.h2o_scores(m, tok, kv, "The pass key for the red door is", template=False)
    n2, after = _cache_copy(kv)
    assert n2 == n and all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(kv.scores, scores)


def _reference_attention(tiny, kv, q_ids):
    """Attention probabilities (L, H, T, T) of prefix + context + query from the independent
    cache-free forward of test_kvzip (its own RoPE, repeat_interleave GQA)."""
    m, tok, w = tiny
    ids = kvzip.prefix_ids(tok) + kv.context_ids + q_ids
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
    torch.testing.assert_close(baselines.h2o_scores(m, tok, kv, "Where is the mill?"), h2o, atol=1e-5, rtol=1e-4)
    # SnapKV: mean over the last w rows, max-pool of width 7, mean over the group
    w = 64
    mean = ctx[:, :, T - w:].mean(2)  # (L, H, n_c)
    pad = torch.nn.functional.pad(mean, (3, 3), value=float("-inf"))
    pooled = torch.stack([pad[..., j:j + 7].amax(-1) for j in range(n_c)], dim=-1)
    snap = pooled.view(L, Hkv, G, n_c).mean(2)
    torch.testing.assert_close(baselines.snapkv_scores(m, tok, kv, "Where is the mill?"), snap, atol=1e-5, rtol=1e-4)


def test_streamingllm_keeps_sinks_and_the_most_recent_in_every_head(tiny_kv):
    kv = tiny_kv
    s = baselines.streamingllm_scores(kv)
    L, Hkv, n_c = s.shape
    keep = kvzip.keep_mask(s, 0.3)  # (L, Hkv, n_c)
    n_recent = keep[..., baselines.STREAMING_SINKS:].sum(-1)  # (L, Hkv)
    assert keep[..., :baselines.STREAMING_SINKS].all()
    assert int(n_recent.max() - n_recent.min()) <= 1  # the same in every head, up to one position
    for l in range(L):
        for h in range(Hkv):
            r = int(n_recent[l, h])
            assert keep[l, h, n_c - r:].all() and not keep[l, h, baselines.STREAMING_SINKS:n_c - r].any()


@pytest.mark.parametrize("rule", ["pyramid", "layer"])
@settings(deadline=None, max_examples=200)
@given(ratio=st.floats(0.001, 1.0), L=st.integers(1, 40), Hkv=st.integers(1, 8), n_c=st.integers(1, 3000))
def test_layer_budget_rules_are_integers_summing_to_the_total(rule, ratio, L, Hkv, n_c):
    """Both per-layer budget rules: L integers in [0, Hkv * n_c] summing to round(ratio * L*Hkv*n_c);
    PyramidKV's shrink from the first layer to the last, the plain rule's are equal up to one."""
    b = getattr(baselines, f"{rule}_budgets")(ratio, L, Hkv, n_c)
    assert len(b) == L and all(isinstance(x, int) for x in b)
    assert sum(b) == round(ratio * (L * Hkv * n_c))
    assert all(0 <= x <= Hkv * n_c for x in b)
    if rule == "pyramid":
        assert all(b[i] >= b[i + 1] for i in range(L - 1))
    else:
        assert max(b) - min(b) <= 1


@settings(deadline=None, max_examples=200)
@given(weights=st.lists(st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0, 20.0]), min_size=1, max_size=12),
       cap=st.integers(1, 50), share=st.floats(0.0, 1.0))
def test_integer_budgets_split_the_total_in_proportion_under_the_cap(weights, cap, share):
    """integer_budgets: integers in [0, cap] summing exactly to the total; a heavier group never
    gets less than a lighter one (up to the rounding of one); where no cap binds, every group is
    within one of its exact proportional share."""
    total = round(share * len(weights) * cap)
    budgets = baselines.integer_budgets(weights, total, cap)
    assert sum(budgets) == total and all(0 <= b <= cap for b in budgets)
    for i, j in ((i, j) for i in range(len(weights)) for j in range(len(weights)) if weights[i] > weights[j]):
        assert budgets[i] >= budgets[j] - 1, (weights, budgets)
    W = sum(weights)
    if W > 0 and total * max(weights) / W <= cap - 1:  # no cap binds
        assert all(abs(b - total * w / W) < 1 for w, b in zip(weights, budgets)), (weights, budgets, total)
    with pytest.raises(ValueError, match="cannot split"):
        baselines.integer_budgets(weights, len(weights) * cap + 1, cap)


@pytest.mark.parametrize("ratio, L, Hkv, n_c, expected", [
    # a = ratio * n_c per head; min_num = a / 20, max_num = 2a - min_num; window 64
    # no cap: a = 1500, min 75, max 2925 < 5000 - 64; step (2925 - 75) / 3 = 950; x 2 heads
    (0.3, 4, 2, 5000, [5850, 3950, 2050, 150]),
    # the cap binds: a = 600, max 1170 >= 936 -> max 936, min raised to 1200 - 936 = 264; step 168
    (0.6, 5, 2, 1000, [1872, 1536, 1200, 864, 528]),
    # the cap binds and the raised minimum lands on the window: a = 500 -> max 936, min 64
    (0.5, 3, 1, 1000, [936, 500, 64]),
    # the minimum is below the window: a = 250, min 12.5 < 64 -> every layer 250
    (0.25, 4, 1, 1000, [250] * 4),
    # capped, the minimum exceeds the maximum: a = 950, max 936, min 964 -> every layer 950
    (0.95, 3, 1, 1000, [950] * 3),
    (1.0, 30, 3, 1000, [3000] * 30),
])
def test_pyramid_budgets_follow_the_published_schedule(ratio, L, Hkv, n_c, expected):
    assert baselines.pyramid_budgets(ratio, L, Hkv, n_c) == expected


def test_pyramid_budgets_on_the_default_models_shape():
    """ratio 0.7, 30 layers, 3 KV heads, 1,047 context tokens: a = 732.9, max_num = 2a - a/20 =
    1429 is capped at 1047 - 64 = 983, min_num raised to 1465.8 - 983 = 482.8; so the top layer
    keeps about half the bottom's. At 0.3 min_num = 15.7 < 64: the equal layer budgets."""
    b = baselines.pyramid_budgets(0.7, 30, 3, 1047)
    assert b[0] == 3 * 983 and b[-1] == pytest.approx(3 * 482.8, abs=1)
    step = 3 * (983 - 482.8) / 29
    assert all(abs(x - (3 * 983 - l * step)) < 1 for l, x in enumerate(b))
    assert baselines.pyramid_budgets(0.3, 30, 3, 1047) == baselines.layer_budgets(0.3, 30, 3, 1047)


@pytest.fixture(scope="module")
def long_kv(tiny):
    """A context long enough for the pyramid (n_c >= 64 / 0.3 at ratio 0.7), unscored."""
    m, tok, _ = tiny
    return kvzip.prefill(m, tok, tasks.haystack(250, seed=4), score=False)


def test_pyramidkv_compress_uses_its_layer_budgets(tiny, long_kv):
    m, tok, _ = tiny
    kv = long_kv
    s = baselines.method_scores("pyramidkv", m, tok, kv, "Where is the mill?")
    ckv = baselines.compress(kv, "pyramidkv", 0.7, s)
    per_layer = (ckv.head_lengths() - kv.n_prefix).sum(1).tolist()
    assert per_layer == baselines.pyramid_budgets(0.7, m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context)
    assert per_layer[0] > per_layer[-1] + 1  # a pyramid, not the equal budgets' rounding


def test_query_aware_kept_sets_follow_the_first_query_but_kvzip_does_not(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    q1, q2 = "Where is the mill on the river?", "The pass key for the red door is"
    for method in ("snapkv", "h2o"):
        k1 = kvzip.keep_mask(baselines.method_scores(method, m, tok, kv, q1), 0.3)
        k2 = kvzip.keep_mask(baselines.method_scores(method, m, tok, kv, q2), 0.3)
        assert not torch.equal(k1, k2), method
    assert torch.equal(baselines.method_scores("kvzip", m, tok, kv, q1), baselines.method_scores("kvzip", m, tok, kv, q2))
    # KVzip's scores come from the context alone: a second prefill gives the same ones
    assert torch.equal(kvzip.prefill(m, tok, TINY_CONTEXT).scores, kv.scores)


def test_random_scores_are_seeded(tiny_kv):
    assert torch.equal(baselines.random_scores(tiny_kv, 1), baselines.random_scores(tiny_kv, 1))
    assert not torch.equal(baselines.random_scores(tiny_kv, 1), baselines.random_scores(tiny_kv, 2))


def test_bad_method_and_missing_query_are_clear_errors(tiny, tiny_kv):
    m, tok, _ = tiny
    with pytest.raises(ValueError, match="unknown method"):
        baselines.method_scores("nope", m, tok, tiny_kv)
    with pytest.raises(ValueError, match="query-aware"):
        baselines.method_scores("snapkv", m, tok, tiny_kv)


def test_baseline_budget_rule_layer_or_global(tiny, tiny_kv):
    m, tok, _ = tiny
    kv = tiny_kv
    L, Hkv, n_c = m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context
    s = baselines.method_scores("snapkv", m, tok, kv, "Where is the mill?")
    for method in ("snapkv", "h2o", "streamingllm", "random"):
        ckv = baselines.compress(kv, method, 0.3, s, budget="layer")
        per_layer = (ckv.head_lengths() - kv.n_prefix).sum(1).tolist()
        assert per_layer == baselines.layer_budgets(0.3, L, Hkv, n_c), method
    assert baselines.DEFAULT_BUDGET == "layer"
    default = baselines.compress(kv, "snapkv", 0.3, s)
    assert torch.equal(default.head_lengths(), baselines.compress(kv, "snapkv", 0.3, s, budget="layer").head_lengths())
    glob = baselines.compress(kv, "snapkv", 0.3, s, budget="global")
    assert torch.equal(glob.head_lengths() - kv.n_prefix, kvzip.keep_mask(s, 0.3).sum(-1))
    # KVzip keeps its own global ranking, PyramidKV its pyramid, whatever the baselines' rule
    for budget in baselines.BUDGETS:
        z = baselines.compress(kv, "kvzip", 0.3, kv.scores, budget=budget)
        assert torch.equal(z.head_lengths() - kv.n_prefix, kvzip.keep_mask(kv.scores, 0.3).sum(-1))
        p = baselines.compress(kv, "pyramidkv", 0.3, s, budget=budget)
        assert (p.head_lengths() - kv.n_prefix).sum(1).tolist() == baselines.pyramid_budgets(0.3, L, Hkv, n_c)
    with pytest.raises(ValueError, match="budget must be one of"):
        baselines.compress(kv, "snapkv", 0.3, s, budget="head")
