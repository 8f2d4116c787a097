"""
reuse.py: the reuse experiment. One compressed cache answers every query of its context:
query-agnostic KVzip against query-aware baselines (Kim et al., NeurIPS 2025, Figures 2 and 10).

    python reuse.py                        # the default run (~3-5 min on an idle 2-core CPU)
    python reuse.py --quick                # one needle and one fact context (~1 min)
    python reuse.py --json out.json --plot quality.png   # the figure: accuracy and NLL vs ratio
    python reuse.py --baseline-budget global --methods snapkv,h2o   # the baselines' other budget rule
    python reuse.py --head-scores heads.safetensors                 # reuse kvzip-head's head scores
    python reuse.py --online 1000          # KVzip online vs offline, chunks of 1000 (compare_online)

For each seeded context (tasks.py): prefill once, score once per method (baselines.py; SnapKV,
PyramidKV and H2O see the context's *first* query; KVzip's ablations are scored here with
kvzip.py's functions), prune at the method's ratios, then answer *all* queries of the context
from that one cache, as a serving system would reuse it. KVzip online (kvzip-online) builds its
own cache at each ratio instead, chunk by chunk (kvzip.prefill_online), and is answered alike.
The same context also gives the quantized rows: KVzip caches stored in int8 / int4
(kv.prune(ratio, bits=...), quant.py), and quantization alone (ratio 1.0, int4); every row has a
`bits` field (16: the model's dtype, not quantized).

Map of this file: the methods and presets, the evaluation of one cache (_answers,
_reconstruction_nll, _full_reference, _evaluate), the contexts and KVzip's variants
(_quality_contexts, _calibration_contexts, method_ratios, _score_kvzip_variants, _keep_mask),
the intervals and _summarize (one row), run_quality (the experiment) and its steps (_settings,
_online_caches, _score_baselines, _evaluate_caches, _result), format_quality_table,
format_kinds_table (what each method keeps of digits, punctuation and words), plot_quality (the
figure), compare_online and format_online_table (KVzip online against offline, --online), main().
Nothing imports this file.
"""
import argparse
import json
import math
import os
import random
import time

import errors

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import torch  # noqa: E402 (after the OpenMP setting above)

import baselines  # noqa: E402
import kvzip  # noqa: E402
import quant  # noqa: E402
import model as model_lib  # noqa: E402
import tasks  # noqa: E402

#
# For each context: prefill once, score once per method (the query-aware ones see the context's
# first query), prune at every ratio, then answer ALL queries of the context from that one cache.
# Three measures, each relative to the full cache (the 135M default model is often wrong on its
# own, so absolute accuracy would mostly measure the model, not the compression):
#   relative_accuracy        needle probes answered right, among those the full cache gets right
#   agreement                fact questions whose first answer line (normalized) equals the full cache's
#   reconstruction_nll_ratio mean NLL per token of repeating context spans (KVzip's reconstruction
#                            input, teacher-forced) under the compressed cache / under the full cache
# Each row also has kept_by_kind: the kept fraction of digit, punctuation/whitespace and word tokens
# (tasks.token_kind), pooled over layers, heads and contexts, which shows what a method's budget goes to.
# 95% intervals: Wilson intervals for the two proportions (pooled over queries, which treats the
# queries of one context as independent: with few contexts they understate the spread), and a
# bootstrap over contexts for the NLL ratio.

# KVzip's ablations, computed here from kvzip.py's functions (baselines.py holds the query-aware
# methods); each is pruned by FullKV.prune into the same packed cache:
#   kvzip-head          whole KV heads ranked by head scores computed once per model on calibration
#                       contexts (other seeds than the evaluation's), no scoring pass per context
#   kvzip-uniform       KVzip's scores, the same budget for every head (uniform=True)
#   kvzip-softmax-free  the max scaled logit instead of the max attention probability (scorer="logits")
#   kvzip-c500/-c1000   KVzip with reconstruction chunks of 500 / 1000 tokens instead of 2000
# and KVzip online beside them (ONLINE), which cannot be pruned from the offline FullKV:
#   kvzip-online        kvzip.prefill_online at each of its ratios (a fresh prefill per ratio: the
#                       kept past decides what every later chunk sees), chunks of ONLINE_CHUNK = 500
#                       tokens, so the contexts of 719-1,492 tokens come in 2-3 chunks; with those
#                       chunks kvzip-c500 is the same scoring offline
KVZIP_VARIANTS = ("kvzip-head", "kvzip-uniform", "kvzip-softmax-free", "kvzip-c500", "kvzip-c1000")
ONLINE = "kvzip-online"
ONLINE_CHUNK = 500
METHODS = baselines.METHODS + KVZIP_VARIANTS + (ONLINE,)
VARIANT_CHUNKS = {"kvzip": kvzip.CHUNK_SIZE, "kvzip-c500": 500, "kvzip-c1000": 1000}
CALIBRATION_SEED = 10 ** 6  # head scores are calibrated on contexts of seed CALIBRATION_SEED + seed

