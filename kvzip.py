"""
KVzip: query-agnostic KV cache compression with context reconstruction, in one readable file.

Kim, Kim, Kwon, Lee, Yun, Song. "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", NeurIPS 2025, https://arxiv.org/abs/2505.23416 (authors' code: snu-mllab/KVzip).
The algorithm, prompts and parameters followed here are spelled out in shared/KVZIP.md.

The idea: prefill a context once; ask the model to repeat it; every cached KV pair gets the highest
attention it receives while the model repeats the context (Eq. 2). Pairs the model never looks at
while reconstructing the context are not needed for any later question, so the lowest-scored ones
are evicted once and the compressed cache serves every future query with no further prefill.

Map of this file:
  1. chunk_scores_reference - Eq. 2 for one context chunk, materializing the attention matrix (the spec)
  2. prefill                - prefix + context into a full cache, then scoring by reconstruction -> FullKV
  3. keep_mask / FullKV.prune - eviction: one global ranking (non-uniform head budgets) or per head
  4. CompressedKV           - the packed cache: per layer one buffer of the kept K/V of all KV heads
  5. generate               - greedy answers from a full or compressed cache, which stays unchanged
  6. query-aware baselines  - SnapKV, PyramidKV, H2O, StreamingLLM and random scores, for comparison
  7. a small demo: `python kvzip.py`

Shape alphabet (one sequence, no batch dimension):
  L    layers                        Hkv  KV heads        G   query heads per KV head
  D    head dim                      n_p  prefix tokens   n_c context tokens
  n_q  tokens of one reconstruction input (prompt + postfix + chunk)

Left out on purpose: batching several contexts, and the authors' other eviction granularities
(KVzip's "head-level" variant that evicts whole heads).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import model as model_lib

# Reconstruction prompts (KVZIP.md, "Pipeline", step 2). Each is encoded on its own.
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
N_OVERLAP = 8  # the next prompt quotes the last 8 token ids of the previous chunk
CHUNK_SIZE = 2000  # context tokens scored per reconstruction pass (the paper's m)


# -----------------------------------------------------------------------------
# 1. The reference scorer: the spec that every fast path is tested against

def chunk_scores_reference(q, k, n_sink: int, n_chunk: int):
    """Eq. 2 of the paper for one chunk: the max attention each chunk key receives.

    q: (Hkv, G, n_q, D) post-RoPE queries of the reconstruction input, grouped by KV head.
    k: (Hkv, n_sink + n_chunk + n_q, D) the reduced key set K' = [prefix ; chunk ; input's own keys].
    Returns (Hkv, n_chunk) float32:  S[h, j] = max over g, t of softmax_j'(q[h,g,t] . k[h,j'] / sqrt(D)).

    The causal mask applies only between input queries and input keys: row t sees input keys 0..t.
    This materializes the probability matrix of one KV head at a time, G * n_q * |K'| floats: for
    Llama-3.1-8B (G = 4) and a 2000-token chunk that is 4 * 2030 * 4070 * 4 B = 132 MB, 1.06 GB for
    the layer's 8 KV heads; without chunking a 124k context would need 32 * 124k^2 * 4 B = 2 TB per
    layer. Hence the chunks here and the Triton kernel (kernels.chunk_max_scores), which never
    holds the matrix.
    """
    Hkv, G, n_q, D = q.shape
    n_keys = k.shape[1]
    assert n_keys == n_sink + n_chunk + n_q, (k.shape, n_sink, n_chunk, n_q)
    t = torch.arange(n_q, device=q.device)[:, None]  # query row
    j = torch.arange(n_keys, device=q.device)[None, :] - (n_sink + n_chunk)  # input-key index (<0: cached)
    future = j > t  # (n_q, n_keys): input keys after the row, masked; every cached key is visible
    scores = torch.empty(Hkv, n_chunk, dtype=torch.float32, device=q.device)
    qs = q.float() / math.sqrt(D)  # scale the queries once, not each (G, n_q, n_keys) matrix
    for h in range(Hkv):
        logits = qs[h] @ k[h].float().T  # (G, n_q, n_keys)
        probs = torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)  # float32
        chunk_probs = probs[:, :, n_sink:n_sink + n_chunk]  # (G, n_q, n_chunk)
        scores[h] = chunk_probs.amax(dim=(0, 1))  # max over the group and the query rows
    return scores  # (Hkv, n_chunk)


def chunk_scores(q, k, n_sink, n_chunk, backend: str):
    """Dispatch to the reference scorer or the Triton kernel (same signature, same result)."""
    if backend == "reference":
        return chunk_scores_reference(q, k, n_sink, n_chunk)
    if backend == "triton":
        import kernels
        return kernels.chunk_max_scores(q.contiguous(), k.contiguous(), n_sink, n_chunk)
    raise ValueError(f"unknown scoring backend {backend!r}; use 'reference' or 'triton'")


# -----------------------------------------------------------------------------
# 2. Prefill and scoring by context reconstruction

class FullKV:
    """The uncompressed cache of prefix + context, plus KVzip's scores of every context pair.

    cache:  model.KVCache holding n_p + n_c positions (keys post-RoPE)
    scores: (L, Hkv, n_c) float32, or None if scoring was skipped
    It stays available after pruning, so several ratios can be tried from one prefill and one
    scoring pass: each prune(r) builds a new CompressedKV.
    """

    def __init__(self, cache, scores, n_prefix: int, context_ids: list[int]):
        self.cache, self.scores = cache, scores
        self.n_prefix, self.n_context = n_prefix, len(context_ids)
        self.context_ids = context_ids

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def prune(self, ratio: float, uniform: bool = False, scores=None, layer_budgets=None) -> "CompressedKV":
        """Keep `ratio` of the context's KV pairs (prefix always kept): a new compressed cache.

        scores: (L, Hkv, n_c) to rank by; default KVzip's own. layer_budgets: per-layer counts
        (PyramidKV); otherwise one global ranking, or per-head budgets when uniform.
        """
        scores = self.scores if scores is None else scores
        if scores is None:
            raise ValueError("this FullKV has no scores (prefill(..., score=False)); pass scores=")
        keep = keep_mask(scores, ratio, uniform=uniform, layer_budgets=layer_budgets)
        return CompressedKV.from_full(self.cache, self.n_prefix, keep)


def check_ratio(ratio):
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of context pairs kept), got {ratio!r}")


def reconstruction_inputs(tok, context_ids: list[int], chunk_size: int = CHUNK_SIZE):
    """The reconstruction input of each chunk: [(start, end, ids)], ids = prompt + postfix + chunk.

    Chunk i covers context positions [start, end). Chunk 0 is asked to "repeat the previous
    context"; later chunks to repeat "starting with" the last 8 token ids of the previous chunk
    (the ids themselves, not re-tokenized text).
    """
    postfix = tok.encode(tok.postfix)
    first, nxt = tok.encode(FIRST_PROMPT), tok.encode(NEXT_PROMPT)
    out = []
    for start in range(0, len(context_ids), chunk_size):
        end = min(start + chunk_size, len(context_ids))
        prompt = first if start == 0 else nxt + context_ids[start - N_OVERLAP:start]
        out.append((start, end, prompt + postfix + context_ids[start:end]))
    return out


@torch.no_grad()
def score_context(m, tok, cache, n_prefix: int, context_ids, chunk_size=CHUNK_SIZE, backend="auto"):
    """KVzip scores (L, Hkv, n_c) of the context pairs in `cache`, by context reconstruction.

    Each chunk's reconstruction input runs through the model on top of the full cache at positions
    after prefix + context (the model's own attention sees the whole cache as usual). In every layer
    the `observe` hook scores the chunk's cached keys against the reduced key set
    K' = [prefix ; chunk ; input]. The input's K/V is removed afterwards: the cache is left as found.
    """
    if backend == "auto":
        backend = "triton" if cache.k[0].is_cuda else "reference"
    cfg = m.cfg
    n_c = len(context_ids)
    base = cache.seq_len  # n_p + n_c
    scores = torch.zeros(cfg.n_layer, cfg.n_kv_head, n_c, dtype=torch.float32, device=m.device)
    for start, end, ids in reconstruction_inputs(tok, context_ids, chunk_size):

        def observe(layer, q, k):  # q (Hkv, G, n_q, D), k (Hkv, n_q, D): the input's own
            cached = cache.keys(layer)  # (Hkv, n_p + n_c, D); the input is not stored yet
            keys = torch.cat([cached[:, :n_prefix],
                              cached[:, n_prefix + start:n_prefix + end], k], dim=1)  # (Hkv, |K'|, D)
            scores[layer, :, start:end] = chunk_scores(q, keys, n_prefix, end - start, backend)

        m(torch.tensor(ids, device=m.device), cache, last_only=True, observe=observe)
        cache.truncate(base)  # drop the reconstruction input's K/V
    return scores


def max_reconstruction_len(tok, chunk_size=CHUNK_SIZE) -> int:
    """Longest reconstruction input, so prefill can check the context leaves room for it."""
    return len(tok.encode(NEXT_PROMPT)) + N_OVERLAP + len(tok.encode(tok.postfix)) + chunk_size


@torch.no_grad()
def prefill(m, tok, context: str, chunk_size: int = CHUNK_SIZE, backend: str = "auto",
            score: bool = True, prefill_chunk: int = 1024) -> FullKV:
    """Prefill the template prefix and the context into a full cache, then score it (KVzip).

    backend: "reference" (readable torch, the default on CPU), "triton" (the fused kernel, the
    default on CUDA) or "auto". score=False skips scoring (for the baselines, which score themselves).
    """
    if not isinstance(context, str) or not context.strip():
        raise ValueError("empty context: nothing to prefill and compress")
    if chunk_size < N_OVERLAP:
        raise ValueError(f"chunk_size must be at least {N_OVERLAP}, got {chunk_size}")
    # Encode each piece on its own and concatenate the ids: byte-level BPE merges across seams,
    # so a joined string would give other ids, other positions and other scores (KVZIP.md).
    prefix_ids, context_ids = tok.encode(tok.prefix), tok.encode(context)
    n_p, n_c = len(prefix_ids), len(context_ids)
    room = max_reconstruction_len(tok, min(chunk_size, n_c)) if score else 0
    limit = m.cfg.max_position_embeddings
    if n_p + n_c + room > limit:
        raise ValueError(f"context too long: {n_c} tokens; with the {n_p}-token prefix and "
                         f"{room} tokens for reconstruction it exceeds the model's "
                         f"{limit}-token limit (at most {limit - n_p - room} context tokens)")
    cache = m.new_cache(capacity=n_p + n_c + room)
    model_lib.prefill(m, prefix_ids + context_ids, cache, chunk_size=prefill_chunk)
    scores = score_context(m, tok, cache, n_p, context_ids, chunk_size, backend) if score else None
    return FullKV(cache, scores, n_p, context_ids)


# -----------------------------------------------------------------------------
# 3. Eviction

def keep_mask(scores, ratio: float, uniform: bool = False, layer_budgets=None):
    """Which context pairs to keep: bool (L, Hkv, n_c) with exactly the budgeted count set.

    - default (non-uniform head budget): one global ranking of all L * Hkv * n_c scores, keep the
      top round(ratio * (L * Hkv * n_c)); layers and heads end up with different budgets.
    - uniform: the top round(ratio * n_c) of each (layer, head).
    - layer_budgets: a list of L counts; the top budget[l] of layer l over its heads (PyramidKV).
    Ties are broken deterministically: a stable sort keeps the lower flat index (layer, head,
    position) first. (The authors' code keeps the pairs strictly above the k-th score instead,
    which keeps one fewer and drops ties.)
    """
    check_ratio(ratio)
    L, Hkv, n_c = scores.shape

    def top(s, k):  # s: (..., N) -> bool mask of the k largest along the last axis
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)

    if layer_budgets is not None:
        if len(layer_budgets) != L:
            raise ValueError(f"layer_budgets has {len(layer_budgets)} entries for {L} layers")
        return torch.stack([top(scores[l].reshape(-1), int(b)).view(Hkv, n_c)
                            for l, b in enumerate(layer_budgets)])
    if uniform:
        return top(scores, round(ratio * n_c))
    # ratio times the exact integer count, so every caller computes the same budget
    return top(scores.reshape(-1), round(ratio * (L * Hkv * n_c))).view(L, Hkv, n_c)


# -----------------------------------------------------------------------------
# 4. The packed compressed cache

class CompressedKV:
    """KV pairs kept after eviction, packed per layer; decodes new tokens without copying itself.

    Per layer l:
      k[l], v[l]  (N_l, D)   the kept pairs of all KV heads, head-major: rows offsets[l][h] ..
                             offsets[l][h+1] - 1 belong to KV head h, in increasing position
                             (the n_p prefix pairs first, then that head's kept context pairs)
      offsets[l]  (Hkv + 1,) int64 cumulative row counts; lengths differ between heads
    Keys were cached after RoPE, so kept pairs need no re-rotation: they keep their positions.
    New tokens (a query and its answer) go to a dense tail, tail_k[l], tail_v[l] (Hkv, cap, D),
    at positions n_p + n_c + i. `truncate` back to the context drops them, so the same compressed
    cache serves the next query.
    """

    def __init__(self, k, v, offsets, base_len: int, backend: str = "auto"):
        self.k, self.v, self.offsets = k, v, offsets  # lists over layers
        self._bounds = [o.tolist() for o in offsets]  # the same offsets as Python ints, for slicing
        self.base_len = base_len  # n_p + n_c: positions of new tokens start here
        self.n_tail = 0
        Hkv, D = offsets[0].numel() - 1, k[0].shape[1]
        self.tail_k = [k[0].new_empty((Hkv, 0, D)) for _ in k]
        self.tail_v = [k[0].new_empty((Hkv, 0, D)) for _ in k]
        if backend == "auto":
            backend = "triton" if k[0].is_cuda else "torch"
        self.backend = backend  # decode path: "torch" (per-head loop) or "triton" (varlen kernel)

    @classmethod
    def from_full(cls, cache, n_prefix: int, keep):
        """Gather the kept rows of a dense cache. keep: bool (L, Hkv, n_c)."""
        L, Hkv, n_c = keep.shape
        prefix = torch.ones(Hkv, n_prefix, dtype=torch.bool, device=keep.device)
        ks, vs, offs = [], [], []
        for l in range(L):
            rows = torch.cat([prefix, keep[l]], dim=1)  # (Hkv, n_p + n_c): the prefix is never evicted
            # boolean indexing of (Hkv, S, D) by (Hkv, S) walks head by head: exactly head-major packing
            ks.append(cache.keys(l)[rows].clone())  # (N_l, D)
            vs.append(cache.values(l)[rows].clone())  # (N_l, D)
            counts = rows.sum(dim=1)  # (Hkv,)
            offs.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))  # (Hkv + 1,) int64
        return cls(ks, vs, offs, base_len=n_prefix + n_c)

    # --- the cache protocol used by model.Transformer.forward ---
    @property
    def seq_len(self) -> int:
        return self.base_len + self.n_tail

    def reserve(self, n: int):
        need = self.n_tail + n
        if need <= self.tail_k[0].shape[1]:
            return
        for buf in (self.tail_k, self.tail_v):
            for i, old in enumerate(buf):  # grows only the small tail, never the packed buffers
                new = old.new_empty((old.shape[0], max(need, 2 * old.shape[1]), old.shape[2]))
                new[:, :self.n_tail] = old[:, :self.n_tail]
                buf[i] = new

    def attend(self, layer: int, q, k, v):
        """Store new k, v (Hkv, T, D) in the tail; q (Hkv, G, T, D) attends per KV head over
        [that head's kept pairs ; tail]. Returns (Hkv, G, T, D)."""
        T = k.shape[1]
        end = self.n_tail + T
        self.tail_k[layer][:, self.n_tail:end] = k
        self.tail_v[layer][:, self.n_tail:end] = v
        tk, tv = self.tail_k[layer][:, :end], self.tail_v[layer][:, :end]  # (Hkv, n_tail + T, D)
        if self.backend == "triton" and T == 1:
            import kernels
            out = kernels.varlen_decode_attention(q[:, :, 0], self.k[layer], self.v[layer], self.offsets[layer],
                                                  tk, tv, offsets_host=self._bounds[layer])  # (Hkv, G, D)
            return out.unsqueeze(2)
        return packed_attention(q, self.k[layer], self.v[layer], self._bounds[layer], tk, tv)

    def advance(self, n: int):
        self.n_tail += n

    def truncate(self, seq_len: int):
        if not self.base_len <= seq_len <= self.seq_len:
            raise ValueError(f"can truncate only to [{self.base_len}, {self.seq_len}], got {seq_len}")
        self.n_tail = seq_len - self.base_len

    @property
    def nbytes(self) -> int:
        """Bytes held for the context: packed K and V, the offsets, and any new tokens' K/V."""
        packed = sum(t.numel() * t.element_size() for t in self.k + self.v + self.offsets)
        tail = sum(t[:, :self.n_tail].numel() * t.element_size() for t in self.tail_k + self.tail_v)
        return packed + tail

    def head_lengths(self):
        """Kept pairs per (layer, KV head), prefix included: (L, Hkv) int64."""
        return torch.stack([o.diff() for o in self.offsets])


def packed_attention(q, k_packed, v_packed, bounds, tail_k, tail_v):
    """Attention over a packed cache, one KV head at a time (the torch decode path).

    q (Hkv, G, T, D): the new tokens, which are the last T rows of the tail; k_packed, v_packed
    (N, D) with head h in rows bounds[h] .. bounds[h+1] - 1; tail_k, tail_v (Hkv, n_tail, D).
    Each head's G query heads become G * T rows; their logits over the head's kept pairs and over
    the tail are concatenated, (G*T, n_h + n_tail): the packed rows are read in place, never copied
    or padded. Returns (Hkv, G, T, D).
    """
    Hkv, G, T, D = q.shape
    n_tail = tail_k.shape[1]
    # causal mask inside the tail: query t (tail row n_tail - T + t) sees tail rows 0 .. n_tail - T + t
    t = torch.arange(T, device=q.device)[:, None] + (n_tail - T)
    causal = (torch.arange(n_tail, device=q.device)[None, :] > t).repeat(G, 1)  # (G*T, n_tail), row g*T + t
    out = torch.empty_like(q)
    for h in range(Hkv):
        kh, vh = k_packed[bounds[h]:bounds[h + 1]], v_packed[bounds[h]:bounds[h + 1]]  # (n_h, D)
        qh = q[h].reshape(G * T, D) / math.sqrt(D)  # scale the few query rows, not the n_h logits
        # keys on the long side of the product: (n_h, D) @ (D, G*T) is a much faster GEMM shape on
        # a CPU than (G*T, D) @ (D, n_h) (measured 3.6x for n_h = 35k, G*T = 4), same numbers
        ctx = (kh @ qh.T).T  # (G*T, n_h)
        new = (tail_k[h] @ qh.T).T.masked_fill(causal, float("-inf"))  # (G*T, n_tail)
        p = torch.softmax(torch.cat([ctx, new], dim=-1).float(), dim=-1).to(vh.dtype)  # (G*T, n_h + n_tail)
        y = p[:, :kh.shape[0]] @ vh + p[:, kh.shape[0]:] @ tail_v[h]  # (G*T, D)
        out[h] = y.view(G, T, D)
    return out


# -----------------------------------------------------------------------------
# 5. Answering queries from a (compressed) cache

def query_ids(tok, query: str, template: bool = True) -> list[int]:
    """A query as token ids: "\\n\\n" + query, then the assistant postfix, each encoded on its own;
    or the raw text (template=False) for completion probes."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("empty query")
    if not template:
        return tok.encode(query)
    return tok.encode("\n\n" + query) + tok.encode(tok.postfix)


@torch.no_grad()
def generate(m, tok, query: str, kv, max_new_tokens: int = 64, template: bool = True,
             keep: bool = False) -> str:
    """Greedy answer to `query` from kv (a FullKV or a CompressedKV); returns only the new text.

    By default the cache goes back to its state before the call (the query's tokens are dropped),
    so the same cache serves the next query. keep=True leaves them in (multi-turn use).
    """
    cache = kv.cache if isinstance(kv, FullKV) else kv
    ids = query_ids(tok, query, template)
    limit = m.cfg.max_position_embeddings
    if cache.seq_len + len(ids) + max_new_tokens > limit:
        raise ValueError(f"query of {len(ids)} tokens plus {max_new_tokens} new tokens does not fit "
                         f"after the {cache.seq_len} cached positions (model limit {limit})")
    start = cache.seq_len
    cache.reserve(len(ids) + max_new_tokens)
    try:
        out = model_lib.generate(m, ids, cache, max_new_tokens, tok.stop_ids)
    finally:
        if not keep:
            cache.truncate(start)
    return tok.decode(out)


# -----------------------------------------------------------------------------
# 6. Query-aware baselines (and two controls), all scoring (L, Hkv, n_c) so prune() serves them
#
# Every method below turns into scores of the same shape as KVzip's, so one eviction rule (the
# global ranking, or PyramidKV's per-layer budgets) and one packed cache serve them all. The
# query-aware ones (SnapKV, PyramidKV, H2O) look at one query while scoring; in the reuse
# experiment (bench.py --quality) that is the first query, and the cache they pick then answers
# every query of the context, as a serving system would reuse it. KVzip never sees a query.

METHODS = ("kvzip", "snapkv", "pyramidkv", "h2o", "streamingllm", "random")
SNAP_WINDOW = 64  # SnapKV's observation window: the last 64 tokens of context + query
SNAP_KERNEL = 7  # SnapKV's pooling width over positions (max-pool, as in AdaKV's SnapKV; the
#                  SnapKV repo defaults to avg-pool of width 5 -- both only smooth the ranking)
PYRAMID_BETA = 20  # PyramidKV: the top layer's budget is 1/beta of the average layer budget
N_SINK = 4  # StreamingLLM's attention sinks: the first 4 context tokens


@torch.no_grad()
def attention_received(m, kv: FullKV, new_ids: list[int], n_rows: int):
    """How much attention each context key receives from the last n_rows positions of
    prefix + context + new_ids (float32 softmax over every key a row can see, causally).

    Those positions are re-run in a *copy* of the cache (the rows before them are copied, then the
    model appends to the copy), so kv.cache is never written: it stays bit-exact. Their post-RoPE
    queries are read through model.prefill's `observe` hook.
    Returns sums (L, Hkv, G, n_c): attention summed over the observed rows, per query head; and
    counts (n_c,): how many observed rows can see each context key (a row sees keys at or before it).
    """
    cfg = m.cfg
    n_p, n_c = kv.n_prefix, kv.n_context
    base, end = n_p + n_c, n_p + n_c + len(new_ids)  # context ends at base; new ids end at end
    n_rows = min(n_rows, n_c + len(new_ids))
    first_row = end - n_rows  # position of the first observed row
    start = min(first_row, base)  # re-run from here (new ids are always run: they are not cached)
    work = m.new_cache(capacity=end)
    for l in range(cfg.n_layer):  # copy the rows before `start`; kv.cache is only read
        work.k[l][:, :start] = kv.cache.k[l][:, :start]
        work.v[l][:, :start] = kv.cache.v[l][:, :start]
    work.seq_len = start
    sums = torch.zeros(cfg.n_layer, cfg.n_kv_head, cfg.group, n_c, dtype=torch.float32, device=m.device)

    def observe(layer, q, k):  # q (Hkv, G, T, D), k (Hkv, T, D): the tokens of this prefill chunk
        past = work.keys(layer)  # (Hkv, S0, D): rows before this chunk (this chunk is not stored yet)
        keys = torch.cat([past, k], dim=1)  # (Hkv, S, D), S = S0 + T
        logits = q.float() @ keys.float().unsqueeze(1).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (Hkv, G, T, S)
        row = torch.arange(q.shape[2], device=q.device)[:, None] + past.shape[1]  # absolute position of each row
        col = torch.arange(keys.shape[1], device=q.device)[None, :]
        p = torch.softmax(logits.masked_fill_(col > row, float("-inf")), dim=-1)  # (Hkv, G, T, S) float32
        p = p[:, :, row[:, 0] >= first_row, n_p:base]  # observed rows only; context columns only
        sums[layer, :, :, :p.shape[-1]] += p.sum(dim=2)  # (Hkv, G, <= n_c)

    ids = (kv.context_ids + list(new_ids))[start - n_p:]
    # 512-row chunks bound the probability matrix: Hkv * G * 512 * S floats, 37 MB per layer for
    # SmolLM2 (9 query heads) at S = 2000
    model_lib.prefill(m, ids, work, chunk_size=512, observe=observe)
    j = torch.arange(n_c, device=m.device) + n_p  # position of each context key
    counts = end - torch.clamp(j, min=first_row)  # observed rows at or after each key
    return sums, counts.float()


def snapkv_scores(m, tok, kv: FullKV, query: str, template: bool = True,
                  window: int = SNAP_WINDOW, kernel: int = SNAP_KERNEL):
    """SnapKV (Li et al., 2024): the mean attention that the last `window` tokens of context + query
    pay to each context key, max-pooled over `kernel` neighbouring positions, mean over the group."""
    q_ids = query_ids(tok, query, template)
    sums, _ = attention_received(m, kv, q_ids, window)  # (L, Hkv, G, n_c)
    L, Hkv, G, n_c = sums.shape
    mean = sums / min(window, n_c + len(q_ids))  # mean over window rows (rows before a key add 0)
    pooled = torch.nn.functional.max_pool1d(mean.view(-1, n_c), kernel, stride=1, padding=kernel // 2)
    return pooled.view(L, Hkv, G, n_c).mean(dim=2)  # (L, Hkv, n_c)


def pyramid_budgets(ratio: float, n_layer: int, n_kv_head: int, n_c: int, beta: float = PYRAMID_BETA):
    """PyramidKV (Cai et al., 2024) budgets: kept pairs per layer, shrinking linearly with depth.

    With the average layer budget a = ratio * Hkv * n_c, the top layer gets a / beta and the bottom
    layer 2a - a / beta, linear in between, so the total is L * a, the same as a uniform split.
    (The PyramidKV code: min_num = a / beta, max_num = 2a - min_num, steps of
    (max_num - min_num) / (L - 1).) A layer cannot keep more than its Hkv * n_c pairs: at high
    ratios the bottom layers are capped and the rest is spread over the others in proportion to
    the same line (water-filling). Then largest-remainder rounding makes the budgets integers
    that sum exactly to round(ratio * (L * Hkv * n_c)); they stay non-increasing over layers.
    """
    check_ratio(ratio)
    L, cap = n_layer, n_kv_head * n_c
    total = round(ratio * (L * cap))  # the same count keep_mask uses: ratio times an exact integer
    top, bottom = 1 / beta, 2 - 1 / beta  # in units of the average layer budget
    shape = [bottom - (bottom - top) * l / (L - 1) if L > 1 else 1.0 for l in range(L)]
    capped = [False] * L
    while True:  # at most L rounds: each one caps at least one more layer
        free = total - cap * sum(capped)
        weight = sum(w for w, c in zip(shape, capped) if not c)
        b = [cap if c or weight == 0 else free * w / weight for w, c in zip(shape, capped)]
        over = [not c and x > cap for x, c in zip(b, capped)]
        if not any(over):
            break
        capped = [c or o for c, o in zip(capped, over)]
    budgets = [min(cap, math.floor(x)) for x in b]
    for l in sorted(range(L), key=lambda l: budgets[l] - b[l]):  # largest remainder first; stable
        if sum(budgets) < total and budgets[l] < cap:
            budgets[l] += 1
    assert sum(budgets) == total, (budgets, total)
    return budgets


def h2o_scores(m, tok, kv: FullKV, query: str, template: bool = True):
    """H2O (Zhang et al., 2023): the attention each context key receives from every later context
    and query position (itself included), divided by the number of positions that see it; mean
    over the group."""
    q_ids = query_ids(tok, query, template)
    sums, counts = attention_received(m, kv, q_ids, kv.n_context + len(q_ids))  # every row from the context on
    return (sums / counts).mean(dim=2)  # (L, Hkv, n_c)


def streamingllm_scores(kv: FullKV, n_sink: int = N_SINK):
    """StreamingLLM (Xiao et al., 2024): keep the first n_sink tokens (attention sinks) and the most
    recent ones. As scores: the sinks get 2, the others j / n_c (later is higher), in every head,
    so the global ranking keeps the sinks and then the most recent positions in all heads alike."""
    L, Hkv, n_c = len(kv.cache.k), kv.cache.k[0].shape[0], kv.n_context
    s = torch.arange(n_c, dtype=torch.float32, device=kv.cache.k[0].device) / n_c
    s[:n_sink] = 2.0
    return s.expand(L, Hkv, n_c).clone()  # (L, Hkv, n_c)


def random_scores(kv: FullKV, seed: int = 0):
    """Control: seeded uniform random scores (what any scorer must beat)."""
    L, Hkv, n_c = len(kv.cache.k), kv.cache.k[0].shape[0], kv.n_context
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, Hkv, n_c, generator=g).to(kv.cache.k[0].device)  # (L, Hkv, n_c)


def method_scores(method: str, m, tok, kv: FullKV, query: str | None = None, template: bool = True,
                  seed: int = 0):
    """Scores (L, Hkv, n_c) of one method for the context in kv. Query-aware methods (snapkv,
    pyramidkv, h2o) need `query`, formatted as generate would (template=False: a raw probe)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("snapkv", "pyramidkv", "h2o") and query is None:
        raise ValueError(f"{method} is query-aware: pass the query it should score for")
    if method == "kvzip":
        if kv.scores is None:
            raise ValueError("this FullKV was prefilled with score=False: no KVzip scores")
        return kv.scores
    if method in ("snapkv", "pyramidkv"):  # PyramidKV differs only in its budgets (see compress)
        return snapkv_scores(m, tok, kv, query, template)
    if method == "h2o":
        return h2o_scores(m, tok, kv, query, template)
    if method == "streamingllm":
        return streamingllm_scores(kv)
    return random_scores(kv, seed)


def compress(kv: FullKV, method: str, ratio: float, scores):
    """kv.prune(ratio) with a method's scores and eviction rule: PyramidKV's per-layer budgets,
    otherwise the global ranking over all layers and heads. (The paper gives the baselines
    AdaKV-style non-uniform budgets across the heads of a layer; the global ranking also moves
    budget between layers.)"""
    budgets = pyramid_budgets(ratio, *scores.shape) if method == "pyramidkv" else None
    return kv.prune(ratio, scores=scores, layer_budgets=budgets)


# -----------------------------------------------------------------------------
# 7. Demo

def main(argv=None):
    p = argparse.ArgumentParser(description="KVzip demo: full-cache vs compressed-cache answers.")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept")
    p.add_argument("--context", help="a text file to use as the context (default: built-in)")
    p.add_argument("--query", action="append", help="a question (repeatable)")
    p.add_argument("--model", help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    try:
        check_ratio(args.ratio)
    except ValueError as e:
        p.error(str(e))
    if args.context:
        try:
            with open(args.context, encoding="utf-8") as f:
                context = f.read()
        except OSError as e:
            p.error(f"cannot read --context: {e}")
        queries = args.query or ["Summarize the context in one sentence."]
    else:
        import bench  # the project's own seeded haystack and fact generator
        task = bench.fact_task(n_entities=4, seed=0, filler_words=600)  # ~1K tokens
        context = task["context"]
        queries = args.query or [q for q, _ in task["questions"][:4]]

    m, tok = model_lib.load(args.model)
    t0 = time.perf_counter()
    kv = prefill(m, tok, context)
    t1 = time.perf_counter()
    ckv = kv.prune(args.ratio)
    print(f"context: {kv.n_context} tokens, prefill + scoring {t1 - t0:.1f} s")
    print(f"KV cache: full {kv.nbytes / 2**20:.2f} MiB, compressed at ratio {args.ratio}: "
          f"{ckv.nbytes / 2**20:.2f} MiB ({ckv.nbytes / kv.nbytes:.1%})\n")
    for q in queries:
        full = generate(m, tok, q, kv, args.max_new_tokens).strip().splitlines()
        comp = generate(m, tok, q, ckv, args.max_new_tokens).strip().splitlines()
        print(f"Q: {q}\n  full cache : {full[0] if full else ''}\n  compressed : {comp[0] if comp else ''}")


if __name__ == "__main__":
    main()
