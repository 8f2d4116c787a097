"""
KVzip: query-agnostic KV cache compression with context reconstruction, in one readable file.

Kim, Kim, Kwon, Lee, Yun, Song. "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", NeurIPS 2025, https://arxiv.org/abs/2505.23416 (authors' code: snu-mllab/KVzip).

The idea: prefill a context once; ask the model to repeat it; every cached KV pair gets the highest
attention it receives while the model repeats the context (Eq. 2). Pairs the model never looks at
while reconstructing the context are not needed for any later question, so the lowest-scored ones
are evicted once and the compressed cache serves every future query with no further prefill.

Map of this file, in pipeline order:
  1. the prompts            - KVzip's instruction before the context, the reconstruction prompts
  2. chunk_scores_reference - Eq. 2 for one context chunk, materializing the attention matrix (the spec);
     chunk_scores_logits    - the paper's softmax-free ablation (max scaled logit), for comparison
  3. prefill / score_context - prefix + context into a full cache (FullKV), then scoring by reconstruction
     ScoringCache           - the same scores from the forward's own attention (the CPU's fast path)
     head_scores            - the scores reduced to one per KV head, once per model (save/load_head_scores)
  4. keep_mask / FullKV.prune - eviction: one global ranking (non-uniform head budgets) or per head;
     head_keep_mask         - head-level eviction: whole heads, no reconstruction pass per context
  5. CompressedKV           - the packed cache: per layer one buffer of the kept K/V of all KV heads,
                              in the model's dtype or quantized to int8/int4 (quant.py);
     packed_attention       - decoding over it, one KV head at a time (the spec); its fused CPU
                              twins: packed_attention_fused, and packed_decode for one new token
  6. generate               - greedy answers from a full or compressed cache, which stays unchanged
  7. a small demo: `python kvzip.py`
The query-aware baselines that the reuse experiment compares KVzip with are in baselines.py.
For teaching, explain.py runs this pipeline on a hand-checkable toy model, prints each step on a
real one, and draws which tokens are kept.

Shape alphabet (one sequence, no batch dimension):
  L    layers                        Hkv  KV heads        G   query heads per KV head
  D    head dim                      n_p  prefix tokens   n_c context tokens
  n_q  tokens of one reconstruction input (prompt + postfix + chunk)

The `backend` argument is model.py's one switch between the readable reference code and the fast
paths ("auto", "reference", "triton"); the fast paths are tested against the reference.

Left out on purpose: batching several contexts.
"""
from __future__ import annotations

import bisect
import math
import os
import time

import errors
from errors import InputError

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import torch  # noqa: E402 (after the OpenMP setting above)
import torch.nn.functional as F  # noqa: E402

import model as model_lib  # noqa: E402
import quant  # noqa: E402
import tasks  # noqa: E402

# -----------------------------------------------------------------------------
# 1. The prompts
#
# Each piece (prefix, instruction, context, prompt, postfix, query) is encoded on its own and the
# ids are concatenated. Byte-level BPE merges across the seams of a joined string ("\n\n" at the
# end of a string is one token, but two when a word follows), which would give other ids, other
# positions and other scores.

# KVzip's instruction, the end of the never-evicted prefix: system turn + user opener + this.
INSTRUCTION = "Given the context, answer to the following question or request without explanation.\n\n"
# Reconstruction prompts: chunk 0 is asked to repeat the context, later chunks to repeat "starting
# with" the last N_OVERLAP token ids of the previous chunk.
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
N_OVERLAP = 8  # the next prompt quotes the last 8 token ids of the previous chunk
CHUNK_SIZE = 2000  # context tokens scored per reconstruction pass (the paper's m)


def prefix_ids(tok) -> list[int]:
    """The template prefix placed before the context: the chat template's system turn and user-turn
    opener, then KVzip's instruction. It is never evicted (the attention "sink")."""
    return tok.encode(tok.prefix + INSTRUCTION)


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


def max_reconstruction_len(tok, chunk_size=CHUNK_SIZE) -> int:
    """Longest reconstruction input for chunks of chunk_size tokens (the room scoring needs after
    the context): the longer prompt with its quoted ids, the postfix and the chunk."""
    return len(tok.encode(NEXT_PROMPT)) + N_OVERLAP + len(tok.encode(tok.postfix)) + chunk_size