QUALITY_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # every method, when run_quality is given no ratios
QUALITY_PRESETS = {
    # needle_tokens / needles cycle over the needle contexts; a fact context holds fact_entities
    # invented people (4 questions each, questions_per_context of them asked) among
    # fact_filler_words words of haystack; recon_spans spans of recon_span_tokens context tokens
    # per context are reconstructed. qa_max_new = 8 is short: the 135M model often restates the
    # question first, so agreement measures how faithfully the compressed cache reproduces the
    # full cache's greedy continuation.
    # Needles (tasks.varied_needle_task) are each a different sentence with a 3-digit number: with
    # needle_task's one shared template ("The pass key for the red door is 48213.") the 135M model
    # often answers with another needle's key even from the full cache, and only probes the full
    # cache gets right count. Sixteen needles per context then give many counted probes per
    # prefill and scoring pass. needle_max_new = 5 covers a 3-digit answer and the token after it
    # (which tells "432" from "4321"); longer answers only cost decoding.
    # Ratios: answering dominates the run time (every cache answers every query: 17 caches per
    # context by default), so each method runs only where it can tell us something: KVzip at
    # kvzip_ratios (beside the baselines at 0.3, the ablations at 0.1 and head-level at 0.6); the
    # query-aware baselines at baseline_ratios (below 0.3 they keep almost no probe, at 0.7
    # some); the controls (StreamingLLM, random) at one ratio; KVzip's pair-level ablations at
    # 0.1, where KVzip itself loses probes (where it keeps them all an ablation cannot differ);
    # head-level at the paper's 0.6; KVzip online at KVzip's own ratios (online_ratios), to set
    # beside it row by row; ratio 1 once, shared. Scoring is the other large cost (four
    # KVzip passes per context for the ablations), hence contexts of 1-1.5K tokens.
    "default": dict(needle_contexts=3, needle_tokens=(1000, 1500, 1000), needles=(16,), key_digits=3,
                    fact_contexts=1, fact_entities=6, fact_filler_words=400, questions_per_context=6,
                    recon_spans=1, recon_span_tokens=64, needle_max_new=5, qa_max_new=8,
                    kvzip_ratios=(0.1, 0.3, 0.5), baseline_ratios=(0.3, 0.7),
                    control_ratios=(0.5,), ablation_ratios=(0.1,), head_ratios=(0.6,),
                    online_ratios=(0.1, 0.3, 0.5), calibration_tokens=1500),
    "quick": dict(needle_contexts=1, needle_tokens=(1000,), needles=(8,), key_digits=3,
                  fact_contexts=1, fact_entities=4, fact_filler_words=200, questions_per_context=3,
                  recon_spans=1, recon_span_tokens=64, needle_max_new=5, qa_max_new=8,
                  kvzip_ratios=(0.1, 0.3), baseline_ratios=(0.3,), control_ratios=(0.3,),
                  ablation_ratios=(0.1,), head_ratios=(0.6,), online_ratios=(0.1, 0.3),
                  calibration_tokens=1000),
}
BOOTSTRAP_SAMPLES = 1000
# The quantized rows: (ratio, bits) of KVzip caches stored quantized (kv.prune(ratio, bits=bits)),
# evaluated on every context besides the method x ratio grid. Ratio 1.0 keeps every pair: int4
# quantization alone.
QUANTIZED_ROWS = ((0.3, 8), (0.3, 4), (0.1, 8), (0.1, 4), (1.0, 4))


@torch.no_grad()
def _forward_rollback(m, cache, ids):
    """Logits (T, V) of ids run on top of cache (teacher-forced); the cache is rolled back after."""
    with model_lib.rollback(cache):
        return m(torch.tensor(ids, device=m.device), cache)


def _answers(m, tok, cache, q_ids, refs, max_new) -> list[str]:
    """Greedy answers to every probe of a context from cache, sped up by the full cache's answer
    ids `refs`, all probes together (kvzip.forward_batched, kvzip.generate_ids_batched).

    One teacher-forced pass over q_ids + ref gives the argmax after every prefix of ref. Greedy
    decoding follows ref up to the first position where that argmax differs, then emits the
    argmax; only from there on do we decode token by token (often not at all). Equal to
    kvzip.generate's answers except at float near-ties between these passes and the one-token pass.
    """
    stopped = [len(ref) < max_new for ref in refs]  # ref ended on a stop token, not on the length limit
    inputs = [q + (ref if stop else ref[:-1]) for q, ref, stop in zip(q_ids, refs, stopped)]
    outs, todo = [], []  # todo: the probes that left ref and may say more
    for j, (q, ref, stop, logits) in enumerate(zip(q_ids, refs, stopped, kvzip.forward_batched(m, inputs, cache))):
        pred = logits[len(q) - 1:].argmax(dim=-1).tolist()  # pred[i]: the greedy choice after ref[:i]
        i = next((i for i, (p, r) in enumerate(zip(pred, ref)) if p != r), len(ref))
        if i == len(ref) and not stop:
            outs.append(list(ref))  # ref all along, up to the length limit
        elif pred[i] in tok.stop_ids:
            outs.append(ref[:i])
        else:
            outs.append(ref[:i] + [pred[i]])
            if len(outs[-1]) < max_new:
                todo.append(j)
    if todo:  # decoded together, each up to its own limit
        more = kvzip.generate_ids_batched(m, tok, [q_ids[j] + outs[j] for j in todo], cache,
                                          [max_new - len(outs[j]) for j in todo])
        for j, extra in zip(todo, more):
            outs[j] += extra
    return [tok.decode(o) for o in outs]


def _reconstruction_nll(m, cache, spans) -> float:
    """Summed NLL (nats) of each span's context tokens, teacher-forced after its reconstruction prompt."""
    total = 0.0
    for start, end, ids in spans:
        n_prompt = len(ids) - (end - start)  # prompt + postfix before the span's context tokens
        logits = _forward_rollback(m, cache, ids)  # (T, V)
        target = torch.tensor(ids[n_prompt:], device=logits.device)
        total += torch.nn.functional.cross_entropy(logits[n_prompt - 1:-1], target, reduction="sum").item()
    return total


def _quality_contexts(tok, cfg, seed):
    """The seeded contexts: needle contexts (raw completion probes) and fact contexts (chat questions)."""
    out = []
    for i in range(cfg["needle_contexts"]):
        n_tokens = cfg["needle_tokens"][i % len(cfg["needle_tokens"])]
        n_needles = cfg["needles"][i % len(cfg["needles"])]
        task = tasks.varied_needle_task(n_tokens, n_needles=n_needles, seed=1000 * seed + i, tok=tok,
                                        key_digits=cfg["key_digits"])
        probes = random.Random(f"quality-needle-{seed}-{i}").sample(task["probes"], n_needles)  # asking order
        out.append(dict(kind="needle", context=task["context"], template=False, queries=probes))
    for i in range(cfg["fact_contexts"]):
        task = tasks.fact_task(cfg["fact_entities"], seed=1000 * seed + i, filler_words=cfg["fact_filler_words"])
        qs = random.Random(f"quality-fact-{seed}-{i}").sample(task["questions"], cfg["questions_per_context"])
        out.append(dict(kind="fact", context=task["context"], template=True, queries=qs))
    return out


