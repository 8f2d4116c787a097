"""
Tests for quant.py, the K/V quantization spec: the round-trip error bound, the stored grid, int4
packing, the byte count and bad input.

Run: `.venv/bin/python -m pytest -q test_quant.py` (CPU only, a few seconds).
"""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import quant

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("mixed", "tiny", "huge", "offset", "negative", "constant", "some constant", "zeros")


def make_rows(N: int, D: int, group: int, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(N, D) test rows of one kind of values, generated from a seed (fast, reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    if kind == "mixed":
        x = 3 * randn(N, D)
    elif kind == "tiny":  # steps below fp16's normal range: subnormal scales
        x = 1e-6 * randn(N, D)
    elif kind == "huge":
        x = 1e3 * randn(N, D)
    elif kind == "offset":  # a narrow spread far from 0: the fp16 zero's rounding is many steps wide
        x = 1e3 * torch.sign(randn(N, 1)) + randn(N, 1) + 0.05 * rand(N, D)
    elif kind == "negative":
        x = -(5 * rand(N, D) + 1e-3)
    elif kind == "constant":  # every group constant, at a value that is usually not exact in fp16
        x = randn(N, D // group, 1).expand(N, D // group, group).reshape(N, D)
    elif kind == "some constant":
        x = 3 * randn(N, D)
        x[:, :group] = randn(N, 1)
    else:
        x = torch.zeros(N, D)
    return x.clamp(-6e4, 6e4).to(dtype)


def grouped(t: torch.Tensor, group: int) -> torch.Tensor:  # (N, D) -> (N, D // group, group)
    return t.reshape(t.shape[0], t.shape[1] // group, group)


# -----------------------------------------------------------------------------
# Round trip: half a step, on a grid that covers the group and is no wider than it needs to be

@settings(max_examples=300, deadline=None)
@given(N=st.integers(0, 6), D=st.sampled_from([16, 32, 64, 128]), group=st.sampled_from([16, 32]),
       bits=st.sampled_from([8, 4]), kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16))
@example(N=3, D=16, group=16, bits=8, kind="offset", dtype=torch.float32, seed=0)
@example(N=3, D=64, group=32, bits=4, kind="offset", dtype=torch.float32, seed=1)
@example(N=2, D=32, group=32, bits=8, kind="constant", dtype=torch.float32, seed=2)
@example(N=2, D=32, group=16, bits=4, kind="constant", dtype=torch.bfloat16, seed=3)
@example(N=4, D=128, group=32, bits=4, kind="zeros", dtype=torch.float16, seed=0)
@example(N=4, D=64, group=32, bits=8, kind="tiny", dtype=torch.float32, seed=4)
@example(N=4, D=64, group=16, bits=4, kind="huge", dtype=torch.float16, seed=5)
@example(N=4, D=16, group=16, bits=8, kind="negative", dtype=torch.bfloat16, seed=6)
@example(N=1, D=16, group=16, bits=4, kind="some constant", dtype=torch.float32, seed=7)
def test_round_trip(N, D, group, bits, kind, dtype, seed):
    x = make_rows(N, D, min(group, D), kind, dtype, seed)
    qx = quant.quantize(x, bits, group)
    group = min(group, D)  # a group of 32 on D = 16 rows is the whole row
    levels = 2 ** bits - 1

    # layout and metadata
    assert qx.data.dtype == torch.uint8 and qx.data.shape == (N, D if bits == 8 else D // 2)
    assert qx.scale.dtype == qx.zero.dtype == torch.float16
    assert qx.scale.shape == qx.zero.shape == (N, D // group)
    assert (qx.bits, qx.group, qx.dtype, qx.shape) == (bits, group, dtype, (N, D))

    # every element within half a step of its group (the stored fp16 step), up to float32 rounding:
    # a few 2^-24 of |x|, |zero| and |x'| (quant.py's docstring derives 2^-23 |x - zero| + 2^-24 |x'|)
    x32 = grouped(x.float(), group)  # (N, G, group)
    y = grouped(quant.dequantize(qx, torch.float32), group)
    scale, zero = qx.scale.float()[..., None], qx.zero.float()[..., None]  # (N, G, 1)
    assert torch.isfinite(y).all()
    fp32_rounding = 2.0 ** -22 * (x32.abs() + zero.abs() + y.abs())
    err = (x32 - y).abs()
    assert (err <= scale / 2 + fp32_rounding).all(), (err - scale / 2).max()

    # the grid: zero at or below the min, by at most one fp16 ulp of it (<= 2^-10 |min|, or 2^-24)
    lo, hi = x32.amin(-1, keepdim=True).double(), x32.amax(-1, keepdim=True).double()
    zero, scale = zero.double(), scale.double()
    assert (zero <= lo).all() and (lo - zero <= 2.0 ** -10 * lo.abs() + 2.0 ** -24).all()
    # ... levels steps reach the max, and the step is the smallest fp16 that does (up to rounding)
    span = hi - zero
    assert (scale * levels >= span * (1 - 2.0 ** -22)).all()
    assert (scale * levels <= span * (1 + 2.0 ** -10 + 2.0 ** -22) + levels * 2.0 ** -24).all()

    # constant groups whose value is exact in fp16 come back exactly; none produces nan
    const = (x32 == x32[..., :1]).all(-1, keepdim=True)  # (N, G, 1)
    exact16 = x32[..., :1].half().float() == x32[..., :1]
    assert (y == x32)[(const & exact16).expand_as(y)].all()

    # in the input's dtype: the float32 result, rounded once more
    assert quant.dequantize(qx).dtype == dtype
    assert torch.equal(quant.dequantize(qx), quant.dequantize(qx, torch.float32).to(dtype))


def test_constant_and_zero_groups():
    zeros = quant.quantize(torch.zeros(3, 64), 4)
    assert torch.equal(quant.dequantize(zeros), torch.zeros(3, 64)) and (zeros.scale == 0).all()
    assert (zeros.data == 0).all()  # a scale-0 group stores code 0 (no 0/0 cast to uint8)
    for dtype in DTYPES:  # 1.5 is exact in all three dtypes: exact round trip, scale 0
        qx = quant.quantize(torch.full((2, 32), 1.5, dtype=dtype), 8)
        assert torch.equal(quant.dequantize(qx), torch.full((2, 32), 1.5, dtype=dtype))
        assert (qx.scale == 0).all() and (qx.data == 0).all()
    c = torch.full((2, 32), 0.1)  # not exact in fp16: zero rounds down, a tiny step reaches 0.1
    qx = quant.quantize(c, 4)
    assert (qx.zero.float() < 0.1).all() and (0 < qx.scale).all() and (qx.scale.float() < 1e-5).all()
    assert ((quant.dequantize(qx) - c).abs() <= qx.scale.float()[:, :1] / 2 + 1e-8).all()


def test_offset_group_needs_the_rounded_down_zero():
    # min 1000.3 is between fp16 neighbours 1000.0 and 1000.5: rounded to nearest (1000.5) the min
    # would come back 0.2 off, about 1000 int8 steps of 0.0002; rounded down it stays within half a step
    x = torch.linspace(1000.3, 1000.35, 32)[None]
    qx = quant.quantize(x, 8)
    assert qx.zero.item() == 1000.0
    assert (quant.dequantize(qx) - x).abs().max() <= qx.scale.float().item() / 2 + 1e-4


def test_group_clamps_to_d_and_quantization_is_per_group():
    x = torch.randn(4, 16)
    assert quant.quantize(x, 8, group=32).group == 16
    # a group's codes depend only on that group: scaling the second group leaves the first untouched
    y = x.clone()
    y[:, 8:] *= 100
    a, b = quant.quantize(x, 8, group=8), quant.quantize(y, 8, group=8)
    assert torch.equal(a.data[:, :8], b.data[:, :8]) and torch.equal(a.scale[:, 0], b.scale[:, 0])
    assert not torch.equal(a.scale[:, 1], b.scale[:, 1])


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_rows_matches_the_whole_block(bits):
    x = torch.randn(40, 64)
    qx = quant.quantize(x, bits)
    full = quant.dequantize(qx)
    for start, end in [(0, 7), (7, 7), (7, 30), (30, 40), (0, 40)]:  # per-head ranges of a packed buffer
        assert torch.equal(quant.dequantize_rows(qx, start, end), full[start:end])
    assert quant.dequantize_rows(qx, 3, 9, torch.float16).dtype == torch.float16
    for start, end in [(-1, 3), (5, 4), (0, 41)]:
        with pytest.raises(ValueError, match="row range"):
            quant.dequantize_rows(qx, start, end)


# -----------------------------------------------------------------------------
# int4 packing

def test_int4_pack_layout_and_every_pair():
    assert quant.pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    lo, hi = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pairs = torch.stack([lo.flatten(), hi.flatten()], dim=1).to(torch.uint8)  # (256, 2): every code pair
    packed = quant.pack_int4(pairs)  # (256, 1)
    assert torch.equal(packed[:, 0].long(), pairs[:, 0].long() + 16 * pairs[:, 1].long())
    assert torch.equal(quant.unpack_int4(packed), pairs)
    every_byte = torch.arange(256).to(torch.uint8)[None]  # (1, 256)
    assert torch.equal(quant.pack_int4(quant.unpack_int4(every_byte)), every_byte)


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=2), half_d=st.integers(1, 64),
       seed=st.integers(0, 2 ** 16))
def test_int4_round_trip_random(shape, half_d, seed):
    codes = torch.randint(0, 16, (*shape, 2 * half_d), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape, half_d)
    assert torch.equal(quant.unpack_int4(packed), codes)


def test_pack_int4_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        quant.pack_int4(torch.tensor([[3, 16]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        quant.pack_int4(torch.tensor([[3, 1, 2]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        quant.pack_int4(torch.tensor([[3, 1]]))


# -----------------------------------------------------------------------------
# Size

@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (8, 16), (4, 64), (4, 128)])
@pytest.mark.parametrize("N,D", [(0, 64), (37, 64), (5, 128)])
def test_nbytes_is_exact(bits, group, N, D):
    qx = quant.quantize(torch.randn(N, D), bits, group)
    codes = N * D * bits // 8
    params = 2 * 2 * N * (D // min(group, D))  # scale and zero: 2 bytes each per group
    assert quant.nbytes(qx) == codes + params
    if group == 32:  # one fp16 pair per 32 values: 1 extra bit per value
        assert 8 * quant.nbytes(qx) == N * D * (bits + 1)


# -----------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("bits", [3, 16, "4", 4.0, True, None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be 8 or 4.*got " + repr(bits)):
        quant.quantize(torch.randn(2, 32), bits)


@pytest.mark.parametrize("D,group", [(48, 32), (24, 16), (96, 64)])
def test_d_not_a_multiple_of_group(D, group):
    with pytest.raises(ValueError, match=f"D={D} is not a multiple of group={group}"):
        quant.quantize(torch.randn(2, D), 8, group)


@pytest.mark.parametrize("group", [0, -32, 1.5, True])
def test_bad_group(group):
    with pytest.raises(ValueError, match="group must be a positive int"):
        quant.quantize(torch.randn(2, 32), 8, group)


def test_bad_tensors():
    with pytest.raises(ValueError, match="D must be even"):
        quant.quantize(torch.randn(2, 5), 4, group=5)
    with pytest.raises(ValueError, match="2-D float"):
        quant.quantize(torch.randn(2, 3, 32), 8)
    with pytest.raises(ValueError, match="2-D float"):
        quant.quantize(torch.ones(2, 32, dtype=torch.int32), 8)
    for bad in (float("nan"), float("inf"), 7e4):
        x = torch.randn(2, 32)
        x[1, 5] = bad
        with pytest.raises(ValueError, match="finite and within"):
            quant.quantize(x, 8)


@settings(max_examples=80, deadline=None)
@given(N=st.integers(1, 40), D=st.sampled_from([8, 32, 64, 128]), group=st.sampled_from([2, 4, 16, 32, 128]),
       bits=st.sampled_from([8, 4]), kind=st.sampled_from(KINDS), cut=st.floats(0, 1), width=st.floats(0, 1),
       seed=st.integers(0, 2 ** 16))
def test_scaled_codes_plus_zero_are_dequantize_rows(N, D, group, bits, kind, cut, width, seed):
    """The buffer-filling half of dequantization (fused.quantized_decode's): code * scale written in
    place into a reused buffer holding stale values, int4 as its even and its odd columns; adding
    each column's group zero gives dequantize_rows' very numbers, for a row range anywhere."""
    x = make_rows(N, D, min(group, D), kind, torch.float32, seed)
    qx = quant.quantize(x, bits, group)
    start = min(int(cut * N), N - 1)
    end = start + 1 + int(width * (N - start - 1))
    n = end - start
    buf = torch.full(((N + 3) * D,), float("nan"))
    got = quant.scaled_codes_into(buf[:n * D].view((n, D) if bits == 8 else (2, n, D // 2)), qx, start, end)
    assert got.data_ptr() == buf.data_ptr()  # written in place
    zero = qx.zero[start:end].float().repeat_interleave(qx.group, dim=1)  # (n, D): each column's zero
    want = quant.dequantize_rows(qx, start, end, torch.float32)
    if bits == 8:
        assert torch.equal(got + zero, want)
    else:
        assert torch.equal(got[0] + zero[:, 0::2], want[:, 0::2])
        assert torch.equal(got[1] + zero[:, 1::2], want[:, 1::2])


def test_scaled_codes_into_refuses_bad_buffers():
    qx = quant.quantize(make_rows(4, 64, 32, "mixed", torch.float32, seed=11), 8)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        quant.scaled_codes_into(torch.empty(3, 64), qx, 0, 4)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        quant.scaled_codes_into(torch.empty(4, 64, dtype=torch.bfloat16), qx, 0, 4)
    q4 = quant.quantize(make_rows(4, 64, 32, "mixed", torch.float32, seed=11), 4)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        quant.scaled_codes_into(torch.empty(4, 64), q4, 0, 4)  # int4 wants (2, n, D // 2)
    odd = quant.quantize(make_rows(4, 6, 3, "mixed", torch.float32, seed=12), 4, group=3)
    with pytest.raises(ValueError, match="need an even group"):
        quant.scaled_codes_into(torch.empty(2, 4, 3), odd, 0, 4)
