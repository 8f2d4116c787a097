"""
baselines.py: the query-aware methods KVzip is compared with, and two controls.

Every method turns into scores of the same shape as KVzip's, (L', Hkv, n_c) over the scored
layers (kvzip.scored_layers: all L, or a hybrid model's global layers), so one eviction rule
(kvzip.keep_mask: the global ranking, or per-layer budgets) and one packed cache
(kvzip.CompressedKV) serve them all:
  - snapkv_scores      SnapKV (Li et al., 2024): attention from an observation window at the end
  - pyramid_budgets    PyramidKV (Cai et al., 2024): SnapKV's scores, layer budgets shrinking with depth
  - h2o_scores         H2O (Zhang et al., 2023): accumulated attention
  - streamingllm_scores StreamingLLM (Xiao et al., 2024): attention sinks + the most recent tokens
  - random_scores      seeded random scores, what any scorer must beat
  - layer_budgets      the baselines' budget rule in the paper (AdaKV-style): equal layer budgets,
                       heads ranked against each other within each layer
  - integer_budgets    a total split into integer budgets in proportion to weights, capped per group
  - method_scores / compress: one entry point for the reuse experiment (reuse.py)

The query-aware ones (SnapKV, PyramidKV, H2O) look at one query while scoring; in the reuse
experiment that is the first query, and the cache they pick then answers every query of the
context, as a serving system would reuse it. KVzip never sees a query.
"""
from __future__ import annotations

import math

import torch

import kvzip
import model as model_lib

METHODS = ("kvzip", "snapkv", "pyramidkv", "h2o", "streamingllm", "random")
SNAP_WINDOW = 64  # SnapKV's observation window: the last 64 tokens of context + query
SNAP_KERNEL = 7  # SnapKV's pooling width over positions (max-pool, as in AdaKV's SnapKV; the
#                  SnapKV repo defaults to avg-pool of width 5 -- both only smooth the ranking)
PYRAMID_BETA = 20  # PyramidKV: the top layer's budget is 1/beta of the average layer budget
STREAMING_SINKS = 4  # StreamingLLM's attention sinks: the first 4 context tokens
# The baselines' budget rule (compress's `budget`): "layer" gives every layer the same budget and
# ranks the pairs of its heads against each other (AdaKV-style non-uniform head budgets, the
# setup the paper gives its baselines), "global" ranks all layers at once as KVzip does. "layer"
# is the default because it is the paper's setup: the comparison then measures the scores, not
# a budget rule the baselines were not designed for.
BUDGETS = ("layer", "global")
DEFAULT_BUDGET = "layer"


@torch.no_grad()
def attention_received(m, kv: kvzip.FullKV, new_ids: list[int], n_rows: int):
    """How much attention each context key receives from the last n_rows positions of
    prefix + context + new_ids (float32 softmax over every key a row can see, causally).

    Those positions are re-run in a *copy* of the cache (the rows before them are copied, then the
    model appends to the copy), so kv.cache is never written: it stays bit-exact. Their post-RoPE
    queries are read through model.prefill's `observe` hook. A hybrid model's sliding layers hold
    only their window, so there everything is re-run from position 0 in a new cache, and only the
    scored (global) layers are observed.
    Returns sums (L', Hkv, G, n_c): attention summed over the observed rows, per query head, one row
    per scored layer (kv.layers); and counts (n_c,): how many observed rows can see each context
    key (a row sees keys at or before it).
    """
    cfg = m.cfg
    n_p, n_c = kv.n_prefix, kv.n_context
    base, end = n_p + n_c, n_p + n_c + len(new_ids)  # context ends at base; new ids end at end
    n_rows = min(n_rows, n_c + len(new_ids))
    first_row = end - n_rows  # position of the first observed row
    # re-run from here (new ids are not cached: always run); a sliding layer holds only its window
    start = 0 if kvzip.has_windows(kv) else min(first_row, base)
    work = m.new_cache(capacity=end)
    for l in range(cfg.n_layer if start else 0):  # copy the rows before `start`; kv.cache is only read
        work.k[l][:, :start] = kv.cache.k[l][:, :start]
        work.v[l][:, :start] = kv.cache.v[l][:, :start]
    work.seq_len = start
    row_of = kvzip.scored_rows(kv.windows)  # layer -> its row of sums
    sums = torch.zeros(len(kv.layers), cfg.n_kv_head, cfg.group, n_c, dtype=torch.float32, device=m.device)

    def observe(layer, q, k):  # q (Hkv, G, T, D), k (Hkv, T, D): the tokens of this prefill chunk
        if layer not in row_of:
            return  # a sliding layer: not scored
        past = work.keys(layer)  # (Hkv, S0, D): rows before this chunk (this chunk is not stored yet)
        keys = torch.cat([past, k], dim=1)  # (Hkv, S, D), S = S0 + T
        logits = q.float() @ keys.float().unsqueeze(1).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (Hkv, G, T, S)
        row = torch.arange(q.shape[2], device=q.device)[:, None] + past.shape[1]  # absolute position of each row
        col = torch.arange(keys.shape[1], device=q.device)[None, :]
        p = torch.softmax(logits.masked_fill_(col > row, float("-inf")), dim=-1)  # (Hkv, G, T, S) float32
        p = p[:, :, row[:, 0] >= first_row, n_p:base]  # observed rows only; context columns only
        sums[row_of[layer], :, :, :p.shape[-1]] += p.sum(dim=2)  # (Hkv, G, <= n_c)

    ids = (kv.prefix_ids + kv.context_ids + list(new_ids))[start:]
    # 512-row chunks bound the probability matrix: Hkv * G * 512 * S floats, 37 MB per layer for
    # SmolLM2 (9 query heads) at S = 2000
    model_lib.prefill(m, ids, work, chunk_size=512, observe=observe)
    j = torch.arange(n_c, device=m.device) + n_p  # position of each context key
    counts = end - torch.clamp(j, min=first_row)  # observed rows at or after each key
    return sums, counts.float()


