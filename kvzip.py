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
  3. prefill, score_context - prefix + context into a full cache (FullKV), then scoring by reconstruction;
     scored_layers          - which layers are scored and evicted (a hybrid model's global ones; scored_rows)
  4. head_scores            - the scores reduced to one per KV head, once per model (save/load_head_scores)
  5. keep_mask, FullKV.prune - eviction: one global ranking (non-uniform head budgets) or per head;
     head_keep_mask         - head-level eviction: whole heads, no reconstruction pass per context
  6. CompressedKV           - the packed cache: per layer one buffer of the kept K/V of all KV heads,
                              in the model's dtype or quantized to int8/int4 (quant.py);
     packed_attention       - decoding over it, one KV head at a time (the spec)
  6b. save_compressed, load_compressed - a compressed cache in one safetensors file, checked on loading
  7. generate               - greedy answers from a full or compressed cache, which stays unchanged
  7b. BatchedTails, shared_attention - many queries over one shared cache; 7c. prefill_online - KVzip online
  8. the command line: `python kvzip.py` (demo), --save FILE, --load FILE

Shape alphabet (one sequence, no batch dimension):
  L    layers                        Hkv  KV heads        G   query heads per KV head
  L'   scored layers (scored_layers: all L, or a hybrid model's global layers)
  D    head dim                      n_p  prefix tokens   n_c context tokens
  n_q  tokens of one reconstruction input (prompt + postfix + chunk)
  T    new tokens of one forward     S    positions held in a dense cache (as in model.py)
  N    rows of a layer's packed buffer (all KV heads); n_h of them belong to KV head h

The fast paths live in their own files and are tested against the code here: fused.py (the CPU's:
torch's fused attention) and kernels.py (the GPU's: Triton). The `backend` argument, model.py's
one switch, chooses: "reference" runs this file's readable code, "auto" the fastest tested path
for the device, "triton" the kernels. The query-aware baselines are in baselines.py; explain.py
runs this pipeline on a hand-checkable toy model and draws which tokens are kept.

