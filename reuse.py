"""
reuse.py: the reuse experiment. One compressed cache answers every query of its context:
query-agnostic KVzip against query-aware baselines (Kim et al., NeurIPS 2025, Figures 2 and 10).

    python reuse.py                        # the default run (~10 min on an idle 2-core CPU, estimated)
    python reuse.py --quick                # one needle and one fact context (2.5 min)
    python reuse.py --json out.json --plot quality.png
    python reuse.py --baseline-budget global --methods snapkv,h2o   # the baselines' other budget rule
    python reuse.py --head-scores heads.safetensors                 # reuse kvzip-head's head scores

For each seeded context (tasks.py): prefill once, score once per method (baselines.py; SnapKV,
PyramidKV and H2O see the context's *first* query; KVzip's ablations are scored here with
kvzip.py's functions), prune at the method's ratios, then answer *all* queries of the context
from that one cache, as a serving system would reuse it.

Map of this file: the methods and presets, the evaluation of one cache (_answer,
_reconstruction_nll, _full_reference, _evaluate), the contexts and KVzip's variants
(_quality_contexts, _calibration_contexts, method_ratios, _score_kvzip_variants, _compress), the
intervals, run_quality (the experiment), format_quality_table, plot_quality, main(). Nothing
imports this file.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

import baselines
import kvzip
import model as model_lib
import tasks

#
# For each context: prefill once, score once per method (the query-aware ones see the context's
# first query), prune at every ratio, then answer ALL queries of the context from that one cache.
# Three measures, each relative to the full cache (the 135M default model is often wrong on its
# own, so absolute accuracy would mostly measure the model, not the compression):
#   relative_accuracy        needle probes answered right, among those the full cache gets right
#   agreement                fact questions whose first answer line (normalized) equals the full cache's
#   reconstruction_nll_ratio mean NLL per token of repeating context spans (KVzip's reconstruction
#                            input, teacher-forced) under the compressed cache / under the full cache
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
KVZIP_VARIANTS = ("kvzip-head", "kvzip-uniform", "kvzip-softmax-free", "kvzip-c500", "kvzip-c1000")
METHODS = baselines.METHODS + KVZIP_VARIANTS
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
    # needle_task's shared template ("The pass key for the red door is 48213.") the 135M model's
    # full cache answered only 10 of 32 probes (1.5K tokens, 8 needles, 5 digits; 8 of 32 with 3
    # digits, 7 of 48 with 12 needles in 1K tokens): it answers with another needle's key. Varied
    # sentences: 35 of 36 (1K tokens, 12 needles), 33 of 36 (2K tokens). Only probes the full
    # cache gets right count, so sixteen needles per context give many counted probes per prefill
    # and scoring pass. needle_max_new = 5 covers a 3-digit answer and the token after it (which
    # tells "432" from "4321"); longer answers only cost decoding.
    # Ratios: answering dominates the run time (every cache answers every query, ~0.4 s per probe
    # on one CPU thread; 17 caches per context by default), so each method runs only where it can
    # tell us something: KVzip at kvzip_ratios (beside the baselines at 0.3, the ablations at 0.1
    # and head-level at 0.6); the query-aware baselines at baseline_ratios (below 0.3 they kept
    # almost no probe in earlier runs, at 0.7 some); the controls (StreamingLLM, random) at one
    # ratio; KVzip's pair-level ablations at 0.1, where KVzip itself loses probes (where it keeps
    # them all an ablation cannot differ); head-level at the paper's 0.6; ratio 1 once, shared.
    # Scoring is the other large cost (four KVzip passes per context for the ablations), hence
    # contexts of 1-1.5K tokens.
    "default": dict(needle_contexts=3, needle_tokens=(1000, 1500, 1000), needles=(16,), key_digits=3,
                    fact_contexts=1, fact_entities=6, fact_filler_words=400, questions_per_context=6,
                    recon_spans=1, recon_span_tokens=64, needle_max_new=5, qa_max_new=8,
                    kvzip_ratios=(0.1, 0.3, 0.5), baseline_ratios=(0.3, 0.7),
                    control_ratios=(0.5,), ablation_ratios=(0.1,), head_ratios=(0.6,),
                    calibration_tokens=1500),
    "quick": dict(needle_contexts=1, needle_tokens=(1000,), needles=(8,), key_digits=3,
                  fact_contexts=1, fact_entities=4, fact_filler_words=200, questions_per_context=3,
                  recon_spans=1, recon_span_tokens=64, needle_max_new=5, qa_max_new=8,
                  kvzip_ratios=(0.1, 0.3), baseline_ratios=(0.3,), control_ratios=(0.3,),
                  ablation_ratios=(0.1,), head_ratios=(0.6,), calibration_tokens=1000),
}
BOOTSTRAP_SAMPLES = 1000


@torch.no_grad()
def _forward_rollback(m, cache, ids):
    """Logits (T, V) of ids run on top of cache (teacher-forced); the cache is rolled back after."""
    with model_lib.rollback(cache):
        return m(torch.tensor(ids, device=m.device), cache)


def _answer(m, tok, cache, q_ids, ref, max_new) -> str:
    """Greedy answer from cache, sped up by the full cache's answer ids `ref`.

    One teacher-forced pass over q_ids + ref gives the argmax after every prefix of ref. Greedy
    decoding follows ref up to the first position where that argmax differs, then emits the
    argmax; only from there on do we decode token by token (often not at all). Equal to
    kvzip.generate's answer except at float near-ties between the batched and the one-token pass.
    """
    stopped = len(ref) < max_new  # ref ended on a stop token, not on the length limit
    pred = _forward_rollback(m, cache, q_ids + (ref if stopped else ref[:-1]))
    pred = pred[len(q_ids) - 1:].argmax(dim=-1).tolist()  # pred[i]: the greedy choice after ref[:i]
    i = next((i for i, (p, r) in enumerate(zip(pred, ref)) if p != r), len(ref))
    if i == len(ref) and not stopped:
        return tok.decode(ref)  # ref all along, up to the length limit
    if pred[i] in tok.stop_ids:
        return tok.decode(ref[:i])
    out = ref[:i] + [pred[i]]
    if len(out) < max_new:
        out += kvzip.generate_ids(m, tok, q_ids + out, cache, max_new - len(out))
    return tok.decode(out)




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
        t = tasks.varied_needle_task(n_tokens, n_needles=n_needles, seed=1000 * seed + i, tok=tok,
                                     key_digits=cfg["key_digits"])
        probes = random.Random(f"quality-needle-{seed}-{i}").sample(t["probes"], n_needles)  # asking order
        out.append(dict(kind="needle", context=t["context"], template=False, queries=probes))
    for i in range(cfg["fact_contexts"]):
        t = tasks.fact_task(cfg["fact_entities"], seed=1000 * seed + i, filler_words=cfg["fact_filler_words"])
        qs = random.Random(f"quality-fact-{seed}-{i}").sample(t["questions"], cfg["questions_per_context"])
        out.append(dict(kind="fact", context=t["context"], template=True, queries=qs))
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
        t = time.perf_counter()
        scores[meth] = kvzip.score_context(m, tok, kv, chunk_size=VARIANT_CHUNKS.get(meth, kvzip.CHUNK_SIZE),
                                           scorer="logits" if meth == "kvzip-softmax-free" else "softmax")
        seconds[meth] = time.perf_counter() - t
    if "kvzip-uniform" in methods:  # the same scores, another budget rule
        scores["kvzip-uniform"], seconds["kvzip-uniform"] = scores["kvzip"], seconds["kvzip"]
    return scores, seconds


def _compress(kv, method, ratio, scores, head_scores, budget):
    """The compressed cache of one method at one ratio: KVzip's variants through kv.prune, the
    baselines through baselines.compress (with their budget rule)."""
    if method == "kvzip-head":
        return kv.prune(ratio, level="head", head_scores=head_scores)
    if method == "kvzip-uniform":
        return kv.prune(ratio, uniform=True, scores=scores[method])
    if method in KVZIP_VARIANTS:
        return kv.prune(ratio, scores=scores[method])
    return baselines.compress(kv, method, ratio, scores["snapkv" if method == "pyramidkv" else method], budget)


def _full_reference(m, tok, kv, ctx, cfg, offset=0.5) -> dict:
    """The full cache's side of every measure: its greedy answers (token ids), which needle probes
    it gets right, and the reconstruction spans with their NLL. The k spans sit at depths
    (i + offset) / k of the context; the caller varies offset over contexts (stratified depths), so
    that with one span per context the spans still cover beginnings, middles and ends."""
    max_new = cfg["needle_max_new" if ctx["kind"] == "needle" else "qa_max_new"]
    q_ids = [kvzip.query_ids(tok, q, ctx["template"]) for q, _ in ctx["queries"]]
    ref = [kvzip.generate_ids(m, tok, ids, kv, max_new) for ids in q_ids]
    right = [ctx["kind"] == "needle" and tasks.check_answer(tok.decode(r), a)
             for r, (_, a) in zip(ref, ctx["queries"])]
    spans = kvzip.reconstruction_inputs(tok, kv.context_ids, cfg["recon_span_tokens"])
    k = min(cfg["recon_spans"], len(spans))
    spans = [spans[int((i + offset) * len(spans) / k)] for i in range(k)]
    return dict(q_ids=q_ids, ref=ref, right=right, max_new=max_new, spans=spans,
                nll=_reconstruction_nll(m, kv.cache, spans),
                n_tokens=sum(end - start for start, end, _ in spans))


def _evaluate(m, tok, cache, ctx, full) -> dict:
    """Counts for one (compressed) cache of one context, against the full cache's answers `full`."""
    max_new = full["max_new"]
    right = agree = 0
    for (q, answer), q_ids, ref, ok in zip(ctx["queries"], full["q_ids"], full["ref"], full["right"]):
        if ctx["kind"] == "needle":
            if ok:  # relative accuracy: only probes the full cache answers right count
                right += tasks.check_answer(_answer(m, tok, cache, q_ids, ref, max_new), answer)
        else:
            answer_line = tasks.first_line(_answer(m, tok, cache, q_ids, ref, max_new))
            agree += answer_line == tasks.first_line(tok.decode(ref))
    return dict(right=right, agree=agree, nll=_reconstruction_nll(m, cache, full["spans"]))


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