def snapkv_scores(m, tok, kv: kvzip.FullKV, query: str, template: bool = True,
                  window: int = SNAP_WINDOW, kernel: int = SNAP_KERNEL):
    """SnapKV (Li et al., 2024): the mean attention that the last `window` tokens of context + query
    pay to each context key, max-pooled over `kernel` neighbouring positions, mean over the group."""
    q_ids = kvzip.query_ids(tok, query, template)
    sums, _ = attention_received(m, kv, q_ids, window)  # (L, Hkv, G, n_c)
    L, Hkv, G, n_c = sums.shape
    mean = sums / min(window, n_c + len(q_ids))  # mean over window rows (rows before a key add 0)
    pooled = torch.nn.functional.max_pool1d(mean.view(-1, n_c), kernel, stride=1, padding=kernel // 2)
    return pooled.view(L, Hkv, G, n_c).mean(dim=2)  # (L, Hkv, n_c)


def integer_budgets(weights, total: int, cap: int) -> list[int]:
    """Split `total` kept pairs over len(weights) groups (layers, heads) in proportion to weights,
    at most `cap` per group: integers that sum exactly to total.

    A group whose share would exceed cap is capped and its excess spread over the others, again in
    proportion to their weights (water-filling); then largest-remainder rounding, ties to the lower
    index. Groups of zero total weight share evenly. Used by the budget rules below and by the
    benchmarks' per-head budgets (bench.py, gpu_check.py).
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


def layer_budgets(ratio: float, n_layer: int, n_kv_head: int, n_c: int):
    """Equal per-layer budgets (AdaKV-style): round(ratio * Hkv * n_c) pairs per layer, as integers
    that sum exactly to the global total round(ratio * (L * Hkv * n_c)) (integer_budgets,
    largest remainder); within a layer the heads compete (kvzip.keep_mask's layer_budgets path)."""
    kvzip.check_ratio(ratio)
    cap = n_kv_head * n_c
    return integer_budgets([1.0] * n_layer, round(ratio * (n_layer * cap)), cap)


def pyramid_budgets(ratio: float, n_layer: int, n_kv_head: int, n_c: int, beta: float = PYRAMID_BETA,
                    window: int = SNAP_WINDOW):
    """PyramidKV (Cai et al., 2024) budgets: kept pairs per layer, shrinking linearly with depth.

    The schedule of kvpress's PyramidKVPress.get_layer_budget, which takes its formula from the
    authors' code (KVCache-Factory, pyramidkv_utils.py, PyramidKVCluster.update_kv), per head,
    with n_c context tokens and an average budget a = ratio * n_c:
        min_num = a / beta                  the top layer
        max_num = 2a - min_num              the bottom layer, so the average stays a
        if max_num >= n_c - window:         the bottom would keep (almost) the whole context:
            max_num = n_c - window          cap it, and raise the top so the average stays a,
            min_num = 2a - max_num          which flattens the pyramid at high ratios
        if not n_c >= max_num >= min_num >= window:
            the same budget in every layer  (kvpress "falls back to SnapKV": layer_budgets)
        else layer l keeps max_num - l * (max_num - min_num) / (L - 1)
    At ratio 0.7 on 1,047 context tokens: 983 at the bottom layer, 483 at the top; at 0.3 the
    top would keep 15.7 < 64, so every layer keeps 314.

    Where the counting differs from those two codes:
      - n_c counts the context only: the template prefix is always kept here, outside every
        budget (kvpress's q_len is its whole prefill, template and question included).
      - The observation window is counted inside the budget, as in kvpress. The authors' code
        keeps the last `window` tokens on top of the budget, which is C - window for a fixed
        capacity C; and it uses integer division for min_num and the step, and the uniform
        budget whenever q_len < 2 (C - window), that is above ratio 0.5 in this parametrization.
      - The per-head budget times Hkv is the layer's budget, and the heads of a layer compete
        for it (kvzip.keep_mask's layer_budgets path), where PyramidKV gives every head the
        same count.
      - Largest-remainder rounding (integer_budgets) makes the budgets integers that sum
        exactly to round(ratio * (L * Hkv * n_c)), the count keep_mask uses; they stay
        non-increasing over layers.
    """
    kvzip.check_ratio(ratio)
    L, cap = n_layer, n_kv_head * n_c
    a = ratio * n_c  # average per-head budget
    min_num = a / beta
    max_num = 2 * a - min_num
    if max_num >= n_c - window:
        max_num = n_c - window
        min_num = 2 * a - max_num
    if L == 1 or not n_c >= max_num >= min_num >= window:
        return layer_budgets(ratio, n_layer, n_kv_head, n_c)
    step = (max_num - min_num) / (L - 1)
    line = [max_num - l * step for l in range(L)]  # per head; sums to L * a
    total = round(ratio * (L * cap))  # the same count keep_mask uses: ratio times an exact integer
    return integer_budgets(line, total, cap)


def h2o_scores(m, tok, kv: kvzip.FullKV, query: str, template: bool = True):
    """H2O (Zhang et al., 2023): the attention each context key receives from every later context
    and query position (itself included), divided by the number of positions that see it; mean
    over the group."""
    q_ids = kvzip.query_ids(tok, query, template)
    sums, counts = attention_received(m, kv, q_ids, kv.n_context + len(q_ids))  # every row from the context on
    return (sums / counts).mean(dim=2)  # (L, Hkv, n_c)


def streamingllm_scores(kv: kvzip.FullKV, n_sink: int = STREAMING_SINKS):
    """StreamingLLM (Xiao et al., 2024): keep the first n_sink tokens (attention sinks) and the most
    recent ones. As scores: the sinks get 2, the others j / n_c (later is higher), in every head,
    so the global ranking keeps the sinks and then the most recent positions in all heads alike."""
    L, Hkv, n_c = len(kv.layers), kv.cache.k[0].shape[0], kv.n_context  # L: the scored layers
    s = torch.arange(n_c, dtype=torch.float32, device=kv.cache.k[0].device) / n_c
    s[:n_sink] = 2.0
    return s.expand(L, Hkv, n_c).clone()  # (L, Hkv, n_c)


def random_scores(kv: kvzip.FullKV, seed: int = 0):
    """Control: seeded uniform random scores (what any scorer must beat)."""
    L, Hkv, n_c = len(kv.layers), kv.cache.k[0].shape[0], kv.n_context  # L: the scored layers
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, Hkv, n_c, generator=g).to(kv.cache.k[0].device)  # (L, Hkv, n_c)


def method_scores(method: str, m, tok, kv: kvzip.FullKV, query: str | None = None, template: bool = True,
                  seed: int = 0):
    """Scores (L', Hkv, n_c) of one method for the context in kv. Query-aware methods (snapkv,
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


def eviction_budgets(method: str, ratio: float, shape, budget: str = DEFAULT_BUDGET):
    """The per-layer budgets a method's scores of `shape` (L', Hkv, n_c) are ranked under, for
    kvzip.keep_mask(layer_budgets=...): PyramidKV's shrinking layer budgets; for the other
    baselines `budget`: "layer" (equal layer budgets, heads ranked within each layer, as the paper
    sets up its baselines) or "global" (None: one ranking over all layers, which also moves budget
    between layers); KVzip always None (its own global ranking)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if method == "pyramidkv":
        return pyramid_budgets(ratio, *shape)
    if method != "kvzip" and budget == "layer":
        return layer_budgets(ratio, *shape)
    return None


def compress(kv: kvzip.FullKV, method: str, ratio: float, scores, budget: str = DEFAULT_BUDGET):
    """kv.prune(ratio) with a method's scores and eviction rule (eviction_budgets)."""
    return kv.prune(ratio, scores=scores, layer_budgets=eviction_budgets(method, ratio, scores.shape, budget))