Left out on purpose: batching several contexts (several queries over one cache are batched, 7b).
"""
from __future__ import annotations

import math
import os
import sys
import textwrap
import time

import errors
from errors import InputError

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import torch  # noqa: E402 (after the OpenMP setting above)

import fused  # noqa: E402
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
    row sums to 1; raw logits are not, so a head whose queries and keys have larger norms scores
    every pair higher. Neither the paper nor the authors' code says that this variant rescales
    heads, so the scaled logits are ranked as they are, in the one global ranking (keep_mask), like
    Eq. 2's scores. An ablation, not a fast path: this is its only implementation.
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

def scored_layers(windows) -> list[int]:
    """The layers whose context pairs KVzip scores and evicts, from the per-layer windows of a
    model (ModelConfig.windows) or cache (None for a full-attention layer): every layer of an
    ordinary model; of a hybrid one (Gemma 3) the full-attention ("global") layers only.

    A sliding layer already holds only its window of the context's last positions (window - 1 of
    them, model.WindowKVCache), whatever the context's length: evicting there would save little
    and cost the recent tokens every answer starts from. So its window is kept whole, never scored,
    and never counted in the ratio: ratio is the fraction of the global layers' context pairs kept.
    (The authors' code also scores only Gemma 3's global layers, but backs the sliding layers' full
    caches up before scoring and restores them afterwards, and evicts by masking, so nothing is
    freed; here the sliding layers never hold more than their window.)
    """
    return [l for l, w in enumerate(windows) if w is None]


def scored_rows(windows) -> dict[int, int]:
    """{layer: its row} in the (L', ...) scores, keep masks and head scores, for the scored layers."""
    return {l: i for i, l in enumerate(scored_layers(windows))}


def n_window_kept(n_positions: int, window: int) -> int:
    """How many of the last positions a sliding layer keeps after n_positions: window - 1 (the next
    token's window is those and itself), or all of them if fewer."""
    return min(n_positions, window - 1)


def has_windows(kv) -> bool:
    """Whether a FullKV or CompressedKV has sliding layers (a hybrid model's)."""
    return any(w is not None for w in kv.windows)


class FullKV:
    """The uncompressed cache of prefix + context, plus KVzip's scores of every context pair.

    cache:  model.KVCache holding n_p + n_c positions (keys post-RoPE); for a hybrid model a
            model.WindowKVCache, whose sliding layers hold only their window
    scores: (L', Hkv, n_c) float32, or None if scoring was skipped; L' = len(layers)
    layers: the scored layers (scored_layers): all L, or a hybrid model's global layers only;
            scores, keep masks and head scores have one row per scored layer, in this order
    It stays available after pruning, so several ratios can be tried from one prefill and one
    scoring pass: each prune(r) builds a new CompressedKV. It follows the cache protocol (see
    model.KVCache) by handing every call to its cache, so generate takes it like a CompressedKV.
    """

    def __init__(self, cache, scores, n_prefix: int, context_ids: list[int], backend: str = "auto",
                 prefix_ids: list[int] | None = None, model_identity: dict | None = None):
        self.cache, self.scores = cache, scores
        self.n_prefix, self.n_context = n_prefix, len(context_ids)
        self.context_ids, self.prefix_ids = context_ids, prefix_ids
        self.backend = backend  # scoring, and the decode path of the compressed caches it prunes to
        self.layers = scored_layers(cache.windows)
        # what a saved compressed cache records about its origin (CompressedKV.save)
        self.model_identity = model_identity
        self.chunk_size = self.scorer = None  # set by score_context

    def prune(self, ratio: float, uniform: bool = False, scores=None, layer_budgets=None,
              level: str = "pair", head_scores=None, *, bits: int = 16) -> "CompressedKV":
        """Keep `ratio` of the context's KV pairs (prefix always kept): a new compressed cache.

        level="pair" (default): scores (L', Hkv, n_c) to rank by, default KVzip's own (L' = the
        scored layers, self.layers: a hybrid model's global ones);
        layer_budgets: per-layer counts (PyramidKV); otherwise one global ranking, or per-head
        budgets when uniform.
        level="head": keep the whole context of the round(ratio * L * Hkv) heads ranked highest by
        head_scores (L', Hkv) (see head_scores()) and nothing of the others'; needs no pair scores,
        so no reconstruction pass (prefill(..., score=False) is enough).
        bits: 16 stores the kept K/V in the model's dtype; 8 or 4 stores them quantized
        (quant.py: groups of 32 along D, fp16 scale and zero per group). ratio=1.0 with bits 8 or 4
        is quantization alone.
        The returned cache's kept_ratio is the fraction of context pairs actually kept (at head
        level a whole number of heads, so it can differ from ratio by up to half a head).
        """
        quant.check_bits(bits)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}, got {level!r}")
        if level == "head":
            if head_scores is None:
                raise ValueError("level='head' needs head_scores= (L, Hkv), e.g. from kvzip.head_scores "
                                 "or kvzip.load_head_scores")
            if uniform or scores is not None or layer_budgets is not None:
                raise ValueError("level='head' ranks whole heads by head_scores; uniform=, scores= and "
                                 "layer_budgets= apply to level='pair' only")
            want = (len(self.layers), self.cache.k[0].shape[0])  # (L', Hkv) of this cache
            if not torch.is_tensor(head_scores) or tuple(head_scores.shape) != want:
                got = tuple(head_scores.shape) if torch.is_tensor(head_scores) else type(head_scores).__name__
                raise ValueError(f"head_scores must have shape (scored layers, n_kv_head) = {want} for this "
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
        ckv = self.pack(keep, bits=bits)
        rule = "head" if level == "head" else "layer_budgets" if layer_budgets is not None else \
            "uniform" if uniform else "global"
        ckv.info.update(ratio=repr(float(ratio)), level=level, budget=rule,
                        scores="given" if scores is not None and scores is not self.scores else "kvzip")
        return ckv

    def pack(self, keep, bits: int = 16) -> "CompressedKV":
        """The compressed cache of the context pairs `keep` (bool (L', Hkv, n_c), one row per
        scored layer) selects, prefix always kept (and a hybrid model's sliding windows whole);
        prune computes keep from scores, callers with a mask of their own pass it here.
        Its kept_ratio is the fraction of the scored layers' context pairs kept."""
        quant.check_bits(bits)
        ckv = CompressedKV.from_full(self.cache, self.n_prefix, keep, self.backend, bits=bits)
        ckv.kept_ratio = keep.sum().item() / max(1, keep.numel())  # context pairs kept, as a fraction
        ckv.prefix_ids, ckv.context_ids = self.prefix_ids, self.context_ids
        ckv.model_identity = self.model_identity
        # how the pairs were chosen, as strings (the metadata of a saved file); prune fills in more
        ckv.info = dict(ratio="", level="mask", budget="mask", scores="mask",
                        chunk_size=str(self.chunk_size or ""), scorer=self.scorer or "")
        return ckv

    @property
    def windows(self) -> list:
        """Per layer, a sliding layer's window or None (model.ModelConfig.windows)."""
        return self.cache.windows

    @property
    def dense_nbytes(self) -> int:
        """Bytes a cache without sliding windows would hold for the same positions: every layer
        holding all of them (what a non-hybrid model of this shape would need). Equals nbytes for
        an ordinary model."""
        return sum(2 * k.shape[0] * k.shape[2] * k.element_size() for k in self.cache.k) * self.seq_len

    def save(self, path):
        """Not supported: the file format holds a compressed cache. (A user who tries this gets
        the way to it, instead of an AttributeError.)"""
        raise InputError(f"kv.save({path!r}): the full cache is not saved; save a compressed one, "
                         "kv.prune(ratio).save(path) (ratio 1.0 keeps every pair)")

    # --- the cache protocol, handed to the dense cache ---
    @property
    def floor(self):
        """A WindowKVCache's rollback floor (model.rollback sets it), None for a dense cache."""
        return getattr(self.cache, "floor", None)

    @floor.setter
    def floor(self, value):
        self.cache.floor = value

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


def check_context(m, tok, context: str, chunk_size: int = CHUNK_SIZE, score: bool = True,
                  prefill_chunk: int = model_lib.PREFILL_CHUNK):
    """(prefix ids, context ids) for prefill / prefill_online, or an InputError naming the problem."""
    if isinstance(context, str) and not context.strip():
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
        raise InputError(f"context too long: {n_c} tokens; the model's {m.cfg.max_position_embeddings}-token limit "
                         f"leaves room for at most {limit} context tokens after the {n_p}-token prefix"
                         + (" and the reconstruction input" if score else ""))
    return p_ids, context_ids


def prefill_ids(m, tok, p_ids: list[int], context_ids: list[int], chunk_size: int = CHUNK_SIZE,
                backend: str = "auto", prefill_chunk: int = model_lib.PREFILL_CHUNK) -> FullKV:
    """The unscored FullKV of prefix + context ids (checked by check_context), its cache with room
    for the reconstruction input too, so that scoring never has to grow (copy) the cache."""
    room = max_reconstruction_len(tok, min(chunk_size, len(context_ids)))
    capacity = min(len(p_ids) + len(context_ids) + room, m.cfg.max_position_embeddings)
    cache = m.new_cache(capacity=capacity, backend=backend)
    model_lib.prefill(m, p_ids + context_ids, cache, chunk_size=prefill_chunk)
    return FullKV(cache, None, len(p_ids), context_ids, backend, prefix_ids=p_ids, model_identity=model_identity(m))


@torch.no_grad()
def prefill(m, tok, context: str, chunk_size: int = CHUNK_SIZE, backend: str = "auto",
            score: bool = True, prefill_chunk: int = model_lib.PREFILL_CHUNK, scorer: str = "softmax") -> FullKV:
    """Prefill the template prefix and the context into a full cache, then score it (KVzip).

    backend: see model.BACKENDS ("auto": the Triton kernel on CUDA, fused.ScoringCache on a CPU).
    score=False skips scoring (for the baselines, which score themselves, or to time it apart:
    score_context(m, tok, kv) then scores the same FullKV, and head-level pruning needs no scores).
    scorer: see score_context ("logits": the softmax-free ablation).
    """
    model_lib.check_backend(backend)
    if scorer not in SCORERS:
        raise InputError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    p_ids, context_ids = check_context(m, tok, context, chunk_size, score, prefill_chunk)
    kv = prefill_ids(m, tok, p_ids, context_ids, chunk_size, backend, prefill_chunk)
    if score:
        score_context(m, tok, kv, chunk_size, scorer=scorer)
    return kv


@torch.no_grad()
def score_context(m, tok, kv: FullKV, chunk_size: int = CHUNK_SIZE, backend: str | None = None,
                  scorer: str = "softmax"):
    """KVzip scores (L', Hkv, n_c) of the context pairs in kv's scored layers (kv.layers: all L, or
    a hybrid model's global layers), by context reconstruction; also stored as kv.scores.

    Each chunk's reconstruction input runs through the model on top of the full cache at positions
    after prefix + context (the model's own attention sees the whole cache as usual). In every layer
    the `observe` hook scores the chunk's cached keys against the reduced key set
    K' = [prefix ; chunk ; input]. The input's K/V is removed afterwards: the cache is left as found.
    backend: default kv.backend. On a CPU, "auto" takes the fast path instead (fused.ScoringCache:
    the same scores, from the forward's own attention); "reference" always takes this one.
    scorer: "softmax" (Eq. 2) or "logits" (the softmax-free ablation, chunk_scores_logits, always
    on this path).
    A hybrid model runs as usual, its sliding layers attending within their window (the input's
    K/V stored and rolled back in them too); only the global layers' chunk is scored, here on this
    path (fused.ScoringCache reads every layer's whole cache, which a sliding layer does not hold).
    """
    if scorer not in SCORERS:
        raise InputError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    backend = kv.backend if backend is None else backend
    cfg, cache, n_p = m.cfg, kv.cache, kv.n_prefix
    fast_cpu = backend == "auto" and m.device.type == "cpu" and scorer == "softmax" and not has_windows(kv)
    row = scored_rows(kv.windows)  # layer -> its row of scores
    scores = torch.zeros(len(kv.layers), cfg.n_kv_head, kv.n_context, dtype=torch.float32, device=m.device)
    for start, end, ids in reconstruction_inputs(tok, kv.context_ids, chunk_size):
        ids = torch.tensor(ids, device=m.device)
        if fast_cpu:  # the cache only read; scores written from inside the forward's attention
            m(ids, fused.ScoringCache(cache, n_p, start, end, scores), last_only=True)
            continue

        def observe(layer, q, k):  # q (Hkv, G, n_q, D), k (Hkv, n_q, D): the input's own
            if layer not in row:
                return  # a sliding layer: not scored
            cached = cache.keys(layer)  # (Hkv, n_p + n_c, D); the input is not stored yet
            keys = torch.cat([cached[:, :n_p], cached[:, n_p + start:n_p + end], k], dim=1)  # (Hkv, |K'|, D)
            if scorer == "logits":
                scores[row[layer], :, start:end] = chunk_scores_logits(q, keys, n_p, end - start)
            else:
                scores[row[layer], :, start:end] = chunk_scores(q, keys, n_p, end - start, backend)

        with model_lib.rollback(cache):  # drop the reconstruction input's K/V afterwards
            m(ids, cache, last_only=True, observe=observe)
    kv.scores, kv.chunk_size, kv.scorer = scores, chunk_size, scorer
    return scores


# -----------------------------------------------------------------------------
# 4. Head scores: KVzip's scores reduced to one number per KV head, computed once per model
#
# Head-level eviction (the paper's context-independent variant, in the spirit of DuoAttention)
# drops the whole context KV of the lowest-ranked heads. The ranking comes from a few calibration
# contexts scored once; every later context is pruned with it, with no reconstruction pass.

@torch.no_grad()
def head_scores(m, tok, contexts, chunk_size: int = CHUNK_SIZE, backend: str = "auto"):
    """Head scores (L', Hkv) float32 from calibration contexts: for each context, KVzip's pair scores
    (prefill + score_context) reduced by the max over context positions; then the max over contexts.
    L' = the scored layers (scored_layers: all L, or a hybrid model's global layers).

    A head that ever pays high attention to some context pair while reconstructing some context
    scores high. Use contexts unlike the ones you will evaluate on (the reuse experiment draws
    them from other seeds).
    """
    if isinstance(contexts, str) or not contexts:
        raise ValueError("contexts must be a non-empty list of strings (calibration texts)")
    per_context = [prefill(m, tok, c, chunk_size=chunk_size, backend=backend).scores.amax(dim=-1)
                   for c in contexts]  # each (L', Hkv)
    return torch.stack(per_context).amax(dim=0).float().cpu()  # (L', Hkv)


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
    """Write head scores (L', Hkv) to a small safetensors file, with the model's identity
    (model_identity) in its metadata."""
    from safetensors.torch import save_file
    ident = model_identity(m)
    want = (len(scored_layers(m.cfg.windows)), m.cfg.n_kv_head)
    if not torch.is_tensor(hs) or tuple(hs.shape) != want:
        raise ValueError(f"head scores must have shape (scored layers, n_kv_head) = {want}, got "
                         f"{tuple(hs.shape) if torch.is_tensor(hs) else type(hs).__name__}")
    problem = errors.check_output(path, "head scores")
    if problem:
        raise InputError(problem)
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

    if saved != ident or tuple(hs.shape) != (len(scored_layers(m.cfg.windows)), m.cfg.n_kv_head):
        raise ValueError(f"head scores in {path} were computed for another model: file {describe(saved)}, "
                         f"shape {tuple(hs.shape)}; this model {describe(ident)}")
    return hs.to(m.device)


# -----------------------------------------------------------------------------
# 5. Eviction

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


def head_keep_mask(hs, ratio: float, n_c: int):
    """Head-level eviction: bool (L, Hkv, n_c), True for every context position of the
    k = round(ratio * L * Hkv) heads with the highest head scores hs (L, Hkv), False for the others.

    It is keep_mask's global ranking with every position of a head given its head's score: the
    kept count k * n_c is a whole number of heads, and a stable sort over the flat (layer, head,
    position) index keeps a head's contiguous positions together, so ties between heads go to the
    lower (layer, head) as a whole. (The authors also spread the head score over the positions and
    threshold the global ranking.)
    """
    check_ratio(ratio)
    if not torch.is_tensor(hs) or hs.dim() != 2:
        raise ValueError(f"head_scores must be a (n_layer, n_kv_head) tensor, got "
                         f"{tuple(hs.shape) if torch.is_tensor(hs) else type(hs).__name__}")
    L, Hkv = hs.shape
    k = round(ratio * (L * Hkv))  # whole heads
    if k == 0 or n_c == 0:
        return torch.zeros(L, Hkv, n_c, dtype=torch.bool, device=hs.device)
    per_pair = hs.float()[:, :, None].expand(L, Hkv, n_c)  # (L, Hkv, n_c)
    return keep_mask(per_pair, k / (L * Hkv))  # round(k / (L*Hkv) * L*Hkv*n_c) = k * n_c pairs


# -----------------------------------------------------------------------------
# 6. The packed compressed cache

class CompressedKV:
    """KV pairs kept after eviction, packed per layer; decodes new tokens without copying itself.

    Per layer l:
      k[l], v[l]  (N_l, D)   the kept pairs of all KV heads, head-major: rows offsets[l][h] ..
                             offsets[l][h+1] - 1 belong to KV head h, in increasing position
                             (the n_p prefix pairs first, then that head's kept context pairs)
      offsets[l]  (Hkv + 1,) int64 cumulative row counts; lengths differ between heads
    Decoding (`attend`): packed_attention below is the spec (backend "reference"); "auto" takes
    the fast path for the device: on CUDA the Triton varlen kernel for single tokens (kernels.py),
    on a CPU torch's fused attention (fused.py; a 16-bit cache builds one fused.DecodePlan per
    layer, `plans`, with the cache, so that one new token attends over all heads in one call).
    bits = 16: k[l], v[l] are tensors in the model's dtype. bits = 8 or 4: quant.Quantized blocks
    (codes plus an fp16 scale and zero per group of 32 values of a row); decoding dequantizes one head's
    rows, or blocks of them (fused.quantized_decode), or inside the kernel's tile loads, never the cache.
    Keys were cached after RoPE, so kept pairs need no re-rotation: they keep their positions.
    New tokens (a query and its answer) go to a dense tail, tail_k[l], tail_v[l] (Hkv, capacity, D),
    at positions n_p + n_c + i, in the model's dtype (it is small, and dropped again): `truncate`
    back to the context drops them, so the same compressed cache serves the next query.

    Memory: `nbytes` counts the packed K and V, the offsets, the decode plans if any, and the
    n_tail tail rows in use. The tail buffers are allocated by `reserve` (room for a query and its
    answer, grown by doubling) and released when `truncate` returns to the context (n_tail = 0):
    between queries the cache holds exactly nbytes, however long the last query was.

    A hybrid model's sliding layers (windows[l], the layer's window, or None for a full layer)
    have no packed pairs (k[l], v[l] hold 0 rows; offsets all 0): they keep the window of the
    context's last positions whole (window_kv[l] = (k, v), each (Hkv, n_w, D), n_w = the last
    min(n_p + n_c, window - 1) positions), in the model's dtype, at the front of the layer's tail
    (rows 0 .. n_w - 1, then the new tokens), and attend over it with the window's mask, as
    model.KVCache does. The window is never released: nbytes counts it.
    """

    def __init__(self, k, v, offsets, base_len: int, backend: str = "auto", windows=None, window_kv=None):
        self.k, self.v, self.offsets = k, v, offsets  # lists over layers: tensors or quant.Quantized
        self.bits = next((t.bits for t in k if isinstance(t, quant.Quantized)), 16)
        self._bounds = [o.tolist() for o in offsets]  # the same offsets as Python ints, for slicing
        self.base_len = base_len  # n_p + n_c: positions of new tokens start here
        self.n_tail = 0
        Hkv, D = offsets[0].numel() - 1, k[0].shape[1]
        self.dtype = k[0].dtype  # the model's dtype (a Quantized block keeps its input's): the tail's
        device = offsets[0].device
        self.windows = list(windows) if windows is not None else [None] * len(k)
        empty = torch.empty((Hkv, 0, D), dtype=self.dtype, device=device)
        # a sliding layer's tail starts with its window: n_window[l] rows (0 for a full layer)
        self.tail_k = [empty if w is None else window_kv[l][0] for l, w in enumerate(self.windows)]
        self.tail_v = [empty if w is None else window_kv[l][1] for l, w in enumerate(self.windows)]
        self.n_window = [t.shape[1] for t in self.tail_k]
        model_lib.check_backend(backend)
        self.backend = backend  # the decode path (see attend)
        # a sliding layer's attention: the dense cache's, with the window's mask
        self.window_attention = model_lib.attention if backend == "reference" else model_lib.attention_sdpa
        self.plans = None  # per layer, the fused.DecodePlan of the CPU's single-token path
        if backend == "auto" and device.type == "cpu" and self.bits == 16:
            self.plans = [fused.DecodePlan(kl, vl, b) if w is None else None
                          for kl, vl, b, w in zip(k, v, self._bounds, self.windows)]
        # where it came from, for `save`: set by FullKV.pack and load_compressed
        self.kept_ratio = None
        self.prefix_ids = self.context_ids = self.model_identity = None
        self.info = {}

    def save(self, path):
        """Write this cache to one safetensors file (see save_compressed); load_compressed reads it."""
        save_compressed(self, path)

    @staticmethod
    def no_rows(Hkv: int, D: int, dtype, device):
        """A sliding layer's packed part: (k, v, offsets) holding no rows ((0, D), (0, D), (Hkv + 1,) zeros)."""
        empty = torch.empty((0, D), dtype=dtype, device=device)
        return empty, empty, torch.zeros(Hkv + 1, dtype=torch.int64, device=device)

    @classmethod
    def from_full(cls, cache, n_prefix: int, keep, backend: str = "auto", bits: int = 16):
        """Gather the kept rows of a dense cache, stored in its dtype (bits=16) or quantized
        (bits=8 or 4, see quant.quantize). keep: bool (L', Hkv, n_c), one row per scored layer
        (scored_layers(cache.windows)); a sliding layer keeps its window (see the class docstring)."""
        quant.check_bits(bits)
        layers = scored_layers(cache.windows)
        if keep.shape[0] != len(layers):
            raise ValueError(f"keep has {keep.shape[0]} layers; the cache has {len(layers)} scored layers")
        _, Hkv, n_c = keep.shape
        base_len = n_prefix + n_c
        prefix = torch.ones(Hkv, n_prefix, dtype=torch.bool, device=keep.device)
        ks, vs, offs, window_kv = [], [], [], []
        row = scored_rows(cache.windows)  # layer -> its row of keep
        for l, w in enumerate(cache.windows):
            if w is not None:  # a sliding layer: no packed pairs; its window, copied
                keys, values = cache.keys(l), cache.values(l)  # (Hkv, held, D)
                a = keys.shape[1] - n_window_kept(base_len, w)  # the first of the last positions kept
                window_kv.append((keys[:, a:].clone(), values[:, a:].clone()))
                for out, x in zip((ks, vs, offs), cls.no_rows(Hkv, keys.shape[2], keys.dtype, keys.device)):
                    out.append(x)
                continue
            window_kv.append(None)
            rows = torch.cat([prefix, keep[row[l]]], dim=1)  # (Hkv, n_p + n_c): the prefix is never evicted
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
        return cls(ks, vs, offs, base_len=base_len, backend=backend, windows=cache.windows, window_kv=window_kv)

    # --- the cache protocol (see model.KVCache) ---
    @property
    def seq_len(self) -> int:
        return self.base_len + self.n_tail

    def reserve(self, n: int):
        """Make room for n more new tokens: grows only the small tail, never the packed buffers
        (doubling, so a long answer decoded token by token copies the tail only a few times)."""
        for buf in (self.tail_k, self.tail_v):
            for l, n_w in enumerate(self.n_window):
                one = buf[l:l + 1]  # grow works on a list of buffers
                model_lib.grow(one, n_w + self.n_tail, n_w + self.n_tail + n, at_least=2 * one[0].shape[1])
                buf[l] = one[0]

    def attend(self, layer: int, q, k, v):
        """Store new k, v (Hkv, T, D) in the tail; q (Hkv, G, T, D) attends per KV head over
        [that head's kept pairs ; tail] (a sliding layer: over the window and the tail, masked to
        the window). Returns (Hkv, G, T, D)."""
        T = k.shape[1]
        old = self.n_window[layer] + self.n_tail  # the tail rows before these tokens
        end = old + T
        self.tail_k[layer][:, old:end] = k
        self.tail_v[layer][:, old:end] = v
        tk, tv = self.tail_k[layer][:, :end], self.tail_v[layer][:, :end]  # (Hkv, n_window + n_tail + T, D)
        w = self.windows[layer]
        if w is not None:  # consecutive positions, as in a dense cache: its attention with the mask
            a = max(0, old - w + 1)  # the oldest row the first new token sees
            return self.window_attention(q, tk[:, a:], tv[:, a:], old - a, window=w)
        if T == 1 and use_triton(self.backend, q.device):  # the kernel decodes one token at a time
            out = triton_kernels(q.device).varlen_decode_attention(
                q[:, :, 0], self.k[layer], self.v[layer], self.offsets[layer], tk, tv,
                offsets_host=self._bounds[layer])  # (Hkv, G, D)
            return out.unsqueeze(2)
        if self.backend == "auto" and q.device.type == "cpu":  # the CPU's fast paths
            if T == 1 and self.plans is not None:
                return fused.packed_decode(q, self.k[layer], self.v[layer], self.plans[layer], tk, tv)
            fast = fused.quantized_decode if T == 1 and self.bits != 16 else fused.packed_attention_fused
            return fast(q, self.k[layer], self.v[layer], self._bounds[layer], tk, tv)
        return packed_attention(q, self.k[layer], self.v[layer], self._bounds[layer], tk, tv)

    def advance(self, n: int):
        self.n_tail += n

    def truncate(self, seq_len: int):
        if not self.base_len <= seq_len <= self.seq_len:
            raise ValueError(f"can truncate only to [{self.base_len}, {self.seq_len}], got {seq_len}")
        self.n_tail = seq_len - self.base_len
        if self.n_tail == 0:  # back to the context: release the tail buffers (see the class docstring)
            self.tail_k = [t[:, :n].clone() for t, n in zip(self.tail_k, self.n_window)]  # (Hkv, n_window, D)
            self.tail_v = [t[:, :n].clone() for t, n in zip(self.tail_v, self.n_window)]

    @property
    def nbytes(self) -> int:
        """Bytes held for the context: packed K and V (quantized: codes, scales and zeros), the
        offsets, the decode plans (a CPU cache in the model's dtype), a hybrid model's sliding
        windows, and any new tokens' K/V."""
        packed = sum(quant.nbytes(t) for t in self.k + self.v + self.offsets)
        plans = sum(p.nbytes for p in self.plans or [] if p is not None)
        rows = self.n_window * 2  # per tail buffer (keys, then values): window + new tokens
        tail = sum(t[:, :n + self.n_tail].numel() * t.element_size()
                   for t, n in zip(self.tail_k + self.tail_v, rows))
        return packed + plans + tail

    def head_lengths(self):
        """Kept pairs per (layer, KV head), prefix included: (L, Hkv) int64."""
        return torch.stack([o.diff() for o in self.offsets])


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
        kh = quant.packed_rows(k_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
        vh = quant.packed_rows(v_packed, bounds[h], bounds[h + 1], q.dtype)  # (n_h, D)
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
# 6b. A compressed cache in a file: compress once, answer in later processes
#
# One safetensors file: per layer l the tensors "k.{l}", "v.{l}" (the packed rows in the model's
# dtype) or, for an int8/int4 cache, "k.{l}.codes", "k.{l}.scale", "k.{l}.zero" (likewise v), and
# "offsets.{l}"; a hybrid model's sliding layer l instead holds its window, "window_k.{l}" and
# "window_v.{l}" (Hkv, n_w, D) in the model's dtype; then "prefix_ids" and "context_ids". Its
# metadata (strings) says what the file is (FORMAT, FORMAT_VERSION), which model made it
# (model_identity), and how it was compressed (ratio, bits, level, budget rule, chunk size,
# scorer). The file holds the packed bytes and nothing else: the decode plans are rebuilt on
# loading, from the same rows.

FORMAT, FORMAT_VERSION = "kvzip-ref compressed cache", "1"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
           "U8": torch.uint8}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def save_compressed(ckv: CompressedKV, path):
    """Write ckv (at its context state: no query rows) to `path` as described above."""
    from safetensors.torch import save_file
    if ckv.model_identity is None or ckv.context_ids is None:
        raise ValueError("this compressed cache does not know its model or context (it was not made by "
                         "FullKV.prune or FullKV.pack): nothing to check a later load against")
    if ckv.n_tail:
        raise ValueError(f"the cache holds {ckv.n_tail} query rows (keep=True): truncate it to its "
                         f"context ({ckv.base_len} positions) before saving")
    problem = errors.check_output(path, "compressed cache")  # before the bytes are gathered
    if problem:
        raise InputError(problem)
    tensors = {"prefix_ids": torch.tensor(ckv.prefix_ids, dtype=torch.int64),
               "context_ids": torch.tensor(ckv.context_ids, dtype=torch.int64)}
    for l in range(len(ckv.k)):
        if ckv.windows[l] is not None:  # a sliding layer: its window, the first n_window rows of its tail
            n_w = ckv.n_window[l]
            tensors.update({f"window_k.{l}": ckv.tail_k[l][:, :n_w], f"window_v.{l}": ckv.tail_v[l][:, :n_w]})
            continue
        for name, x in ((f"k.{l}", ckv.k[l]), (f"v.{l}", ckv.v[l])):
            if isinstance(x, quant.Quantized):
                tensors.update({f"{name}.codes": x.data, f"{name}.scale": x.scale, f"{name}.zero": x.zero})
            else:
                tensors[name] = x
        tensors[f"offsets.{l}"] = ckv.offsets[l]
    group = next((t.group for t in ckv.k if isinstance(t, quant.Quantized)), 0)
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, **ckv.model_identity,
                dtype=str(ckv.dtype).removeprefix("torch."), bits=str(ckv.bits), quant_group=str(group),
                n_prefix=str(len(ckv.prefix_ids)), base_len=str(ckv.base_len),
                kept_ratio=repr(ckv.kept_ratio), **ckv.info)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path), metadata=meta)


