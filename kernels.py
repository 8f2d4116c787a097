"""
Triton kernels for KVzip: the chunked-max scoring kernel and varlen decode attention.

This file contains, top to bottom:

1. ``chunk_max_scores(q, k, n_prefix, n_chunk)``: KVzip's importance score of every cached key of one
   context chunk (the paper's Eq. 2), computed without materializing the attention matrix.
   - ``_row_lse_kernel``   pass 1: each query row's log-sum-exp over its visible keys.
   - ``_chunk_max_kernel`` pass 2: the chunk columns' probabilities, max over rows and the group.
2. ``varlen_decode_attention(q, k_packed, v_packed, offsets, k_tail, v_tail)``: one new token
   attending over the compressed cache, whose heads keep different numbers of pairs.
   - ``_decode_partial_kernel`` flash-decoding: (head, split of keys) -> partial (max, sum, acc),
     merged afterwards with the log-sum-exp rule (in torch, see ``_merge_partials``).
   - ``_load_rows`` a tile of K or V rows as float32: plain floats, or int8/int4 codes with their
     per-group scale and zero (quant.py's layout) dequantized as they are loaded.

The reference scorer in kvzip.py (readable torch, full probability matrix) is the spec; the tests
check these kernels against naive torch only. Shape alphabet: Hkv (KV heads), G (query heads per
KV head, GQA group; query head h*G + g belongs to KV head h), D (head dim), n_q (query rows).

Running without a GPU: Triton's interpreter executes the kernels on the CPU with numpy when the
environment variable ``TRITON_INTERPRET=1`` is set *before* triton is imported (the tests do this
when CUDA is missing; this module never sets it, so on a GPU it compiles). The interpreter is also
how to step through a kernel with pdb. One interpreter quirk shaped the code: it multiplies
bfloat16 tiles as raw uint16 bits, so every tile is cast to float32 before ``tl.dot`` (see
``_dot_precision`` for why this costs no accuracy and keeps tensor cores on the GPU).

References: KVzip, Kim et al., NeurIPS 2025, arXiv 2505.23416; the Triton tutorials 02 (fused
softmax: layout of this file) and 06 (fused attention: the online softmax of pass 1); Flash-Decoding
(Dao et al., 2023) for splitting the key axis in decode.

Left out on purpose: autotuning (fixed block sizes: autotuning keyed on the context length would
re-tune, running the kernels many times, for every new length, which muddles a debugger session),
backward passes, block pointers / TMA descriptors, paged caches, batch size > 1, and a fused merge
kernel.
"""

import math

import torch
import triton
import triton.language as tl

import quant

# Fixed block sizes (no autotuning). 64 x 64 tiles of float32 fit the registers of one 4-warp
# program for D <= 128 and keep the interpreter's per-program numpy overhead low. tl.dot needs every
# tile dimension >= 16 when compiled.
BLOCK_M = 64  # query rows per program (scoring)
BLOCK_N = 64  # keys per inner-loop step (scoring and decode)
SPLIT_N = 256  # keys per decode program: a head of S kept pairs is split over ceil(S / 256) programs

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange) and >= 16 (tl.dot)


