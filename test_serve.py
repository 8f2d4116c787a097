"""Tests of compress once, answer many (kvzip.py sections 6b and 7b): a compressed cache saved to a
file and loaded again, byte for byte, with every bad file refused in one InputError naming it; and
several queries answered together over one shared cache, against one query at a time."""
import math
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fused
import kvzip
import model
import quant
import tasks
from conftest import TINY_CONTEXT, write_tiny_checkpoint


def parts(x):
    """The tensors of a packed buffer: itself, or a Quantized block's codes, scales and zeros."""
    return [x.data, x.scale, x.zero] if isinstance(x, quant.Quantized) else [x]


def plan_tensors(ckv):
    return [t for p in ckv.plans or [] if p is not None for t in (p.mask, p.heads, p.extra_k, p.extra_v, p.extra_mask,
                                                   p.extra_heads)]


def assert_same_cache(a, b):
    """Equal byte for byte: every stored tensor (dtype, shape, bytes), the offsets, the plans, the
    positions and what the cache records about its origin."""
    ta = [t for x in a.k + a.v for t in parts(x)] + a.offsets + plan_tensors(a)
    tb = [t for x in b.k + b.v for t in parts(x)] + b.offsets + plan_tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert (a.bits, a.base_len, a.n_tail, a.nbytes, a.kept_ratio) == (b.bits, b.base_len, b.n_tail, b.nbytes, b.kept_ratio)
    assert (a.prefix_ids, a.context_ids, a.model_identity, a.info) == (b.prefix_ids, b.context_ids,
                                                                       b.model_identity, b.info)


# -----------------------------------------------------------------------------
# save and load