def max_context_tokens(m, tok, chunk_size: int = CHUNK_SIZE, score: bool = True) -> int:
    """The longest context `prefill` accepts: the model's position limit minus the prefix and, when
    scoring, the reconstruction input that runs after the context (a context shorter than one
    chunk is repeated whole, so it needs room for itself once more)."""
    budget = m.cfg.max_position_embeddings - len(prefix_ids(tok))
    if not score:
        return max(0, budget)
    fixed = max_reconstruction_len(tok, 0)  # prompt + quoted ids + postfix
    long = budget - fixed - chunk_size  # contexts of at least one whole chunk
    short = min(chunk_size - 1, (budget - fixed) // 2)  # shorter ones: n_c + fixed + n_c <= budget
    return max(long if long >= chunk_size else 0, short, 0)


# -----------------------------------------------------------------------------
# 2. The reference scorer: the spec that every fast path is tested against

def chunk_scores_reference(q, k, n_prefix: int, n_chunk: int):
    """Eq. 2 of the paper for one chunk: the max attention each chunk key receives.

    q: (Hkv, G, n_q, D) post-RoPE queries of the reconstruction input, grouped by KV head.
    k: (Hkv, n_prefix + n_chunk + n_q, D) the reduced key set K' = [prefix ; chunk ; input's own keys].
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
    assert n_keys == n_prefix + n_chunk + n_q, (k.shape, n_prefix, n_chunk, n_q)
    t = torch.arange(n_q, device=q.device)[:, None]  # query row
    j = torch.arange(n_keys, device=q.device)[None, :] - (n_prefix + n_chunk)  # input-key index (<0: cached)
    future = j > t  # (n_q, n_keys): input keys after the row, masked; every cached key is visible
    scores = torch.empty(Hkv, n_chunk, dtype=torch.float32, device=q.device)
    qs = q.float() / math.sqrt(D)  # scale the queries once, not each (G, n_q, n_keys) matrix
    for h in range(Hkv):
        logits = qs[h] @ k[h].float().T  # (G, n_q, n_keys)
        probs = torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)  # float32
        chunk_probs = probs[:, :, n_prefix:n_prefix + n_chunk]  # (G, n_q, n_chunk)
        scores[h] = chunk_probs.amax(dim=(0, 1))  # max over the group and the query rows
    return scores  # (Hkv, n_chunk)


SCORERS = ("softmax", "logits")  # score_context's choice: Eq. 2, or the softmax-free ablation


def chunk_scores_logits(q, k, n_prefix: int, n_chunk: int):
    """The paper's softmax-free ablation for one chunk: the max *scaled logit* each chunk key gets.

    Same arguments as chunk_scores_reference, same rows (every query head of the group, every input
    row) and the same K'. Returns (Hkv, n_chunk) float32:
        S[h, j] = max over g, t of q[h,g,t] . k[h,j] / sqrt(D).
    A chunk key is visible to every input row (the causal mask acts only among the input's own
    keys), so no mask is needed, and the prefix and input keys do not enter at all: without the
    softmax nothing normalizes a row.

    Ranking on one scale: Eq. 2's probabilities are comparable across heads and layers because each
    row sums to 1; raw logits are not normalized, so a head whose queries and keys have larger
    norms scores every pair higher. The authors' public code has no softmax-free variant, and we
    could not confirm from the paper whether its variant rescales the logits of different heads,
    so we take the ablation at its word: the scaled logits are ranked as they are, within each
    head and across all heads and layers in the one global ranking (keep_mask), exactly like
    Eq. 2's scores; the comparison then includes that loss of a common scale. This readable
    reference is the only implementation (no Triton path): it is an ablation, not a fast path.
    """
    Hkv, G, n_q, D = q.shape
    assert k.shape[1] == n_prefix + n_chunk + n_q, (k.shape, n_prefix, n_chunk, n_q)
    chunk_keys = k[:, n_prefix:n_prefix + n_chunk].float()  # (Hkv, n_chunk, D)
    logits = (q.float() / math.sqrt(D)) @ chunk_keys.unsqueeze(1).transpose(-1, -2)  # (Hkv, G, n_q, n_chunk)
    return logits.amax(dim=(1, 2))  # (Hkv, n_chunk)


def use_triton(backend: str, device) -> bool:
    """Whether `backend` means the Triton kernels for tensors on `device` (see model.BACKENDS)."""
    model_lib.check_backend(backend)
    return backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")


def triton_kernels(device="cuda"):
    """kernels.py, imported on first use rather than at the top of this file: Triton has no wheels
    for macOS or Windows, and everything here must still run there on the reference paths."""
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs a CUDA GPU, or, on a CPU, Triton's interpreter: set "
                           "TRITON_INTERPRET=1 in the environment before starting Python")
    try:
        import kernels
    except ImportError as e:
        raise RuntimeError(f"backend='triton' needs Triton, which is not installed ({e}); it has no "
                           "wheels for macOS or Windows: use backend='reference' there") from None
    return kernels


def chunk_scores(q, k, n_prefix: int, n_chunk: int, backend: str = "auto"):
    """Eq. 2 for one chunk through the chosen backend: the reference scorer or the Triton kernel
    (same arguments, same result; the tests check one against the other)."""
    if use_triton(backend, q.device):
        return triton_kernels(q.device).chunk_max_scores(q.contiguous(), k.contiguous(), n_prefix, n_chunk)
    return chunk_scores_reference(q, k, n_prefix, n_chunk)


# -----------------------------------------------------------------------------
# 3. Prefill and scoring by context reconstruction

class FullKV:
    """The uncompressed cache of prefix + context, plus KVzip's scores of every context pair.

    cache:  model.KVCache holding n_p + n_c positions (keys post-RoPE)
    scores: (L, Hkv, n_c) float32, or None if scoring was skipped
    It stays available after pruning, so several ratios can be tried from one prefill and one
    scoring pass: each prune(r) builds a new CompressedKV. It follows the cache protocol (see
    model.KVCache) by handing every call to its cache, so generate takes it like a CompressedKV.
    """

    def __init__(self, cache, scores, n_prefix: int, context_ids: list[int], backend: str = "auto"):
        self.cache, self.scores = cache, scores
        self.n_prefix, self.n_context = n_prefix, len(context_ids)
        self.context_ids = context_ids
        self.backend = backend  # scoring, and the decode path of the compressed caches it prunes to

    def prune(self, ratio: float, uniform: bool = False, scores=None, layer_budgets=None,
              level: str = "pair", head_scores=None, *, bits: int = 16) -> "CompressedKV":
        """Keep `ratio` of the context's KV pairs (prefix always kept): a new compressed cache.

        level="pair" (default): scores (L, Hkv, n_c) to rank by, default KVzip's own;
        layer_budgets: per-layer counts (PyramidKV); otherwise one global ranking, or per-head
        budgets when uniform.
        level="head": keep the whole context of the round(ratio * L * Hkv) heads ranked highest by
        head_scores (L, Hkv) (see head_scores()) and nothing of the others'; needs no pair scores,
        so no reconstruction pass (prefill(..., score=False) is enough).
        bits: 16 stores the kept K/V in the model's dtype; 8 or 4 stores them quantized
        (quant.py: groups of 32 along D, fp16 scale and zero per group). ratio=1.0 with bits 8 or 4
        is quantization alone.
        The returned cache's kept_ratio is the fraction of context pairs actually kept (at head
        level a whole number of heads, so it can differ from ratio by up to half a head).
        """
        check_bits(bits)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}, got {level!r}")
        if level == "head":
            if head_scores is None:
                raise ValueError("level='head' needs head_scores= (L, Hkv), e.g. from kvzip.head_scores "
                                 "or kvzip.load_head_scores")
            if uniform or scores is not None or layer_budgets is not None:
                raise ValueError("level='head' ranks whole heads by head_scores; uniform=, scores= and "
                                 "layer_budgets= apply to level='pair' only")
            want = (len(self.cache.k), self.cache.k[0].shape[0])  # (L, Hkv) of this cache
            if not torch.is_tensor(head_scores) or tuple(head_scores.shape) != want:
                got = tuple(head_scores.shape) if torch.is_tensor(head_scores) else type(head_scores).__name__
                raise ValueError(f"head_scores must have shape (n_layer, n_kv_head) = {want} for this "
                                 f"cache, got {got}")
            keep = head_keep_mask(head_scores.to(self.cache.k[0].device), ratio, self.n_context)
        else:
            if head_scores is not None:
                raise ValueError("head_scores= is used only with level='head'")
            scores = self.scores if scores is None else scores
            if scores is None:
                raise ValueError("this FullKV has no scores (prefill(..., score=False)); pass scores=, "
                                 "or prune at level='head' with head_scores=")
            keep = keep_mask(scores, ratio, uniform=uniform, layer_budgets=layer_budgets)
        return self.pack(keep, bits=bits)

    def pack(self, keep, bits: int = 16) -> "CompressedKV":
        """The compressed cache of the context pairs `keep` (bool (L, Hkv, n_c)) selects, prefix
        always kept; prune computes keep from scores, callers with a mask of their own pass it here.
        Its kept_ratio is the fraction of context pairs kept."""
        check_bits(bits)
        ckv = CompressedKV.from_full(self.cache, self.n_prefix, keep, self.backend, bits=bits)
        ckv.kept_ratio = keep.sum().item() / max(1, keep.numel())  # context pairs kept, as a fraction
        return ckv

    # --- the cache protocol, handed to the dense cache ---
    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def reserve(self, n: int):
        self.cache.reserve(n)

    def attend(self, layer: int, q, k, v):
        return self.cache.attend(layer, q, k, v)

    def advance(self, n: int):
        self.cache.advance(n)

    def truncate(self, seq_len: int):
        self.cache.truncate(seq_len)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


BITS = (16, 8, 4)  # bits per stored K/V value of a CompressedKV; 16 = the model's dtype, not quantized


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be 16 (not quantized), 8 or 4, got {bits!r}")
    return bits


def check_ratio(ratio):
    """A ratio is a Python int or float (numpy's float64 is one) in (0, 1]. A torch tensor is
    refused rather than converted: float() of a CUDA tensor waits for the GPU, and a tensor here is
    most often a score or a mean passed by mistake; a bool is refused because True would mean 1.0."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        kind = "torch.Tensor (pass float(ratio))" if torch.is_tensor(ratio) else type(ratio).__name__
        raise InputError(f"ratio must be in (0, 1] (the fraction of context pairs kept) as a Python "
                         f"float, got a {kind}: {ratio!r}")
    if not 0 < ratio <= 1:  # also refuses nan
        raise InputError(f"ratio must be in (0, 1] (the fraction of context pairs kept), got {ratio!r}")


@torch.no_grad()
def score_context(m, tok, kv: FullKV, chunk_size: int = CHUNK_SIZE, backend: str | None = None,
                  scorer: str = "softmax"):
    """KVzip scores (L, Hkv, n_c) of the context pairs in kv, by context reconstruction; also
    stored as kv.scores.

    Each chunk's reconstruction input runs through the model on top of the full cache at positions
    after prefix + context (the model's own attention sees the whole cache as usual). In every layer
    the `observe` hook scores the chunk's cached keys against the reduced key set
    K' = [prefix ; chunk ; input]. The input's K/V is removed afterwards: the cache is left as found.
    backend: default kv.backend. On a CPU, "auto" takes the fused path instead (ScoringCache below:
    the same scores, from the forward's own attention); "reference" always takes this one.
    scorer: "softmax" (Eq. 2) or "logits" (the softmax-free ablation, chunk_scores_logits, always
    on this path with the reference code).
    """
    if scorer not in SCORERS:
        raise InputError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    backend = kv.backend if backend is None else backend
    cfg, cache, n_p = m.cfg, kv.cache, kv.n_prefix
    fused = backend == "auto" and m.device.type == "cpu" and scorer == "softmax"
    scores = torch.zeros(cfg.n_layer, cfg.n_kv_head, kv.n_context, dtype=torch.float32, device=m.device)
    for start, end, ids in reconstruction_inputs(tok, kv.context_ids, chunk_size):
        ids = torch.tensor(ids, device=m.device)
        if fused:
            m(ids, ScoringCache(cache, n_p, start, end, scores), last_only=True)
            continue

        def observe(layer, q, k):  # q (Hkv, G, n_q, D), k (Hkv, n_q, D): the input's own
            cached = cache.keys(layer)  # (Hkv, n_p + n_c, D); the input is not stored yet
            keys = torch.cat([cached[:, :n_p], cached[:, n_p + start:n_p + end], k], dim=1)  # (Hkv, |K'|, D)
            if scorer == "logits":
                scores[layer, :, start:end] = chunk_scores_logits(q, keys, n_p, end - start)
            else:
                scores[layer, :, start:end] = chunk_scores(q, keys, n_p, end - start, backend)

        with model_lib.rollback(cache):  # drop the reconstruction input's K/V afterwards
            m(ids, cache, last_only=True, observe=observe)
    kv.scores = scores
    return scores


# The fast path on a CPU: scoring inside the reconstruction forward's own attention.
#
# The reference path computes every logit q.k of K' twice: once in the model's attention (which
# sees the whole cache) and once more in the scorer, which also materializes, masks and normalizes
# a (G, n_q, |K'|) probability matrix per KV head. But a probability is exp(logit - lse_row), where
# lse_row is the log-sum-exp of the row's logits over K'. torch's fused CPU attention kernel returns
# each row's lse beside its output, so the forward's attention can be split over three disjoint key
# sets, A = [prefix ; chunk] and B = the input's own keys (causal), both in K', and C = the other
# chunks (not in K'); the output is the exact merge of the three, and logaddexp(lse_A, lse_B) is the
# lse over K'. The scorer then only needs the chunk columns' logits: S[j] = exp(max_rows(logit - lse)).
# Measured on the default model (2,000-token context, one CPU thread): scoring 1.3-1.5x a prefill
# against 3.5-4.9x for the reference path, peak memory +3-6% of the prefill's against +48-54%, and
# scores within 5e-6 of the reference path (the tests hold it to 1e-5).

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
    softmax over the parts' lse, taken like any softmax from the largest one, and added up one part
    at a time: no stack of all the parts' outputs (during scoring each is as large as the layer's
    attention output), so the merge holds two outputs' worth of memory."""
    top = torch.stack([l for _, l in parts]).amax(dim=0).unsqueeze(-1)  # (..., 1)
    out = den = None
    for o, l in parts:
        w = torch.exp(l.unsqueeze(-1) - top)  # (..., 1), in (0, 1]
        out = w * o if out is None else out.addcmul_(w, o)  # (..., D)
        den = w if den is None else den + w
    return out / den, (top + torch.log(den)).squeeze(-1)