def _dot_precision(dtype):
    """How tl.dot multiplies our float32 tiles on a GPU.

    Tiles are upcast to float32 before tl.dot. TF32 keeps 10 mantissa bits, so bfloat16 (7) and
    float16 (10) values pass through it exactly and products accumulate in float32: tensor cores,
    no accuracy lost. Float32 inputs (23 bits) would be rounded by TF32 (~1e-3 relative, ~0.05 on a
    logit of 50), so they use the exact "ieee" path. The interpreter ignores this setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


# %%
# Scoring, pass 1: log-sum-exp of every query row
# -----------------------------------------------
# Query row t (of n_q) sees K' = [prefix (n_prefix) ; chunk (n_chunk) ; input keys 0..t]. The first
# n_ctx = n_prefix + n_chunk keys are visible to every row; after them the mask is causal.


@triton.jit
def _row_lse_kernel(
    q_ptr,  # (Hkv, G, n_q, D), contiguous
    k_ptr,  # (Hkv, n_ctx + n_q, D), contiguous
    lse_ptr,  # (Hkv, G, n_q) float32, output
    G, n_q, n_ctx, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16)  # tl.dot minimum
    pid_m = tl.program_id(0)  # block of query rows
    g = tl.program_id(1)  # member of the head group
    h = tl.program_id(2)  # KV head
    n_keys = n_ctx + n_q
    # int64 base offsets: Hkv * n_keys * D can exceed 2**31 for long contexts
    q_base = q_ptr + (h * G + g).to(tl.int64) * n_q * HEAD_DIM
    k_base = k_ptr + h.to(tl.int64) * n_keys * HEAD_DIM
    lse_base = lse_ptr + (h * G + g).to(tl.int64) * n_q

    # -- load the query block once: (BLOCK_M, D); rows past n_q read zeros and are never stored
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_q
    q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row's logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(logit - m_i)
    # The last row of this block sees keys up to n_ctx + its own index; later keys are all masked.
    hi = n_ctx + tl.minimum((pid_m + 1) * BLOCK_M, n_q)
    for start_n in range(0, hi, BLOCK_N):
        # -- load a key block: (BLOCK_N, D)
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=(cols < n_keys)[:, None], other=0.0)
        k = k.to(tl.float32)
        # -- qk: (BLOCK_M, BLOCK_N) logits in float32; masked entries are -inf, which exp turns into 0
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        # Row t < n_q sees input keys j <= t only, so no key past n_keys; padding rows (t >= n_q) may
        # "see" the zero-filled keys there, but their lse is never stored.
        visible = (cols[None, :] < n_ctx) | (cols[None, :] - n_ctx <= offs_m[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        # -- running max and sum (online softmax): rescale the old sum by exp(m_old - m_new).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Key 0 (a prefix or chunk key, n_ctx >= 1) is visible to every row and sits in the first
        # block, so m_new is finite from then on. The guard keeps a row that has seen no key yet
        # from computing exp(-inf - -inf) = nan, should the loop ever start elsewhere.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(qk - m_safe[:, None]), 1)
        m_i = m_new

    # -- store lse = log(sum_j exp(logit_j)) = m + log(l), so that softmax_j = exp(logit_j - lse)
    tl.store(lse_base + offs_m, m_i + tl.log(l_i), mask=row_ok)


# %%
# Scoring, pass 2: max probability of each chunk key
# --------------------------------------------------
# Only the n_chunk chunk columns are scored, and every query row sees all of them (no mask).
# Each program owns (block of chunk keys, block of query rows, KV head) and loops over the G group
# members, so the group max is taken in registers.
#
# Combining the row blocks: each program writes its maximum to a partials buffer
# (Hkv, n_row_blocks, n_chunk) and torch.amax reduces it. tl.atomic_max on float32 would also work
# (probabilities are >= 0, and non-negative IEEE floats order like their integer bits), but the
# buffer is simpler to read, needs no zero-initialised output, and is deterministic by construction.
# It is small: n_q / BLOCK_M rows of n_chunk floats per head (32 x 2000 x 4 B = 256 KB at m = 2000).


@triton.jit
def _chunk_max_kernel(
    q_ptr,  # (Hkv, G, n_q, D), contiguous
    k_ptr,  # (Hkv, n_prefix + n_chunk + n_q, D), contiguous
    lse_ptr,  # (Hkv, G, n_q) float32, from pass 1
    partial_ptr,  # (Hkv, n_row_blocks, n_chunk) float32, output
    G, n_q, n_prefix, n_chunk, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16)  # tl.dot minimum
    pid_n = tl.program_id(0)  # block of chunk keys
    pid_m = tl.program_id(1)  # block of query rows
    h = tl.program_id(2)  # KV head
    n_row_blocks = tl.num_programs(1)
    n_keys = n_prefix + n_chunk + n_q
    k_base = k_ptr + h.to(tl.int64) * n_keys * HEAD_DIM

    # -- load the chunk-key block once: (BLOCK_N, D); chunk key c is row n_prefix + c of k
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_c < n_chunk
    row_ok = offs_m < n_q
    k = tl.load(k_base + (n_prefix + offs_c)[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    k = k.to(tl.float32)

    best = tl.zeros([BLOCK_N], tl.float32)  # probabilities are >= 0, so 0 is the identity of max
    for g in range(G):
        # -- load this member's query block (BLOCK_M, D) and its rows' lse (BLOCK_M,)
        q_base = q_ptr + (h * G + g).to(tl.int64) * n_q * HEAD_DIM
        lse_base = lse_ptr + (h * G + g).to(tl.int64) * n_q
        q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        q = q.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        # -- qk: recompute the chunk logits (BLOCK_M, BLOCK_N); probability = exp(logit - lse_row)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        p = tl.exp(qk - lse[:, None])
        p = tl.where(row_ok[:, None], p, 0.0)  # padding rows must not win the max
        # -- running max over rows and group members
        best = tl.maximum(best, tl.max(p, 0))

    # -- store this row block's maximum for each chunk key
    partial_base = partial_ptr + (h * n_row_blocks + pid_m).to(tl.int64) * n_chunk
    tl.store(partial_base + offs_c, best, mask=col_ok)


def _check_scoring_inputs(q, k, n_prefix, n_chunk):
    """chunk_max_scores' argument checks, with messages that name the argument; returns (Hkv, G, n_q, D)."""
    if not (isinstance(n_prefix, int) and n_prefix >= 0):
        raise ValueError(f"n_prefix must be an int >= 0, got {n_prefix!r}")
    if not (isinstance(n_chunk, int) and n_chunk >= 1):
        raise ValueError(f"n_chunk must be an int >= 1, got {n_chunk!r}")
    if q.ndim != 4:
        raise ValueError(f"q must be (Hkv, G, n_q, D), got shape {tuple(q.shape)}")
    n_kv_head, G, n_q, D = q.shape
    if n_kv_head < 1 or G < 1 or n_q < 1:
        raise ValueError(f"q must have Hkv, G, n_q >= 1, got shape {tuple(q.shape)}")
    n_keys = n_prefix + n_chunk + n_q
    if k.ndim != 3 or tuple(k.shape) != (n_kv_head, n_keys, D):
        raise ValueError(
            f"k must be (Hkv, n_prefix + n_chunk + n_q, D) = {(n_kv_head, n_keys, D)} "
            f"(n_prefix={n_prefix}, n_chunk={n_chunk}, n_q={n_q}), got shape {tuple(k.shape)}"
        )
    _check_common(D, q=q, k=k)
    return n_kv_head, G, n_q, D


