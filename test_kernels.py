"""Tests of kernels.py: both Triton kernels against the torch references, property-tested.

Compiled on CUDA; on a CPU through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before
triton is imported). Skipped as a whole where Triton is not installed (it has no wheels for macOS
or Windows; everything else runs on the reference paths there).
"""
import math

import pytest

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")

import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

import kernels  # noqa: E402
import kvzip  # noqa: E402
import quant  # noqa: E402
from conftest import tiny_context  # noqa: E402


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


def _random_qk(seed, n_kv_head, G, n_q, n_prefix, n_chunk, D, std, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv_head, G, n_q, D, generator=g) * std
    k = torch.randn(n_kv_head, n_prefix + n_chunk + n_q, D, generator=g) * std
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
    n_prefix=st.integers(0, 40),
    n_chunk=st.integers(1, 150),
    dtype=st.sampled_from(list(DTYPES)),
    std=st.sampled_from([0.3, 1.0, 3.5]),
    seed=st.integers(0, 2**31 - 1),
)
@example(n_kv_head=1, G=1, D=16, n_q=1, n_prefix=0, n_chunk=1, dtype="float32", std=1.0, seed=0)
@example(n_kv_head=2, G=2, D=64, n_q=65, n_prefix=0, n_chunk=64, dtype="float32", std=3.5, seed=1)
@example(n_kv_head=1, G=4, D=32, n_q=64, n_prefix=1, n_chunk=129, dtype="bfloat16", std=3.5, seed=2)
def test_chunk_max_scores_matches_naive(n_kv_head, G, D, n_q, n_prefix, n_chunk, dtype, std, seed):
    dtype = DTYPES[dtype]
    q, k = _random_qk(seed, n_kv_head, G, n_q, n_prefix, n_chunk, D, std, dtype)
    got = kernels.chunk_max_scores(q, k, n_prefix, n_chunk)
    max_logit = (torch.einsum("hgtd,hsd->hgts", q.float(), k.float()) / math.sqrt(D)).abs().max().item()
    assert_scores_close(got, kvzip.chunk_scores_reference(q, k, n_prefix, n_chunk), dtype, max_logit)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n_q,n_prefix,n_chunk", [(1, 0, 1), (3, 5, 70), (66, 17, 130)])
def test_chunk_max_scores_zero_queries_exact(dtype, n_q, n_prefix, n_chunk):
    # q = 0: every visible logit is 0, so row t spreads 1 / (n_prefix + n_chunk + t + 1) evenly and the
    # max over rows is row 0's share. Checks the mask and the normaliser exactly.
    q, k = _random_qk(0, 2, 3, n_q, n_prefix, n_chunk, 32, 1.0, DTYPES[dtype])
    got = kernels.chunk_max_scores(torch.zeros_like(q), k, n_prefix, n_chunk)
    want = torch.full_like(got, 1.0 / (n_prefix + n_chunk + 1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m: f"{m}\n{_report(got, want)}")


@pytest.mark.parametrize("n_prefix", [0, 63])
@pytest.mark.parametrize("n_q", [1, 63, 64, 65, 130])
def test_chunk_max_scores_last_row_sees_its_own_key(n_prefix, n_q):
    # One chunk key k_c = e_0; all other keys 0. Only the last query row of group member 1 is nonzero,
    # giving logit a to k_c and 0 to its n_prefix + n_q other visible keys (its own key included), so
    # its probability e^a / (e^a + n_prefix + n_q) beats every other row's 1 / (n_prefix + t + 2). The max
    # over rows hides errors in the other rows; this pins down the last row's key count, whose own key
    # sits at a block boundary for some of these sizes (n_prefix + 1 + n_q = 65, 129).
    D, a = 16, 5.0
    q = torch.zeros(1, 2, n_q, D)
    q[0, 1, -1, 0] = a * math.sqrt(D)  # logit = q . k_c / sqrt(D) = a
    k = torch.zeros(1, n_prefix + 1 + n_q, D)
    k[0, n_prefix, 0] = 1.0
    got = kernels.chunk_max_scores(q.to(DEVICE), k.to(DEVICE), n_prefix, 1)
    want = torch.full_like(got, math.exp(a) / (math.exp(a) + n_prefix + n_q))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m: f"{m}\n{_report(got, want)}")


# Decode kernel


def naive_decode_attention(q, k_packed, v_packed, offsets, k_tail=None, v_tail=None):
    """Per head: concatenate its packed rows and the tail, softmax in float32, weight the values."""
    n_kv_head, G, D = q.shape
    out = []
    for h in range(n_kv_head):
        a, b = int(offsets[h]), int(offsets[h + 1])
        k, v = k_packed[a:b].float(), v_packed[a:b].float()  # (n_h, D)
        if k_tail is not None:
            k, v = torch.cat([k, k_tail[h].float()]), torch.cat([v, v_tail[h].float()])
        w = torch.softmax(q[h].float() @ k.T / math.sqrt(D), dim=-1)  # (G, n_h + n_tail)
        out.append(w @ v)  # (G, D)
    return torch.stack(out).to(q.dtype)  # (Hkv, G, D)


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
    keys = kp.float() if kt is None else torch.cat([kp.float(), kt.float().flatten(0, 1)])  # (N (+ Hkv n_tail), D)
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