def chunk_scores_from_lse(qs, k_chunk, lse, block: int = 256):
    """S[h, j] = exp(max over g, t of (qs[h,g,t] . k_chunk[h,j] - lse[h,g,t])): Eq. 2 from each row's
    log-sum-exp over K', without a probability matrix.

    qs (Hkv, G, n_q, D) scaled queries; k_chunk (Hkv, n_chunk, D); lse (Hkv, G, n_q).
    One (D+1)-wide product gives logit - lse directly: [qs_t, -lse_t] . [k_j, 1]. Keys go on the
    long side of the product, (block, D+1) @ (D+1, G*n_q), `block` keys at a time, so the working
    set is one (block, G*n_q) float32 tile (6 MB for the default model) and the max runs along
    contiguous memory. A score is exp of a difference of two float32 numbers of the size of the
    largest logit, so it carries about one ulp of that logit (7.6e-6 at 64), as the Triton kernel
    does. Returns (Hkv, n_chunk) float32.
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


@torch.no_grad()
def prefill(m, tok, context: str, chunk_size: int = CHUNK_SIZE, backend: str = "auto",
            score: bool = True, prefill_chunk: int = 1024, scorer: str = "softmax") -> FullKV:
    """Prefill the template prefix and the context into a full cache, then score it (KVzip).

    backend: see model.BACKENDS ("auto": the Triton kernel on CUDA, the reference scorer on a CPU).
    score=False skips scoring (for the baselines, which score themselves, or to time it apart:
    score_context(m, tok, kv) then scores the same FullKV, and head-level pruning needs no scores).
    scorer: see score_context ("logits": the softmax-free ablation).
    """
    model_lib.check_backend(backend)
    if scorer not in SCORERS:
        raise InputError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if context is None or (isinstance(context, str) and not context.strip()):
        raise InputError(f"empty context ({context!r}): nothing to prefill and compress")
    if not isinstance(context, str):
        hint = " (decode it first: data.decode('utf-8'))" if isinstance(context, (bytes, bytearray)) else ""
        raise InputError(f"context must be a str, got {type(context).__name__}{hint}")
    for name, value, least in (("chunk_size", chunk_size, N_OVERLAP), ("prefill_chunk", prefill_chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    p_ids, context_ids = prefix_ids(tok), tok.encode(context)
    n_p, n_c = len(p_ids), len(context_ids)
    limit = max_context_tokens(m, tok, chunk_size, score)
    if n_c > limit:
        raise InputError(f"context too long: {n_c} tokens; the model's "
                         f"{m.cfg.max_position_embeddings}-token limit leaves room for at most {limit} "
                         f"context tokens after the {n_p}-token prefix"
                         + (" and the reconstruction input" if score else ""))
    # room for the reconstruction input too, so scoring never has to grow (copy) the cache
    room = max_reconstruction_len(tok, min(chunk_size, n_c))
    capacity = min(n_p + n_c + room, m.cfg.max_position_embeddings)
    cache = m.new_cache(capacity=capacity, backend=backend)
    model_lib.prefill(m, p_ids + context_ids, cache, chunk_size=prefill_chunk)
    kv = FullKV(cache, None, n_p, context_ids, backend)
    if score:
        score_context(m, tok, kv, chunk_size, scorer=scorer)
    return kv


# -----------------------------------------------------------------------------
# 3b. Head scores: KVzip's scores reduced to one number per KV head, computed once per model
#
# Head-level eviction (the paper's context-independent variant, in the spirit of DuoAttention)
# drops the whole context KV of the lowest-ranked heads. The ranking comes from a few calibration
# contexts scored once; every later context is pruned with it, with no reconstruction pass.

@torch.no_grad()
def head_scores(m, tok, contexts, chunk_size: int = CHUNK_SIZE, backend: str = "auto"):
    """Head scores (L, Hkv) float32 from calibration contexts: for each context, KVzip's pair scores
    (prefill + score_context) reduced by the max over context positions; then the max over contexts.

    A head that ever pays high attention to some context pair while reconstructing some context
    scores high. Use contexts unlike the ones you will evaluate on (the reuse experiment draws
    them from other seeds).
    """
    if isinstance(contexts, str) or not contexts:
        raise ValueError("contexts must be a non-empty list of strings (calibration texts)")
    per_context = [prefill(m, tok, c, chunk_size=chunk_size, backend=backend).scores.amax(dim=-1)
                   for c in contexts]  # each (L, Hkv)
    return torch.stack(per_context).amax(dim=0).float().cpu()  # (L, Hkv)


def model_identity(m) -> dict:
    """What identifies a model's head scores, as strings (safetensors metadata): the architecture,
    the shapes, and a fingerprint: a hash of a few weights rounded to bfloat16 (so the same
    checkpoint loaded in float32 or bfloat16 matches, and a different checkpoint of the same shape
    does not)."""
    import hashlib
    cfg = m.cfg
    h = hashlib.sha256()
    for w in (m.embed.weight, m.layers[0].attn.k_proj.weight, m.layers[-1].attn.k_proj.weight):
        h.update(w.detach().flatten()[:256].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return dict(architecture=cfg.architecture, n_layer=str(cfg.n_layer), n_kv_head=str(cfg.n_kv_head),
                head_dim=str(cfg.head_dim), n_embd=str(cfg.n_embd), vocab_size=str(cfg.vocab_size),
                weights_sha256=h.hexdigest()[:16])


def save_head_scores(path, hs, m):
    """Write head scores (L, Hkv) to a small safetensors file, with the model's identity
    (model_identity) in its metadata."""
    from safetensors.torch import save_file
    ident = model_identity(m)
    want = (m.cfg.n_layer, m.cfg.n_kv_head)
    if not torch.is_tensor(hs) or tuple(hs.shape) != want:
        raise ValueError(f"head scores must have shape (n_layer, n_kv_head) = {want}, got "
                         f"{tuple(hs.shape) if torch.is_tensor(hs) else type(hs).__name__}")
    save_file({"head_scores": hs.detach().float().cpu().contiguous()}, str(path), metadata=ident)


def load_head_scores(path, m):
    """Read head scores saved by save_head_scores; a ValueError naming both models if the file
    was written for another model (architecture, shape or weights)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        saved = f.metadata() or {}
        hs = f.get_tensor("head_scores")
    ident = model_identity(m)

    def describe(d):
        return (f"{d.get('architecture')} with {d.get('n_layer')} layers x {d.get('n_kv_head')} KV heads "
                f"x head_dim {d.get('head_dim')}, weights {d.get('weights_sha256')}")

    if saved != ident or tuple(hs.shape) != (m.cfg.n_layer, m.cfg.n_kv_head):
        raise ValueError(f"head scores in {path} were computed for another model: file {describe(saved)}, "
                         f"shape {tuple(hs.shape)}; this model {describe(ident)}")
    return hs.to(m.device)