def chunk_max_scores(q, k, n_prefix, n_chunk):
    """KVzip scores of one context chunk: max softmax probability each chunk key receives.

    q: (Hkv, G, n_q, D) queries of the reconstruction input (post-RoPE), grouped by KV head.
    k: (Hkv, n_prefix + n_chunk + n_q, D) keys K' = [prefix ; chunk ; the input's own keys] (post-RoPE).
    Returns (Hkv, n_chunk) float32 in [0, 1]: over the group's G query heads and all n_q rows, the
    max of softmax(q k^T / sqrt(D)) (float32, causal only between input rows and input keys) on the
    chunk columns [n_prefix, n_prefix + n_chunk). A key that takes all of a row's attention can score
    slightly above 1: exp(logit - lse) with both sides rounded to float32 is off by a few ulps of the
    logit (one ulp of 50 is 3.8e-6). Nothing clamps it: the kernel shows what float32 computed.

    Naive cost, which this avoids: the (Hkv, G, n_q, |K'|) float32 matrix. With m = 2000, n_q ~ 2,020
    and |K'| ~ 4,060 (a ~40-token prefix), 32 query heads x 2,020 x 4,060 x 4 B ~ 1.05 GB per layer.
    Here: lse (Hkv, G, n_q) and partials (Hkv, ceil(n_q / BLOCK_M), n_chunk) float32 only.
    """
    n_kv_head, G, n_q, D = _check_scoring_inputs(q, k, n_prefix, n_chunk)

    # -- launch pass 1 (grid: row blocks x group members x KV heads), then pass 2
    sm_scale = 1.0 / math.sqrt(D)
    precision = _dot_precision(q.dtype)
    n_row_blocks = triton.cdiv(n_q, BLOCK_M)
    lse = torch.empty((n_kv_head, G, n_q), dtype=torch.float32, device=q.device)
    _row_lse_kernel[(n_row_blocks, G, n_kv_head)](
        q, k, lse, G, n_q, n_prefix + n_chunk, sm_scale,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=precision,
    )
    partial = torch.empty((n_kv_head, n_row_blocks, n_chunk), dtype=torch.float32, device=q.device)
    _chunk_max_kernel[(triton.cdiv(n_chunk, BLOCK_N), n_row_blocks, n_kv_head)](
        q, k, lse, partial, G, n_q, n_prefix, n_chunk, sm_scale,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=precision,
    )
    return partial.amax(dim=1)  # (Hkv, n_chunk)