def run_quality(m, tok, ratios=None, methods=None, n_contexts=None, seed=0, quick=False,
                progress=True, budget=baselines.DEFAULT_BUDGET, head_scores=None, **overrides) -> dict:
    """The reuse experiment. Returns {"rows": [{method, ratio, relative_accuracy, agreement,
    reconstruction_nll_ratio, n_probes, kept_ratio, ...}], plus counts, settings and seconds}.

    ratios: every method at these (default: per method from the preset, see method_ratios);
    methods: default METHODS (the baselines and KVzip's ablations); n_contexts: contexts per task
    (needle and fact each; default from the preset); quick: the small preset; budget: the
    baselines' budget rule (baselines.BUDGETS); head_scores: (L, Hkv) for kvzip-head (default:
    computed here on calibration contexts); overrides: any QUALITY_PRESETS key (e.g.
    needle_tokens=(200,) for tests). A measure with nothing to count is None.
    """
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
    t0 = time.perf_counter()

    def log(msg):  # progress goes to stderr, so stdout stays the table / JSON
        if progress:
            print(f"[quality {time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    head_seconds = 0.0
    if "kvzip-head" in methods and head_scores is None:  # once per model, on other contexts
        head_seconds = time.perf_counter()
        head_scores = kvzip.head_scores(m, tok, _calibration_contexts(tok, cfg, seed))
        head_seconds = time.perf_counter() - head_seconds
        log(f"head scores from 2 calibration contexts: {head_seconds:.0f} s")

    contexts = _quality_contexts(tok, cfg, seed)
    counts = {(meth, r): [] for meth in methods for r in ratios_of[meth]}  # one count dict per context
    scoring_seconds = {meth: 0.0 for meth in methods}  # summed over contexts
    per_context = []
    for ci, ctx in enumerate(contexts):
        t1 = time.perf_counter()
        kv = kvzip.prefill(m, tok, ctx["context"], score=False)
        prefill_s = time.perf_counter() - t1
        scores, seconds = _score_kvzip_variants(m, tok, kv, methods)
        full = _full_reference(m, tok, kv, ctx, cfg, offset=(ci + 0.5) / len(contexts))
        right, n_q = full["right"], len(full["ref"])
        # score once per method: query-aware methods see the first query only
        first_query = ctx["queries"][0][0]
        for meth in methods:
            key = "snapkv" if meth == "pyramidkv" else meth  # PyramidKV = SnapKV scores + layer budgets
            if meth in baselines.METHODS and key not in scores:
                t = time.perf_counter()
                scores[key] = baselines.method_scores(key, m, tok, kv, first_query, ctx["template"], seed=seed + ci)
                seconds[key] = time.perf_counter() - t
            scoring_seconds[meth] += 0.0 if meth == "kvzip-head" else seconds[key]
        t2 = time.perf_counter()
        res_full = None  # at ratio 1 every method keeps every pair: one cache, evaluated once
        for meth in methods:
            for r in ratios_of[meth]:
                if r < 1 or res_full is None:
                    ckv = _compress(kv, meth, r, scores, head_scores, budget)
                    res = dict(_evaluate(m, tok, ckv, ctx, full), kept=ckv.kept_ratio)
                    if r == 1:
                        res_full = res
                res = res_full if r == 1 else res
                counts[(meth, r)].append(dict(res, probes=sum(right), full_nll=full["nll"],
                                              questions=n_q if ctx["kind"] == "fact" else 0))
        per_context.append(dict(kind=ctx["kind"], n_context=kv.n_context, n_queries=n_q,
                                full_right=sum(right), recon_tokens=full["n_tokens"],
                                full_nll_per_token=full["nll"] / max(1, full["n_tokens"]),
                                prefill_seconds=round(prefill_s, 2),
                                scoring_seconds={k: round(v, 2) for k, v in seconds.items()}))
        log(f"context {ci + 1}/{len(contexts)} ({ctx['kind']}, {kv.n_context} tokens, {n_q} queries"
            + (f", {sum(right)} right with the full cache" if ctx["kind"] == "needle" else "")
            + f"): prefill {prefill_s:.0f} s, scoring {sum(seconds.values()):.0f} s, "
            f"evaluation {time.perf_counter() - t2:.0f} s")

    rows = []
    for (meth, r), cs in counts.items():
        right, probes = [c["right"] for c in cs], [c["probes"] for c in cs]
        agree, qs = [c["agree"] for c in cs], [c["questions"] for c in cs]
        nll, full_nll = [c["nll"] for c in cs], [c["full_nll"] for c in cs]
        ratio_of = lambda a, b: sum(a) / sum(b) if sum(b) > 0 else None  # noqa: E731
        rows.append(dict(method=meth, ratio=r,
                         relative_accuracy=ratio_of(right, probes), agreement=ratio_of(agree, qs),
                         reconstruction_nll_ratio=ratio_of(nll, full_nll), n_probes=sum(probes),
                         n_questions=sum(qs),
                         kept_ratio=sum(c["kept"] for c in cs) / len(cs),  # mean over contexts
                         relative_accuracy_ci95=_wilson_ci(sum(right), sum(probes)),
                         agreement_ci95=_wilson_ci(sum(agree), sum(qs)),
                         reconstruction_nll_ratio_ci95=_bootstrap_ci(nll, full_nll, seed)))
    needle = [c for c in per_context if c["kind"] == "needle"]
    fact = [c for c in per_context if c["kind"] == "fact"]
    return dict(
        rows=rows, methods=list(methods), ratios=sorted({r for rs in ratios_of.values() for r in rs}),
        seed=seed, quick=quick, config=cfg, baseline_budget=budget,
        n_contexts=len(contexts), n_needle_contexts=len(needle), n_fact_contexts=len(fact),
        n_probes_asked=sum(c["n_queries"] for c in needle),
        n_probes=sum(c["full_right"] for c in needle),  # those the full cache gets right: the denominator
        n_questions=sum(c["n_queries"] for c in fact),
        n_recon_tokens=sum(c["recon_tokens"] for c in per_context),
        full_nll_per_token=sum(c["full_nll_per_token"] for c in per_context) / max(1, len(per_context)),
        context_tokens=[c["n_context"] for c in per_context],
        prefill_seconds=round(sum(c["prefill_seconds"] for c in per_context), 1),
        scoring_seconds={k: round(v, 3) for k, v in scoring_seconds.items()},  # per method, all contexts
        head_scores_seconds=round(head_seconds, 3),  # once per model (kvzip-head), not per context
        head_scores=None if head_scores is None else head_scores.tolist(),  # (L, Hkv)
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
             f"{'method':<19}{'ratio':>6}  {'relative accuracy':>20}  {'agreement':>20}  "
             f"{'recon. NLL / full':>20}  {'n_probes':>8}  {'kept':>5}"]
    for row in sorted(result["rows"], key=lambda x: (result["methods"].index(x["method"]), x["ratio"])):
        lines.append(f"{row['method']:<19}{row['ratio']:>6.2f}  "
                     f"{cell(row['relative_accuracy'], row['relative_accuracy_ci95'])}  "
                     f"{cell(row['agreement'], row['agreement_ci95'])}  "
                     f"{cell(row['reconstruction_nll_ratio'], row['reconstruction_nll_ratio_ci95'])}  "
                     f"{row['n_probes']:>8}  {row.get('kept_ratio', row['ratio']):>5.3f}")
    if "scoring_seconds" in result:
        lines.append(f"scoring seconds, all {result['n_contexts']} contexts: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in result["scoring_seconds"].items())
                     + f"; prefill {result['prefill_seconds']:.1f}"
                     + (f"; head scores (once per model) {result['head_scores_seconds']:.1f}"
                        if "kvzip-head" in result["methods"] else ""))
    return "\n".join(lines)


def plot_quality(result, path) -> bool:
    """Relative accuracy vs ratio, one line per method, as a PNG; False if matplotlib is missing
    (it is optional, not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for meth in result["methods"]:
        rows = sorted((x for x in result["rows"] if x["method"] == meth and x["relative_accuracy"] is not None),
                      key=lambda x: x["ratio"])
        ax.plot([x["ratio"] for x in rows], [x["relative_accuracy"] for x in rows], marker="o", label=meth)
    ax.set_xlabel("KV ratio (fraction of context pairs kept)")
    ax.set_ylabel("relative accuracy (needle probes)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reuse.py", description="The reuse experiment: query-agnostic KVzip "
                                "against query-aware baselines, one compressed cache per context and method.")
    p.add_argument("--quick", action="store_true", help="one needle and one fact context (~2.5 min)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated contexts (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and counts to FILE as JSON")
    p.add_argument("--plot", metavar="FILE", default="quality.png",
                   help="relative accuracy vs ratio per method, as a PNG (needs matplotlib; default quality.png)")
    p.add_argument("--model", metavar="DIR", help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--baseline-budget", choices=baselines.BUDGETS, default=baselines.DEFAULT_BUDGET,
                   help="the baselines' budget rule: 'layer' (equal layer budgets, heads ranked within each "
                        "layer: the paper's setup, the default) or 'global' (one ranking over all layers)")
    p.add_argument("--methods", type=lambda x: [s.strip() for s in x.split(",") if s.strip()],
                   help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--head-scores", metavar="FILE",
                   help="kvzip-head's head scores: read FILE if it exists (kvzip.load_head_scores), "
                        "otherwise compute them on calibration contexts and write FILE")
    args = p.parse_args(argv)
    for meth in args.methods or ():
        if meth not in METHODS:
            p.error(f"unknown method {meth!r} in --methods; choose from {', '.join(METHODS)}")
    return args


def main(args: argparse.Namespace) -> dict:
    m, tok = model_lib.load(args.model)
    hs = None
    if args.head_scores and os.path.exists(args.head_scores):
        hs = kvzip.load_head_scores(args.head_scores, m)
    result = run_quality(m, tok, seed=args.seed, quick=args.quick, methods=args.methods,
                         budget=args.baseline_budget, head_scores=hs)
    if args.head_scores and hs is None and result.get("head_scores") is not None:
        kvzip.save_head_scores(args.head_scores, torch.tensor(result["head_scores"]), m)
        print(f"wrote {args.head_scores}", file=sys.stderr)
    print(format_quality_table(result))
    if plot_quality(result, args.plot):
        print(f"wrote {args.plot}", file=sys.stderr)
    else:
        print("matplotlib is not installed: no plot (optional; pip install matplotlib)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main(parse_args())