# -----------------------------------------------------------------------------
# 4. Eviction

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


LEVELS = ("pair", "head")  # eviction granularity of FullKV.prune


def head_keep_mask(head_scores, ratio: float, n_c: int):
    """Head-level eviction: bool (L, Hkv, n_c), True for every context position of the
    k = round(ratio * L * Hkv) heads with the highest head scores, False for the others.

    It is keep_mask's global ranking with every position of a head given its head's score: the
    kept count k * n_c is a whole number of heads, and a stable sort over the flat (layer, head,
    position) index keeps a head's contiguous positions together, so ties between heads go to the
    lower (layer, head) as a whole. (The authors also spread the head score over the positions and
    threshold the global ranking.)
    """
    check_ratio(ratio)
    if not torch.is_tensor(head_scores) or head_scores.dim() != 2:
        raise ValueError(f"head_scores must be a (n_layer, n_kv_head) tensor, got "
                         f"{tuple(head_scores.shape) if torch.is_tensor(head_scores) else type(head_scores).__name__}")
    L, Hkv = head_scores.shape
    k = round(ratio * (L * Hkv))  # whole heads
    if k == 0 or n_c == 0:
        return torch.zeros(L, Hkv, n_c, dtype=torch.bool, device=head_scores.device)
    per_pair = head_scores.float()[:, :, None].expand(L, Hkv, n_c)  # (L, Hkv, n_c)
    return keep_mask(per_pair, k / (L * Hkv))  # round(k / (L*Hkv) * L*Hkv*n_c) = k * n_c pairs


