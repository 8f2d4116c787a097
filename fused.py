"""
fused.py: the CPU's fast paths, the counterpart of kernels.py (which holds the GPU's).

Everything here computes what a readable reference in kvzip.py computes, through torch's fused CPU
attention kernel, and the tests check each function against that reference on random inputs.
kvzip.py picks these paths with backend="auto" on a CPU; backend="reference" never comes here.
Only torch and quant.py are imported (no Triton), so this file runs on macOS and Windows too.

The one idea behind every function: torch's fused CPU kernel returns, beside each query row's
attention output, the row's log-sum-exp (lse) over the keys it saw. So attention over a key set
can be split into disjoint parts, each attended on its own, and merged exactly afterwards
(merge_attention); and a softmax probability needs no probability matrix: p = exp(logit - lse).

Map of this file:
  1. attention_lse, merge_attention - attention with each row's lse; the exact merge of parts
  2. scoring by reconstruction      - ScoringCache: kvzip.score_context's scores from the
                                      forward's own attention; chunk_scores_from_lse: Eq. 2 from
                                      the rows' lse (spec: kvzip.chunk_scores_reference)
  3. decoding the packed cache      - packed_attention_fused: a call per KV head (several new
                                      tokens, int8/int4 caches); DecodePlan and packed_decode: one
                                      new token over all heads in one call (spec: kvzip.packed_attention);
                                      quantized_decode: one new token over an int8/int4 cache, in
                                      blocks of code * scale with the zeros folded into the
                                      products, on several threads (a TorchScript loop each)
  4. several queries at once        - shared_attention_fused: the rows of several queries over one
                                      shared cache and their own tails (spec: kvzip.shared_attention)

Shape alphabet (as in kvzip.py, plus the pieces of section 3):
  Hkv  KV heads      G   query heads per KV head      D   head dim
  T    new tokens    S   keys of one attention call   n_q tokens of one reconstruction input
  N    rows of a layer's packed buffer (all KV heads, head-major)
  P    equal pieces of s rows each (a DecodePlan)      E   extra pieces of at most R rows each
  M    parts merged into one head's output

Why few, large calls: the commands run with OMP_WAIT_POLICY=PASSIVE (errors.passive_openmp), under
which every torch call that runs on several threads first wakes them (0.1-0.2 ms each on the
project's 2-core machine). A decode step is dozens of calls per layer, so the number of calls, not
the bytes, sets what remains above the memory-bound time.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import math

import torch
import torch.nn.functional as F

import quant

# -----------------------------------------------------------------------------
# 1. Attention with each row's log-sum-exp, and the exact merge of parts

_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attention_lse(qs, k, v, causal: bool = False, mask=None):
    """Attention that also returns each row's log-sum-exp, through torch's fused CPU kernel.

    qs (Hkv, G, T, D): queries already divided by sqrt(D) (the kernel runs with scale 1, so its
    logits are the very numbers qs @ k.T gives, and their rounding cancels in logit - lse);
    k, v (Hkv, S, D). causal: row t sees keys 0..t (S == T). mask: None, or an additive mask (0 or
    -inf) in qs's dtype that broadcasts to (Hkv, G, T, S); no row may be wholly -inf (the kernel
    then returns lse 0, not -inf). The G query heads read their KV head through a stride-0 expand,
    so K and V are never copied per query head.
    Returns out (Hkv, G, T, D) and lse (Hkv, G, T) float32 (natural log).
    """
    Hkv, G, T, D = qs.shape
    S = k.shape[1]
    if mask is not None:
        mask = mask.expand(Hkv, G, T, S)  # the kernel wants the full shape; a stride-0 view is enough
    out, lse = _flash_attention_cpu(qs, k[:, None].expand(Hkv, G, S, D), v[:, None].expand(Hkv, G, S, D),
                                    0.0, causal, attn_mask=mask, scale=1.0)[:2]
    return out, lse


def merge_attention(parts):
    """Attention over the union of disjoint key sets, from each set's (out, lse): (out, lse).

    Each part's output is weighted by its share of the total softmax mass, exp(lse_part - lse): a
    softmax over the parts' lse, taken like any softmax from the largest one. The parts are added
    one at a time, not stacked: during scoring each is as large as the layer's attention output,
    so the merge holds two outputs' worth of memory, whatever the number of parts.
    """
    top = torch.stack([l for _, l in parts]).amax(dim=0).unsqueeze(-1)  # (..., 1)
    out = den = None
    for o, l in parts:
        w = torch.exp(l.unsqueeze(-1) - top)  # (..., 1), in (0, 1]
        out = w * o if out is None else out.addcmul_(w, o)  # (..., D)
        den = w if den is None else den + w
    return out / den, (top + torch.log(den)).squeeze(-1)


# -----------------------------------------------------------------------------
# 2. Scoring by reconstruction inside the forward's own attention
#
# kvzip.score_context's reference path computes every logit of K' twice: once in the model's
# attention (which sees the whole cache) and again in the scorer, which also materializes, masks
# and normalizes a (G, n_q, |K'|) probability matrix per KV head. Here the forward's attention is
# split over three disjoint key sets, A = [prefix ; chunk] and B = the input's own keys (causal),
# which make up K', and C = the other chunks. Their merge is the forward's attention output, and
# logaddexp(lse_A, lse_B) is each row's lse over K'; the scorer then needs only the chunk columns'
# logits: S[j] = exp(max over rows of (logit - lse)). Scoring then costs about 1.4 prefills on the
# default model instead of 3.5-4.9 (bench.py's scoring row measures it).

def chunk_scores_from_lse(qs, k_chunk, lse, block: int = 256):
    """S[h, j] = exp(max over g, t of (qs[h,g,t] . k_chunk[h,j] - lse[h,g,t])): Eq. 2 from each row's
    log-sum-exp over K', without a probability matrix.

    qs (Hkv, G, n_q, D) scaled queries; k_chunk (Hkv, n_chunk, D); lse (Hkv, G, n_q).
    One (D+1)-wide product gives logit - lse directly: [qs_t, -lse_t] . [k_j, 1]. Keys go on the
    long side of the product, (block, D+1) @ (D+1, G*n_q), `block` keys at a time, so the working
    set is one (block, G*n_q) float32 tile and the max runs along contiguous memory. A score is exp
    of a difference of two float32 numbers of the size of the largest logit, so it carries about
    one ulp of that logit (7.6e-6 at 64), as the Triton kernel does. Returns (Hkv, n_chunk) float32.
    """
    Hkv, G, n_q, D = qs.shape
    n_chunk = k_chunk.shape[1]
    q_aug = torch.cat([qs.float().reshape(Hkv, G * n_q, D), -lse.reshape(Hkv, G * n_q, 1)], dim=-1)  # (Hkv, G*n_q, D+1)
    k_aug = torch.cat([k_chunk.float(), k_chunk.new_ones(Hkv, n_chunk, 1, dtype=torch.float32)], dim=-1)  # (Hkv, n_chunk, D+1)
    best = torch.empty(Hkv, n_chunk, dtype=torch.float32, device=qs.device)
    for h in range(Hkv):
        q_t = q_aug[h].T  # (D+1, G*n_q)
        for j in range(0, n_chunk, block):
            best[h, j:j + block] = (k_aug[h, j:j + block] @ q_t).amax(dim=-1)  # max of logit - lse
    return best.exp_()  # (Hkv, n_chunk)


class ScoringCache:
    """Stands in for the full cache while one chunk's reconstruction input runs (it follows the part
    of the cache protocol that Transformer.forward uses), and scores the chunk on the way.

    In every layer the input's queries attend over the full cache and their own keys as three key
    sets, each through `attention_lse`: A = [prefix ; chunk i] and B = the input's own keys
    (causal) make up K'; C = the other chunks. The output merges all three: the same attention as
    the dense cache's. The lse over K' is logaddexp(lse_A, lse_B), and chunk_scores_from_lse turns
    it into the chunk's scores, written into scores[layer, :, start:end]. The input's K/V are never
    stored: the full cache is only read.
    """

    def __init__(self, cache, n_prefix: int, start: int, end: int, scores):
        self.cache, self.n_prefix, self.start, self.end, self.scores = cache, n_prefix, start, end, scores
        self.seq_len = cache.seq_len  # n_p + n_c: the input's positions continue from here

    def reserve(self, n: int):
        pass  # nothing is stored

    def advance(self, n: int):
        pass

    def attend(self, layer: int, q, k, v):
        """q (Hkv, G, T, D); k, v (Hkv, T, D): the input's own. Returns (Hkv, G, T, D)."""
        K, V = self.cache.keys(layer), self.cache.values(layer)  # (Hkv, n_p + n_c, D)
        n_p, a, b = self.n_prefix, self.n_prefix + self.start, self.n_prefix + self.end  # chunk rows a..b-1

        def rows(t, spans):  # the rows of t in the given (from, to) spans: a view if they touch
            pieces = [t[:, i:j] for i, j in spans if j > i]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

        qs = q / math.sqrt(q.shape[-1])  # (Hkv, G, T, D)
        in_k_prime = [(0, n_p), (a, b)]  # prefix and this chunk
        A = attention_lse(qs, rows(K, in_k_prime), rows(V, in_k_prime))
        B = attention_lse(qs, k, v, causal=True)
        parts = [A, B]
        others = [(n_p, a), (b, K.shape[1])]  # the chunks before and after this one
        if any(j > i for i, j in others):
            parts.append(attention_lse(qs, rows(K, others), rows(V, others)))
        out, _ = merge_attention(parts)
        lse = torch.logaddexp(A[1], B[1])  # (Hkv, G, T): over K' only
        self.scores[layer, :, self.start:self.end] = chunk_scores_from_lse(qs, K[:, a:b], lse)
        return out.to(q.dtype)