def _check_common(D, strided=(), **tensors):
    """Dtype, head-dim, device and contiguity checks shared by both wrappers (names in strided:
    no contiguity check, the caller checks their strides itself)."""
    if D not in _HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {_HEAD_DIMS}, got {D}")
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, but the other inputs are {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, but the other inputs are on {first.device}")
        if name not in strided and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


# %%
# Decode: one new token over the packed compressed cache (flash-decoding)
# -----------------------------------------------------------------------
# KV head h keeps rows offsets[h]:offsets[h+1] of k_packed/v_packed (N, D). Heads differ in length,
# and one token has only G query rows per head, so parallelism comes from the key axis: program
# (split s, head h) reads up to SPLIT_N of the head's rows, starting at starts[h] + s * SPLIT_N, for
# all G query heads at once (each K/V row is read once for the whole group), and writes a partial
# softmax state (m = max logit, l = sum exp(logit - m), acc = sum exp(logit - m) v). A split past
# the end of its head writes the empty state (-inf, 0, 0), which the merge weighs by exp(-inf) = 0.
#
# The kernel sees a buffer of D-wide rows and, per head, the row range [starts[h], ends[h]). For the
# packed cache that is offsets[:-1], offsets[1:]. The dense tail (Hkv, n_tail, D) of new tokens is
# the same kind of buffer: head h's rows start at h * (rows per head of the tail's storage), which
# also covers a slice [:, :n_tail] of a preallocated (Hkv, capacity, D) buffer without copying it.
# So one kernel, launched twice into the same partial buffers, handles both; it knows no tails.
#
# A quantized cache (kvzip.CompressedKV with bits 8 or 4) passes quant.Quantized blocks instead of
# float buffers: the same kernel, compiled once per BITS (a constexpr), reads the codes and their
# per-group fp16 scale and zero and dequantizes each tile as it loads it (``_load_rows``). The
# float32 tile is what the torch path computes with quant.dequantize_rows; nothing else changes.
# The tail is never quantized, so its launch uses BITS = 16.


@triton.jit
def _load_rows(x_ptr, scale_ptr, zero_ptr, rows, row_ok, offs_d,
               HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """A (BLOCK_N, D) float32 tile of rows (rows past the mask read 0).

    BITS = 16: rows of D floats. BITS = 8 or 4: quant.Quantized's layout, dequantized here as
    quant.dequantize does (code * scale + zero in float32): rows of D uint8 codes (8) or D / 2
    bytes holding two codes each, column 2i in the low nibble of byte i, 2i + 1 in the high one
    (4); scale and zero fp16, one per GROUP consecutive values of a row.
    """
    mask = row_ok[:, None]
    if BITS == 16:
        x = tl.load(x_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        if BITS == 8:
            code = tl.load(x_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0)
        else:  # each byte is loaded twice, once for its low and once for its high nibble
            byte = tl.load(x_ptr + rows[:, None] * (HEAD_DIM // 2) + (offs_d // 2)[None, :], mask=mask, other=0)
            code = (byte >> ((offs_d % 2) * 4)[None, :]) & 0xF
        groups = rows[:, None] * (HEAD_DIM // GROUP) + (offs_d // GROUP)[None, :]
        scale = tl.load(scale_ptr + groups, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + groups, mask=mask, other=0.0).to(tl.float32)
        x = code.to(tl.float32) * scale + zero
    return x


@triton.jit
def _decode_partial_kernel(
    q_ptr,  # (Hkv, G, D), contiguous
    k_ptr,  # rows of D keys: head h owns rows starts[h]:ends[h] (BITS 8 / 4: rows of codes)
    v_ptr,  # rows of D values, same layout as the keys
    k_scale_ptr, k_zero_ptr,  # BITS 8 / 4: (rows, D // GROUP) float16 each (unused for 16)
    v_scale_ptr, v_zero_ptr,
    starts_ptr,  # (Hkv,) int64
    ends_ptr,  # (Hkv,) int64
    m_ptr,  # (Hkv, n_splits_total, G) float32, output: max logit
    l_ptr,  # (Hkv, n_splits_total, G) float32, output: sum of exp(logit - m)
    acc_ptr,  # (Hkv, n_splits_total, G, D) float32, output: sum of exp(logit - m) * v
    G, split0, n_splits_total, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
):
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16)  # tl.dot minimum
    tl.static_assert(SPLIT_N % BLOCK_N == 0)
    s = tl.program_id(0)  # split of this head's keys
    h = tl.program_id(1)  # KV head
    # this program's rows: [lo, hi), int64 like starts/ends, so row * D never overflows
    lo = tl.load(starts_ptr + h) + s * SPLIT_N
    hi = tl.minimum(lo + SPLIT_N, tl.load(ends_ptr + h))

    # -- load the group's queries: (BLOCK_G, D); BLOCK_G pads G up to tl.dot's 16 rows with zeros
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < G
    q_rows = h.to(tl.int64) * G + offs_g
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        # -- load a block of keys and values: (BLOCK_N, D) each, float32 (dequantized if BITS < 16)
        rows = start + offs_n
        key_ok = rows < hi
        k = _load_rows(k_ptr, k_scale_ptr, k_zero_ptr, rows, key_ok, offs_d, HEAD_DIM, BITS, GROUP)
        v = _load_rows(v_ptr, v_scale_ptr, v_zero_ptr, rows, key_ok, offs_d, HEAD_DIM, BITS, GROUP)
        # -- qk: (BLOCK_G, BLOCK_N); rows past hi are -inf
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        # -- running max, sum and weighted values. Every block starts below hi, so it holds at least
        # one real key and m_new is finite: no -inf - -inf here.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)  # rescales the old state; exp(-inf) = 0 on the first block
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- store the partial state of the G real query heads (an empty split stores -inf, 0, 0)
    slot = (h.to(tl.int64) * n_splits_total + split0 + s) * G + offs_g
    tl.store(m_ptr + slot, m_i, mask=g_ok)
    tl.store(l_ptr + slot, l_i, mask=g_ok)
    tl.store(acc_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


def _merge_partials(m, l, acc):
    """Log-sum-exp merge of split states: m, l (Hkv, n_splits, G) and acc (Hkv, n_splits, G, D)
    -> out (Hkv, G, D).

    Rescale every split to the common max M: out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s.
    Done in torch: it reads n_splits * G * (D + 2) floats per head, tiny next to the cache itself.
    """
    m_max = m.amax(dim=1, keepdim=True)  # (Hkv, 1, G), finite: every head has a key
    w = torch.exp(m - m_max)  # (Hkv, n_splits, G); empty splits (m = -inf) weigh 0
    num = (w[..., None] * acc).sum(dim=1)  # (Hkv, G, D)
    den = (w * l).sum(dim=1)  # (Hkv, G)
    return num / den[..., None]


def _check_decode_inputs(q, k_packed, v_packed, offsets, k_tail, v_tail, offsets_host):
    """varlen_decode_attention's argument checks, with messages that name the argument; returns
    (Hkv, G, D, n_tail, per-head packed lengths as Python ints)."""
    if q.ndim != 3:
        raise ValueError(f"q must be (Hkv, G, D), got shape {tuple(q.shape)}")
    n_kv_head, G, D = q.shape
    if n_kv_head < 1 or G < 1:
        raise ValueError(f"q must have Hkv, G >= 1, got shape {tuple(q.shape)}")
    quantized = isinstance(k_packed, quant.Quantized)
    if quantized != isinstance(v_packed, quant.Quantized):
        raise ValueError("k_packed and v_packed must both be tensors or both quant.Quantized blocks")
    if len(k_packed.shape) != 2 or k_packed.shape[1] != D:
        raise ValueError(f"k_packed must be (N, D) with D={D}, got shape {tuple(k_packed.shape)}")
    if tuple(v_packed.shape) != tuple(k_packed.shape):
        raise ValueError(f"v_packed must match k_packed {tuple(k_packed.shape)}, got {tuple(v_packed.shape)}")
    if offsets.ndim != 1 or offsets.shape[0] != n_kv_head + 1 or offsets.dtype != torch.int64:
        raise ValueError(
            f"offsets must be int64 (Hkv + 1,) = ({n_kv_head + 1},), got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if (k_tail is None) != (v_tail is None):
        raise ValueError("pass both k_tail and v_tail, or neither")
    n_tail = 0
    tensors = dict(q=q) if quantized else dict(q=q, k_packed=k_packed, v_packed=v_packed)
    if quantized:
        _check_quantized(q, k_packed, v_packed)
    if k_tail is not None:
        if k_tail.ndim != 3 or k_tail.shape[0] != n_kv_head or k_tail.shape[2] != D:
            raise ValueError(f"k_tail must be (Hkv={n_kv_head}, n_tail, D={D}), got shape {tuple(k_tail.shape)}")
        if v_tail.shape != k_tail.shape:
            raise ValueError(f"v_tail must match k_tail {tuple(k_tail.shape)}, got {tuple(v_tail.shape)}")
        n_tail = k_tail.shape[1]
        if n_tail > 0:
            for name, t in (("k_tail", k_tail), ("v_tail", v_tail)):
                if t.stride(2) != 1 or t.stride(1) != D or t.stride(0) % D != 0 or t.stride() != k_tail.stride():
                    raise ValueError(
                        f"{name} rows must be D contiguous values, the heads a whole number of rows apart "
                        f"(e.g. a slice [:, :n] of a contiguous (Hkv, capacity, D) buffer); got strides "
                        f"{t.stride()} (k_tail: {k_tail.stride()})"
                    )
        tensors.update(k_tail=k_tail, v_tail=v_tail)
    _check_common(D, strided=("k_tail", "v_tail"), **tensors)
    if offsets.device != q.device:
        raise ValueError(f"offsets is on {offsets.device}, but q is on {q.device}")
    offs = offsets.tolist() if offsets_host is None else list(offsets_host)
    lengths = [b - a for a, b in zip(offs[:-1], offs[1:])]
    if len(offs) != n_kv_head + 1 or offs[0] != 0 or offs[-1] != k_packed.shape[0] or min(lengths) < 0:
        raise ValueError(f"offsets must rise from 0 to N={k_packed.shape[0]}, got {offs}")
    if n_tail == 0 and min(lengths) == 0:
        empty = [h for h, n in enumerate(lengths) if n == 0]
        raise ValueError(f"KV heads {empty} have no keys (no packed rows and no tail): softmax undefined")
    return n_kv_head, G, D, n_tail, lengths


def _check_quantized(q, k_packed, v_packed):
    """A quantized packed cache: K and V quantized alike, in quant.Quantized's layout, on q's device,
    of q's dtype once dequantized."""
    if k_packed.bits not in quant.QUANTIZED_BITS or k_packed.shape[1] % k_packed.group:
        raise ValueError(f"k_packed must hold bits {quant.QUANTIZED_BITS} codes in whole groups, got bits {k_packed.bits}, "
                         f"group {k_packed.group}")
    if (k_packed.bits, k_packed.group) != (v_packed.bits, v_packed.group):
        raise ValueError(f"k_packed (bits {k_packed.bits}, group {k_packed.group}) and v_packed (bits "
                         f"{v_packed.bits}, group {v_packed.group}) must be quantized alike")
    N, D = k_packed.shape
    for name, qx in (("k_packed", k_packed), ("v_packed", v_packed)):
        if qx.dtype != q.dtype:
            raise ValueError(f"{name} dequantizes to {qx.dtype}, but q is {q.dtype}")
        want = dict(data=(torch.uint8, (N, D * qx.bits // 8)), scale=(torch.float16, (N, D // qx.group)),
                    zero=(torch.float16, (N, D // qx.group)))
        for part, (dtype, shape) in want.items():
            t = getattr(qx, part)
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != q.device:
                raise ValueError(f"{name}.{part} must be a contiguous {dtype} {shape} tensor on {q.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                                 + ("" if t.is_contiguous() else ", not contiguous"))


def varlen_decode_attention(q, k_packed, v_packed, offsets, k_tail=None, v_tail=None, *, offsets_host=None):
    """Attention of one new token over the compressed cache plus the dense tail.

    q: (Hkv, G, D) the new token's query heads (post-RoPE), grouped by KV head.
    k_packed, v_packed: (N, D) kept pairs of all KV heads, head-major; offsets: int64 (Hkv + 1,),
        head h owns rows offsets[h]:offsets[h+1] (a head may own none). Either tensors of q's dtype,
        or quant.Quantized blocks (int8/int4 codes + fp16 scale and zero per group), which the
        kernel dequantizes tile by tile as it reads them.
    k_tail, v_tail: (Hkv, n_tail, D) or None: tokens generated after compression, the new token's
        own K/V included. Each row must be D contiguous values (stride(1) == D, stride(2) == 1), so
        a slice [:, :n_tail] of a preallocated (Hkv, capacity, D) buffer is fine and is not copied.
    offsets_host: optional list of Python ints equal to offsets. The wrapper needs the offsets on
        the host (grid size, empty-head check); passing them saves a device-to-host copy per call.
    No mask: the new token sees every key of its head.
    Returns (Hkv, G, D) in q's dtype: softmax(q k^T / sqrt(D)) v per head, float32 inside.
    """
    n_kv_head, G, D, n_tail, lengths = _check_decode_inputs(q, k_packed, v_packed, offsets, k_tail, v_tail,
                                                            offsets_host)

    # -- partial states: packed splits in slots [0, n_split_packed), tail splits after them
    n_split_packed = triton.cdiv(max(lengths), SPLIT_N)
    n_split_tail = triton.cdiv(n_tail, SPLIT_N)
    n_splits = n_split_packed + n_split_tail
    m = torch.empty((n_kv_head, n_splits, G), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((n_kv_head, n_splits, G, D), dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N, SPLIT_N=SPLIT_N,
                DOT_PRECISION=_dot_precision(q.dtype))
    sm_scale = 1.0 / math.sqrt(D)
    if isinstance(k_packed, quant.Quantized):  # codes, and each one's scale and zero
        packed = (k_packed.data, v_packed.data, k_packed.scale, k_packed.zero, v_packed.scale, v_packed.zero)
        bits, group = k_packed.bits, k_packed.group
    else:  # floats: the scale and zero pointers are never read (BITS = 16)
        packed = (k_packed, v_packed, k_packed, k_packed, v_packed, v_packed)
        bits, group = 16, D

    # -- launch over (split, head) for the packed cache, then for the tail
    if n_split_packed > 0:
        _decode_partial_kernel[(n_split_packed, n_kv_head)](
            q, *packed, offsets[:-1], offsets[1:], m, l, acc, G, 0, n_splits, sm_scale,
            BITS=bits, GROUP=group, **meta
        )
    if n_split_tail > 0:
        # head h's tail rows start at row h * (stride(0) / D) of the tail's storage
        starts = torch.arange(n_kv_head, dtype=torch.int64, device=q.device) * (k_tail.stride(0) // D)
        _decode_partial_kernel[(n_split_tail, n_kv_head)](
            q, k_tail, v_tail, k_tail, k_tail, v_tail, v_tail, starts, starts + n_tail, m, l, acc, G,
            n_split_packed, n_splits, sm_scale, BITS=16, GROUP=D, **meta
        )

    # -- merge the splits
    return _merge_partials(m, l, acc).to(q.dtype)  # (Hkv, G, D)
