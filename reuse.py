"""
reuse.py: the reuse experiment. One compressed cache answers every query of its context:
query-agnostic KVzip against query-aware baselines (Kim et al., NeurIPS 2025, Figures 2 and 10).

    python reuse.py                        # the default run (~17 min on a 2-core CPU)
    python reuse.py --quick                # one needle and one fact context (~3 min)
    python reuse.py --json out.json --plot quality.png   # the figure: accuracy and NLL vs ratio

For each seeded context (tasks.py): prefill once, score once per method (baselines.py; SnapKV,
PyramidKV and H2O see the context's *first* query), prune at every ratio, then answer *all*
queries of the context from that one cache, as a serving system would reuse it.
The same context also gives the quantized rows: KVzip caches stored in int8 / int4
(kv.prune(ratio, bits=...), quant.py), and quantization alone (ratio 1.0, int4); every row has a
`bits` field (16: the model's dtype, not quantized).

Map of this file: the presets, the evaluation of one cache (_answer, _reconstruction_nll,
_full_reference, _evaluate, _keep_mask), the intervals and _summarize (one row), run_quality (the
experiment), format_quality_table, format_kinds_table (what each method keeps of digits,
punctuation and words), plot_quality (the figure), main(). Nothing imports this file.
"""
import argparse
import json
import math
import random
import sys
import time

import errors

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import torch  # noqa: E402 (after the OpenMP setting above)

import baselines  # noqa: E402
import kvzip  # noqa: E402
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

