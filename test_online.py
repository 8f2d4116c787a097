"""Tests of KVzip online (kvzip.prefill_online, section 7c): one chunk is offline KVzip byte for
byte; many chunks never hold more than their bound; the ranking is exact over the scores held;
kept pairs keep their positions; bad input is refused as by prefill and prune."""
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import kvzip
import model
from conftest import tiny_context, write_tiny_checkpoint
from test_kvzip import stored_tensors


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A tiny checkpoint of 8 layers: one layer is 1/8 of the cache, so the bound below (which
    allows one layer twice while a cache is packed) stays well under the full cache."""
    d = tmp_path_factory.mktemp("tiny8")
    write_tiny_checkpoint(d, n_layer=8, seed=1)
    return model.load(d)


@pytest.mark.parametrize("bits", [16, 4])
def test_one_chunk_is_offline_prefill_and_prune_byte_for_byte(tiny, bits):
    m, tok, _ = tiny
    context = tiny_context(tok, 60, seed=2)
    kv = kvzip.prefill(m, tok, context)  # one chunk of the default 2000
    offline = kv.prune(0.3, bits=bits)
    online = kvzip.prefill_online(m, tok, context, 0.3, bits=bits)
    assert len(online.trace) == 1
    assert online.base_len == offline.base_len and online.bits == offline.bits == bits
    got, want = stored_tensors(online), stored_tensors(offline)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert online.kept_ratio == offline.kept_ratio and online.nbytes == offline.nbytes
    keep = kvzip.keep_mask(kv.scores, 0.3)
    assert torch.equal(online.scores, kv.scores.masked_fill(~keep, -math.inf))
    assert kvzip.generate(m, tok, "where is the market?", online, max_new_tokens=6) == \
        kvzip.generate(m, tok, "where is the market?", offline, max_new_tokens=6)


def expected_bound(m, tok, trace, i, n_p):
    """The most bytes step i may hold, from the geometry alone: the prefix and the larger of the
    kept sets before and after the step, in the model's dtype; one chunk's dense K/V and its
    reconstruction input's (step 0: the prefix too, its dense cache holds it); one layer's rows
    twice while the next cache is packed (at most all of its positions); the offsets."""
    cfg = m.cfg
    L, Hkv, row = cfg.n_layer, cfg.n_kv_head, 2 * cfg.head_dim * m.embed.weight.element_size()  # K + V
    step = trace[i]
    n_new = step["end"] - step["start"]
    kept = max(step["kept"], trace[i - 1]["kept"] if i else 0)
    dense = L * Hkv * ((n_p if i == 0 else 0) + n_new + kvzip.max_reconstruction_len(tok, n_new))
    one_layer = Hkv * (n_p + step["end"])
    offsets = 2 * L * (Hkv + 1) * 8
    return row * (L * Hkv * n_p + kept + dense + one_layer) + offsets


@pytest.mark.parametrize("bits", [16, 4])
def test_many_chunks_never_hold_more_than_the_bound(tiny8, bits):
    m, tok = tiny8
    context = tiny_context(tok, 400, seed=5)
    ckv = kvzip.prefill_online(m, tok, context, 0.3, chunk_size=40, bits=bits)
    n_p, n_c = len(ckv.prefix_ids), len(ckv.context_ids)
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    assert len(ckv.trace) == math.ceil(n_c / 40) >= 8
    full = 2 * L * Hkv * (n_p + n_c) * m.cfg.head_dim * m.embed.weight.element_size()  # offline's full cache
    for i, step in enumerate(ckv.trace):
        assert step["kept"] == round(0.3 * (L * Hkv * step["end"]))  # the global budget over what was seen
        assert sum(step["kept_per_chunk"]) == step["kept"] and len(step["kept_per_chunk"]) == i + 1
        assert step["held_bytes"] <= expected_bound(m, tok, ckv.trace, i, n_p), (i, step)
    assert max(s["held_bytes"] for s in ckv.trace) < 0.75 * full  # never the full cache (0.65 here)
    assert sum(s["evicted_past"] for s in ckv.trace) > 0  # later chunks did evict earlier pairs
    # the returned cache: the last step's kept set, each head's rows prefix first, in position order
    keep = torch.isfinite(ckv.scores)  # (L, Hkv, n_c)
    assert int(keep.sum()) == ckv.trace[-1]["kept"] and ckv.base_len == n_p + n_c
    assert torch.equal(ckv.head_lengths(), n_p + keep.sum(-1))
    assert ckv.bits == bits and ckv.info["budget"] == "online"


def test_kept_pairs_keep_their_positions(tiny8):
    """Layer 0's keys depend only on the token and its position (RoPE), not on attention: every
    kept key of the online cache equals the offline full cache's key at the same context position,
    which holds only if each chunk's positions continue from n_p + n_seen (not from the pairs kept)."""
    m, tok = tiny8
    context = tiny_context(tok, 200, seed=7)
    kv = kvzip.prefill(m, tok, context, score=False)
    ckv = kvzip.prefill_online(m, tok, context, 0.3, chunk_size=30)
    n_p = kv.n_prefix
    keep = torch.isfinite(ckv.scores[0])  # (Hkv, n_c)
    b = ckv.offsets[0].tolist()
    for h in range(len(b) - 1):
        want = kv.cache.keys(0)[h, torch.cat([torch.arange(n_p), n_p + keep[h].nonzero()[:, 0]])]
        torch.testing.assert_close(ckv.k[0][b[h]:b[h + 1]], want, rtol=1e-5, atol=1e-5)


