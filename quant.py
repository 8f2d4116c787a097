"""
Quantized storage for the kept K/V rows of kvzip.CompressedKV: the reference (the spec) of the scheme.

Map of this file:
  1. Quantized                 - int8/int4 codes of an (N, D) block plus per-group fp16 scale and zero
  2. quantize                  - group-wise asymmetric min-max along the head dimension -> Quantized
  3. dequantize, dequantize_rows - back to floats: the whole block, or a row range (one KV head);
     scaled_codes_into            - code * scale of a row range (the zero left to the caller) in a
                                    buffer the caller reuses (fused.quantized_decode); int4 in two
                                    parts, the even columns and the odd ones; script: TorchScript
  4. pack_int4, unpack_int4    - two 4-bit codes per byte, low nibble first
  5. packed_rows, nbytes       - a packed buffer (a tensor or a Quantized block) as its callers
                                 see it: a row range as floats, and the exact bytes it holds

The scheme. A packed buffer k or v (N, D) holds the kept rows of all KV heads, head-major. Each row
(one token of one head) is split into D / group groups of `group` consecutive values along D, and
each group gets its own asymmetric min-max grid with 2^bits levels:
    zero  = min of the group                 (stored in fp16, rounded down)
    scale = (max - zero) / (2^bits - 1)      (stored in fp16, rounded up)
    code  = round((x - zero) / scale)        in 0 .. 2^bits - 1
    x'    = zero + code * scale              (dequantized)

Why per-token groups along D, for K and for V alike. KIVI (Liu et al., 2024) quantizes keys per
channel (a group spans 32 tokens of one channel) because a few key channels carry outliers, and
values per token. Per-channel groups span tokens, so on this cache they would have to respect the
per-head lengths (offsets[h] .. offsets[h+1] do not line up with groups of 32), and a head whose
length is not a multiple of 32, or the growing tail of new tokens, needs a full-precision residual
until its group fills. Per-token groups make every row self-contained: any row range (a head, or a
single row appended later) quantizes and dequantizes on its own. They also cost nothing measurable.
Measured on the default model (SmolLM2-135M-Instruct, float32 on CPU, D = 64) with a 1000-token
needle context (tasks.needle_task(1000, 4, seed=0)): the full dense cache from
kvzip.prefill(..., score=False) is fake-quantized (quantize -> dequantize, every layer, K and V),
then the teacher-forced NLL per token of reconstructing the context (the first 6 reconstruction
inputs of kvzip.reconstruction_inputs(tok, ids, 64), 384 tokens) and the greedy pass-key answers
(8 tokens, template=False) are taken from it. Errors are over all L * Hkv * S * D values.

    scheme                            bits  bits/value  NLL/token  keys  mean|err| K / V  max|err| K / V
    none (the float32 cache)           -       32        0.6285    2/4        0 / 0            0 / 0
    per token, 16 along D              8       10        0.6293    2/4   0.0071 / 0.0027  0.068 / 0.045
    per token, 16 along D              4        6        0.6738    1/4   0.1160 / 0.0448  1.143 / 0.786
    per token, 32 along D (this file)  8        9        0.6298    2/4   0.0103 / 0.0035  0.068 / 0.047
    per token, 32 along D (this file)  4        5        0.6850    2/4   0.1729 / 0.0578  1.151 / 0.792
    per token, 64 = D (whole row)      8        8.5      0.6275    2/4   0.0142 / 0.0042  0.087 / 0.051
    per token, 64 = D (whole row)      4        4.5      0.7775    2/4   0.2398 / 0.0703  1.465 / 0.863
    KIVI: K per channel, V per token   8        9        0.6297    2/4   0.0038 / 0.0035  0.054 / 0.047
    KIVI: K per channel, V per token   4        5        0.6970    2/4   0.0643 / 0.0578  0.917 / 0.792

(keys: pass keys recalled out of 4; this 135M model recalls 2 even from the unquantized cache, and
every scheme but int4 groups of 16 recalls the same 2. Group 128 clamps to D = 64, the whole-row
line. KIVI: key groups of 32 tokens of one channel, values 32 along D; the last S mod 32 tokens
stay float32, its residual.) At int8 every scheme is within 0.0015 nat of none. At int4, one
group per row costs 2.6x the NLL of groups of 32 (+0.149 vs +0.057 nat per token); groups of 16
gain little (+0.045) for one more bit per value. KIVI's per-channel keys cut the key error 2.7x,
yet reconstruct no better (0.6970 vs 0.6850 at int4, on this one context): groups of 32 along D,
for K and V alike.

Scale and zero are stored in fp16, one pair per group: 32 bits per `group` values, so group = 32
costs 1 extra bit per value (int8 -> 9 bits, int4 -> 5 bits per value; group = 64: 8.5 and 4.5).
fp16 rather than float32 halves that overhead; fp16 rather than bfloat16 because its 11-bit
significand keeps the rounding of `zero` small (next paragraph) and K/V values are far inside its
range (|x| <= 65504 is checked; wider values raise ValueError).

What is guaranteed, precisely. Rounded to nearest, an fp16 zero can land up to half an fp16 ulp
above the group's min (and a rounded-down scale can end the grid below the max): those values fall
off the grid, and their error is that offset, not half a step (an int8 step can be far smaller than
the fp16 ulp of a large min: a group 1000.3 .. 1000.35 has step 0.0002, while fp16 holds 1000.0 and
1000.5, so the min would come back 0.2 off). So zero is rounded down and scale (computed from the
stored zero) rounded up: the stored grid always covers [min, max], and codes are computed against
the stored fp16 zero and scale. Hence, for every element,
    |x - dequantize(qx, float32)| <= scale / 2   (scale: the stored fp16 step of the element's group)
plus float32 arithmetic rounding, at most 2^-23 |x - zero| + 2^-24 |x'|. The stored step exceeds
the ideal (max - min) / (2^bits - 1) by at most ulp16(min) / (2^bits - 1) plus fp16's relative
rounding of the step (2^-10, or the subnormal spacing 2^-24 for tiny steps). A constant group whose
value is exact in fp16 (any fp16 input, bfloat16 inputs in fp16's normal range, 0) dequantizes
exactly (scale = 0, code 0); any other constant c comes back within half a step of at most
ulp16(c) / (2^bits - 1).
dequantize(qx) in the input's dtype is that float32 result rounded once more to that dtype.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

BITS = (16, 8, 4)  # bits per stored K/V value of a compressed cache; 16 = the model's dtype, not quantized
QUANTIZED_BITS = (8, 4)  # the widths this file quantizes to
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP16_MAX = torch.finfo(torch.float16).max  # 65504: scale and zero must fit in fp16


# -----------------------------------------------------------------------------
# 1. The quantized block

@dataclass(frozen=True)
class Quantized:
    """An (N, D) block of K or V rows as integer codes plus one fp16 (scale, zero) per group."""
    data: torch.Tensor  # (N, D) uint8 codes (bits=8) or (N, D // 2) uint8, two codes a byte (bits=4)
    scale: torch.Tensor  # (N, D // group) float16: the step between consecutive codes (0: constant group)
    zero: torch.Tensor  # (N, D // group) float16: the value of code 0, at or below the group's min
    bits: int  # 8 or 4
    group: int  # values per group along D (already min(group, D))
    dtype: torch.dtype  # the input's dtype: what dequantize returns by default

    @property
    def shape(self) -> tuple[int, int]:
        """(N, D) of the original block (also of a row slice, whose N is its own)."""
        return self.data.shape[0], self.data.shape[1] * (8 // self.bits)


def check_bits(bits, quantized: bool = False) -> int:
    """bits per stored K/V value: one of BITS; quantized=True (what quantize accepts): 8 or 4."""
    allowed = QUANTIZED_BITS if quantized else BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        what = ("8 or 4 to quantize (16, i.e. not quantized, is left to the caller)" if quantized
                else "16 (not quantized), 8 or 4")
        raise ValueError(f"bits must be {what}, got {bits!r}")
    return bits


def group_size(group, D: int, bits: int) -> int:
    """The group actually used, min(group, D); D must be a whole number of groups."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if D < 1:
        raise ValueError("cannot quantize rows of length D = 0")
    g = min(group, D)
    if D % g:
        raise ValueError(f"head dim D={D} is not a multiple of group={g}")
    if bits == 4 and D % 2:
        raise ValueError(f"int4 packs two codes per byte: D must be even, got D={D}")
    return g