@pytest.mark.parametrize("how", ["pair", "uniform", "head", "head-empty"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_saved_cache_loads_byte_for_byte(tiny, tiny_kv, tmp_path, bits, how):
    m, tok, _ = tiny
    hs = torch.rand(m.cfg.n_layer, m.cfg.n_kv_head, generator=torch.Generator().manual_seed(0))
    ckv = {"pair": lambda: tiny_kv.prune(0.3, bits=bits),
           "uniform": lambda: tiny_kv.prune(0.3, uniform=True, bits=bits),
           "head": lambda: tiny_kv.prune(0.5, level="head", head_scores=hs, bits=bits),
           "head-empty": lambda: tiny_kv.prune(0.01, level="head", head_scores=hs, bits=bits)}[how]()
    if how == "head-empty":  # no head keeps any context pair: every head holds the prefix alone
        assert (ckv.head_lengths() == tiny_kv.n_prefix).all()
    path = tmp_path / "c.kvz"
    ckv.save(path)
    loaded = kvzip.load_compressed(path, m)
    assert_same_cache(loaded, ckv)
    assert loaded.info["level"] == ("head" if how.startswith("head") else "pair")
    assert loaded.info["budget"] == {"pair": "global", "uniform": "uniform"}.get(how, "head")
    # the file: the packed bytes and the token ids, plus a small header
    packed = ckv.nbytes - sum(p.nbytes for p in ckv.plans or [])
    extra = path.stat().st_size - packed - 8 * (tiny_kv.n_prefix + tiny_kv.n_context)
    assert 0 < extra < 8192, extra
    # answers from the file equal the in-process ones: the same logits, exactly
    ids = kvzip.query_ids(tok, "where is the market?")
    with model.rollback(ckv), model.rollback(loaded):
        assert torch.equal(m(torch.tensor(ids), loaded), m(torch.tensor(ids), ckv))


def resave(src, dst, drop=None, **meta):
    """A copy of the saved file src with some metadata changed, or a tensor dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        saved = f.metadata()
    save_file(tensors, str(dst), metadata=dict(saved, **meta))
    return dst


@pytest.fixture(scope="module")
def saved(tiny, tiny_kv, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "c.kvz"
    tiny_kv.prune(0.3, bits=8).save(path)
    return path


def test_bad_files_are_one_input_error_naming_file_and_field(tiny, saved, tmp_path, tmp_path_factory):
    m, _, _ = tiny
    data = saved.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    (tmp_path / "cut.kvz").write_bytes(data[:-100])
    (tmp_path / "text.kvz").write_text("just some notes\n")
    (tmp_path / "empty.kvz").write_bytes(b"")
    (tmp_path / "junk_header.kvz").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    cases = [
        (tmp_path / "cut.kvz", ["truncated", f"{len(data):,}", f"{len(data) - 100:,}"]),
        (tmp_path / "text.kvz", ["not a safetensors file"]),
        (tmp_path / "empty.kvz", ["not a safetensors file"]),
        (tmp_path / "junk_header.kvz", ["not a safetensors file"]),
        (tmp_path, ["is a folder"]),
        (other, ["not a compressed cache file", "'format'", "'pt'"]),
        (resave(saved, tmp_path / "v2.kvz", format_version="2"), ["format_version", "'2'"]),
        (resave(saved, tmp_path / "arch.kvz", architecture="Qwen2ForCausalLM"), ["another model", "architecture"]),
        (resave(saved, tmp_path / "no_v.kvz", drop="v.1.codes"), ["'v.1.codes'", "missing"]),
        (resave(saved, tmp_path / "bits.kvz", bits="3"), ["'bits'", "'3'"]),
        (resave(saved, tmp_path / "base.kvz", base_len="5"), ["base_len"]),
    ]
    for path, words in cases:
        with pytest.raises(kvzip.InputError) as e:
            kvzip.load_compressed(path, m)
        msg = str(e.value)
        assert str(path) in msg and all(w in msg for w in words), (path, msg)
    assert header_len < 8192
    with pytest.raises(kvzip.InputError, match="nope.kvz: No such file"):
        kvzip.load_compressed(tmp_path / "nope.kvz", m)
    # made by another model: other shapes (3 layers) and the same shapes with other weights
    for folder, kwargs, field in [("three_layers", dict(n_layer=3), "n_layer"),
                                  ("other_weights", dict(seed=1), "weights_sha256")]:
        d = tmp_path_factory.mktemp(folder)
        write_tiny_checkpoint(d, **kwargs)
        theirs, _ = model.load(d)
        with pytest.raises(kvzip.InputError, match=f"{saved}: made for another model: {field}"):
            kvzip.load_compressed(saved, theirs)


def test_save_refuses_a_cache_it_cannot_describe(tiny, tiny_kv, tmp_path):
    m, tok, _ = tiny
    ckv = tiny_kv.prune(0.3)
    kvzip.generate(m, tok, "the dog", ckv, max_new_tokens=2, template=False, keep=True)
    with pytest.raises(ValueError, match="truncate it"):
        ckv.save(tmp_path / "x.kvz")
    keep = torch.ones(m.cfg.n_layer, m.cfg.n_kv_head, tiny_kv.n_context, dtype=torch.bool)
    bare = kvzip.CompressedKV.from_full(tiny_kv.cache, tiny_kv.n_prefix, keep)
    with pytest.raises(ValueError, match="does not know its model"):
        bare.save(tmp_path / "y.kvz")
    # a path that cannot be written is named before any bytes are gathered; the full cache has no file format
    for path, words in ((tmp_path, "is a folder"), (tmp_path / "no" / "z.kvz", "does not exist")):
        with pytest.raises(kvzip.InputError, match=f"compressed cache {path}: .*{words}"):
            tiny_kv.prune(0.3).save(path)
    with pytest.raises(kvzip.InputError, match=r"kv.prune\(ratio\).save\(path\)"):
        tiny_kv.save(tmp_path / "full.kvz")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# several queries at once

def dense_masked(q, ctx_k, ctx_v, tail_k, tail_v, visible):
    """shared_attention from its definition: per head, one dense softmax over [context ; tail]
    with the hidden tail rows at -inf, the group's query heads one by one."""
    Hkv, G, T, D = q.shape
    out = torch.empty_like(q)
    for h in range(Hkv):
        k = torch.cat([ctx_k[h], tail_k[h]])
        v = torch.cat([ctx_v[h], tail_v[h]])
        seen = torch.cat([torch.ones(T, ctx_k[h].shape[0], dtype=torch.bool), visible], 1)  # (T, n_h + n_tail)
        for g in range(G):
            logits = (q[h, g] @ k.T / math.sqrt(D)).masked_fill(~seen, float("-inf"))
            out[h, g] = logits.softmax(-1) @ v
    return out


@settings(max_examples=40, deadline=None)
@given(Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3]), n_q=st.integers(1, 4), seed=st.integers(0, 2**16),
       empty_head=st.booleans(), long_head=st.booleans())