def read_saved_header(path) -> tuple[dict, dict]:
    """(metadata, {tensor name: header entry}) of a saved cache file, read and checked before any
    tensor (errors.safetensors_header: a safetensors file, complete). InputError naming the file."""
    header = errors.safetensors_header(path, "compressed cache")
    return header.pop("__metadata__", None) or {}, header


def check_saved_format(path, meta: dict):
    """The file's metadata says it is this format, in this version (needs no model)."""
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a compressed cache file (metadata field 'format' is "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format_version is {meta.get('format_version')!r}; this code reads "
                         f"version {FORMAT_VERSION!r}")


def check_saved_model(path, meta: dict, m):
    """The file's identity fields (model_identity) against model m's, one at a time."""
    for field, ours in model_identity(m).items():
        if meta.get(field) != ours:
            raise InputError(f"{path}: made for another model: {field} is {meta.get(field)!r} in the "
                             f"file, {ours!r} for this model")


def _expected_tensors(path, meta: dict, header: dict, L: int, Hkv: int, D: int, windows=None,
                      base_len: int = 0) -> list[str]:
    """The names the file must hold, each checked for dtype and row width against its header entry
    (the row counts follow from the offsets, checked once they are read; a sliding layer's window,
    windows[l], must have the shape (Hkv, min(base_len, window - 1), D))."""
    bits = meta.get("bits")
    if bits not in ("16", "8", "4"):
        raise InputError(f"{path}: metadata field 'bits' is {bits!r}, expected 16, 8 or 4")
    want = {"prefix_ids": ("I64", None), "context_ids": ("I64", None)}
    window_names = []  # a sliding layer's window: its whole shape is known, checked here
    float_name = _DTYPE_NAMES.get(getattr(torch, meta.get("dtype", ""), None))
    for l, w in enumerate(windows or [None] * L):
        if w is not None:
            shape = [Hkv, n_window_kept(base_len, w), D]
            for name in (f"window_k.{l}", f"window_v.{l}"):
                e = header.get(name)
                if e is None:
                    raise InputError(f"{path}: tensor {name!r} is missing (layer {l} is a sliding layer)")
                if e.get("dtype") != float_name or e.get("shape") != shape:
                    raise InputError(f"{path}: tensor {name!r} is {e.get('dtype')} {e.get('shape')}, expected "
                                     f"{float_name} {shape} (the last window - 1 positions)")
                window_names.append(name)
            continue
        want[f"offsets.{l}"] = ("I64", None)
        for kv in "kv":
            if bits == "16":
                want[f"{kv}.{l}"] = (float_name, D)
            else:
                group = int(meta.get("quant_group") or 0) or 1
                want.update({f"{kv}.{l}.codes": ("U8", D * int(bits) // 8),
                             f"{kv}.{l}.scale": ("F16", D // group), f"{kv}.{l}.zero": ("F16", D // group)})
    for name, (dtype, width) in want.items():
        e = header.get(name)
        if e is None:
            raise InputError(f"{path}: tensor {name!r} is missing")
        shape = e.get("shape") or [0]
        if e.get("dtype") != dtype or (width is not None and (len(shape) != 2 or shape[1] != width)):
            raise InputError(f"{path}: tensor {name!r} is {e.get('dtype')} {shape}, expected {dtype} "
                             f"with rows of {width}")
        if name.startswith("offsets.") and shape != [Hkv + 1]:
            raise InputError(f"{path}: tensor {name!r} has shape {shape}, expected [{Hkv + 1}] (KV heads + 1)")
    return list(want) + window_names


@torch.no_grad()
def load_compressed(path, m, backend: str = "auto") -> CompressedKV:
    """The compressed cache saved in `path` (CompressedKV.save), for model m, on m's device.

    Everything is checked before a tensor is used: that the file is a complete safetensors file,
    of this format and version, made for this model (architecture, shapes, weights fingerprint:
    model_identity), holding every tensor with the dtype and shape its metadata implies, and
    offsets that describe its rows. Each problem is one InputError naming the file and the field.
    Rows saved in another float dtype than m's (a cache made on a CPU in float32, loaded on a GPU
    in bfloat16) are converted to m's dtype; otherwise the cache equals the saved one byte for byte.
    """
    from safetensors import SafetensorError, safe_open
    meta, header = read_saved_header(path)
    check_saved_format(path, meta)
    check_saved_model(path, meta, m)
    cfg = m.cfg
    L, Hkv, D = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
    try:
        bits, n_prefix, base_len = int(meta["bits"]), int(meta["n_prefix"]), int(meta["base_len"])
        kept_ratio = float(meta["kept_ratio"])
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: metadata field {e} is missing or not a number") from None
    names = _expected_tensors(path, meta, header, L, Hkv, D, cfg.windows, base_len)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            t = {name: f.get_tensor(name) for name in names}
    except SafetensorError as e:
        raise InputError(f"{path}: not a valid safetensors file ({e})") from None
    if len(t["prefix_ids"]) != n_prefix or n_prefix + len(t["context_ids"]) != base_len:
        raise InputError(f"{path}: prefix_ids and context_ids ({len(t['prefix_ids'])} + "
                         f"{len(t['context_ids'])}) disagree with base_len {base_len}")
    ks, vs, offs, window_kv = [], [], [], []
    for l in range(L):
        if cfg.windows[l] is not None:  # a sliding layer: no packed rows, its window
            for out, x in zip((ks, vs, offs), CompressedKV.no_rows(Hkv, D, m.dtype, m.device)):
                out.append(x)
            window_kv.append(tuple(t[f"window_{kv}.{l}"].to(device=m.device, dtype=m.dtype) for kv in "kv"))
            continue
        window_kv.append(None)
        o = t[f"offsets.{l}"]
        lengths = o.diff()
        rows = header[f"k.{l}" if bits == 16 else f"k.{l}.codes"]["shape"][0]
        for name in (n for n in names if n.split(".")[:2] in (["k", str(l)], ["v", str(l)])):
            if header[name]["shape"][0] != rows:
                raise InputError(f"{path}: tensor {name!r} has {header[name]['shape'][0]} rows, "
                                 f"the layer's keys {rows}")
        if o[0] != 0 or (lengths < n_prefix).any() or (lengths > base_len).any() or o[-1] != rows:
            raise InputError(f"{path}: offsets.{l} {o.tolist()} do not describe the layer's {rows} rows "
                             f"(each head keeps {n_prefix} to {base_len})")
        offs.append(o.to(m.device))
        for kv, out in (("k", ks), ("v", vs)):
            if bits == 16:
                out.append(t[f"{kv}.{l}"].to(device=m.device, dtype=m.dtype))
            else:
                out.append(quant.Quantized(t[f"{kv}.{l}.codes"].to(m.device), t[f"{kv}.{l}.scale"].to(m.device),
                                           t[f"{kv}.{l}.zero"].to(m.device), bits, int(meta["quant_group"]),
                                           m.dtype))
    ckv = CompressedKV(ks, vs, offs, base_len=base_len, backend=backend, windows=cfg.windows, window_kv=window_kv)
    ckv.kept_ratio = kept_ratio
    ckv.prefix_ids, ckv.context_ids = t["prefix_ids"].tolist(), t["context_ids"].tolist()
    ckv.model_identity = {k: meta[k] for k in model_identity(m)}
    ckv.info = {k: meta.get(k, "") for k in ("ratio", "level", "budget", "scores", "chunk_size", "scorer")}
    return ckv


# -----------------------------------------------------------------------------
# 7. Answering queries from a (compressed) cache

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
    kv.reserve(len(ids) + max_new_tokens)
    if keep:
        return model_lib.generate(m, ids, kv, max_new_tokens, tok.stop_ids)
    with model_lib.rollback(kv):
        return model_lib.generate(m, ids, kv, max_new_tokens, tok.stop_ids)


def generate(m, tok, query, kv, max_new_tokens: int = 64, template: bool = True,
             keep: bool = False):
    """Greedy answer to `query` from kv (a FullKV or a CompressedKV); returns only the new text.
    The cache is left as it was (keep=False) or with the turn appended (keep=True).
    A list of queries is answered together over the one cache (generate_ids_batched), which stays
    unchanged: a list of answers, each equal to the query's answer alone up to float rounding."""
    if isinstance(query, str):
        return tok.decode(generate_ids(m, tok, query_ids(tok, query, template), kv, max_new_tokens, keep))
    if keep:
        raise InputError("keep=True appends one turn to the cache: answer one query at a time for that")
    if not isinstance(query, (list, tuple)) or not query:
        raise InputError(f"query must be a string or a non-empty list of strings, got {query!r}")
    ids = [query_ids(tok, q, template) for q in query]
    return [tok.decode(a) for a in generate_ids_batched(m, tok, ids, kv, max_new_tokens)]


# -----------------------------------------------------------------------------
# 7b. Many queries answered together over one shared cache
#
# A decode step of one query reads every weight of the model and every kept row of the cache to
# produce one token; B queries in one forward read them once for B tokens. The model stays
# batch-free: a forward takes T rows, and nothing in it mixes rows except attention, which the
# cache performs (cache.attend). So the rows of several queries go through the model as one
# sequence, each at its own position (Transformer.forward's `positions`), and BatchedTails, the
# cache of that forward, decides what each row sees: all of the shared cache, read in place, and
# the earlier rows of its own query.

class BatchedTails:
    """The cache protocol for several queries over one read-only cache (a FullKV or CompressedKV).

    base: the shared cache, never written: every row attends to all of it (its context).
    tail_k[l], tail_v[l] (Hkv, capacity, D): the new rows of all queries, in the order the forwards
    brought them (query rows interleaved), with owner (capacity,) = the query of each tail row and
    pos (capacity,) = its position. Before each forward, `set_rows(owners, positions)` says whose
    the forward's T rows are. Row r then sees tail row s iff owner[s] == owner[r] and
    pos[s] <= pos[r]: its own query's earlier rows and itself (`visible`, (T, n_tail)). A finished
    query brings no more rows; its tail rows stay (hidden from the others) until the batch ends.
    A hybrid model's sliding layer of window w narrows both sets by position: the row at position
    p sees the shared rows and its own tail rows at positions j with p - w < j <= p (the shared
    cache's sliding layers hold only their last positions, the window; see `window_rows`).
    """

    def __init__(self, base, capacity: int, n_layer: int):
        if getattr(base, "n_tail", 0):
            raise InputError("answer several queries from a cache at its context state (it holds a "
                             "turn kept with keep=True: truncate it first)")
        self.base = base
        self.seq_len = base.seq_len  # positions of the shared context; new rows bring their own
        self.windows = base.windows  # per layer: a sliding layer's window, or None
        if isinstance(base, CompressedKV):
            Hkv, D, dtype, device = base.offsets[0].numel() - 1, base.k[0].shape[1], base.dtype, base.offsets[0].device
        else:
            Hkv, _, D = base.cache.keys(0).shape
            dtype, device = base.cache.keys(0).dtype, base.cache.keys(0).device
        self.tail_k = [torch.empty(Hkv, capacity, D, dtype=dtype, device=device) for _ in range(n_layer)]
        self.tail_v = [torch.empty(Hkv, capacity, D, dtype=dtype, device=device) for _ in range(n_layer)]
        self.owner = torch.empty(capacity, dtype=torch.int64, device=device)
        self.pos = torch.empty(capacity, dtype=torch.int64, device=device)
        self.n_tail = 0
        self.visible = None  # (T, n_tail + T) bool, built once per forward by set_rows
        self.in_window = {}  # window -> (T, n_tail + T) bool: visible and inside the window
        self.row_pos = None  # (T,) the positions of the forward's rows

    def set_rows(self, owners, positions):
        """owners, positions (T,) int64: the query and position of each row of the next forward."""
        end = self.n_tail + len(owners)
        if end > self.owner.numel():
            raise ValueError(f"tail capacity {self.owner.numel()} exceeded ({end} rows)")
        self.owner[self.n_tail:end], self.pos[self.n_tail:end] = owners, positions
        own, pos = self.owner[:end], self.pos[:end]
        self.visible = (own[None, :] == owners[:, None]) & (pos[None, :] <= positions[:, None])  # (T, end)
        self.row_pos = positions
        self.in_window = {w: self.visible & (pos[None, :] > positions[:, None] - w)
                          for w in set(self.windows) if w is not None}

    def reserve(self, n: int):
        pass  # the capacity is set when the batch starts (its largest possible need)

    def context(self, layer: int):
        """Per KV head, the shared cache's rows: ([k_h (n_h, D)], [v_h (n_h, D)]), views of the
        packed (or dense) rows; an int8/int4 cache's rows dequantized, one layer at a time."""
        b = self.base
        if isinstance(b, CompressedKV):
            bounds, dtype = b._bounds[layer], b.dtype
            ks = [quant.packed_rows(b.k[layer], bounds[h], bounds[h + 1], dtype) for h in range(len(bounds) - 1)]
            vs = [quant.packed_rows(b.v[layer], bounds[h], bounds[h + 1], dtype) for h in range(len(bounds) - 1)]
            return ks, vs
        return list(b.cache.keys(layer)), list(b.cache.values(layer))  # (S, D) per head

    def window_rows(self, layer: int):
        """A sliding layer's shared rows, the last positions of the context: k, v (Hkv, n, D) and
        their positions (n,), seq_len - n .. seq_len - 1. Of a CompressedKV: its window, the first
        rows of that layer's tail; of a FullKV: what its cache holds of the layer."""
        b = self.base
        if isinstance(b, CompressedKV):
            n = b.n_window[layer]
            k, v = b.tail_k[layer][:, :n], b.tail_v[layer][:, :n]
        else:
            k, v = b.cache.keys(layer), b.cache.values(layer)
        n = k.shape[1]
        return k, v, torch.arange(self.seq_len - n, self.seq_len, device=k.device)

    def attend(self, layer: int, q, k, v):
        """Store the rows' k, v (Hkv, T, D) in the tail; q (Hkv, G, T, D) attends over each head's
        shared rows and the visible tail rows. Returns (Hkv, G, T, D)."""
        end = self.n_tail + k.shape[1]
        self.tail_k[layer][:, self.n_tail:end] = k
        self.tail_v[layer][:, self.n_tail:end] = v
        tk, tv = self.tail_k[layer][:, :end], self.tail_v[layer][:, :end]
        w = self.windows[layer]
        if w is None:
            ctx_k, ctx_v = self.context(layer)
            visible = self.visible
        else:
            # The shared window is masked by position like the tail, so it joins the tail: one set
            # of rows with one mask, and no context rows that every row sees. (Hkv, n_w + end, D)
            wk, wv, wpos = self.window_rows(layer)
            tk, tv = torch.cat([wk, tk], dim=1), torch.cat([wv, tv], dim=1)
            visible = torch.cat([wpos[None, :] > self.row_pos[:, None] - w, self.in_window[w]], dim=1)
            ctx_k = ctx_v = [tk.new_empty(0, tk.shape[2])] * tk.shape[0]
        if getattr(self.base, "backend", "auto") == "auto" and q.device.type == "cpu":
            return fused.shared_attention_fused(q, ctx_k, ctx_v, tk, tv, visible)
        return shared_attention(q, ctx_k, ctx_v, tk, tv, visible)

    def advance(self, n: int):
        self.n_tail += n


def shared_attention(q, ctx_k, ctx_v, tail_k, tail_v, visible):
    """Attention of T rows of several queries over a shared context and their own tails (the spec
    of BatchedTails.attend; packed_attention is its one-query case).

    q (Hkv, G, T, D); ctx_k[h], ctx_v[h] (n_h, D): the rows of KV head h every row sees;
    tail_k, tail_v (Hkv, n_tail, D); visible (T, n_tail) bool: which tail rows each row sees.
    Each head's context rows are read once for all G * T query rows. Returns (Hkv, G, T, D).
    """
    Hkv, G, T, D = q.shape
    hidden = ~visible.repeat(G, 1)  # (G*T, n_tail), row g*T + t
    out = torch.empty_like(q)
    for h in range(Hkv):
        qh = q[h].reshape(G * T, D) / math.sqrt(D)
        ctx = (ctx_k[h] @ qh.T).T  # (G*T, n_h), keys on the long side (see packed_attention)
        new = (tail_k[h] @ qh.T).T.masked_fill(hidden, float("-inf"))  # (G*T, n_tail)
        p = torch.softmax(torch.cat([ctx, new], dim=-1).float(), dim=-1).to(q.dtype)  # (G*T, n_h + n_tail)
        n_h = ctx_k[h].shape[0]
        out[h] = (p[:, :n_h] @ ctx_v[h] + p[:, n_h:] @ tail_v[h]).view(G, T, D)
    return out


def _first_rows(inputs: list[list[int]], start: int, device):
    """The rows of several inputs as one forward: ids, owners (the input of each row) and positions
    (each input from `start` on), all (T,) int64, T = the inputs' lengths summed."""
    ids = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=device)
    owners = torch.tensor([i for i, x in enumerate(inputs) for _ in x], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(start, start + len(x), device=device) for x in inputs])
    return ids, owners, positions


@torch.no_grad()
def forward_batched(m, inputs: list[list[int]], kv) -> list:
    """Teacher-forced logits of several inputs run together on top of kv, each at positions
    kv.seq_len, kv.seq_len + 1, ... and seeing only kv and itself: [(T_i, V) float32], equal to
    m(input_i, kv) alone up to float rounding. kv is only read (unchanged afterwards)."""
    if not inputs or any(not x for x in inputs):
        raise InputError("no inputs, or an empty one: nothing to run")
    tails = BatchedTails(kv, sum(len(x) for x in inputs), m.cfg.n_layer)
    ids, owners, positions = _first_rows(inputs, kv.seq_len, m.device)
    tails.set_rows(owners, positions)
    return list(m(ids, tails, positions=positions).split([len(x) for x in inputs]))


@torch.no_grad()
def generate_ids_batched(m, tok, queries: list[list[int]], kv, max_new_tokens=64) -> list[list[int]]:
    """Greedy answer ids to several inputs at once, over the one cache kv (FullKV or CompressedKV),
    which is only read: it is byte for byte unchanged afterwards.

    The first forward runs every query's input ids, concatenated, each query at positions
    kv.seq_len, kv.seq_len + 1, ...; every later forward one new token of each unfinished query,
    at that query's next position. A query stops as generate_ids does (a stop id, or
    max_new_tokens) and brings no rows to the next forward. max_new_tokens: one for all, or a list
    of one per query. Same answers as one query at a time (generate_ids), except where float
    rounding of the other kernels breaks a near-tie.
    """
    if not queries or any(not q for q in queries):
        raise InputError("no queries, or an empty one: nothing to answer")
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(queries)
    if len(budgets) != len(queries):
        raise InputError(f"{len(budgets)} max_new_tokens for {len(queries)} queries")
    for n in budgets:
        model_lib.check_max_new_tokens(n)
    limit, start = m.cfg.max_position_embeddings, kv.seq_len
    for q, n in zip(queries, budgets):
        if start + len(q) + n > limit:
            raise InputError(f"query of {len(q)} tokens plus {n} new tokens does not fit "
                             f"after the {start} cached positions (model limit {limit})")
    dev = m.device
    tails = BatchedTails(kv, sum(len(q) for q in queries) + sum(budgets), m.cfg.n_layer)
    out = [[] for _ in queries]
    active = list(range(len(queries)))
    ids, owners, positions = _first_rows(queries, start, dev)
    rows = torch.tensor([len(q) for q in queries], device=dev).cumsum(0) - 1  # each input's last row
    while active:
        tails.set_rows(owners, positions)
        logits = m(ids, tails, positions=positions, rows=rows)  # (len(active), V)
        still = []
        for i, nxt in zip(active, logits.argmax(dim=-1).tolist()):
            if nxt in tok.stop_ids:
                continue
            out[i].append(nxt)
            if len(out[i]) < budgets[i]:
                still.append(i)
        active = still
        ids = torch.tensor([out[i][-1] for i in active], device=dev, dtype=torch.long)
        owners = torch.tensor(active, device=dev, dtype=torch.long)
        positions = torch.tensor([start + len(queries[i]) + len(out[i]) - 1 for i in active],
                                 device=dev, dtype=torch.long)
        rows = None
    return out


# -----------------------------------------------------------------------------
# 7c. Online: prefill, score and evict a long context chunk by chunk
#
# Offline, the full cache of the context is held before anything is scored: at 124K tokens of
# Llama-3.1-8B that is 16.3 GB, of which 30% survives. But Eq. 2 for a chunk needs only the prefix,
# the chunk and the chunk's own reconstruction input, so a chunk can be scored as soon as it is
# prefilled. prefill_online takes the chunks of reconstruction_inputs in order, and for each:
#   1. prefills it on top of the working cache (a CompressedKV: the prefix and the kept pairs of
#      the earlier chunks) into that cache's dense tail. The tail's positions start at base_len =
#      n_p + n_seen, the context tokens seen so far, not the pairs kept: kept keys were rotated at
#      their own positions when they were prefilled, as offline, and the chunk comes after all of them;
#   2. scores it by reconstruction as score_context scores a chunk: the same prompt (quoting the
#      previous chunk's last ids) and postfix, K' = [prefix ; chunk ; input], run after the chunk;
#   3. ranks the kept pairs of the earlier chunks (with the scores they got then) and the chunk's
#      pairs in one global ranking (keep_mask's), keeps round(ratio * L * Hkv * n_seen) of them and
#      packs the next working cache (_next_working_cache).
# The cache held never exceeds the kept pairs plus one chunk's dense K/V plus its reconstruction
# input's (and, while the next cache is packed, one layer's kept rows twice).
# On a hybrid model (Gemma 3) the steps score and evict the global layers only, as offline; each
# sliding layer's window moves on with every chunk (its last window - 1 positions).
# What differs from offline, by construction: a chunk's prefill and reconstruction see only the
# kept past, and its reconstruction runs right after the chunk, not after the whole context, so
# hidden states and scores drift; and a pair once evicted cannot come back if later chunks score
# lower: the ranking is exact over the scores still held, not over every score ever computed.

def online_keep(held_scores, new_scores, ratio: float):
    """One online eviction step, pure bookkeeping: (keep, scores), both over the n_seen = n_prev +
    n_new context positions seen so far.

    held_scores (L, Hkv, n_prev) float32: the scores of the pairs still held, -inf where a pair was
    evicted at an earlier step; new_scores (L, Hkv, n_new): the new chunk's.
    keep: bool (L, Hkv, n_seen), keep_mask's global ranking of the two side by side (so its count,
    round(ratio * L * Hkv * n_seen), and its tie rule). An evicted pair (-inf) is never chosen: the
    budget grows by at most the new chunk's pairs. scores: the same, -inf where not kept.
    """
    scores = torch.cat([held_scores, new_scores.float()], dim=-1)
    keep = keep_mask(scores, ratio)
    assert not (keep & torch.isneginf(scores)).any(), "the budget outgrew the pairs held"
    return keep, scores.masked_fill(~keep, float("-inf"))


def held_bytes(*caches) -> int:
    """Bytes of every buffer the given caches hold (a FullKV's dense cache at its capacity, a
    CompressedKV's packed rows, offsets, decode plans and tail at its capacity), not just the rows
    in use: what online KVzip's bound is about. A None (a layer already released) holds nothing."""
    total = 0
    for c in caches:
        if isinstance(c, FullKV):
            total += sum(t.numel() * t.element_size() for t in c.cache.k + c.cache.v)
            continue
        total += sum(quant.nbytes(t) for t in c.k + c.v + c.offsets + c.tail_k + c.tail_v if t is not None)
        total += sum(p.nbytes for p in c.plans or [] if p is not None)
    return total


def _score_tail_chunk(m, ckv, ids, n_p: int, n_new: int, backend: str):
    """Eq. 2 for the chunk in the first n_new rows of ckv's tail: its reconstruction input `ids`
    runs on top of ckv, and each layer's `observe` scores the chunk against K' = [prefix ; chunk ;
    input], as score_context does, in the scored layers (scored_layers). The input's K/V are
    dropped again. Returns (L', Hkv, n_new) float32."""
    row = scored_rows(ckv.windows)  # layer -> its row in the scores
    scores = torch.zeros(len(row), m.cfg.n_kv_head, n_new, dtype=torch.float32, device=m.device)

    def observe(layer, q, k):  # q (Hkv, G, n_q, D), k (Hkv, n_q, D): the input's own
        if layer not in row:  # a sliding layer: its window is kept whole, never scored
            return
        b = ckv._bounds[layer]  # every head's rows start with its n_p prefix rows
        prefix = torch.stack([ckv.k[layer][b[h]:b[h] + n_p] for h in range(len(b) - 1)])  # (Hkv, n_p, D)
        keys = torch.cat([prefix, ckv.tail_k[layer][:, :n_new], k], dim=1)  # (Hkv, |K'|, D)
        scores[row[layer]] = chunk_scores(q, keys, n_p, n_new, backend)

    with model_lib.rollback(ckv):
        m(torch.tensor(ids, device=m.device), ckv, last_only=True, observe=observe)
    return scores


def _next_working_cache(ckv, rows_before, rows_after, bits: int, backend: str):
    """(the CompressedKV of the rows rows_after selects, the peak bytes held while building it),
    from ckv's packed rows (those rows_before selects) and its tail's first n_new rows (the chunk).

    rows_before: bool (L', Hkv, n_p + n_prev); rows_after: bool (L', Hkv, n_p + n_prev + n_new),
    over positions, prefix included, one row per scored layer; what rows_after keeps of the past
    lies within rows_before. Per layer and KV head the rows stay in increasing position, head-major,
    as from_full packs them. A sliding layer's window moves on: the last window - 1 positions of
    its old window and the chunk (its tail's first rows). ckv is taken apart layer by layer, each
    old layer released once its new one exists, so no more than one layer is ever held twice.
    """
    n_old, base_len = rows_before.shape[-1], rows_after.shape[-1]
    row = scored_rows(ckv.windows)  # layer -> its row in the masks
    ks, vs, offs, window_kv, peak = [], [], [], [], 0
    for l, w in enumerate(ckv.windows):
        if w is not None:  # a sliding layer: no packed pairs; its window, copied out of the tail
            end = ckv.n_window[l] + base_len - n_old  # tail rows: the old window, then the chunk
            a = end - n_window_kept(base_len, w)
            window_kv.append((ckv.tail_k[l][:, a:end].clone(), ckv.tail_v[l][:, a:end].clone()))
            for out, x in zip((ks, vs, offs), CompressedKV.no_rows(*ckv.tail_k[l].shape[::2], ckv.dtype,
                                                                    ckv.tail_k[l].device)):
                out.append(x)
        else:
            window_kv.append(None)
            j = row[l]
            past, chunk = rows_after[j, :, :n_old], rows_after[j, :, n_old:]  # (Hkv, n_old), (Hkv, n_new)
            assert not (past & ~rows_before[j]).any(), "an evicted pair cannot come back"
            still = past[rows_before[j]]  # (N_l,) over ckv's packed rows, in their (head-major) order
            for buf, tail, out in ((ckv.k[l], ckv.tail_k[l], ks), (ckv.v[l], ckv.tail_v[l], vs)):
                old = buf[still].split(past.sum(1).tolist())  # per head: the past's rows still kept
                new = tail[:, :chunk.shape[1]][chunk].split(chunk.sum(1).tolist())  # per head: the chunk's kept
                rows = torch.cat([x for pair in zip(old, new) for x in pair])  # (N'_l, D), head-major
                out.append(rows if bits == 16 else quant.quantize(rows, bits))
            counts = rows_after[j].sum(1)  # (Hkv,)
            offs.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        built = ks + vs + offs + [t for kv in window_kv if kv is not None for t in kv]
        peak = max(peak, held_bytes(ckv) + sum(quant.nbytes(t) for t in built))
        ckv.k[l] = ckv.v[l] = ckv.tail_k[l] = ckv.tail_v[l] = None  # release the old layer
        if ckv.plans:
            ckv.plans[l] = None
    return CompressedKV(ks, vs, offs, base_len=base_len, backend=backend, windows=ckv.windows,
                        window_kv=window_kv), peak


@torch.no_grad()
def prefill_online(m, tok, context: str, ratio: float, chunk_size: int = CHUNK_SIZE, bits: int = 16,
                   backend: str = "auto", prefill_chunk: int = model_lib.PREFILL_CHUNK) -> "CompressedKV":
    """KVzip online (see above): the context prefilled, scored and evicted chunk by chunk, never
    held whole. Returns the CompressedKV of round(ratio * L * Hkv * n_c) context pairs (prefix
    always kept), stored in `bits` (quantized once, at the end: the working caches stay in the
    model's dtype, so every chunk is prefilled and scored over the values offline KVzip would use).
    With one chunk (n_c <= chunk_size) it is offline prefill + prune, byte for byte.

    Besides what prune's caches have, the returned cache carries
      scores (L, Hkv, n_c) float32: each kept pair's score at its context position, as computed
             when its chunk arrived (never recomputed); -inf at the positions of evicted pairs;
      seen_scores  the same with the evicted pairs' scores too (to compare with offline scores);
      trace  one dict per chunk: its context positions [start, end), the context pairs kept after
             it (kept) and per chunk so far (kept_per_chunk), those of earlier chunks it evicted
             (evicted_past), and held_bytes: the most bytes of K/V buffers held during the step
             (held_bytes(), measured after the reconstruction and while packing).
    Bad input is refused as by prefill and prune, before any work.
    """
    check_ratio(ratio)
    quant.check_bits(bits)
    model_lib.check_backend(backend)
    p_ids, context_ids = check_context(m, tok, context, chunk_size, True, prefill_chunk)
    n_p, pieces = len(p_ids), reconstruction_inputs(tok, context_ids, chunk_size)
    # chunk 0: offline KVzip on the first chunk alone (the whole context if it is one chunk)
    n_0 = pieces[0][1]
    kv = prefill_ids(m, tok, p_ids, context_ids[:n_0], chunk_size, backend, prefill_chunk)
    new = score_context(m, tok, kv, chunk_size)
    keep, scores = online_keep(new[..., :0], new, ratio)
    seen = [new]
    ckv = kv.pack(keep, bits=bits if len(pieces) == 1 else 16)
    trace = [dict(start=0, end=n_0, kept=int(keep.sum()), kept_per_chunk=[int(keep.sum())], evicted_past=0,
                  held_bytes=held_bytes(kv, ckv))]
    del kv
    prefix = torch.ones(*keep.shape[:2], n_p, dtype=torch.bool, device=keep.device)  # (L, Hkv, n_p)
    for i, (start, end, ids) in enumerate(pieces[1:], start=1):
        ckv.plans = None  # a working cache decodes no single tokens (see CompressedKV.attend)
        ckv.reserve(end - start + len(ids))  # the chunk and its input: the tail is never grown mid-step
        model_lib.prefill(m, context_ids[start:end], ckv, chunk_size=prefill_chunk)
        new = _score_tail_chunk(m, ckv, ids, n_p, end - start, backend)
        seen.append(new)
        held = held_bytes(ckv)  # the kept past, the chunk and the room its input used
        before = keep
        keep, scores = online_keep(scores, new, ratio)
        ckv, packing = _next_working_cache(ckv, torch.cat([prefix, before], -1), torch.cat([prefix, keep], -1),
                                           bits if i == len(pieces) - 1 else 16, backend)
        trace.append(dict(start=start, end=end, kept=int(keep.sum()),
                          kept_per_chunk=[int(keep[..., a:b].sum()) for a, b, _ in pieces[:i + 1]],
                          evicted_past=int((before & ~keep[..., :start]).sum()), held_bytes=max(held, packing)))
    ckv.kept_ratio = keep.sum().item() / keep.numel()
    ckv.prefix_ids, ckv.context_ids, ckv.model_identity = p_ids, context_ids, model_identity(m)
    ckv.info = dict(ratio=repr(float(ratio)), level="pair", budget="online", scores="kvzip",
                    chunk_size=str(chunk_size), scorer="softmax")
    ckv.scores, ckv.seen_scores, ckv.trace = scores, torch.cat(seen, dim=-1), trace
    return ckv


# -----------------------------------------------------------------------------
# 8. Demo

# The default demo: pass keys hidden in ~1000 tokens of seeded filler (tasks.needle_task), asked
# as completion probes ("The pass key for the red door is"). Seed 4 is the first seed whose four
# keys the default 135M model retrieves from the full cache, so whatever goes wrong is the
# compression's doing. (Chat questions about invented people make a poor demo: the model answers
# them with filler even from the full cache.)
DEMO_TASK = dict(n_tokens=1000, n_needles=4, seed=4)
ONLINE_DEMO_CHUNK = 250  # --online: the demo's ~1000 context tokens in 4 chunks


def format_online_steps(ckv, full_bytes: int) -> str:
    """prefill_online's trace as a table: after each chunk, the pairs kept of every chunk so far
    (an earlier chunk's share shrinks as later chunks outscore it), the pairs of earlier chunks
    the step evicted, and the most K/V bytes held during the step, against the full cache's."""
    n = len(ckv.trace)
    lines = ["kept pairs of each chunk (all layers and heads) after each chunk arrives:",
             "chunk  positions  " + "".join(f"{'c' + str(i):>8}" for i in range(n)) + "  evicted   most held"]
    for i, s in enumerate(ckv.trace):
        cells = "".join(f"{k:>8,}" for k in s["kept_per_chunk"]) + " " * 8 * (n - 1 - i)
        lines.append(f"{'c' + str(i):<5}  {s['start']:>4}-{s['end']:<5}{cells}  {s['evicted_past']:>7,}  "
                     f"{s['held_bytes'] / 2**20:6.2f} MiB ({s['held_bytes'] / full_bytes:.0%} of the full cache)")
    return "\n".join(lines)


def _wrapped(label: str, answer: str, width: int = 100) -> str:
    """An answer in full after its label, its whitespace made single spaces, wrapped under itself."""
    return textwrap.fill(" ".join(answer.split()) or "(no answer)", width=width, initial_indent=label,
                         subsequent_indent=" " * len(label))


def _parting(full: str, compressed: str) -> str:
    """Whether two answers are the same (word for word) or, if not, where they part."""
    a, b = full.split(), compressed.split()
    if a == b:
        return "the same answer"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    full_at, comp_at = (" ".join(w[i:i + 4]) or "(the answer ends)" for w in (a, b))
    return f'the answers part at word {i + 1}: full "{full_at}" | compressed "{comp_at}"'


def _demo_probes(args, tok, context):
    """(context, what it is, [(query, expected answer or None)], template) for the demo's arguments;
    context: the text of --context, or None for the built-in one."""
    about = args.context
    if context is None:
        task = tasks.needle_task(**DEMO_TASK, tok=tok)
        context, about = task["context"], (f"seeded filler with {DEMO_TASK['n_needles']} pass keys hidden in it "
                                           f"(tasks.needle_task, seed {DEMO_TASK['seed']})")
        if not args.query:
            return context, about, task["probes"], False  # completion probes, each with its key
    queries = args.query or ["Summarize the context in one sentence."]
    expected = args.expect or [None] * len(queries)  # main checked that they pair up
    return context, about, list(zip(queries, expected)), not args.raw


def _print_sizes(m, kv, ckv, ratio: float):
    """The full and compressed cache's bytes, and why the compressed share is not the ratio."""
    n_p, n_c = kv.n_prefix, kv.n_context
    L, Hkv = len(kv.layers), m.cfg.n_kv_head  # the scored layers: a hybrid model's global ones
    kept = round(ratio * L * Hkv * n_c)  # context pairs kept by the global ranking
    rows = (kept + L * Hkv * n_p) / (L * Hkv * (n_p + n_c))  # the prefix is never evicted
    plans = sum(p.nbytes for p in ckv.plans or [] if p is not None)  # the CPU's decode plans (fused.DecodePlan)
    print(f"KV cache: full {kv.nbytes / 2**20:.2f} MiB; compressed at ratio {ratio}: "
          f"{ckv.nbytes / 2**20:.2f} MiB ({ckv.nbytes / kv.nbytes:.1%} of the bytes)")
    print(f"  why not {ratio:.0%}: the ratio counts context pairs only; the {n_p}-token prefix ("
          f"template + KVzip's instruction) is never evicted, so {rows:.1%} of the rows stay "
          f"(({kept:,} + {L * Hkv * n_p:,} prefix) of {L * Hkv * (n_p + n_c):,}), plus the per-head offsets"
          + (f" and the decode plans ({plans / 2**20:.2f} MiB, see fused.DecodePlan)" if plans else ""))
    if has_windows(kv):
        print(f"  of the {m.cfg.n_layer} layers {L} are global (scored, evicted; the rows above count them); the "
              f"sliding ones keep their windows whole. Every layer holding every position would take "
              f"{kv.dense_nbytes / 2**20:.2f} MiB ({ckv.nbytes / kv.dense_nbytes:.1%} of it compressed)")


def _compare_answers(m, tok, caches: dict, probes, template: bool, max_new_tokens: int, ratio: float):
    """Each probe answered from both caches ({"full": kv, "compressed": ckv}), in full, marked
    right or WRONG where the expected answer is known (tasks.check_answer: its first line), then
    whether the two answers are the same or where they part."""
    n_right = dict.fromkeys(caches, 0)
    for i, (q, expected) in enumerate(probes):
        errors.progress(f"answering {i + 1}/{len(probes)} from both caches")
        print(f"Q: {q}" + (f"   (expected {expected})" if expected else ""))
        answers = {}
        for name, cache in caches.items():
            answers[name] = generate(m, tok, q, cache, max_new_tokens, template=template)
            label = f"  {name + ' cache':<16}"
            if expected:
                right = tasks.check_answer(answers[name], expected)
                n_right[name] += right
                label += " right" if right else " WRONG"
            print(_wrapped(label + ": ", answers[name]))
        print(f"  -> {_parting(answers['full'], answers['compressed'])}")
    n_scored = sum(1 for _, e in probes if e)
    if n_scored:
        print(f"\nright: full cache {n_right['full']}/{n_scored}, compressed cache "
              f"{n_right['compressed']}/{n_scored} at ratio {ratio}")


def _answer_saved(m, tok, ckv, queries, max_new_tokens: int):
    """--load: the --query questions answered together; without any, questions read from stdin,
    one a line, each answered as it comes (a pipe or a terminal)."""
    if queries:
        errors.progress(f"answering {len(queries)} questions together")
        for q, a in zip(queries, generate(m, tok, queries, ckv, max_new_tokens)):
            print(f"Q: {q}\nA: {a.strip()}", flush=True)
        return
    errors.progress("reading questions from stdin, one a line (end with Ctrl-D)")
    for line in sys.stdin:
        if line.strip():
            print(f"A: {generate(m, tok, line.strip(), ckv, max_new_tokens).strip()}", flush=True)


def _save(m, tok, args, context):
    """--save: prefill, score and prune the context, write the compressed cache to the file;
    then answer the --query questions, if any, from it."""
    if context is None:
        context = tasks.needle_task(**DEMO_TASK, tok=tok)["context"]
    errors.progress(f"prefill and scoring by reconstruction ({len(tok.encode(context))} context tokens)")
    try:
        if args.online:
            ckv = prefill_online(m, tok, context, args.ratio, chunk_size=args.chunk_size, bits=args.bits)
        else:
            kv = prefill(m, tok, context, chunk_size=args.chunk_size)
            ckv = kv.prune(args.ratio, bits=args.bits)
    except InputError as e:
        raise InputError(f"--context {args.context}: {e}" if args.context else str(e)) from None
    ckv.save(args.save)
    size = os.path.getsize(args.save)
    n_c = len(ckv.context_ids)
    Hkv, D = len(ckv.offsets[0]) - 1, ckv.k[0].shape[1]
    full = 2 * len(ckv.k) * Hkv * D * ckv.base_len * ckv.tail_k[0].element_size()  # dense prefix + context
    print(f"saved {args.save}: {size / 2**20:.2f} MiB ({n_c} context tokens at ratio {args.ratio}, "
          f"{args.bits}-bit{', online' if args.online else ''}; the full cache is {full / 2**20:.2f} MiB)")
    if args.query:
        _answer_saved(m, tok, ckv, args.query, args.max_new_tokens)


def main(argv=None):
    p = errors.ArgumentParser(prog="kvzip.py", description="KVzip demo: full-cache vs compressed-cache answers; "
                              "--save compresses a context into a file, --load answers from one.")
    p.add_argument("--ratio", type=float, help="fraction of context KV pairs kept (default 0.3)")
    p.add_argument("--context", metavar="FILE", help="a UTF-8 text file to use as the context (default: "
                   "four pass keys hidden in seeded filler, asked as completion probes)")
    p.add_argument("--query", action="append", metavar="TEXT", help="a question, repeatable (default with "
                   "--context: 'Summarize the context in one sentence.')")
    p.add_argument("--expect", action="append", metavar="ANSWER", help="the expected answer of each --query, "
                   "in order (one per --query): both caches are then marked right or WRONG")
    p.add_argument("--raw", action="store_true", help="ask each --query as raw text to complete (e.g. 'The "
                   "pass key for the red door is'), not as a chat question")
    p.add_argument("--model", metavar="DIR_OR_NAME",
                   help=f"Hugging Face folder or a model name: {', '.join(model_lib.MODEL_NAMES)} "
                        "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="the longest answer, in tokens (default 32)")
    p.add_argument("--save", metavar="FILE", help="compress the context and write the cache to FILE")
    p.add_argument("--bits", type=int, default=16, choices=quant.BITS,
                   help="with --save: 16, 8 or 4 bits a stored value (default 16)")
    p.add_argument("--load", metavar="FILE", help="answer from a cache saved with --save (questions: "
                   "--query, or stdin one a line)")
    p.add_argument("--online", action="store_true", help="compress chunk by chunk (prefill_online), never "
                   "holding the full cache; prints the kept set growing chunk by chunk")
    p.add_argument("--chunk-size", type=int, metavar="N", help="context tokens scored per reconstruction "
                   f"pass (default {CHUNK_SIZE}; with --online {ONLINE_DEMO_CHUNK}, so the demo has several chunks)")
    args = p.parse_args(argv)
    # cheap checks first: nothing is loaded, prefilled or scored before the arguments are usable
    if args.load:
        for option, given in (("--context", args.context), ("--save", args.save), ("--ratio", args.ratio),
                              ("--online", args.online or None), ("--chunk-size", args.chunk_size)):
            if given is not None:
                p.error(f"--load {args.load}: answers from the saved cache; {option} cannot be used with it")
    args.ratio = 0.3 if args.ratio is None else args.ratio
    try:
        check_ratio(args.ratio)
    except ValueError as e:
        p.error(f"--ratio: {e}")
    if args.save and (why := errors.check_output(args.save, "--save")):
        p.error(why)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.chunk_size is not None and args.chunk_size < N_OVERLAP:
        p.error(f"--chunk-size must be at least {N_OVERLAP}, got {args.chunk_size}")
    args.chunk_size = args.chunk_size or (ONLINE_DEMO_CHUNK if args.online else CHUNK_SIZE)
    for q in args.query or []:
        if not q.strip():
            p.error(f"--query {q!r}: empty question")
    if args.expect and len(args.expect) != len(args.query or []):
        p.error(f"--expect: one per --query, in order ({len(args.query or [])} --query, {len(args.expect)} --expect)")
    if args.raw and not args.query:
        p.error("--raw: applies to --query, and none was given")
    for option, given in (("--expect", args.expect), ("--raw", args.raw)):
        if given and (args.save or args.load):
            p.error(f"{option}: marks the demo's two caches; it cannot be used with --save or --load")
    if args.bits != 16 and not args.save:
        p.error(f"--bits {args.bits}: sets the stored values of a cache written with --save; no --save given")
    if args.model and (why := model_lib.model_arg_problem(args.model)):
        p.error(why)
    context = None
    if args.context:
        context = errors.read_text(args.context, "--context")  # UTF-8, not empty; else one line
    if args.load:  # the file itself, before the model: a safetensors file of this format, complete
        check_saved_format(args.load, read_saved_header(args.load)[0])

    m, tok = model_lib.load(args.model)  # fails in one line for a broken checkpoint, before any output
    errors.progress("model loaded")
    if args.load:
        t0 = time.perf_counter()
        ckv = load_compressed(args.load, m)  # refuses a file made for another model
        errors.progress(f"loaded {args.load} ({ckv.base_len - len(ckv.prefix_ids)} context tokens, ratio "
                        f"{ckv.info.get('ratio')}, {ckv.bits}-bit) in {time.perf_counter() - t0:.2f} s")
        return _answer_saved(m, tok, ckv, args.query, args.max_new_tokens)
    if args.save:
        return _save(m, tok, args, context)
    context, about, probes, template = _demo_probes(args, tok, context)
    errors.progress(f"prefill and scoring by reconstruction ({len(tok.encode(context))} context tokens)")
    t0 = time.perf_counter()
    try:
        if args.online:  # the full cache only for the comparison of answers; the online one never holds it
            ckv = prefill_online(m, tok, context, args.ratio, chunk_size=args.chunk_size)
            kv = prefill(m, tok, context, score=False)
        else:
            kv = prefill(m, tok, context, chunk_size=args.chunk_size)
            ckv = kv.prune(args.ratio)
    except InputError as e:  # too long for this model: name the file it came from
        raise InputError(f"--context {args.context}: {e}" if args.context else str(e)) from None
    t_prefill = time.perf_counter() - t0
    print(f"context: {kv.n_context} tokens, {about}")
    _print_sizes(m, kv, ckv, args.ratio)
    if args.online:
        print(format_online_steps(ckv, kv.nbytes))
    print()
    _compare_answers(m, tok, {"full": kv, "compressed": ckv}, probes, template=template,
                     max_new_tokens=args.max_new_tokens, ratio=args.ratio)
    errors.progress(f"done (prefill and scoring {t_prefill:.1f} s)")


if __name__ == "__main__":
    errors.run(main, prog="kvzip.py")