# -----------------------------------------------------------------------------
# 2. Quantization

def round_fp16(v: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> the nearest float16 at or above v (up) or at or below v (down)."""
    h = v.half()  # round to nearest
    missed = h.float() < v if up else h.float() > v  # landed on the wrong side of v
    toward = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(missed, torch.nextafter(h, toward), h)


def quantize(x: torch.Tensor, bits: int, group: int = 32) -> Quantized:
    """Group-wise asymmetric min-max quantization of x (N, D) along D; bits 8 or 4."""
    bits = check_bits(bits, quantized=True)
    if x.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D float32/bfloat16/float16 tensor, got {x.dtype} {tuple(x.shape)}")
    N, D = x.shape
    g = group_size(group, D, bits)
    xf = x.float()  # exact for all three input dtypes
    if not (xf.abs() <= FP16_MAX).all():  # also false for nan and inf
        raise ValueError(f"values must be finite and within +-{FP16_MAX:g} (scale and zero are fp16)")
    xg = xf.reshape(N, D // g, g)  # (N, n_groups, g)
    levels = 2 ** bits - 1
    zero = round_fp16(xg.amin(dim=-1), up=False)  # (N, n_groups) <= min: the grid starts below it
    scale = round_fp16((xg.amax(dim=-1) - zero.float()) / levels, up=True)  # (N, n_groups): reaches max
    step = torch.where(scale == 0, 1.0, scale.float())  # scale 0 only when every value equals zero
    codes = ((xg - zero.float()[..., None]) / step[..., None]).round().clamp_(0, levels)  # (N, n_groups, g)
    codes = codes.to(torch.uint8).reshape(N, D)
    data = pack_int4(codes) if bits == 4 else codes  # (N, D // 2) or (N, D)
    return Quantized(data, scale, zero, bits, g, x.dtype)


# -----------------------------------------------------------------------------
# 3. Dequantization

def dequantize(qx: Quantized, dtype: torch.dtype | None = None) -> torch.Tensor:
    """zero + code * scale, computed in float32, returned as dtype (default: the input's). (N, D)"""
    N, D = qx.shape
    codes = unpack_int4(qx.data) if qx.bits == 4 else qx.data  # (N, D) uint8
    n_groups = qx.scale.shape[1]
    # code * scale is exact in float32 (8 + 11 significant bits); only the addition rounds
    x = codes.float().reshape(N, n_groups, D // n_groups) * qx.scale.float()[..., None]  # (N, n_groups, group)
    x = x + qx.zero.float()[..., None]
    return x.reshape(N, D).to(dtype or qx.dtype)


def dequantize_rows(qx: Quantized, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows start .. end - 1 only, e.g. one KV head's rows offsets[h] .. offsets[h+1] - 1 of a packed
    cache: a decode step dequantizes one head at a time, never the whole cache. (end - start, D)"""
    if not 0 <= start <= end <= qx.shape[0]:
        raise ValueError(f"row range [{start}, {end}) is outside [0, {qx.shape[0]}]")
    rows = dataclasses.replace(qx, data=qx.data[start:end], scale=qx.scale[start:end],
                               zero=qx.zero[start:end])  # views, no copy
    return dequantize(rows, dtype)


def scaled_codes_into(out: torch.Tensor, qx: Quantized, start: int, end: int) -> torch.Tensor:
    """code * scale of rows start .. end - 1, written into out (float32), which the caller reuses
    (fused.quantized_decode: a block of rows that stays in cache). This is dequantize_rows(qx,
    start, end, torch.float32) less each group's zero, which the caller adds where it costs a few
    numbers instead of a pass over the block (on the logits and on the attention output). code *
    scale is exact in float32 (8 + 11 significant bits), so adding the zero gives the spec's very
    number.

    out: (n, D) for int8, n = end - start. int4: (2, n, D // 2), the even columns (the low nibbles)
    in out[0] and the odd ones (the high nibbles) in out[1], as each byte holds them: each part is
    one contiguous write, over twice as fast as interleaving them into rows (a stride-2 write); the
    caller splits its query the same way and interleaves the output, D numbers each."""
    n, D = end - start, qx.shape[1]
    shape = (n, D) if qx.bits == 8 else (2, n, D // 2)
    if out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if qx.bits == 4 and qx.group % 2:
        raise ValueError(f"int4 rows in two parts need an even group, got {qx.group}")
    return scaled_codes_kernel(out, qx.data[start:end], qx.scale[start:end], qx.bits, qx.group)


def scaled_codes_kernel(out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bits: int,
                        group: int) -> torch.Tensor:
    """scaled_codes_into without the checks: data (n, D) or (n, D // 2) uint8, scale (n, n_groups)
    fp16 of the same rows."""
    n, n_groups = scale.shape[0], scale.shape[1]
    scale = scale.float().unsqueeze(2)  # (n, n_groups, 1): a float32 scale multiplies 3x faster than fp16
    if bits == 8:
        out.copy_(data)  # uint8 -> float32, exact
        out.view(n, n_groups, group).mul_(scale)
        return out
    out[0].copy_(data & 15)  # byte i holds columns 2i (low nibble) and 2i + 1 (high nibble)
    out[1].copy_(data >> 4)
    for part in out:  # each part holds group / 2 columns of every group: (n, n_groups, group / 2)
        part.view(n, n_groups, group // 2).mul_(scale)
    return out


def script(fn):
    """fn compiled by TorchScript, or fn itself where this torch cannot. Why TorchScript: a scripted
    function runs its torch ops without holding Python's GIL, so fused.quantized_decode's scripted
    loop runs on several Python threads at once (plain Python there waits on the GIL between ops:
    two threads were no faster than one). torch 2.13 marks torch.jit.script deprecated (in favour of
    torch.compile, which needs a C++ compiler at run time); that warning is silenced here, and
    TorchScript only compiles these two small functions. Same ops, same numbers either way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # a torch without TorchScript: the plain function (fused then runs it on one thread)
        return fn


scaled_codes_kernel = script(scaled_codes_kernel)


# -----------------------------------------------------------------------------
# 4. int4 packing

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) uint8 codes in 0..15 -> (..., D // 2) uint8: byte i = codes[2i] | codes[2i+1] << 4
    (the even column in the low nibble, the odd column in the high nibble)."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs uint8 codes with an even last dim, "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and codes.max() > 15:
        raise ValueError(f"int4 codes must be in 0..15, got {codes.max().item()}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The exact inverse of pack_int4: (..., D // 2) uint8 -> (..., D) uint8 codes in 0..15."""
    low, high = packed & 0x0F, packed >> 4  # (..., D // 2) each
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# -----------------------------------------------------------------------------
# 5. A packed buffer as its callers see it: a tensor, or a Quantized block

def packed_rows(x, start: int, end: int, dtype) -> torch.Tensor:
    """Rows start .. end - 1 of a packed buffer as floats (end - start, D): a view of a tensor, or
    just these rows of a Quantized block dequantized (one head, never the whole cache)."""
    if isinstance(x, Quantized):
        return dequantize_rows(x, start, end, dtype)
    return x[start:end]


def nbytes(x) -> int:
    """Exact bytes held: a tensor's, or a Quantized block's codes, scales and zeros."""
    if isinstance(x, Quantized):
        return sum(t.numel() * t.element_size() for t in (x.data, x.scale, x.zero))
    return x.numel() * x.element_size()