def test_shared_attention_equals_dense_masked_attention(Hkv, G, n_q, seed, empty_head, long_head):
    g = torch.Generator().manual_seed(seed)
    D = 8
    lengths = torch.randint(0, 12, (Hkv,), generator=g).tolist()
    if empty_head:
        lengths[0] = 0
    if long_head:
        lengths[-1] = 45  # more rows than the fused path's pieces
    ctx_k = [torch.randn(n, D, generator=g) for n in lengths]
    ctx_v = [torch.randn(n, D, generator=g) for n in lengths]
    # a tail of n_q queries' rows in an interleaved order, each query at its own positions
    owner = torch.randint(0, n_q, (20,), generator=g)
    pos = torch.zeros(20, dtype=torch.long)
    for i in range(n_q):
        pos[owner == i] = 100 + torch.arange(int((owner == i).sum()))
    T = int(torch.randint(1, 8, (1,), generator=g))  # the last T rows are this call's
    rows_owner, rows_pos = owner[-T:], pos[-T:]
    visible = (owner[None] == rows_owner[:, None]) & (pos[None] <= rows_pos[:, None])  # (T, 20)
    tail_k, tail_v = torch.randn(Hkv, 20, D, generator=g), torch.randn(Hkv, 20, D, generator=g)
    q = torch.randn(Hkv, G, T, D, generator=g)
    want = dense_masked(q, ctx_k, ctx_v, tail_k, tail_v, visible)
    torch.testing.assert_close(kvzip.shared_attention(q, ctx_k, ctx_v, tail_k, tail_v, visible), want,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.shared_attention_fused(q, ctx_k, ctx_v, tail_k, tail_v, visible), want,
                               atol=1e-5, rtol=1e-5)