def _calibration_contexts(tok, cfg, seed):
    """Head-score calibration texts: one needle and one fact context from the same generators as
    the evaluation, with other seeds (CALIBRATION_SEED + seed), so no evaluation context is seen."""
    cal = CALIBRATION_SEED + seed
    return [tasks.varied_needle_task(cfg["calibration_tokens"], n_needles=cfg["needles"][0], seed=cal, tok=tok,
                                     key_digits=cfg["key_digits"])["context"],
            tasks.fact_task(cfg["fact_entities"], seed=cal, filler_words=cfg["fact_filler_words"])["context"]]


def method_ratios(method, cfg) -> tuple:
    """The ratios a method is evaluated at in a preset (see QUALITY_PRESETS), ratio 1 included."""
    key = ("kvzip_ratios" if method == "kvzip" else "head_ratios" if method == "kvzip-head"
           else "online_ratios" if method == ONLINE
           else "ablation_ratios" if method in KVZIP_VARIANTS
           else "control_ratios" if method in ("streamingllm", "random") else "baseline_ratios")
    return tuple(sorted(set(cfg[key]) | {1.0}))


def _score_kvzip_variants(m, tok, kv, methods) -> tuple[dict, dict]:
    """Scores (L, Hkv, n_c) and scoring seconds of KVzip and its pair-level ablations that
    `methods` asks for; kv.scores is left as KVzip's own (chunk size CHUNK_SIZE, softmax)."""
    scores, seconds = {}, {}
    wanted = [x for x in ("kvzip-softmax-free", "kvzip-c500", "kvzip-c1000", "kvzip") if x in methods]
    if "kvzip-uniform" in methods and "kvzip" not in wanted:
        wanted.append("kvzip")
    for meth in wanted:  # kvzip last, so kv.scores ends as its own
        start = time.perf_counter()
        scores[meth] = kvzip.score_context(m, tok, kv, chunk_size=VARIANT_CHUNKS.get(meth, kvzip.CHUNK_SIZE),
                                           scorer="logits" if meth == "kvzip-softmax-free" else "softmax")
        seconds[meth] = time.perf_counter() - start
    if "kvzip-uniform" in methods:  # the same scores, another budget rule
        scores["kvzip-uniform"], seconds["kvzip-uniform"] = scores["kvzip"], seconds["kvzip"]
    return scores, seconds


def _full_reference(m, tok, kv, ctx, cfg, offset=0.5) -> dict:
    """The full cache's side of every measure: its greedy answers (token ids), which needle probes
    it gets right, and the reconstruction spans with their NLL. The n_spans spans sit at depths
    (i + offset) / n_spans of the context; the caller varies offset over contexts (stratified
    depths), so that with one span per context the spans still cover beginnings, middles and ends."""
    max_new = cfg["needle_max_new" if ctx["kind"] == "needle" else "qa_max_new"]
    q_ids = [kvzip.query_ids(tok, q, ctx["template"]) for q, _ in ctx["queries"]]
    ref = kvzip.generate_ids_batched(m, tok, q_ids, kv, max_new)
    right = [ctx["kind"] == "needle" and tasks.check_answer(tok.decode(r), a)
             for r, (_, a) in zip(ref, ctx["queries"])]
    spans = kvzip.reconstruction_inputs(tok, kv.context_ids, cfg["recon_span_tokens"])
    n_spans = min(cfg["recon_spans"], len(spans))
    spans = [spans[int((i + offset) * len(spans) / n_spans)] for i in range(n_spans)]
    return dict(q_ids=q_ids, ref=ref, right=right, max_new=max_new, spans=spans,
                nll=_reconstruction_nll(m, kv.cache, spans),
                n_tokens=sum(end - start for start, end, _ in spans))


def _evaluate(m, tok, cache, ctx, full) -> dict:
    """Counts for one (compressed) cache of one context, against the full cache's answers `full`."""
    right = agree = 0
    answers = _answers(m, tok, cache, full["q_ids"], full["ref"], full["max_new"])
    for (q, answer), got, ref, ok in zip(ctx["queries"], answers, full["ref"], full["right"]):
        if ctx["kind"] == "needle":
            if ok:  # relative accuracy: only probes the full cache answers right count
                right += tasks.check_answer(got, answer)
        else:
            agree += tasks.first_line(got) == tasks.first_line(tok.decode(ref))
    return dict(right=right, agree=agree, nll=_reconstruction_nll(m, cache, full["spans"]))


def _kind_order(kind):
    """tasks.TOKEN_KINDS first, in their order, then any other kind by name."""
    return (tasks.TOKEN_KINDS.index(kind), "") if kind in tasks.TOKEN_KINDS else (len(tasks.TOKEN_KINDS), kind)


def _scores_key(method) -> str:
    """The scores a method ranks by: its own, but PyramidKV's are SnapKV's (with layer budgets of
    its own)."""
    return "snapkv" if method == "pyramidkv" else method


def _keep_mask(kv, method, ratio, scores, hs, budget):
    """Which context pairs (bool (L, Hkv, n_c)) a method keeps at a ratio: KVzip's variants by
    their own rule (head level by the head scores hs (L, Hkv), uniform, or the global ranking of
    their scores), the baselines by theirs (baselines.eviction_budgets). The same mask gives the
    cache (kv.pack) and the kept share of each token kind; test_reuse checks it against each
    method's own prune path. kvzip-online's mask comes with its cache (_online_caches), except
    at ratio 1, where it is every pair, as for every method."""
    if method == ONLINE:
        if ratio < 1:
            raise ValueError("kvzip-online's kept pairs come from kvzip.prefill_online, not from offline scores")
        return torch.ones(len(kv.layers), kv.cache.k[0].shape[0], kv.n_context, dtype=torch.bool,
                          device=kv.cache.k[0].device)
    if method == "kvzip-head":
        return kvzip.head_keep_mask(hs.to(kv.cache.k[0].device), ratio, kv.n_context)
    if method == "kvzip-uniform":
        return kvzip.keep_mask(scores[method], ratio, uniform=True)
    if method in KVZIP_VARIANTS:
        return kvzip.keep_mask(scores[method], ratio)
    s = scores[_scores_key(method)]
    return kvzip.keep_mask(s, ratio, layer_budgets=baselines.eviction_budgets(method, ratio, s.shape, budget))