def integer_budgets(weights, total: int, cap: int) -> list[int]:
    """Split `total` kept pairs over len(weights) groups (layers, heads) in proportion to weights,
    at most `cap` per group: integers that sum exactly to total.

    A group whose share would exceed cap is capped and its excess spread over the others, again in
    proportion to their weights (water-filling); then largest-remainder rounding, ties to the lower
    index. Groups of zero total weight share evenly. Used by PyramidKV's layer budgets
    (baselines.py) and by the benchmark's per-head budgets (bench.py).
    """
    n = len(weights)
    if not 0 <= total <= n * cap:
        raise ValueError(f"cannot split {total} pairs over {n} groups of at most {cap}")
    capped = [False] * n
    while True:  # at most n rounds: each one caps at least one more group
        free = total - cap * sum(capped)
        weight = sum(w for w, c in zip(weights, capped) if not c)
        n_free = n - sum(capped)
        share = [cap if c else free * w / weight if weight > 0 else free / n_free
                 for w, c in zip(weights, capped)]
        over = [not c and x > cap for x, c in zip(share, capped)]
        if not any(over):
            break
        capped = [c or o for c, o in zip(capped, over)]
    budgets = [min(cap, math.floor(x)) for x in share]
    for i in sorted(range(n), key=lambda i: budgets[i] - share[i]):  # largest remainder first; stable
        if sum(budgets) < total and budgets[i] < cap:
            budgets[i] += 1
    assert sum(budgets) == total, (budgets, total)
    return budgets


# -----------------------------------------------------------------------------
# 5. The packed compressed cache