# -----------------------------------------------------------------------------
# 3. Decoding over the packed cache

def packed_attention_fused(q, k_packed, v_packed, bounds, tail_k, tail_v):
    """kvzip.packed_attention through torch's fused CPU attention: same arguments, same result.

    The keys are split into disjoint sets; `attention_lse` gives each set's attention with its row
    log-sum-exps, and `merge_attention` joins them exactly, once, at the end:
      - the tail: its older rows (seen by every new row) and the T new rows (causal);
      - each head's kept rows, with the group's G query heads folded into G * T rows of one head,
        so that each K/V row is read once for the whole group. One new token has only G rows per
        head, too few to share among threads, so each head's rows are cut into `pieces` equal
        pieces, each a "head" of one call (views, no copy); the n_h % pieces rows left over are
        one-key sets (a single key's lse is its logit, its output its value row).
    Used for several new tokens (a query's prompt) and for int8/int4 caches, whose rows are
    dequantized one head at a time (quant.packed_rows). Returns (Hkv, G, T, D).
    """
    Hkv, G, T, D = q.shape
    qs = q / math.sqrt(D)  # (Hkv, G, T, D)
    parts = []  # (out (Hkv, G, T, D), lse (Hkv, G, T)) of disjoint key sets
    n_tail = tail_k.shape[1]  # 0 only when the new tokens' K/V are already packed rows (bench.py)
    if n_tail:
        n_old = n_tail - T  # tail rows from earlier calls: visible to every new row
        parts.append(attention_lse(qs, tail_k[:, n_old:], tail_v[:, n_old:], causal=T > 1))
        if n_old:
            parts.append(attention_lse(qs, tail_k[:, :n_old], tail_v[:, :n_old]))
    # one token: two pieces per thread, so that a thread done early takes another; many rows
    # already keep every thread busy
    pieces = 2 * torch.get_num_threads() if T == 1 else 1
    outs, lses, left_k, left_v = [], [], [], []
    for h in range(Hkv):
        kh = quant.packed_rows(k_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        vh = quant.packed_rows(v_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        size = kh.shape[0] // pieces  # rows per piece
        rows = qs[h].reshape(1, 1, G * T, D).expand(pieces, 1, G * T, D)  # the group as rows of one head
        if size:
            o, l = attention_lse(rows, kh[:pieces * size].view(pieces, size, D),
                                 vh[:pieces * size].view(pieces, size, D))  # (pieces, 1, G*T, D), (pieces, 1, G*T)
        else:  # fewer rows than pieces: all of them are left over
            o, l = rows.new_zeros(rows.shape), torch.full(rows.shape[:-1], -math.inf, device=q.device)
        outs.append(o)
        lses.append(l)
        left_k.append(kh[pieces * size:])  # (n_h % pieces, D)
        left_v.append(vh[pieces * size:])
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)  # (pieces, Hkv, G*T, D), (pieces, Hkv, G*T)
    parts += zip(out.view(pieces, Hkv, G, T, D), lse.view(pieces, Hkv, G, T))
    n_left = [len(k) for k in left_k]
    if any(n_left):  # T == 1 here: with one piece nothing is left over
        R = pieces - 1  # at most R rows per head, padded to R with empty (-inf) sets
        lk = torch.stack([F.pad(k, (0, 0, 0, R - len(k))) for k in left_k])  # (Hkv, R, D)
        lv = torch.stack([F.pad(v, (0, 0, 0, R - len(v))) for v in left_v])  # (Hkv, R, D)
        logit = (qs[:, :, 0, None] * lk[:, None]).sum(-1).float()  # (Hkv, G, R): a lone key's lse
        real = torch.arange(R, device=q.device) < torch.tensor(n_left, device=q.device)[:, None]  # (Hkv, R)
        logit = logit.masked_fill(~real[:, None], -math.inf)
        parts += [(lv[:, None, i, None].expand(Hkv, G, 1, D), logit[:, :, i, None]) for i in range(R)]
    return merge_attention(parts)[0].to(q.dtype)


# One new token over a layer's packed rows in one fused call: the CPU's decode step (16-bit caches).
#
# packed_attention_fused makes a call per KV head, because heads keep different numbers of rows and
# one call takes equal pieces of one tensor. A compressed layer's packed rows never change, so they
# are cut once, when the cache is built, into equal pieces that ignore head boundaries (a
# DecodePlan), and every decode step attends over all heads' rows in one call, plus one for the few
# rows the pieces leave out and one for the tail.

DECODE_PIECES = 256  # pieces per layer: enough to keep any thread count busy, few enough to merge cheaply
EXTRA_ROWS = 32  # rows per extra piece (see DecodePlan)


def plan_piece_size(bounds, n_pieces: int) -> int:
    """The piece size s of a DecodePlan over rows 0 .. N - 1, N = bounds[-1]: the size from N // n_pieces
    to 25% above it that leaves the fewest rows to the plan's extra pieces. A head boundary at row b
    inside a piece hands the smaller side of the piece, min(b % s, s - b % s) rows, to an extra
    piece; so do the N % s rows past the last piece."""
    N = bounds[-1]
    lo = max(1, N // n_pieces)
    left_over = lambda s: sum(min(b % s, s - b % s) for b in bounds[1:-1]) + N % s  # noqa: E731
    return min(range(lo, lo + lo // 4 + 1), key=left_over)


class DecodePlan:
    """How one new token attends over a layer's packed rows (N, D), cut once into equal pieces.

    Piece p is rows p*s .. p*s + s - 1 of the packed buffer, a view (no copy), p < P = N // s. The
    query heads of the KV head owning the piece's middle row attend over it (`heads`, (P,)). Where
    a head boundary falls inside a piece, the other heads' rows in it are hidden from those queries
    by -inf in `mask` (P, s), and copied into extra pieces of at most EXTRA_ROWS rows of one head
    each (`extra_k`, `extra_v` (E, R, D), zero-padded to R rows and hidden again by `extra_mask`
    (E, R); their heads `extra_heads` (E,)). The N - P*s rows past the last piece go to extra
    pieces too. So every packed row is attended exactly once, by its own head's queries.
    Memory (`nbytes`, which CompressedKV.nbytes counts): the mask, 1/(2D) of the layer's K and V
    bytes in the same dtype, and the copied rows, which the choice of s keeps few (about 1% of the
    layer's bytes in all at bench.py's Llama-3.1-8B geometry).
    """

    def __init__(self, k_packed, v_packed, bounds, n_pieces: int = DECODE_PIECES):
        N, D = bounds[-1], k_packed.shape[1]
        s = plan_piece_size(bounds, n_pieces)
        P = N // s
        head_of = lambda row: bisect.bisect_right(bounds, row) - 1  # noqa: E731 (empty heads are skipped)
        heads = [head_of(p * s + s // 2) for p in range(P)]
        mask = torch.zeros(P, s, dtype=k_packed.dtype, device=k_packed.device)
        runs = []  # (head, first row, end row): the rows for the extra pieces
        for h in range(len(bounds) - 1):
            a, b = bounds[h], bounds[h + 1]
            if a == b:  # a head that kept nothing
                continue
            for p in range(a // s, min(P, (b - 1) // s + 1)):  # the pieces holding rows of head h
                if heads[p] != h:
                    lo, hi = max(a, p * s), min(b, p * s + s)
                    mask[p, lo - p * s:hi - p * s] = -math.inf
                    runs.append((h, lo, hi))
            if b > P * s:  # rows past the last piece
                runs.append((h, max(a, P * s), b))
        # the runs in extra pieces of at most EXTRA_ROWS rows: the zero padding stays short
        extra = [(h, a, min(hi, a + EXTRA_ROWS)) for h, lo, hi in runs for a in range(lo, hi, EXTRA_ROWS)]
        R = min(EXTRA_ROWS, max([hi - lo for _, lo, hi in runs], default=0))
        self.extra_k = k_packed.new_zeros(len(extra), R, D)
        self.extra_v = v_packed.new_zeros(len(extra), R, D)
        self.extra_mask = torch.full((len(extra), R), -math.inf, dtype=k_packed.dtype, device=k_packed.device)
        for i, (_, lo, hi) in enumerate(extra):
            self.extra_k[i, :hi - lo] = k_packed[lo:hi]
            self.extra_v[i, :hi - lo] = v_packed[lo:hi]
            self.extra_mask[i, :hi - lo] = 0
        self.size, self.n_pieces, self.mask = s, P, mask
        self.heads = torch.tensor(heads, dtype=torch.int64, device=k_packed.device)  # (P,)
        self.extra_heads = torch.tensor([h for h, _, _ in extra], dtype=torch.int64, device=k_packed.device)  # (E,)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.mask, self.heads, self.extra_k, self.extra_v, self.extra_mask, self.extra_heads))


def merge_by_head(out, lse, head, n_heads: int):
    """merge_attention for many parts that each belong to one of n_heads heads, in a few ops:
    out (M, G, D), lse (M, G), head (M,) -> (n_heads, G, D). Each part's weight is its softmax
    mass relative to the largest lse of its head; a (n_heads, M) 0/1 matrix sums each head's parts."""
    M, G = lse.shape
    top = torch.full((n_heads, G), -math.inf, device=lse.device).scatter_reduce(
        0, head[:, None].expand(M, G), lse, "amax")  # (n_heads, G): each head's largest lse
    w = torch.exp(lse - top[head])  # (M, G), in (0, 1]
    onehot = (head[None, :] == torch.arange(n_heads, device=head.device)[:, None]).to(w.dtype)  # (n_heads, M)
    num = onehot @ (w[:, :, None] * out.float()).reshape(M, -1)  # (n_heads, G * D)
    return num.view(n_heads, G, -1) / (onehot @ w)[..., None]


def packed_decode(q, k_packed, v_packed, plan: DecodePlan, tail_k, tail_v):
    """kvzip.packed_attention for one new token (T == 1) over a DecodePlan of the packed rows: one
    fused call over the plan's P pieces, one over its extra pieces, one over the tail, one merge.
    q (Hkv, G, 1, D); k_packed, v_packed (N, D) tensors; tail_k, tail_v (Hkv, n_tail, D), the new
    token's row included. Returns (Hkv, G, 1, D)."""
    Hkv, G, _, D = q.shape
    qs = q.view(Hkv, G, D) / math.sqrt(D)
    P, s = plan.n_pieces, plan.size
    parts = []  # (out (n, G, D), lse (n, G), head (n,)) of disjoint key sets
    if P:  # the G query rows of each piece's head, as the rows of one head: qs[heads] (P, 1, G, D)
        o, l = attention_lse(qs[plan.heads][:, None], k_packed[:P * s].view(P, s, D),
                             v_packed[:P * s].view(P, s, D), mask=plan.mask[:, None, None])  # (P, 1, G, D), (P, 1, G)
        parts.append((o[:, 0], l[:, 0], plan.heads))
    if len(plan.extra_heads):
        o, l = attention_lse(qs[plan.extra_heads][:, None], plan.extra_k, plan.extra_v,
                             mask=plan.extra_mask[:, None, None])  # (E, 1, G, D), (E, 1, G)
        parts.append((o[:, 0], l[:, 0], plan.extra_heads))
    if tail_k.shape[1]:
        o, l = attention_lse(qs[:, None], tail_k, tail_v)  # (Hkv, 1, G, D), (Hkv, 1, G)
        parts.append((o[:, 0], l[:, 0], torch.arange(Hkv, device=q.device)))
    out = merge_by_head(*(torch.cat(x) for x in zip(*parts)), Hkv)  # (Hkv, G, D)
    return out.to(q.dtype).view(Hkv, G, 1, D)


# One new token over an int8/int4 cache (quant.Quantized blocks): the CPU's decode step.
#
# Each head's rows are taken QUANT_BLOCK rows at a time. A block's codes times their scales go into
# two float32 buffers that stay in cache (quant.scaled_codes_into: one conversion and one multiply
# per value), and the block is attended with plain matrix products, which let each group's zero in
# without a pass over the block:
#     logit[i, n] = q_i . (s * c)_n + sum over groups g of zk[n, g] * (sum of q_i over g's columns)
#     out[i]      = sum_n p[i, n] (s * c)_n  +  (sum_n p[i, n] zv[n, g]) on every column of group g
# (p = exp(logit - max), the softmax's numerator; the blocks' parts are merged at the end).
#
# The blocks are shared out to torch.get_num_threads() Python threads, each running torch on one
# thread, and each running its share in one TorchScript loop (attend_blocks), which holds no GIL.
# Why not torch's own threads over each block's ops: every op then wakes the other threads
# (OMP_WAIT_POLICY=PASSIVE, see the top of this file), and a layer is hundreds of such ops. Why
# not plain Python threads: they take turns on the GIL between ops, so two were no faster than one.

QUANT_BLOCK = 4096  # rows per block: its float32 K and V (2 MiB each at D = 128) stay in cache


def attend_blocks(blocks: list[int], first: int, step: int, q_parts: list[torch.Tensor], q_zero: torch.Tensor,
                  k: list[torch.Tensor], v: list[torch.Tensor], bits: int, group: int, rows: int,
                  outs: torch.Tensor, tops: torch.Tensor, totals: torch.Tensor):
    """Blocks first, first + step, ... of `blocks` (head, first row, rows: three ints each), one
    new token's G query rows over each; TorchScript (see above). q_parts: the scaled query
    (Hkv, G, D), or for int4 its even and odd columns (Hkv, G, D/2) each; q_zero (Hkv, G, n_groups):
    its sum over each group's columns; k, v: [codes, scale, zero] of the layer's packed rows.
    Writes block i's unnormalized output into outs[i] (G, D), its max logit into tops[i] and its
    sum of exp(logit - max) into totals[i] (G,)."""
    G, D = outs.shape[1], outs.shape[2]
    n_groups = D // group
    shape = [2, 0, D // 2] if bits == 4 else [0, D]  # one block's buffer; 0: its rows
    kb, vb = torch.empty(rows * D), torch.empty(rows * D)  # this thread's buffers
    for i in range(first, len(blocks) // 3, step):
        h, a, n = blocks[3 * i], blocks[3 * i + 1], blocks[3 * i + 2]
        shape[-2] = n
        kf = quant.scaled_codes_kernel(kb[:n * D].view(shape), k[0][a:a + n], k[1][a:a + n], bits, group)
        logit = q_zero[h] @ k[2][a:a + n].float().t()  # (G, n): the key zeros' share
        if bits == 4:  # + q . (code * scale), part by part
            logit.addmm_(q_parts[0][h], kf[0].t()).addmm_(q_parts[1][h], kf[1].t())
        else:
            logit.addmm_(q_parts[0][h], kf.t())
        top = logit.amax(dim=1, keepdim=True)  # (G, 1)
        p = logit.sub_(top).exp_()  # (G, n)
        tops[i] = top[:, 0]
        totals[i] = p.sum(dim=1)
        vf = quant.scaled_codes_kernel(vb[:n * D].view(shape), v[0][a:a + n], v[1][a:a + n], bits, group)
        if bits == 4:  # the parts' outputs interleaved back: column 2j from part 0, 2j + 1 from part 1
            o = torch.stack([p @ vf[0], p @ vf[1]], dim=-1).view(G, n_groups, group)
        else:
            o = (p @ vf).view(G, n_groups, group)
        torch.add(o, (p @ v[2][a:a + n].float()).unsqueeze(2), out=outs[i].view(G, n_groups, group))  # + value zeros


attend_blocks = quant.script(attend_blocks)
SCRIPTED = isinstance(attend_blocks, torch.jit.ScriptFunction)  # else one thread: plain Python would wait on the GIL
_pool, _pool_size = None, 0  # the decode's worker threads (concurrent.futures), made on first use


def run_on_threads(fn, workers: int):
    """fn(0), ..., fn(workers - 1) at once, on this thread and workers - 1 from a pool, each running
    torch on one thread; returns when all are done. torch.set_num_threads is per thread for OpenMP,
    but it also sets a process-wide count (MKL's, and the one new threads start with): that is put
    back before returning, whatever happens."""
    global _pool, _pool_size
    if _pool_size < workers - 1:
        _pool, _pool_size = concurrent.futures.ThreadPoolExecutor(workers - 1, thread_name_prefix="decode"), workers - 1
    before = torch.get_num_threads()

    def one_thread(w):
        torch.set_num_threads(1)
        fn(w)

    try:
        others = [_pool.submit(one_thread, w) for w in range(1, workers)]
        one_thread(0)
        for f in others:
            f.result()  # re-raises a worker's exception
    finally:
        torch.set_num_threads(before)


def quantized_decode(q, k_packed, v_packed, bounds, tail_k, tail_v, block: int = QUANT_BLOCK,
                     workers: int | None = None):
    """kvzip.packed_attention for one new token (T == 1) over quant.Quantized k_packed, v_packed
    (N rows, head h in rows bounds[h] .. bounds[h+1] - 1): same arguments, same result.

    Each head's rows are cut into near-equal blocks of at most `block` rows, block i going to thread
    i % workers (default torch.get_num_threads()), which holds two float32 buffers of one block.
    q (Hkv, G, 1, D); tail_k, tail_v (Hkv, n_tail, D). Returns (Hkv, G, 1, D) in q's dtype; the
    arithmetic is float32.
    """
    Hkv, G, _, D = q.shape
    bits, g = k_packed.bits, k_packed.group
    if (bits == 4 and g % 2) or (v_packed.bits, v_packed.group) != (bits, g):
        # an odd group does not split into the int4 parts; K and V quantized alike (as CompressedKV
        # does) share one loop. Neither happens by default: the per-head path, same result
        return packed_attention_fused(q, k_packed, v_packed, bounds, tail_k, tail_v)
    qs = q.view(Hkv, G, D).float() / math.sqrt(D)  # (Hkv, G, D)
    q_zero = qs.view(Hkv, G, D // g, g).sum(-1)  # (Hkv, G, n_groups): what each key zero adds per unit
    # the query in the buffers' column parts (quant.scaled_codes_into): int8 one, int4 two
    q_parts = [qs[..., 0::2].contiguous(), qs[..., 1::2].contiguous()] if bits == 4 else [qs]
    blocks = []  # (head, first row, rows) of every block
    for h in range(Hkv):
        a, b = bounds[h], bounds[h + 1]
        if b > a:
            size = -(-(b - a) // -(-(b - a) // block))  # near-equal blocks of at most `block` rows
            blocks += [(h, r, min(size, b - r)) for r in range(a, b, size)]
    M = len(blocks)
    outs, tops, totals = torch.empty(M, G, D), torch.empty(M, G), torch.empty(M, G)  # per block
    flat = [x for blk in blocks for x in blk]
    k, v = [k_packed.data, k_packed.scale, k_packed.zero], [v_packed.data, v_packed.scale, v_packed.zero]
    rows = max((n for _, _, n in blocks), default=0)
    threads = min(workers or (torch.get_num_threads() if SCRIPTED else 1), M)

    def share(first: int):  # blocks first, first + threads, ...
        attend_blocks(flat, first, threads, q_parts, q_zero, k, v, bits, g, rows, outs, tops, totals)

    if threads > 1:
        run_on_threads(share, threads)
    elif M:
        share(0)
    heads = torch.tensor([h for h, _, _ in blocks], dtype=torch.int64)  # (M,)
    parts = [(outs / totals[..., None], tops + totals.log(), heads)]  # (M, G, D), (M, G): each block's attention
    if tail_k.shape[1]:
        o, l = attention_lse(qs[:, None], tail_k.float(), tail_v.float())  # (Hkv, 1, G, D), (Hkv, 1, G)
        parts.append((o[:, 0], l[:, 0], torch.arange(Hkv)))
    out = merge_by_head(*(torch.cat(x) for x in zip(*parts)), Hkv)  # (Hkv, G, D)
    return out.to(q.dtype).view(Hkv, G, 1, D)


# -----------------------------------------------------------------------------
# 4. Several queries' rows over one shared cache (kvzip.BatchedTails)

def shared_attention_fused(q, ctx_k, ctx_v, tail_k, tail_v, visible):
    """kvzip.shared_attention through torch's fused CPU attention: same arguments, same result.

    q (Hkv, G, T, D); ctx_k[h], ctx_v[h] (n_h, D); tail_k, tail_v (Hkv, n_tail, D); visible
    (T, n_tail) bool. The tail is one call with an additive mask (each row sees at least itself,
    so no row is wholly masked). Each head's context rows are cut into equal pieces, each a "head"
    of one call over the G * T rows (views, no copy), so that every thread has a piece; the few rows
    left over are one more call. A head's parts are merged exactly (merge_attention).
    Returns (Hkv, G, T, D).
    """
    Hkv, G, T, D = q.shape
    qs = q / math.sqrt(D)  # (Hkv, G, T, D)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, -math.inf)
    tail_out, tail_lse = attention_lse(qs, tail_k, tail_v, mask=mask)  # (Hkv, G, T, D), (Hkv, G, T)
    pieces = 2 * torch.get_num_threads()
    outs = []
    for h in range(Hkv):
        rows = qs[h].reshape(1, 1, G * T, D)  # the group's rows as the rows of one head
        kh, vh = ctx_k[h], ctx_v[h]
        size = kh.shape[0] // pieces
        parts = [(tail_out[h].reshape(G * T, D), tail_lse[h].reshape(G * T))]
        if size:
            o, l = attention_lse(rows.expand(pieces, 1, G * T, D), kh[:pieces * size].view(pieces, size, D),
                                 vh[:pieces * size].view(pieces, size, D))  # (pieces, 1, G*T, D), (pieces, 1, G*T)
            parts += zip(o[:, 0], l[:, 0])
        if kh.shape[0] > pieces * size:
            o, l = attention_lse(rows, kh[None, pieces * size:], vh[None, pieces * size:])  # (1, 1, G*T, D)
            parts.append((o[0, 0], l[0, 0]))
        outs.append(merge_attention(parts)[0].view(G, T, D))
    return torch.stack(outs).to(q.dtype)