def _wilson_ci(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n (treats the queries as independent)."""
    if n == 0:
        return None
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _bootstrap_ci(num, den, seed):
    """95% percentile interval of sum(num) / sum(den) when contexts are resampled with replacement
    (None with fewer than two contexts: there is nothing to resample)."""
    idx = [i for i, d in enumerate(den) if d > 0]
    if len(idx) < 2:
        return None
    rng = random.Random(seed)
    stats = sorted(sum(num[i] for i in pick) / sum(den[i] for i in pick)
                   for pick in ([rng.choice(idx) for _ in idx] for _ in range(BOOTSTRAP_SAMPLES)))
    return [stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]]


def _summarize(cs, kinds, seed) -> dict:
    """One row's measures from its per-context counts cs, with their 95% intervals, the context
    pairs actually kept, and the kept fraction of each token kind (kinds: tasks.token_kind of
    every context position)."""
    right, probes = [c["right"] for c in cs], [c["probes"] for c in cs]
    agree, qs = [c["agree"] for c in cs], [c["questions"] for c in cs]
    nll, full_nll = [c["nll"] for c in cs], [c["full_nll"] for c in cs]
    ratio_of = lambda a, b: sum(a) / sum(b) if sum(b) > 0 else None  # noqa: E731
    return dict(relative_accuracy=ratio_of(right, probes), agreement=ratio_of(agree, qs),
                reconstruction_nll_ratio=ratio_of(nll, full_nll), n_probes=sum(probes),
                n_questions=sum(qs),
                kept_ratio=sum(c["kept_ratio"] for c in cs) / len(cs),  # mean over contexts
                relative_accuracy_ci95=_wilson_ci(sum(right), sum(probes)),
                agreement_ci95=_wilson_ci(sum(agree), sum(qs)),
                reconstruction_nll_ratio_ci95=_bootstrap_ci(nll, full_nll, seed),
                kept_by_kind=tasks.kept_by_kind([f for c in cs for f in c["kept"]], kinds))


def run_quality(m, tok, ratios=None, methods=None, n_contexts=None, seed=0, quick=False,
                progress=True, budget=baselines.DEFAULT_BUDGET, head_scores=None,
                quantized=QUANTIZED_ROWS, **overrides) -> dict:
    """The reuse experiment. Returns {"rows": [{method, ratio, bits, relative_accuracy, agreement,
    reconstruction_nll_ratio, n_probes, kept_ratio, kept_by_kind, ...}], plus counts,
    token_kinds (positions of each kind over all contexts), settings and seconds}.

    quantized: (ratio, bits) pairs of the KVzip rows stored quantized (method "kvzip", bits 8 or
    4), evaluated on the same contexts; () for none.

    ratios: every method at these (default: per method from the preset, see method_ratios);
    methods: default METHODS (the baselines and KVzip's ablations); n_contexts: contexts per task
    (needle and fact each; default from the preset); quick: the small preset; budget: the
    baselines' budget rule (baselines.BUDGETS); head_scores: (L, Hkv) for kvzip-head (default:
    computed here on calibration contexts); progress: progress lines on stderr (errors.progress);
    overrides: any QUALITY_PRESETS key (e.g. needle_tokens=(200,) for tests). A measure with
    nothing to count is None.
    """
    methods, cfg, ratios_of, quantized = _settings(ratios=ratios, methods=methods, n_contexts=n_contexts,
                                                   quick=quick, budget=budget, quantized=quantized,
                                                   overrides=overrides)
    say = errors.progress if progress else (lambda msg: None)
    t0 = time.perf_counter()
    head_seconds = 0.0
    if "kvzip-head" in methods and head_scores is None:  # once per model, on other contexts
        start = time.perf_counter()
        head_scores = kvzip.head_scores(m, tok, _calibration_contexts(tok, cfg, seed))
        head_seconds = time.perf_counter() - start
        say(f"head scores from 2 calibration contexts: {head_seconds:.0f} s")

    contexts = _quality_contexts(tok, cfg, seed)
    counts = {(meth, r): [] for meth in methods for r in ratios_of[meth]}  # one count dict per context
    quantized_counts = {rb: [] for rb in quantized}  # the same, for the quantized KVzip caches
    scoring_seconds = {meth: 0.0 for meth in methods}  # summed over contexts
    per_context = []
    kinds = []  # tasks.token_kind of every context position, contexts concatenated
    for ci, ctx in enumerate(contexts):
        start = time.perf_counter()
        kv = kvzip.prefill(m, tok, ctx["context"], score=False)
        prefill_s = time.perf_counter() - start
        scores, seconds = _score_kvzip_variants(m, tok, kv, methods)
        full = _full_reference(m, tok, kv, ctx, cfg, offset=(ci + 0.5) / len(contexts))
        _score_baselines(m, tok, kv, ctx, methods=methods, scores=scores, seconds=seconds, seed=seed + ci)
        online = _online_caches(m, tok, ctx, ratios_of[ONLINE], seconds) if ONLINE in methods else {}
        for meth in methods:
            scoring_seconds[meth] += 0.0 if meth == "kvzip-head" else seconds[_scores_key(meth)]
        start = time.perf_counter()
        kinds += [tasks.token_kind(tok.decode([i])) for i in kv.context_ids]
        plain, stored = _evaluate_caches(m, tok, kv, ctx, full, scores=scores, methods=methods, ratios_of=ratios_of,
                                         quantized=quantized, hs=head_scores, budget=budget, online=online)
        for key, count in plain:
            counts[key].append(count)
        for key, count in stored:
            quantized_counts[key].append(count)
        right, n_q = sum(full["right"]), len(full["ref"])
        per_context.append(dict(kind=ctx["kind"], n_context=kv.n_context, n_queries=n_q,
                                full_right=right, recon_tokens=full["n_tokens"],
                                full_nll_per_token=full["nll"] / max(1, full["n_tokens"]),
                                prefill_seconds=round(prefill_s, 2),
                                scoring_seconds={k: round(v, 2) for k, v in seconds.items()}))
        say(f"context {ci + 1}/{len(contexts)} ({ctx['kind']}, {kv.n_context} tokens, {n_q} queries"
            + (f", {right} right with the full cache" if ctx["kind"] == "needle" else "")
            + f"): prefill {prefill_s:.0f} s, scoring {sum(seconds.values()):.0f} s, "
            f"evaluation {time.perf_counter() - start:.0f} s")

    return _result(counts, quantized_counts, per_context, kinds, methods=methods, ratios_of=ratios_of,
                   quantized=quantized, seed=seed, quick=quick, cfg=cfg, budget=budget,
                   scoring_seconds=scoring_seconds, head_seconds=head_seconds, hs=head_scores, t0=t0)


def _settings(*, ratios, methods, n_contexts, quick, budget, quantized, overrides):
    """run_quality's arguments, checked before any work (ValueError) and resolved: (the methods,
    the preset with its overrides, {method: its ratios}, the quantized (ratio, bits) pairs)."""
    methods = tuple(methods or METHODS)
    for meth in methods:
        if meth not in METHODS:
            raise ValueError(f"unknown method {meth!r}; choose from {', '.join(METHODS)}")
    if budget not in baselines.BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(baselines.BUDGETS)}, got {budget!r}")
    cfg = dict(QUALITY_PRESETS["quick" if quick else "default"], **overrides)
    if n_contexts is not None:
        cfg["needle_contexts"] = cfg["fact_contexts"] = n_contexts
    if ratios is not None:
        for r in ratios:
            kvzip.check_ratio(r)
    ratios_of = {meth: tuple(sorted(set(ratios))) if ratios is not None else method_ratios(meth, cfg)
                 for meth in methods}
    quantized = tuple((r, bits) for r, bits in quantized)
    for r, bits in quantized:
        kvzip.check_ratio(r)
        quant.check_bits(bits)
    return methods, cfg, ratios_of, quantized


def _online_caches(m, tok, ctx, ratios, seconds) -> dict:
    """KVzip online's cache of one context at each ratio below 1: {ratio: (CompressedKV, keep
    (L', Hkv, n_c))}, from kvzip.prefill_online with chunks of ONLINE_CHUNK. Each ratio is a run of
    its own (prefill, scoring and eviction, chunk by chunk), whose seconds are summed into
    seconds[ONLINE]. At ratio 1 nothing is evicted: the shared full cache stands for it."""
    out, total = {}, 0.0
    for r in ratios:
        if r < 1:
            start = time.perf_counter()
            ckv = kvzip.prefill_online(m, tok, ctx["context"], r, chunk_size=ONLINE_CHUNK)
            total += time.perf_counter() - start
            out[r] = ckv, ckv.scores > float("-inf")  # scores are -inf exactly where a pair was evicted
    seconds[ONLINE] = total
    return out


def _score_baselines(m, tok, kv, ctx, *, methods, scores, seconds, seed):
    """Adds to scores and seconds (_score_kvzip_variants') those of the baselines in `methods`
    not scored yet. The query-aware ones see the context's first query only: the cache must then
    answer every query of its context."""
    first_query = ctx["queries"][0][0]
    for meth in methods:
        key = _scores_key(meth)
        if meth in baselines.METHODS and key not in scores:
            start = time.perf_counter()
            scores[key] = baselines.method_scores(key, m, tok, kv, first_query, ctx["template"], seed=seed)
            seconds[key] = time.perf_counter() - start


def _evaluate_caches(m, tok, kv, ctx, full, *, scores, methods, ratios_of, quantized, hs, budget, online=None):
    """Every cache of one context, pruned from kv (kvzip-online's: given, online = _online_caches')
    and evaluated against the full cache's side `full`: ([((method, ratio), count)],
    [((ratio, bits), count)] for the quantized KVzip caches), each count as _summarize reads it.
    At ratio 1 every method keeps every pair: one cache, evaluated once."""
    plain, stored = [], []
    res_full = None
    for meth in methods:
        for r in ratios_of[meth]:
            if meth == ONLINE and r < 1:
                ckv, keep = online[r]
            else:
                keep = _keep_mask(kv, meth, r, scores, hs, budget)  # (L, Hkv, n_c)
                ckv = kv.pack(keep) if r < 1 or res_full is None else None
            if r < 1 or res_full is None:
                res = dict(_evaluate(m, tok, ckv, ctx, full), kept_ratio=ckv.kept_ratio)
                if r == 1:
                    res_full = res
            plain.append(((meth, r), _count(res_full if r == 1 else res, keep, ctx, full)))
    for r, bits in quantized if "kvzip" in scores else ():  # KVzip's own scores, stored in int8 / int4
        keep = _keep_mask(kv, "kvzip", r, scores, hs, budget)  # the same pairs as bits 16
        ckv = kv.pack(keep, bits=bits)
        res = dict(_evaluate(m, tok, ckv, ctx, full), kept_ratio=ckv.kept_ratio)
        stored.append(((r, bits), _count(res, keep, ctx, full)))
    return plain, stored


def _count(res, keep, ctx, full) -> dict:
    """One cache's count on one context: its results res (_evaluate's, with kept_ratio), the full
    cache's side (the probes it gets right, its NLL, the questions asked), and kept (n_c,): the
    share of heads keeping each context position."""
    return dict(res, probes=sum(full["right"]), full_nll=full["nll"],
                questions=len(full["ref"]) if ctx["kind"] == "fact" else 0,
                kept=keep.float().mean(dim=(0, 1)).tolist())


def _result(counts, quantized_counts, per_context, kinds, *, methods, ratios_of, quantized, seed, quick, cfg,
            budget, scoring_seconds, head_seconds, hs, t0) -> dict:
    """run_quality's result: one row per (method, ratio) and per quantized (ratio, bits) from the
    per-context counts, the totals over contexts, the settings, the head scores hs (L, Hkv) of
    kvzip-head, and the seconds (t0: the start)."""
    rows = [dict(method=meth, ratio=r, bits=16, **_summarize(cs, kinds, seed))
            for (meth, r), cs in counts.items()]
    rows += [dict(method="kvzip", ratio=r, bits=bits, **_summarize(cs, kinds, seed))
             for (r, bits), cs in quantized_counts.items() if cs]
    needle = [c for c in per_context if c["kind"] == "needle"]
    fact = [c for c in per_context if c["kind"] == "fact"]
    return dict(
        rows=rows, methods=list(methods), ratios=sorted({r for rs in ratios_of.values() for r in rs}),
        quantized=[list(rb) for rb in quantized],
        seed=seed, quick=quick, config=cfg, baseline_budget=budget,
        online_chunk_size=ONLINE_CHUNK if ONLINE in methods else None,
        n_contexts=len(per_context), n_needle_contexts=len(needle), n_fact_contexts=len(fact),
        n_probes_asked=sum(c["n_queries"] for c in needle),
        n_probes=sum(c["full_right"] for c in needle),  # those the full cache gets right: the denominator
        n_questions=sum(c["n_queries"] for c in fact),
        n_recon_tokens=sum(c["recon_tokens"] for c in per_context),
        full_nll_per_token=sum(c["full_nll_per_token"] for c in per_context) / max(1, len(per_context)),
        context_tokens=[c["n_context"] for c in per_context],
        token_kinds={k: kinds.count(k) for k in sorted(set(kinds), key=_kind_order)},
        prefill_seconds=round(sum(c["prefill_seconds"] for c in per_context), 1),
        # per method, all contexts; kvzip-online's are whole runs of prefill_online (its prefill
        # included), one per ratio, where the offline methods share one prefill (prefill_seconds)
        scoring_seconds={k: round(v, 3) for k, v in scoring_seconds.items()},
        head_scores_seconds=round(head_seconds, 3),  # once per model (kvzip-head), not per context
        head_scores=None if hs is None else hs.tolist(),  # (L, Hkv)
        per_context=per_context,
        seconds=round(time.perf_counter() - t0, 1))


def format_quality_table(result) -> str:
    """A text table: rows method x ratio, columns the three measures with 95% intervals."""
    def cell(v, ci):
        if v is None:
            return f"{'-':>20}"
        return f"{v:6.3f} [{ci[0]:5.2f},{ci[1]:5.2f}]" if ci else f"{v:6.3f}{'':14}"

    lines = [f"reuse experiment: {result['n_needle_contexts']} needle contexts "
             f"({result['n_probes_asked']} probes, {result['n_probes']} right with the full cache), "
             f"{result['n_fact_contexts']} fact contexts ({result['n_questions']} questions); "
             f"context tokens {result['context_tokens']}; seed {result['seed']}; {result['seconds']:.0f} s",
             "query-aware methods scored with each context's first query; all queries answered from that "
             "one cache; [95% interval: Wilson over queries; NLL: bootstrap over contexts]; "
             f"baselines' budget rule: {result.get('baseline_budget', baselines.DEFAULT_BUDGET)}; "
             "kept: context pairs actually kept",
             f"{'method':<19}{'ratio':>6}{'bits':>5}  {'relative accuracy':>20}  {'agreement':>20}  "
             f"{'recon. NLL / full':>20}  {'n_probes':>8}  {'kept':>5}"]
    order = result["methods"]
    for row in sorted(result["rows"], key=lambda x: (order.index(x["method"]) if x["method"] in order else len(order),
                                                     x["ratio"], -x.get("bits", 16))):
        lines.append(f"{row['method']:<19}{row['ratio']:>6.2f}{row.get('bits', 16):>5}  "
                     f"{cell(row['relative_accuracy'], row['relative_accuracy_ci95'])}  "
                     f"{cell(row['agreement'], row['agreement_ci95'])}  "
                     f"{cell(row['reconstruction_nll_ratio'], row['reconstruction_nll_ratio_ci95'])}  "
                     f"{row['n_probes']:>8}  {row.get('kept_ratio', row['ratio']):>5.3f}")
    if "scoring_seconds" in result:
        lines.append(f"scoring seconds, all {result['n_contexts']} contexts: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in result["scoring_seconds"].items())
                     + f"; prefill {result['prefill_seconds']:.1f}"
                     + (f"; head scores (once per model) {result['head_scores_seconds']:.1f}"
                        if "kvzip-head" in result["methods"] else "")
                     + (f" ({ONLINE}: prefill_online at each of its ratios, chunks of {result['online_chunk_size']}, "
                        "its prefills included)" if ONLINE in result["methods"] else ""))
    return "\n".join(lines)


def format_kinds_table(result) -> str:
    """A text table: rows method x ratio (below 1), columns the kept % of each token kind's pairs."""
    kinds = list(result.get("token_kinds", {}))
    rows = [row for row in result["rows"] if row.get("kept_by_kind") and row["ratio"] < 1]
    if not rows:
        return ""
    order = {meth: i for i, meth in enumerate(result["methods"])}
    lines = ["kept % of each token kind's KV pairs (pooled over layers, heads and contexts; "
             + ", ".join(f"{k} {n} tokens" for k, n in result["token_kinds"].items()) + ")",
             f"{'method':<19}{'ratio':>6}" + "".join(f"{k:>9}" for k in kinds)]
    for row in sorted(rows, key=lambda x: (order.get(x["method"], len(order)), x["method"],
                                           -(x.get("bits") or 16), x["ratio"])):
        lines.append(f"{_label(row):<19}{row['ratio']:>6.2f}"
                     + "".join(f"{100 * row['kept_by_kind'][k]:>8.1f}%" if k in row["kept_by_kind"]
                               else f"{'-':>9}" for k in kinds))
    return "\n".join(lines)