class CompressedKV:
    """KV pairs kept after eviction, packed per layer; decodes new tokens without copying itself.

    Per layer l:
      k[l], v[l]  (N_l, D)   the kept pairs of all KV heads, head-major: rows offsets[l][h] ..
                             offsets[l][h+1] - 1 belong to KV head h, in increasing position
                             (the n_p prefix pairs first, then that head's kept context pairs)
      offsets[l]  (Hkv + 1,) int64 cumulative row counts; lengths differ between heads
    Decoding: the Triton varlen kernel for single tokens (backend "triton", or "auto" on CUDA);
    packed_attention (the readable reference, backend "reference"); on a CPU with backend "auto",
    torch's fused attention: packed_decode for single tokens of a 16-bit cache (all heads in one
    call, through each layer's DecodePlan, `plans`, built with the cache), packed_attention_fused
    (a call per head) otherwise. All are tested against the reference.
    bits = 16: k[l], v[l] are tensors in the model's dtype. bits = 8 or 4: they are
    quant.Quantized blocks (uint8 codes, int4 two per byte, plus an fp16 scale and zero per group
    of 32 values of a row); decoding dequantizes one head's rows at a time (packed_attention) or
    inside the kernel's tile loads, never the whole cache.
    Keys were cached after RoPE, so kept pairs need no re-rotation: they keep their positions.
    New tokens (a query and its answer) go to a dense tail, tail_k[l], tail_v[l] (Hkv, cap, D),
    at positions n_p + n_c + i, always in the model's dtype (not quantized: it is small, and it is
    dropped again by `truncate`). `truncate` back to the context drops them, so the same
    compressed cache serves the next query.

    Memory: `nbytes` counts the packed K and V, the offsets, the decode plans if any (0.9% of
    the packed bytes at bench.py's Llama-3.1-8B layer, 1.7% for the default model; see
    DecodePlan), and the n_tail tail rows in use. The
    tail buffers are allocated by `reserve` (room for a query and its answer, grown by doubling)
    and released when `truncate` returns to the context (n_tail = 0): between queries the cache
    holds exactly nbytes, however long the last query was. (Keeping the buffer for the next query
    would save one small allocation per query, and hold memory that nbytes does not report.)
    """

    def __init__(self, k, v, offsets, base_len: int, backend: str = "auto"):
        self.k, self.v, self.offsets = k, v, offsets  # lists over layers: tensors or quant.Quantized
        self.bits = k[0].bits if isinstance(k[0], quant.Quantized) else 16
        self._bounds = [o.tolist() for o in offsets]  # the same offsets as Python ints, for slicing
        self.base_len = base_len  # n_p + n_c: positions of new tokens start here
        self.n_tail = 0
        Hkv, D = offsets[0].numel() - 1, k[0].shape[1]
        self.dtype = k[0].dtype  # the model's dtype (a Quantized block keeps its input's): the tail's
        device = offsets[0].device
        self.tail_k = [torch.empty((Hkv, 0, D), dtype=self.dtype, device=device) for _ in k]
        self.tail_v = [torch.empty((Hkv, 0, D), dtype=self.dtype, device=device) for _ in k]
        model_lib.check_backend(backend)
        self.backend = backend  # decode path: packed_attention, or the Triton varlen kernel (see attend)
        self.plans = None  # per layer, the DecodePlan of the CPU's single-token path (see attend)
        if backend == "auto" and device.type == "cpu" and self.bits == 16:
            self.plans = [DecodePlan(kl, vl, b) for kl, vl, b in zip(k, v, self._bounds)]

    @classmethod
    def from_full(cls, cache, n_prefix: int, keep, backend: str = "auto", bits: int = 16):
        """Gather the kept rows of a dense cache, stored in its dtype (bits=16) or quantized
        (bits=8 or 4, see quant.quantize). keep: bool (L, Hkv, n_c)."""
        check_bits(bits)
        L, Hkv, n_c = keep.shape
        prefix = torch.ones(Hkv, n_prefix, dtype=torch.bool, device=keep.device)
        ks, vs, offs = [], [], []
        for l in range(L):
            rows = torch.cat([prefix, keep[l]], dim=1)  # (Hkv, n_p + n_c): the prefix is never evicted
            # boolean indexing of (Hkv, S, D) by (Hkv, S) walks head by head: exactly head-major packing
            k, v = cache.keys(l)[rows], cache.values(l)[rows]  # (N_l, D) each, new tensors
            if bits == 16:
                ks.append(k)
                vs.append(v)
            else:
                ks.append(quant.quantize(k, bits))
                vs.append(quant.quantize(v, bits))
            counts = rows.sum(dim=1)  # (Hkv,)
            offs.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))  # (Hkv + 1,) int64
        return cls(ks, vs, offs, base_len=n_prefix + n_c, backend=backend)

    # --- the cache protocol (see model.KVCache) ---
    @property
    def seq_len(self) -> int:
        return self.base_len + self.n_tail

    def reserve(self, n: int):
        """Make room for n more new tokens: grows only the small tail, never the packed buffers
        (doubling, so a long answer decoded token by token copies the tail only a few times)."""
        for buf in (self.tail_k, self.tail_v):
            model_lib.grow(buf, self.n_tail, self.n_tail + n, at_least=2 * buf[0].shape[1])

    def attend(self, layer: int, q, k, v):
        """Store new k, v (Hkv, T, D) in the tail; q (Hkv, G, T, D) attends per KV head over
        [that head's kept pairs ; tail]. Returns (Hkv, G, T, D)."""
        T = k.shape[1]
        end = self.n_tail + T
        self.tail_k[layer][:, self.n_tail:end] = k
        self.tail_v[layer][:, self.n_tail:end] = v
        tk, tv = self.tail_k[layer][:, :end], self.tail_v[layer][:, :end]  # (Hkv, n_tail + T, D)
        if T == 1 and use_triton(self.backend, q.device):  # the kernel decodes one token at a time
            out = triton_kernels(q.device).varlen_decode_attention(
                q[:, :, 0], self.k[layer], self.v[layer], self.offsets[layer], tk, tv,
                offsets_host=self._bounds[layer])  # (Hkv, G, D)
            return out.unsqueeze(2)
        if self.backend == "auto" and q.device.type == "cpu":
            if T == 1 and self.plans is not None:
                return packed_decode(q, self.k[layer], self.v[layer], self.plans[layer], tk, tv)
            return packed_attention_fused(q, self.k[layer], self.v[layer], self._bounds[layer], tk, tv)
        return packed_attention(q, self.k[layer], self.v[layer], self._bounds[layer], tk, tv)

    def advance(self, n: int):
        self.n_tail += n

    def truncate(self, seq_len: int):
        if not self.base_len <= seq_len <= self.seq_len:
            raise ValueError(f"can truncate only to [{self.base_len}, {self.seq_len}], got {seq_len}")
        self.n_tail = seq_len - self.base_len
        if self.n_tail == 0:  # back to the context: release the tail buffers (see the class docstring)
            self.tail_k = [t.new_empty((t.shape[0], 0, t.shape[2])) for t in self.tail_k]  # (Hkv, 0, D)
            self.tail_v = [t.new_empty((t.shape[0], 0, t.shape[2])) for t in self.tail_v]

    @property
    def nbytes(self) -> int:
        """Bytes held for the context: packed K and V (quantized: codes, scales and zeros), the
        offsets, the decode plans (a CPU cache in the model's dtype), and any new tokens' K/V."""
        packed = sum(stored_bytes(t) for t in self.k + self.v + self.offsets)
        plans = sum(p.nbytes for p in self.plans or [])
        tail = sum(t[:, :self.n_tail].numel() * t.element_size() for t in self.tail_k + self.tail_v)
        return packed + plans + tail

    def head_lengths(self):
        """Kept pairs per (layer, KV head), prefix included: (L, Hkv) int64."""
        return torch.stack([o.diff() for o in self.offsets])


def stored_bytes(x) -> int:
    """Bytes of a tensor, or of a quant.Quantized block (codes + scales + zeros)."""
    return quant.nbytes(x) if isinstance(x, quant.Quantized) else x.numel() * x.element_size()


def packed_rows(x, start: int, end: int, dtype):
    """Rows start .. end - 1 of a packed buffer as floats (end - start, D): a view of a tensor, or
    just these rows of a quant.Quantized block dequantized (one head, never the whole cache)."""
    if isinstance(x, quant.Quantized):
        return quant.dequantize_rows(x, start, end, dtype)
    return x[start:end]