def test_generate_from_the_online_cache(tiny8):
    m, tok = tiny8
    context = tiny_context(tok, 150, seed=3)
    ckv = kvzip.prefill_online(m, tok, context, 0.4, chunk_size=50)
    before = [t.clone() for t in stored_tensors(ckv)]
    answer = kvzip.generate(m, tok, "what crossed the valley?", ckv, max_new_tokens=8)
    assert isinstance(answer, str)
    assert all(torch.equal(a, b) for a, b in zip(before, stored_tensors(ckv)))
    assert kvzip.generate(m, tok, "what crossed the valley?", ckv, max_new_tokens=8) == answer
    assert kvzip.generate(m, tok, ["the fox", "the dog"], ckv, max_new_tokens=4)  # batched, too


def test_online_cache_saves_and_loads(tiny8, tmp_path):
    m, tok = tiny8
    ckv = kvzip.prefill_online(m, tok, tiny_context(tok, 120, seed=1), 0.3, chunk_size=40, bits=8)
    ckv.save(tmp_path / "c.safetensors")
    back = kvzip.load_compressed(tmp_path / "c.safetensors", m)
    assert all(torch.equal(a, b) for a, b in zip(stored_tensors(back), stored_tensors(ckv)))
    assert back.info["budget"] == "online" and back.base_len == ckv.base_len


def best(pool: dict, k: int, H: int, n: int) -> set:
    """The k best pairs of pool {(layer, head, position): score} by score, ties to the lower flat
    index (layer * H + head) * n + position: keep_mask's rule, written out in plain Python."""
    return set(sorted(pool, key=lambda p: (-pool[p], (p[0] * H + p[1]) * n + p[2]))[:k])


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 3), H=st.integers(1, 3), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       ratio=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.9, 1.0]), ties=st.booleans(), seed=st.integers(0, 2**16))
@example(L=1, H=1, sizes=[2, 2], ratio=0.5, ties=False, seed=0)
def test_online_ranking_is_exact_over_the_scores_held(L, H, sizes, ratio, ties, seed):
    g = torch.Generator().manual_seed(seed)
    stream = [torch.rand(L, H, n, generator=g) for n in sizes]
    if ties:
        stream = [(s * 3).round() for s in stream]
    held_scores = torch.empty(L, H, 0)
    held, evicted, n_seen = {}, set(), 0  # {(layer, head, position): score} held; pairs evicted so far
    for new in stream:
        new_pairs = {(a, h, n_seen + j): float(new[a, h, j]) for a in range(L) for h in range(H)
                     for j in range(new.shape[-1])}
        n_seen += new.shape[-1]
        keep, held_scores = kvzip.online_keep(held_scores, new, ratio)
        k = round(ratio * (L * H * n_seen))  # as keep_mask rounds
        got = {tuple(p) for p in keep.nonzero().tolist()}
        assert keep.shape == (L, H, n_seen) and len(got) == k
        assert got == best({**held, **new_pairs}, k, H, n_seen)  # exact over the scores held
        evicted |= (set(held) | set(new_pairs)) - got
        held = {p: {**held, **new_pairs}[p] for p in got}
        assert torch.equal(torch.isfinite(held_scores), keep)
        assert all(held_scores[p].item() == s for p, s in held.items())  # earlier scores kept as they were
    # against one offline top-k over all the scores: the same set unless an evicted pair would
    # have come back, and whatever offline keeps beyond online was evicted at an earlier step
    everything = torch.cat(stream, dim=-1)
    offline = {tuple(p) for p in kvzip.keep_mask(everything, ratio).nonzero().tolist()}
    assert offline - set(held) <= evicted
    if all(everything[p].item() < min(held.values(), default=math.inf) for p in evicted):
        assert offline == set(held)


def test_a_pair_once_evicted_does_not_come_back():
    """The limit of online ranking, by hand: chunk 1 scores (10, 5) and keeps 10 at ratio 0.5;
    chunk 2 scores (1, 1), and the budget of 2 takes one of them, not the 5 evicted already."""
    keep, scores = kvzip.online_keep(torch.empty(1, 1, 0), torch.tensor([[[10.0, 5.0]]]), 0.5)
    assert keep.tolist() == [[[True, False]]]
    keep, scores = kvzip.online_keep(scores, torch.tensor([[[1.0, 1.0]]]), 0.5)
    assert keep.tolist() == [[[True, False, True, False]]]
    assert kvzip.keep_mask(torch.tensor([[[10.0, 5.0, 1.0, 1.0]]]), 0.5).tolist() == [[[True, True, False, False]]]