def one_at_a_time(m, inputs, cache):
    """Each input's logits alone over the cache, rolled back afterwards: the path generate takes."""
    out = []
    for x in inputs:
        with model.rollback(cache):
            out.append(m(torch.tensor(x), cache))
    return out


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    """A tiny model whose greedy answers differ between queries (seed 1), with a scored cache."""
    d = tmp_path_factory.mktemp("tiny_seed1")
    write_tiny_checkpoint(d, seed=1, n_layer=3, n_head=6, n_kv_head=2)
    m, tok = model.load(d)
    return m, tok, kvzip.prefill(m, tok, TINY_CONTEXT, chunk_size=40)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_batched_logits_equal_one_at_a_time(random_tiny, backend, lengths, seed):
    """Inputs of very different lengths run together (forward_batched) give each input's logits
    alone, over the full cache and compressed caches (16-bit and int8; both decode paths)."""
    m, tok, kv = random_tiny
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(3, m.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    kv.backend = backend
    try:
        caches = [kv, kv.prune(0.3), kv.prune(0.2, bits=8)]
    finally:
        kv.backend = "auto"
    for cache in caches:
        got = kvzip.forward_batched(m, inputs, cache)
        for a, b in zip(got, one_at_a_time(m, inputs, cache)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def snapshot(kv):
    """Every byte the cache holds (a FullKV: its whole buffers, capacity included), and its length.
    Compare snapshots with same_bytes: unused capacity is uninitialised memory and may hold NaNs,
    which torch.equal calls unequal to themselves."""
    if isinstance(kv, kvzip.FullKV):
        return [t.clone() for t in kv.cache.k + kv.cache.v], kv.seq_len
    return [t.clone() for x in kv.k + kv.v for t in parts(x)] + [t.clone() for t in kv.offsets + plan_tensors(kv)], kv.seq_len


def same_bytes(a, b):
    """Bit-for-bit equality of two contiguous tensors (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("cache_kind", ["full", "compressed", "int4"])
def test_batched_answers_equal_one_at_a_time_and_leave_the_cache(random_tiny, cache_kind, monkeypatch):
    """generate_ids_batched: the same greedy ids as generate_ids, queries of very different lengths,
    one stopping at once (its first token is made a stop id), others at the length limit or later
    stops; and the shared cache is byte for byte unchanged."""
    m, tok, kv = random_tiny
    cache = {"full": lambda: kv, "compressed": lambda: kv.prune(0.3), "int4": lambda: kv.prune(0.3, bits=4)}[cache_kind]()
    queries = ["the dog", "where is the market near the river bank at dawn while a small train crossed",
               "a", "fox jumps over", "the lazy dog near the river"]
    ids = [kvzip.query_ids(tok, q, template=False) for q in queries]
    free = [kvzip.generate_ids(m, tok, x, cache, 6) for x in ids]
    stop = free[1][0]  # query 1 now stops at once; any other query emitting this token stops there too
    monkeypatch.setattr(tok, "stop_ids", set(tok.stop_ids) | {stop})
    want = [kvzip.generate_ids(m, tok, x, cache, 6) for x in ids]
    assert want[1] == [] and any(len(w) == 6 for w in want), want
    before = snapshot(cache)
    got = kvzip.generate_ids_batched(m, tok, ids, cache, 6)
    assert got == want
    after = snapshot(cache)
    assert before[1] == after[1] and all(same_bytes(a, b) for a, b in zip(before[0], after[0]))
    assert kvzip.generate(m, tok, queries, cache, 6, template=False) == [tok.decode(w) for w in want]
    assert kvzip.generate(m, tok, queries[0], cache, 6, template=False) == tok.decode(want[0])


def test_batched_generate_bad_input(random_tiny):
    m, tok, kv = random_tiny
    for bad in ([], ["ok", "  "], [3]):
        with pytest.raises(kvzip.InputError):
            kvzip.generate(m, tok, bad, kv)
    with pytest.raises(kvzip.InputError, match="one query at a time"):
        kvzip.generate(m, tok, ["a", "b"], kv, keep=True)
    with pytest.raises(kvzip.InputError, match="does not fit"):
        kvzip.generate(m, tok, ["a", "b"], kv, max_new_tokens=m.cfg.max_position_embeddings)


def test_default_model_answers_batched_and_from_a_file_as_alone(smol, tmp_path):
    """The default model: four probes answered together equal the one-at-a-time answers, from the
    full cache, the compressed cache and the compressed cache saved and loaded again."""
    m, tok = smol
    task = tasks.needle_task(n_tokens=300, n_needles=2, seed=4, tok=tok)
    kv = kvzip.prefill(m, tok, task["context"])
    ckv = kv.prune(0.3)
    ckv.save(tmp_path / "c.kvz")
    loaded = kvzip.load_compressed(tmp_path / "c.kvz", m)
    probes = [p for p, _ in task["probes"]]
    chat = ["What is this text about?", "Which doors are mentioned?"]
    for cache in (kv, ckv, loaded):
        want = [kvzip.generate(m, tok, q, cache, 12, template=False) for q in probes]
        assert kvzip.generate(m, tok, probes, cache, 12, template=False) == want
        want = [kvzip.generate(m, tok, q, cache, 12) for q in chat]
        assert kvzip.generate(m, tok, chat, cache, 12) == want
    assert [kvzip.generate(m, tok, q, loaded, 12, template=False) for q in probes] == \
        [kvzip.generate(m, tok, q, ckv, 12, template=False) for q in probes]