def packed_attention(q, k_packed, v_packed, bounds, tail_k, tail_v):
    """Attention over a packed cache, one KV head at a time (the torch decode path).

    q (Hkv, G, T, D): the new tokens, which are the last T rows of the tail; k_packed, v_packed
    (N, D) with head h in rows bounds[h] .. bounds[h+1] - 1 (tensors, or quant.Quantized blocks
    whose head rows are dequantized to q's dtype just before use); tail_k, tail_v (Hkv, n_tail, D).
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
        kh = packed_rows(k_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        vh = packed_rows(v_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        qh = q[h].reshape(G * T, D) / math.sqrt(D)  # scale the few query rows, not the n_h logits
        # keys on the long side of the product: (n_h, D) @ (D, G*T) is a much faster GEMM shape on
        # a CPU than (G*T, D) @ (D, n_h) (measured 3.6x for n_h = 35k, G*T = 4), same numbers
        ctx = (kh @ qh.T).T  # (G*T, n_h)
        new = (tail_k[h] @ qh.T).T.masked_fill(causal, float("-inf"))  # (G*T, n_tail)
        p = torch.softmax(torch.cat([ctx, new], dim=-1).float(), dim=-1).to(vh.dtype)  # (G*T, n_h + n_tail)
        y = p[:, :kh.shape[0]] @ vh + p[:, kh.shape[0]:] @ tail_v[h]  # (G*T, D)
        out[h] = y.view(G, T, D)
    return out


def packed_attention_fused(q, k_packed, v_packed, bounds, tail_k, tail_v):
    """packed_attention through torch's fused CPU attention: same arguments, same result.

    The keys are split into disjoint sets; `attention_lse` gives each set's attention with its row
    log-sum-exps, and `merge_attention` joins them exactly, once, at the end:
      - the tail: its older rows (seen by every new row) and the T new rows (causal);
      - each head's kept rows, with the group's G query heads folded into G * T rows of one head,
        so that each K/V row is read once for the whole group. One new token (decode) has only G
        rows per head, too few to share among threads, so each head's rows are cut into `pieces`
        equal pieces, each a "head" of one call (views, no copy); the n_h % pieces rows left over
        are one-key sets (a single key's lse is its logit, its output its value row).
    Few torch calls on purpose: under OMP_WAIT_POLICY=PASSIVE (the command lines set it) each call
    that runs on several threads first wakes them, 0.1-0.2 ms on the project's 2-core machine. So
    there is one call per head, one for the tail and one merge: about 3 ms of fixed cost per layer
    (8 KV heads) against 4-5.5 ms when each head was merged on its own and its leftover rows had a
    call of their own, and 0.2-0.3 ms for the full cache's single SDPA call. See bench.py's decode
    row for the time at the Llama-3.1-8B geometry.
    Returns (Hkv, G, T, D).
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
    # one token: two pieces per thread, so that a thread done early takes another (measured 5%
    # faster than one per thread at 124k keys); many rows already keep every thread busy
    pieces = 2 * torch.get_num_threads() if T == 1 else 1
    outs, lses, left_k, left_v = [], [], [], []
    for h in range(Hkv):
        kh = packed_rows(k_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        vh = packed_rows(v_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
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
        L = pieces - 1  # at most L rows per head, padded to L with empty (-inf) sets
        lk = torch.stack([F.pad(k, (0, 0, 0, L - len(k))) for k in left_k])  # (Hkv, L, D)
        lv = torch.stack([F.pad(v, (0, 0, 0, L - len(v))) for v in left_v])  # (Hkv, L, D)
        logit = (qs[:, :, 0, None] * lk[:, None]).sum(-1).float()  # (Hkv, G, L): a lone key's lse
        real = torch.arange(L, device=q.device) < torch.tensor(n_left, device=q.device)[:, None]  # (Hkv, L)
        logit = logit.masked_fill(~real[:, None], -math.inf)
        parts += [(lv[:, None, i, None].expand(Hkv, G, 1, D), logit[:, :, i, None]) for i in range(L)]
    return merge_attention(parts)[0].to(q.dtype)


# One new token over a layer's packed rows in one fused call: the CPU's decode step (16-bit caches).
#
# packed_attention_fused makes a call per KV head, because heads keep different numbers of rows and
# one call takes equal pieces of one tensor. Each call has a fixed cost: under
# OMP_WAIT_POLICY=PASSIVE its threads are woken first, and they wait for each other at its end;
# on the project's 2-core machine 8 calls over 8 heads' rows took 1.7-3 ms longer than one call
# over the same rows, about a tenth of a decode step at bench.py's geometry. A compressed layer's
# packed rows never change, so they are cut once, when the cache is built, into equal pieces that
# ignore head boundaries (a DecodePlan), and every decode step attends over all heads' rows in one
# call (plus one for the few rows the pieces leave out, and one for the tail).

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
    each (`extra_k`, `extra_v` (E, L, D), zero-padded to L rows and hidden again by `extra_mask`
    (E, L); their heads `extra_heads` (E,)). The N - P*s rows past the last piece go to extra
    pieces too. So every packed row is attended exactly once, by its own head's queries.
    Memory (`nbytes`, which CompressedKV.nbytes counts): the mask, 1/(2D) of the layer's K and V
    bytes in the same dtype (0.4% at D = 128), and the copied rows, which the choice of s keeps few
    (0.9% in all at bench.py's decode layer: 124k tokens, ratio 0.3, Llama-3.1-8B geometry).
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
        L = min(EXTRA_ROWS, max([hi - lo for _, lo, hi in runs], default=0))
        self.extra_k = k_packed.new_zeros(len(extra), L, D)
        self.extra_v = v_packed.new_zeros(len(extra), L, D)
        self.extra_mask = torch.full((len(extra), L), -math.inf, dtype=k_packed.dtype, device=k_packed.device)
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
    out (M, R, D), lse (M, R), head (M,) -> (n_heads, R, D). Each part's weight is its softmax
    mass relative to the largest lse of its head; a (n_heads, M) 0/1 matrix sums each head's parts."""
    M, R = lse.shape
    top = torch.full((n_heads, R), -math.inf, device=lse.device).scatter_reduce(
        0, head[:, None].expand(M, R), lse, "amax")  # (n_heads, R): each head's largest lse
    w = torch.exp(lse - top[head])  # (M, R), in (0, 1]
    onehot = (head[None, :] == torch.arange(n_heads, device=head.device)[:, None]).to(w.dtype)  # (n_heads, M)
    num = onehot @ (w[:, :, None] * out.float()).reshape(M, -1)  # (n_heads, R * D)
    return num.view(n_heads, R, -1) / (onehot @ w)[..., None]


def packed_decode(q, k_packed, v_packed, plan: DecodePlan, tail_k, tail_v):
    """packed_attention for one new token (T == 1) over a DecodePlan of the packed rows: one fused
    call over the plan's P pieces, one over its extra pieces, one over the tail, one merge.
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


# -----------------------------------------------------------------------------
# 6. Answering queries from a (compressed) cache

def query_ids(tok, query: str, template: bool = True) -> list[int]:
    """A query as token ids: "\\n\\n" + query, then the assistant postfix, each encoded on its own;
    or the raw text (template=False) for completion probes."""
    if not isinstance(query, str) or not query.strip():
        raise InputError("empty query")
    if not template:
        return tok.encode(query)
    return tok.encode("\n\n" + query) + tok.encode(tok.postfix)


@torch.no_grad()
def generate_ids(m, tok, ids: list[int], kv, max_new_tokens: int = 64, keep: bool = False) -> list[int]:
    """Greedy answer ids to the input ids, from kv (anything following the cache protocol: a
    FullKV or a CompressedKV). By default the cache goes back to its state before the call (the
    input and answer are dropped), so the same cache serves the next query; keep=True leaves them
    in (multi-turn use)."""
    model_lib.check_max_new_tokens(max_new_tokens)
    limit = m.cfg.max_position_embeddings
    if kv.seq_len + len(ids) + max_new_tokens > limit:
        raise InputError(f"query of {len(ids)} tokens plus {max_new_tokens} new tokens does not fit "
                         f"after the {kv.seq_len} cached positions (model limit {limit})")
    start = kv.seq_len
    kv.reserve(len(ids) + max_new_tokens)
    try:
        return model_lib.generate(m, ids, kv, max_new_tokens, tok.stop_ids)
    finally:
        if not keep:
            kv.truncate(start)


def generate(m, tok, query: str, kv, max_new_tokens: int = 64, template: bool = True,
             keep: bool = False) -> str:
    """Greedy answer to `query` from kv (a FullKV or a CompressedKV); returns only the new text.
    The cache is left as it was (keep=False) or with the turn appended (keep=True)."""
    return tok.decode(generate_ids(m, tok, query_ids(tok, query, template), kv, max_new_tokens, keep))


# -----------------------------------------------------------------------------
# 7. Demo

# The default demo: pass keys hidden in ~1000 tokens of seeded filler (tasks.needle_task), asked
# as completion probes ("The pass key for the red door is"). Seed 4 is the first seed whose four
# keys the default 135M model all retrieves from the full cache (measured; seeds 0-3 miss one to
# three), so whatever goes wrong is the compression's doing. Chat questions about
# tasks.fact_task's people are no use here: the model answers them with filler even from the full
# cache.
DEMO_TASK = dict(n_tokens=1000, n_needles=4, seed=4)


def _first_line(text: str, width: int = 72) -> str:
    """The first non-empty line of an answer (the part tasks.check_answer judges), cut to width."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[:width - 3] + "..."


def main(argv=None):
    p = errors.ArgumentParser(prog="kvzip.py", description="KVzip demo: full-cache vs compressed-cache answers.")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept")
    p.add_argument("--context", help="a text file to use as the context (default: built-in)")
    p.add_argument("--query", action="append", help="a question (repeatable)")
    p.add_argument("--model", help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    # cheap checks first: nothing is loaded, prefilled or scored before the arguments are usable
    try:
        check_ratio(args.ratio)
    except ValueError as e:
        p.error(f"--ratio: {e}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for q in args.query or []:
        if not q.strip():
            p.error(f"--query {q!r}: empty question")
    if args.model and (why := errors.check_folder(args.model, "--model")):
        p.error(why)
    context = None
    if args.context:
        context = errors.read_text(args.context, "--context")  # UTF-8, not empty; else one line

    t0 = time.perf_counter()

    def progress(msg):  # the slow steps; on stdout, so that stderr holds only an error's one line
        print(f"[{time.perf_counter() - t0:5.1f} s] {msg}", flush=True)

    m, tok = model_lib.load(args.model)  # fails in one line for a broken checkpoint, before any output
    progress("model loaded")
    if context is None:
        task = tasks.needle_task(**DEMO_TASK, tok=tok)
        context = task["context"]
        about = (f"seeded filler with {DEMO_TASK['n_needles']} pass keys hidden in it "
                 f"(tasks.needle_task, seed {DEMO_TASK['seed']})")
        if args.query:  # questions about the built-in context, in the chat template; no answer key
            probes, template = [(q, None) for q in args.query], True
        else:
            probes, template = task["probes"], False  # completion probes, each with its key
    else:
        about = args.context
        queries = args.query or ["Summarize the context in one sentence."]
        probes, template = [(q, None) for q in queries], True

    progress(f"prefill and scoring by reconstruction ({len(tok.encode(context))} context tokens)")
    t1 = time.perf_counter()
    try:
        kv = prefill(m, tok, context)
    except InputError as e:  # too long for this model: name the file it came from
        raise InputError(f"--context {args.context}: {e}" if args.context else str(e)) from None
    t_prefill = time.perf_counter() - t1
    ckv = kv.prune(args.ratio)
    n_p, n_c = kv.n_prefix, kv.n_context
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    kept = round(args.ratio * L * Hkv * n_c)  # context pairs kept by the global ranking
    rows = (kept + L * Hkv * n_p) / (L * Hkv * (n_p + n_c))  # the prefix is never evicted
    plans = sum(p.nbytes for p in ckv.plans or [])  # the CPU's decode plans (DecodePlan)
    print(f"context: {n_c} tokens, {about}")
    print(f"KV cache: full {kv.nbytes / 2**20:.2f} MiB; compressed at ratio {args.ratio}: "
          f"{ckv.nbytes / 2**20:.2f} MiB ({ckv.nbytes / kv.nbytes:.1%} of the bytes)")
    print(f"  why not {args.ratio:.0%}: the ratio counts context pairs only; the {n_p}-token prefix (chat "
          f"template + KVzip's instruction) is never evicted, so {rows:.1%} of the rows stay "
          f"(({kept:,} + {L * Hkv * n_p:,} prefix) of {L * Hkv * (n_p + n_c):,}), plus the per-head offsets"
          + (f" and the decode plans ({plans / 2**20:.2f} MiB, see DecodePlan)" if plans else ""))
    print()

    n_right = {"full": 0, "compressed": 0}
    for i, (q, expected) in enumerate(probes):
        progress(f"answering {i + 1}/{len(probes)} from both caches")
        print(f"Q: {q}" + (f"   (expected {expected})" if expected else ""))
        answers = {}
        for name, cache in (("full", kv), ("compressed", ckv)):
            answers[name] = generate(m, tok, q, cache, args.max_new_tokens, template=template)
            mark = ""
            if expected:
                right = tasks.check_answer(answers[name], expected)
                n_right[name] += right
                mark = "   right" if right else "   WRONG"
            print(f"  {name + ' cache':<16}: {_first_line(answers[name])}{mark}")
        if not expected:
            same = tasks.first_line(answers["full"]) == tasks.first_line(answers["compressed"])
            print(f"  {'':<16}  (first lines {'agree' if same else 'differ'})")
    n_scored = sum(1 for _, e in probes if e)
    if n_scored:
        print(f"\nright: full cache {n_right['full']}/{n_scored}, compressed cache "
              f"{n_right['compressed']}/{n_scored} at ratio {args.ratio}")
    progress(f"done (prefill and scoring {t_prefill:.1f} s)")


if __name__ == "__main__":
    errors.run(main, prog="kvzip.py")