def test_bad_online_input_gives_clear_errors(tiny):
    m, tok, _ = tiny
    for r in (0, -0.1, 1.5, float("nan"), "0.3", True, torch.tensor(0.3)):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            kvzip.prefill_online(m, tok, "some words", r)
    for ctx in ("", "   \n"):
        with pytest.raises(ValueError, match="empty context"):
            kvzip.prefill_online(m, tok, ctx, 0.3)
    with pytest.raises(ValueError, match="context must be a str, got NoneType"):
        kvzip.prefill_online(m, tok, None, 0.3)
    with pytest.raises(ValueError, match="context must be a str, got bytes"):
        kvzip.prefill_online(m, tok, b"hello", 0.3)
    with pytest.raises(ValueError, match="context too long"):
        kvzip.prefill_online(m, tok, "the fox " * m.cfg.max_position_embeddings, 0.3)
    for n in (0, -1, 4, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 8"):
            kvzip.prefill_online(m, tok, "some words", 0.3, chunk_size=n)
    with pytest.raises(ValueError, match="bits"):
        kvzip.prefill_online(m, tok, "some words", 0.3, bits=3)
    with pytest.raises(ValueError, match="backend"):
        kvzip.prefill_online(m, tok, "some words", 0.3, backend="gpu")


def test_demo_online_prints_the_kept_set_growing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    folder, _ = tiny_checkpoint
    monkeypatch.setattr(kvzip, "DEMO_TASK", dict(kvzip.DEMO_TASK, n_tokens=200, n_needles=2))
    kvzip.main(["--model", str(folder), "--max-new-tokens", "3", "--online", "--chunk-size", "60"])
    out = capsys.readouterr().out
    assert "kept pairs of each chunk" in out and "right: full cache" in out
    rows = [line for line in out.splitlines() if line.startswith("c") and "of the full cache" in line]
    assert len(rows) >= 3 and rows[0].startswith("c0 ")
    path = tmp_path / "online.kvz"
    kvzip.main(["--model", str(folder), "--online", "--chunk-size", "60", "--save", str(path), "--bits", "8"])
    assert "online" in capsys.readouterr().out
    assert kvzip.load_compressed(path, model.load(folder)[0]).info["budget"] == "online"
    for argv, words in ((["--chunk-size", "4"], "--chunk-size must be at least 8"),
                        (["--online", "--load", str(path)], "--online cannot be used with it")):
        with pytest.raises(SystemExit):
            kvzip.main(["--model", str(folder)] + argv)
        assert words in capsys.readouterr().err


def test_compare_online_agrees_with_offline_on_one_chunk(tiny):
    """reuse.compare_online: on a one-chunk context online is offline, so every figure says so;
    on several chunks the figures are in range, one Spearman per chunk."""
    import reuse
    m, tok, _ = tiny
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert reuse.spearman(x, 2 * x + 1) == pytest.approx(1) and reuse.spearman(x, -x) == pytest.approx(-1)
    one = reuse.compare_online(m, tok, tiny_context(tok, 60, seed=2), chunk_size=2000, ratios=(0.3,), n_spans=2)
    row = one["rows"][0]
    assert row["n_chunks"] == 1 and row["spearman"] == [pytest.approx(1)] and row["jaccard"] == 1
    assert row["nll_ratio_online"] == row["nll_ratio_offline"]
    many = reuse.compare_online(m, tok, tiny_context(tok, 200, seed=2), chunk_size=40, ratios=(0.3, 0.1), n_spans=2)
    for row in many["rows"]:
        assert row["n_chunks"] == len(row["spearman"]) == 5 and 0 < row["jaccard"] < 1
        assert all(-1 <= r <= 1 for r in row["spearman"]) and row["nll_ratio_online"] > 0
        assert row["peak_bytes_online"] < row["peak_bytes_offline"]
    assert "Spearman per chunk" in reuse.format_online_table(many)


def test_memory_arithmetic_matches_the_caches_held(tiny8):
    """bench.online_memory's arithmetic against the bytes the real caches hold (reference
    backend: no CPU decode plans, as the arithmetic assumes): offline exactly; online within
    the one-layer share it estimates while a cache is packed."""
    import bench
    m, tok = tiny8
    context, r, cs = tiny_context(tok, 300, seed=4), 0.3, 50
    kv = kvzip.prefill(m, tok, context, chunk_size=cs, backend="reference")
    on = kvzip.prefill_online(m, tok, context, r, chunk_size=cs, backend="reference")
    geo = bench.get_geometry("model", m)
    got = bench.online_memory(geo, kv.n_prefix, kv.n_context, r, cs, kvzip.max_reconstruction_len(tok, 0))
    assert got["full_bytes"] == kv.nbytes
    assert got["offline_peak_bytes"] == kvzip.held_bytes(kv) + kvzip.held_bytes(kv.prune(r))
    one_layer = kvzip.held_bytes(on) // m.cfg.n_layer
    assert abs(max(s["held_bytes"] for s in on.trace) - got["online_peak_bytes"]) <= one_layer
    assert got["online_peak_bytes"] < 0.6 * got["offline_peak_bytes"]