QUALITY_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
QUALITY_PRESETS = {
    # needle_tokens / needles cycle over the needle contexts; a fact context holds fact_entities
    # invented people (4 questions each, questions_per_context of them asked) among
    # fact_filler_words words of haystack; recon_spans spans of recon_span_tokens context tokens
    # per context are reconstructed. Sized for a 2-core CPU: the 31 caches per context (6 methods
    # x 5 ratios, plus ratio 1 shared) each answer every query, and decoding dominates.
    # qa_max_new = 8 is short: the 135M model often restates the question first, so agreement
    # measures how faithfully the compressed cache reproduces the full cache's greedy continuation.
    "default": dict(needle_contexts=4, needle_tokens=(1000, 2000, 1500, 2500), needles=(8, 6, 8, 7),
                    fact_contexts=2, fact_entities=6, fact_filler_words=400, questions_per_context=6,
                    recon_spans=1, recon_span_tokens=64, needle_max_new=7, qa_max_new=8),
    "quick": dict(needle_contexts=1, needle_tokens=(1000,), needles=(6,),
                  fact_contexts=1, fact_entities=4, fact_filler_words=200, questions_per_context=3,
                  recon_spans=1, recon_span_tokens=64, needle_max_new=7, qa_max_new=8),
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
        t = tasks.needle_task(n_tokens, n_needles=n_needles, seed=1000 * seed + i, tok=tok)
        probes = random.Random(f"quality-needle-{seed}-{i}").sample(t["probes"], n_needles)  # asking order
        out.append(dict(kind="needle", context=t["context"], template=False, queries=probes))
    for i in range(cfg["fact_contexts"]):
        t = tasks.fact_task(cfg["fact_entities"], seed=1000 * seed + i, filler_words=cfg["fact_filler_words"])
        qs = random.Random(f"quality-fact-{seed}-{i}").sample(t["questions"], cfg["questions_per_context"])
        out.append(dict(kind="fact", context=t["context"], template=True, queries=qs))
    return out


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


def _kind_order(kind):
    """tasks.TOKEN_KINDS first, in their order, then any other kind by name."""
    return (tasks.TOKEN_KINDS.index(kind), "") if kind in tasks.TOKEN_KINDS else (len(tasks.TOKEN_KINDS), kind)


def _keep_mask(meth, ratio, scores):
    """The keep mask (L, Hkv, n_c) that baselines.compress packs for this method: PyramidKV's
    per-layer budgets, otherwise the global ranking (test_reuse checks the two agree for every
    method in baselines.METHODS)."""
    budgets = baselines.pyramid_budgets(ratio, *scores.shape) if meth == "pyramidkv" else None
    return kvzip.keep_mask(scores, ratio, layer_budgets=budgets)


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
    """One row's measures from its per-context counts cs, with their 95% intervals, and the kept
    fraction of each token kind (kinds: tasks.token_kind of every context position)."""
    right, probes = [c["right"] for c in cs], [c["probes"] for c in cs]
    agree, qs = [c["agree"] for c in cs], [c["questions"] for c in cs]
    nll, full_nll = [c["nll"] for c in cs], [c["full_nll"] for c in cs]
    ratio_of = lambda a, b: sum(a) / sum(b) if sum(b) > 0 else None  # noqa: E731
    return dict(relative_accuracy=ratio_of(right, probes), agreement=ratio_of(agree, qs),
                reconstruction_nll_ratio=ratio_of(nll, full_nll), n_probes=sum(probes),
                n_questions=sum(qs),
                relative_accuracy_ci95=_wilson_ci(sum(right), sum(probes)),
                agreement_ci95=_wilson_ci(sum(agree), sum(qs)),
                reconstruction_nll_ratio_ci95=_bootstrap_ci(nll, full_nll, seed),
                kept_by_kind=tasks.kept_by_kind([f for c in cs for f in c["kept"]], kinds))


def run_quality(m, tok, ratios=QUALITY_RATIOS, methods=None, n_contexts=None, seed=0, quick=False,
                progress=True, quantized=QUANTIZED_ROWS, **overrides) -> dict:
    """The reuse experiment. Returns {"rows": [{method, ratio, bits, relative_accuracy, agreement,
    reconstruction_nll_ratio, n_probes, kept_by_kind, ...}], plus counts, token_kinds (positions
    of each kind over all contexts), settings and seconds}.

    quantized: (ratio, bits) pairs of the KVzip rows stored quantized (method "kvzip", bits 8 or
    4), evaluated on the same contexts; () for none.

    n_contexts: contexts per task (needle and fact each; default from the preset); quick: the
    small preset; overrides: any QUALITY_PRESETS key (e.g. needle_tokens=(200,) for tests).
    A measure with nothing to count (no probe the full cache gets right) is None.
    """
    methods = tuple(methods or baselines.METHODS)
    cfg = dict(QUALITY_PRESETS["quick" if quick else "default"], **overrides)
    if n_contexts is not None:
        cfg["needle_contexts"] = cfg["fact_contexts"] = n_contexts
    for r in ratios:
        kvzip.check_ratio(r)
    quantized = tuple((r, bits) for r, bits in quantized)
    for r, bits in quantized:
        kvzip.check_ratio(r)
        kvzip.check_bits(bits)
    t0 = time.perf_counter()

    def log(msg):  # progress goes to stderr, so stdout stays the table / JSON
        if progress:
            print(f"[quality {time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    contexts = _quality_contexts(tok, cfg, seed)
    counts = {(meth, r): [] for meth in methods for r in ratios}  # one count dict per context
    quantized_counts = {rb: [] for rb in quantized}  # the same, for the quantized KVzip caches
    per_context = []
    kinds = []  # tasks.token_kind of every context position, contexts concatenated
    for ci, ctx in enumerate(contexts):
        t1 = time.perf_counter()
        kv = kvzip.prefill(m, tok, ctx["context"])
        full = _full_reference(m, tok, kv, ctx, cfg, offset=(ci + 0.5) / len(contexts))
        right, n_q = full["right"], len(full["ref"])
        # score once per method: query-aware methods see the first query only
        first_query = ctx["queries"][0][0]
        scores = {}
        for meth in methods:
            key = "snapkv" if meth == "pyramidkv" else meth  # PyramidKV = SnapKV scores + layer budgets
            if key not in scores:
                scores[key] = baselines.method_scores(key, m, tok, kv, first_query, ctx["template"],
                                                      seed=seed + ci)
        t2 = time.perf_counter()
        kinds += [tasks.token_kind(tok.decode([i])) for i in kv.context_ids]
        for r in ratios:
            res = None  # at ratio 1 every method keeps every pair: one cache, evaluated once
            for meth in methods:
                s = scores["snapkv" if meth == "pyramidkv" else meth]
                if r < 1 or res is None:
                    ckv = baselines.compress(kv, meth, r, s)
                    res = _evaluate(m, tok, ckv, ctx, full)
                kept = _keep_mask(meth, r, s).float().mean(dim=(0, 1)).tolist()  # (n_c,) share of heads
                counts[(meth, r)].append(dict(res, probes=sum(right), full_nll=full["nll"],
                                              questions=n_q if ctx["kind"] == "fact" else 0, kept=kept))
        for r, bits in quantized:  # KVzip's own scores (kv.scores), stored in int8 / int4
            res = _evaluate(m, tok, kv.prune(r, bits=bits), ctx, full)
            kept = _keep_mask("kvzip", r, kv.scores).float().mean(dim=(0, 1)).tolist()  # the same pairs as bits 16
            quantized_counts[(r, bits)].append(dict(res, probes=sum(right), full_nll=full["nll"],
                                                    questions=n_q if ctx["kind"] == "fact" else 0, kept=kept))
        per_context.append(dict(kind=ctx["kind"], n_context=kv.n_context, n_queries=n_q,
                                full_right=sum(right), recon_tokens=full["n_tokens"],
                                full_nll_per_token=full["nll"] / max(1, full["n_tokens"])))
        log(f"context {ci + 1}/{len(contexts)} ({ctx['kind']}, {kv.n_context} tokens, {n_q} queries"
            + (f", {sum(right)} right with the full cache" if ctx["kind"] == "needle" else "")
            + f"): prefill + scoring {t2 - t1:.0f} s, evaluation {time.perf_counter() - t2:.0f} s")

    rows = [dict(method=meth, ratio=r, bits=16, **_summarize(cs, kinds, seed)) for (meth, r), cs in counts.items()]
    rows += [dict(method="kvzip", ratio=r, bits=bits, **_summarize(cs, kinds, seed))
             for (r, bits), cs in quantized_counts.items()]
    needle = [c for c in per_context if c["kind"] == "needle"]
    fact = [c for c in per_context if c["kind"] == "fact"]
    return dict(
        rows=rows, methods=list(methods), ratios=list(ratios), quantized=[list(rb) for rb in quantized],
        seed=seed, quick=quick, config=cfg,
        n_contexts=len(contexts), n_needle_contexts=len(needle), n_fact_contexts=len(fact),
        n_probes_asked=sum(c["n_queries"] for c in needle),
        n_probes=sum(c["full_right"] for c in needle),  # those the full cache gets right: the denominator
        n_questions=sum(c["n_queries"] for c in fact),
        n_recon_tokens=sum(c["recon_tokens"] for c in per_context),
        full_nll_per_token=sum(c["full_nll_per_token"] for c in per_context) / max(1, len(per_context)),
        context_tokens=[c["n_context"] for c in per_context],
        token_kinds={k: kinds.count(k) for k in sorted(set(kinds), key=_kind_order)},
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
             "one cache; [95% interval: Wilson over queries; NLL: bootstrap over contexts]",
             f"{'method':<13}{'ratio':>6}{'bits':>5}  {'relative accuracy':>20}  {'agreement':>20}  "
             f"{'recon. NLL / full':>20}  {'n_probes':>8}"]
    order = result["methods"]
    for row in sorted(result["rows"], key=lambda x: (order.index(x["method"]) if x["method"] in order else len(order),
                                                     x["ratio"], -x.get("bits", 16))):
        lines.append(f"{row['method']:<13}{row['ratio']:>6.2f}{row.get('bits', 16):>5}  "
                     f"{cell(row['relative_accuracy'], row['relative_accuracy_ci95'])}  "
                     f"{cell(row['agreement'], row['agreement_ci95'])}  "
                     f"{cell(row['reconstruction_nll_ratio'], row['reconstruction_nll_ratio_ci95'])}  "
                     f"{row['n_probes']:>8}")
    return "\n".join(lines)


def format_kinds_table(result) -> str:
    """A text table: rows method x ratio (below 1), columns the kept % of each token kind's pairs."""
    kinds = list(result.get("token_kinds", {}))
    rows = [r for r in result["rows"] if r.get("kept_by_kind") and r["ratio"] < 1]
    if not rows:
        return ""
    order = {meth: i for i, meth in enumerate(result["methods"])}
    lines = ["kept % of each token kind's KV pairs (pooled over layers, heads and contexts; "
             + ", ".join(f"{k} {n} tokens" for k, n in result["token_kinds"].items()) + ")",
             f"{'method':<13}{'ratio':>6}" + "".join(f"{k:>9}" for k in kinds)]
    for row in sorted(rows, key=lambda x: (order.get(x["method"], len(order)), x["method"],
                                           -(x.get("bits") or 16), x["ratio"])):
        lines.append(f"{_label(row):<13}{row['ratio']:>6.2f}"
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
    colours = plt.get_cmap("tab10").colors
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


def parse_args(argv=None) -> argparse.Namespace:
    p = errors.ArgumentParser(prog="reuse.py", description="The reuse experiment: query-agnostic KVzip "
                                "against query-aware baselines, one compressed cache per context and method.")
    p.add_argument("--quick", action="store_true", help="one needle and one fact context (~3 min)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated contexts (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and counts to FILE as JSON")
    p.add_argument("--plot", metavar="FILE", default="quality.png",
                   help="the figure, as a PNG: relative accuracy and reconstruction NLL vs ratio, one "
                   "line per method (default quality.png)")
    p.add_argument("--model", metavar="DIR", help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    # cheap checks first: the outputs are written after a run of minutes, which must not be lost
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (why := errors.check_output(path, option)):
            p.error(why)
    if args.model and (why := errors.check_folder(args.model, "--model")):
        p.error(why)
    return args


def main(args: argparse.Namespace) -> dict:
    m, tok = model_lib.load(args.model)
    result = run_quality(m, tok, seed=args.seed, quick=args.quick)
    print(format_quality_table(result))
    print()
    print(format_kinds_table(result))
    plot_quality(result, args.plot)
    print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    errors.run(lambda: main(parse_args()), prog="reuse.py")