@KERNEL_SETTINGS
@given(
    bits=st.sampled_from([8, 4]),
    G=st.sampled_from([1, 3, 4]),
    D=st.sampled_from([16, 64, 128]),
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    n_tail=st.integers(0, 4),
    tail_capacity=st.sampled_from([0, 8]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**31 - 1),
)
@example(bits=4, G=3, D=64, lengths=[0, 270, 1], n_tail=2, tail_capacity=8, dtype="float32", seed=0)
def test_quantized_varlen_decode_equals_dequantize_then_attend(bits, G, D, lengths, n_tail, tail_capacity, dtype,
                                                               seed):
    """The kernel reading int8/int4 codes with their scales and zeros against the naive attention
    over the dequantized buffers (quant.dequantize), heads that keep nothing and a tail included."""
    if n_tail == 0:
        lengths = [max(n, 1) for n in lengths]
    q, kp, vp, offsets, kt, vt = _random_cache(seed, lengths, n_tail, G, D, 1.0, DTYPES[dtype], tail_capacity)
    kq, vq = quant.quantize(kp, bits), quant.quantize(vp, bits)
    kd, vd = quant.dequantize(kq, torch.float32), quant.dequantize(vq, torch.float32)  # what the kernel computes with
    got = kernels.varlen_decode_attention(q, kq, vq, offsets, kt, vt)
    want = naive_decode_attention(q, kd, vd, offsets, kt, vt)
    assert_decode_close(got, want, q, kd, vd, kt, vt)
    if dtype == "float32":  # the same kernel on the dequantized floats: the same tiles, the same sums
        same = kernels.varlen_decode_attention(q, kd, vd, offsets, kt, vt)
        torch.testing.assert_close(got, same, atol=1e-6, rtol=1e-6)


def test_quantized_decode_reads_the_int4_nibbles_in_order():
    """One row of int4 codes 0, 1, ..., 15, 0, ... (scale 1, zero 0): with a single key the output
    is that value row itself, so any nibble swap or misplaced group shows up exactly."""
    D = 32
    codes = (torch.arange(D) % 16).to(torch.uint8)[None]  # (1, D)
    ones, zeros = torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16)
    vq = quant.Quantized(quant.pack_int4(codes), ones, zeros, 4, 32, torch.float32)
    kq = quant.Quantized(quant.pack_int4(codes), ones, zeros, 4, 32, torch.float32)
    q = torch.randn(1, 2, D)
    out = kernels.varlen_decode_attention(q, kq, vq, torch.tensor([0, 1]))
    assert torch.equal(out, torch.arange(D).remainder(16).float().expand(1, 2, D))


# %%
# Bad input: clear ValueErrors, never a crash inside the kernel or a silent NaN


def _good_scoring_inputs():
    q, k = _random_qk(0, 2, 2, 5, 3, 7, 16, 1.0, torch.float32)
    return dict(q=q, k=k, n_prefix=3, n_chunk=7)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(k=a["k"][:, :-1]), "k must be"),
        (lambda a: a.update(k=a["k"][None]), "k must be"),
        (lambda a: a.update(n_prefix=-1), "n_prefix"),
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


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(v_packed=quant.dequantize(a["v_packed"])), "must both be tensors or both quant.Quantized"),
        (lambda a: a.update(v_packed=quant.quantize(quant.dequantize(a["v_packed"]), 4)), "quantized alike"),
        (lambda a: a.update(q=a["q"].bfloat16(), k_tail=a["k_tail"].bfloat16(), v_tail=a["v_tail"].bfloat16()),
         "dequantizes to torch.float32, but q is torch.bfloat16"),
        (lambda a: a.update(k_packed=quant.Quantized(a["k_packed"].data, a["k_packed"].scale, a["k_packed"].zero,
                                                     8, 5, torch.float32)), "whole groups"),
        (lambda a: a.update(k_packed=quant.Quantized(a["k_packed"].data, a["k_packed"].scale.float(),
                                                     a["k_packed"].zero, 8, 16, torch.float32)), "k_packed.scale"),
        (lambda a: a.update(v_packed=quant.Quantized(a["v_packed"].data[:, ::2], a["v_packed"].scale[:, ::2],
                                                     a["v_packed"].zero[:, ::2], 4, 16, torch.float32),
                            k_packed=quant.quantize(quant.dequantize(a["k_packed"]), 4, 16)), "v_packed.data"),
    ],
)
def test_quantized_varlen_decode_bad_input(change, match):
    args = _good_decode_inputs()
    args.update(k_packed=quant.quantize(args["k_packed"], 8, 16), v_packed=quant.quantize(args["v_packed"], 8, 16))
    kernels.varlen_decode_attention(**args)  # the good inputs decode
    change(args)
    with pytest.raises(ValueError, match=match):
        kernels.varlen_decode_attention(**args)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_decodes_alike_through_kernel_and_torch(tiny, bits):
    """A quantized CompressedKV decodes single tokens through the kernel as through packed_attention."""
    m, tok, _ = tiny
    kv = kvzip.prefill(m, tok, tiny_context(tok, 45, seed=5), chunk_size=20, backend="reference")
    torch_ckv, triton_ckv = kv.prune(0.3, bits=bits), kv.prune(0.3, bits=bits)
    triton_ckv.backend = "triton"
    n = torch_ckv.seq_len
    ids = torch.tensor(kvzip.query_ids(tok, "the fox"))
    for c in (torch_ckv, triton_ckv):
        m(ids, c)
    a = [m(torch.tensor([t]), torch_ckv) for t in (7, 8)]
    b = [m(torch.tensor([t]), triton_ckv) for t in (7, 8)]
    torch.testing.assert_close(torch.cat(b), torch.cat(a), atol=1e-4, rtol=1e-4)
    torch_ckv.truncate(n), triton_ckv.truncate(n)


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