def _label(row) -> str:
    """A row's series name: its method, with the cache's bit width when it is not 16 ("kvzip int4")."""
    bits = row.get("bits") or 16
    return row["method"] if bits == 16 else f"{row['method']} int{bits}"


def plot_quality(result, path) -> list[str]:
    """The reuse figure as one PNG with two panels, one line per (method, bits) series in the rows:
    left, relative accuracy vs KV ratio (needle probes, the full cache = 1; the paper's Figures 2
    and 10); right, reconstruction NLL under the compressed cache / under the full cache (1 is
    lossless). Rows of methods not in result["methods"] are drawn too, after the known ones;
    missing measures are skipped. Returns the series labels, in drawing order."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    order = {meth: i for i, meth in enumerate(result.get("methods", []))}
    series = {}  # (method, bits) -> rows
    for row in result["rows"]:
        if isinstance(row.get("method"), str) and isinstance(row.get("ratio"), (int, float)):
            series.setdefault((row["method"], row.get("bits") or 16), []).append(row)
    keys = sorted(series, key=lambda k: (order.get(k[0], len(order)), k[0], -k[1]))
    # tab10, then colours unlike any of its ten: METHODS has more than ten, and a reused colour
    # would make two methods (kvzip-c1000 and kvzip, kvzip-online and snapkv) look like one
    colours = plt.get_cmap("tab10").colors + ("black", "darkgoldenrod", "magenta", "lime")
    methods = list(dict.fromkeys(meth for meth, _ in keys))  # a colour per method, a dash per bit width
    dashes = {16: "-", 8: "--", 4: ":"}
    # equal values (several methods at 0, all at 1) would hide each other: each series gets its own
    # marker shape, later series smaller ones, so coinciding points show as nested markers
    shapes = "osD^vPX<>*"

    fig, (acc, nll) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = []
    for meth, bits in keys:
        rows = sorted(series[(meth, bits)], key=lambda x: x["ratio"])
        label = _label(rows[0])
        i = len(labels)
        style = dict(color=colours[methods.index(meth) % len(colours)], linestyle=dashes.get(bits, "-."),
                     marker=shapes[i % len(shapes)], markersize=max(3.0, 9.0 - 1.2 * i),
                     linewidth=2.4 if meth == "kvzip" else 1.4, label=label)
        for ax, key in ((acc, "relative_accuracy"), (nll, "reconstruction_nll_ratio")):
            pts = [(x["ratio"], x[key]) for x in rows if isinstance(x.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), **style)
        labels.append(label)
    acc.set_title("Needle probes: relative accuracy (full cache = 1)")
    acc.set_ylabel("relative accuracy")
    acc.set_ylim(-0.03, 1.05)
    nll.set_title("Reconstruction NLL / full cache (1 = lossless)")
    nll.set_ylabel("NLL ratio")
    nll.axhline(1.0, color="grey", linewidth=0.8)
    for ax in (acc, nll):
        ax.set_xlabel("KV ratio (fraction of context pairs kept)")
        ax.grid(alpha=0.3)
    legend = {}  # a series may have values in one panel only
    for ax in (acc, nll):
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    if legend:
        fig.legend([legend[x] for x in labels if x in legend], [x for x in labels if x in legend],
                   loc="center right", frameon=False)
    fig.suptitle(f"One compressed cache per context answers every query ({result.get('n_contexts', '?')} "
                 f"contexts; needle probes right with the full cache: {result.get('n_probes', '?')})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels


# -----------------------------------------------------------------------------
# KVzip online against offline KVzip on one context (kvzip.prefill_online), the same chunks and
# prompts on both sides: what the online drift costs, and what its bounded cache saves.

ONLINE_WORDS = 4500  # --online's haystack: about 6,000 tokens of the default model, within its 8K limit


def spearman(a, b) -> float:
    """Spearman's rank correlation of two 1-D tensors (ranks by a stable sort: ties, rare among
    float scores, are ranked in index order rather than averaged)."""
    def ranks(x):
        r = torch.empty(len(x), dtype=torch.float64, device=x.device)
        r[x.argsort(stable=True)] = torch.arange(len(x), dtype=torch.float64, device=x.device)
        return r
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


@torch.no_grad()
def compare_online(m, tok, context: str, chunk_size: int, ratios=(0.3, 0.1), n_spans: int = 4,
                   span_tokens: int = 64) -> dict:
    """Offline KVzip (prefill + prune) and KVzip online (prefill_online) on one context, with
    reconstruction chunks of chunk_size tokens on both sides. Per ratio: the Spearman correlation
    of each chunk's online scores (seen_scores: as computed when the chunk arrived) with its
    offline scores, over all layers, heads and positions; the kept sets' Jaccard index; the
    reconstruction NLL of n_spans spans (spread over the context) under each compressed cache,
    relative to the full cache's; the most K/V bytes held (offline: the full cache with its
    scoring room, and the compressed cache packed from it; online: its trace) and the seconds."""
    t0 = time.perf_counter()
    kv = kvzip.prefill(m, tok, context, chunk_size=chunk_size)
    offline_seconds = time.perf_counter() - t0
    spans = kvzip.reconstruction_inputs(tok, kv.context_ids, span_tokens)
    spans = [spans[int((i + 0.5) * len(spans) / n_spans)] for i in range(n_spans)]
    nll_full = _reconstruction_nll(m, kv.cache, spans)
    full_bytes = kv.nbytes  # the dense cache of prefix + context
    rows = []
    for r in ratios:
        off = kv.prune(r)
        t0 = time.perf_counter()
        on = kvzip.prefill_online(m, tok, context, r, chunk_size=chunk_size)
        online_seconds = time.perf_counter() - t0
        keep_off, keep_on = kvzip.keep_mask(kv.scores, r), torch.isfinite(on.scores)
        rows.append(dict(
            ratio=r, n_chunks=len(on.trace),
            spearman=[spearman(on.seen_scores[..., s["start"]:s["end"]].flatten(),
                               kv.scores[..., s["start"]:s["end"]].flatten()) for s in on.trace],
            jaccard=int((keep_off & keep_on).sum()) / int((keep_off | keep_on).sum()),
            nll_ratio_offline=_reconstruction_nll(m, off, spans) / nll_full,
            nll_ratio_online=_reconstruction_nll(m, on, spans) / nll_full,
            peak_bytes_offline=kvzip.held_bytes(kv) + kvzip.held_bytes(off),
            peak_bytes_online=max(s["held_bytes"] for s in on.trace),
            offline_seconds=offline_seconds, online_seconds=online_seconds,
            kept_per_chunk=[s["kept_per_chunk"] for s in on.trace]))
    return dict(n_context=kv.n_context, n_prefix=kv.n_prefix, chunk_size=chunk_size, full_bytes=full_bytes,
                rows=rows)


def format_online_table(result) -> str:
    """compare_online's result as a table: one row per ratio."""
    n_c, full = result["n_context"], result["full_bytes"]
    lines = [f"KVzip online vs offline: {n_c} context tokens, chunks of {result['chunk_size']} "
             f"(full cache {full / 2**20:.1f} MiB)",
             "ratio  chunks  Spearman per chunk (online vs offline scores)  Jaccard  NLL ratio off / on  "
             "peak held off / on (of full)   seconds off / on"]
    for r in result["rows"]:
        rho = " ".join(f"{x:.2f}" for x in r["spearman"])
        lines.append(f"{r['ratio']:<5}  {r['n_chunks']:>6}  {rho:<45}  {r['jaccard']:.3f}    "
                     f"{r['nll_ratio_offline']:.3f} / {r['nll_ratio_online']:.3f}      "
                     f"{r['peak_bytes_offline'] / full:.0%} / {r['peak_bytes_online'] / full:.0%}"
                     f"                 {r['offline_seconds']:.0f} / {r['online_seconds']:.0f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = errors.ArgumentParser(prog="reuse.py", description="The reuse experiment: query-agnostic KVzip "
                                "against query-aware baselines, one compressed cache per context and method.")
    p.add_argument("--quick", action="store_true", help="one needle and one fact context (~1 min)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated contexts (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and counts to FILE as JSON")
    p.add_argument("--plot", metavar="FILE",
                   help="also draw the figure into FILE (.png, .pdf, .svg, .jpg): relative accuracy and "
                   "reconstruction NLL vs ratio, one line per method")
    p.add_argument("--model", metavar="DIR_OR_NAME",
                   help="Hugging Face folder, or a model name that model.load knows "
                        "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--baseline-budget", choices=baselines.BUDGETS, default=baselines.DEFAULT_BUDGET,
                   help="the baselines' budget rule: 'layer' (equal layer budgets, heads ranked within each "
                        "layer: the paper's setup, the default) or 'global' (one ranking over all layers)")
    p.add_argument("--methods", type=lambda x: [s.strip() for s in x.split(",") if s.strip()],
                   help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--head-scores", metavar="FILE",
                   help="kvzip-head's head scores: read FILE if it exists (kvzip.load_head_scores), "
                        "otherwise compute them on calibration contexts and write FILE")
    p.add_argument("--online", type=int, metavar="CHUNK",
                   help="instead: KVzip online (kvzip.prefill_online) against offline KVzip, chunks of CHUNK "
                        f"tokens, on a haystack of {ONLINE_WORDS} words (compare_online; ratios 0.3, 0.1)")
    args = p.parse_args(argv)
    # cheap checks first: the outputs are written after a run of minutes, which must not be lost
    for option, path, suffixes in (("--json", args.json, None), ("--plot", args.plot, errors.IMAGE_SUFFIXES)):
        if path and (why := errors.check_output(path, option, suffixes)):
            p.error(why)
    if args.head_scores:  # read if it exists (so it must be a head-scores file), else written at the end
        if os.path.exists(args.head_scores):
            header = errors.safetensors_header(args.head_scores, "--head-scores")
            if "head_scores" not in header:
                raise errors.InputError(f"--head-scores {args.head_scores}: no 'head_scores' tensor in "
                                        "this safetensors file (kvzip.save_head_scores writes one)")
        elif why := errors.check_output(args.head_scores, "--head-scores"):
            p.error(why)
    if args.model and (why := model_lib.model_arg_problem(args.model)):
        p.error(why)
    for meth in args.methods or ():
        if meth not in METHODS:
            p.error(f"unknown method {meth!r} in --methods; choose from {', '.join(METHODS)}")
    if args.online is not None and args.online < kvzip.N_OVERLAP:
        p.error(f"--online: the chunk size must be at least {kvzip.N_OVERLAP} tokens, got {args.online}")
    return args


def main(args: argparse.Namespace) -> dict:
    m, tok = model_lib.load(args.model)
    if args.online:
        result = compare_online(m, tok, tasks.haystack(ONLINE_WORDS, seed=args.seed), args.online)
        print(format_online_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    hs = None
    if args.head_scores and os.path.exists(args.head_scores):
        hs = kvzip.load_head_scores(args.head_scores, m)
    result = run_quality(m, tok, seed=args.seed, quick=args.quick, methods=args.methods,
                         budget=args.baseline_budget, head_scores=hs)
    if args.head_scores and hs is None and result.get("head_scores") is not None:
        kvzip.save_head_scores(args.head_scores, torch.tensor(result["head_scores"]), m)
        errors.progress(f"wrote {args.head_scores}")
    print(format_quality_table(result))
    print()
    print(format_kinds_table(result))
    if args.plot:
        plot_quality(result, args.plot)
        errors.progress(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        errors.progress(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    errors.run(lambda: main(parse_args()), prog="reuse.py")
