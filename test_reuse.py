"""Tests of reuse.py: the experiment's driver on a tiny model, its answer shortcut, the keep masks
behind the token-kind table, and the figure."""
import json

import pytest
import torch

import baselines
import kvzip
import model
import reuse
import tasks
from conftest import TINY_CONTEXT

TINY_PRESET = dict(needle_tokens=(150,), needles=(4,), fact_entities=2, fact_filler_words=40,
                   questions_per_context=2, recon_span_tokens=32, needle_max_new=4, qa_max_new=4,
                   calibration_tokens=120)


def test_quality_driver_reports_every_key(tiny, tmp_path):
    m, tok, _ = tiny
    res = reuse.run_quality(m, tok, ratios=(0.5, 1.0), methods=baselines.METHODS, n_contexts=1, seed=0,
                            quick=True, progress=False, needle_tokens=(150,), needles=(4,), fact_entities=2,
                            fact_filler_words=40, questions_per_context=2, recon_span_tokens=32,
                            needle_max_new=4, qa_max_new=4, quantized=((0.5, 8), (0.5, 4), (1.0, 4)))
    res = json.loads(json.dumps(res))  # plain JSON all the way down
    for key in ("rows", "n_contexts", "n_probes", "n_probes_asked", "n_questions", "seconds", "methods", "ratios",
                "quantized"):
        assert key in res
    plain = [r for r in res["rows"] if r["bits"] == 16]
    assert len(plain) == len(baselines.METHODS) * 2 and len(res["rows"]) == len(plain) + 3
    for row in res["rows"]:
        for key in ("method", "ratio", "bits", "relative_accuracy", "agreement", "reconstruction_nll_ratio",
                    "n_probes"):
            assert key in row
        assert row["method"] in baselines.METHODS
        fr = row["kept_by_kind"]
        assert set(fr) == set(res["token_kinds"]) and all(0 <= f <= 1 for f in fr.values())
        if row["ratio"] == 1.0:
            assert all(f == 1.0 for f in fr.values())
    # the kinds' pooled fractions, weighted by their token counts, give back the ratio
    n = sum(res["token_kinds"].values())
    for row in res["rows"]:
        mean = sum(row["kept_by_kind"][k] * c for k, c in res["token_kinds"].items()) / n
        assert mean == pytest.approx(row["ratio"], abs=0.01), row["method"]
    at_one = [r for r in plain if r["ratio"] == 1.0]
    assert all(r["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3) for r in at_one)
    table = reuse.format_quality_table(res)
    assert "kvzip" in table
    # the quantized rows: KVzip's caches stored in int8 / int4, measured like the others
    quantized = {(r["ratio"], r["bits"]): r for r in res["rows"] if r["bits"] != 16}
    assert set(quantized) == {(0.5, 8), (0.5, 4), (1.0, 4)} and all(r["method"] == "kvzip" for r in quantized.values())
    kvzip_half = next(r for r in plain if r["method"] == "kvzip" and r["ratio"] == 0.5)
    assert quantized[(0.5, 8)]["n_probes"] == kvzip_half["n_probes"]
    assert quantized[(0.5, 8)]["kept_by_kind"] == kvzip_half["kept_by_kind"]  # the same pairs, stored smaller
    # int8 is close to the 16-bit cache; int4 alone (ratio 1) moves the NLL, but only a little
    assert quantized[(0.5, 8)]["reconstruction_nll_ratio"] == pytest.approx(kvzip_half["reconstruction_nll_ratio"],
                                                                           abs=0.01)
    assert quantized[(1.0, 4)]["reconstruction_nll_ratio"] != 1.0
    assert quantized[(1.0, 4)]["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=0.2)
    assert f"{'kvzip':<19}  1.00    4" in table  # method, ratio, bits
    kinds_table = reuse.format_kinds_table(res)
    assert "digit" in kinds_table and "kvzip" in kinds_table
    png = tmp_path / "quality.png"
    assert reuse.plot_quality(res, png) and png.exists()


def test_quantized_rows_use_quantized_caches(tiny, monkeypatch):
    """The quantized rows pack with bits=..., and bad configs fail before any work."""
    m, tok, _ = tiny
    calls = []
    pack = kvzip.FullKV.pack

    def spy(self, keep, bits=16):
        calls.append((round(keep.float().mean().item(), 1), bits))  # (the ratio kept, bits)
        return pack(self, keep, bits=bits)

    monkeypatch.setattr(kvzip.FullKV, "pack", spy)
    reuse.run_quality(m, tok, ratios=(0.5,), methods=("kvzip",), n_contexts=1, quick=True, progress=False,
                      needle_tokens=(120,), needles=(2,), fact_entities=1, fact_filler_words=20,
                      questions_per_context=1, recon_span_tokens=32, needle_max_new=2, qa_max_new=2,
                      quantized=((0.3, 4), (1.0, 8)))
    assert sorted(calls) == sorted([(0.5, 16), (0.3, 4), (1.0, 8)] * 2)  # needle and fact context
    for bad, match in [(((0.3, 3),), "bits must be"), (((0.0, 4),), "ratio must be")]:
        with pytest.raises(ValueError, match=match):
            reuse.run_quality(m, tok, quantized=bad, progress=False)


def test_answer_shortcut_equals_generate(tiny, tiny_kv):
    """The driver's teacher-forced shortcut, all probes together, gives kvzip.generate's text.
    `ref` is only a hint, so wrong hints (diverging at the first token, later, too short, too
    long) must not matter, nor which other probes share the batch."""
    m, tok, _ = tiny
    kv = tiny_kv
    queries = [("Where is the mill?", True), ("The pass key for the red door is", False)]
    for ratio in (0.05, 0.7):
        ckv = kv.prune(ratio)
        for q, template in queries:
            for max_new in (1, 2, 6):
                ids = kvzip.query_ids(tok, q, template)
                ref = kvzip.generate_ids(m, tok, ids, kv, max_new)
                assert tok.decode(ref) == kvzip.generate(m, tok, q, kv, max_new, template=template)
                want = kvzip.generate(m, tok, q, ckv, max_new, template=template)
                other = (ref[0] + 1) % 300 + 3  # a token id that is not ref[0] nor a stop id
                hints = [ref, [], [other], ref[:1] + [other] * (max_new - 1), ref[:-1], [other] * max_new]
                hints = [hint[:max_new] for hint in hints]
                got = reuse._answers(m, tok, ckv, [ids] * len(hints), hints, max_new)
                assert got == [want] * len(hints), (ratio, q, max_new, hints, got)


def test_command_line_writes_table_json_and_plot(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """python reuse.py --quick on the tiny checkpoint (with a smaller quick preset, for time): the
    table on stdout, the JSON file, and the PNG exactly when matplotlib is installed."""
    folder, _ = tiny_checkpoint
    monkeypatch.setitem(reuse.QUALITY_PRESETS, "quick", dict(
        reuse.QUALITY_PRESETS["quick"], needle_tokens=(150,), needles=(3,), fact_entities=2,
        fact_filler_words=40, questions_per_context=2, recon_span_tokens=32, calibration_tokens=120))
    out, png, heads = tmp_path / "reuse.json", tmp_path / "reuse.png", tmp_path / "heads.safetensors"
    res = reuse.main(reuse.parse_args(["--quick", "--model", str(folder), "--json", str(out), "--plot", str(png),
                                       "--head-scores", str(heads)]))
    assert "reuse experiment" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the head scores computed for kvzip-head were written, for this model, and are read back next time
    m, _ = model.load(folder)
    assert kvzip.load_head_scores(heads, m).tolist() == res["head_scores"]


def test_keep_mask_is_what_each_method_prunes(tiny_kv):
    """_keep_mask (the mask reuse packs and counts token kinds with) selects exactly the rows each
    method's own prune path packs (kv.prune for KVzip's variants, baselines.compress for the
    baselines), for every method under both budget rules: same kept keys, same values."""
    g = torch.Generator().manual_seed(0)
    L, Hkv, _ = tiny_kv.scores.shape
    scores = {meth: torch.rand(tiny_kv.scores.shape, generator=g) for meth in reuse.METHODS}
    hs = torch.rand(L, Hkv, generator=g)

    def own_prune(meth, ratio, budget):
        if meth == "kvzip-head":
            return tiny_kv.prune(ratio, level="head", head_scores=hs)
        if meth == "kvzip-uniform":
            return tiny_kv.prune(ratio, uniform=True, scores=scores[meth])
        if meth in reuse.KVZIP_VARIANTS:
            return tiny_kv.prune(ratio, scores=scores[meth])
        return baselines.compress(tiny_kv, meth, ratio, scores["snapkv" if meth == "pyramidkv" else meth], budget)

    for meth in (x for x in reuse.METHODS if x != reuse.ONLINE):  # kvzip-online: its own cache, tested below
        for ratio in (0.1, 0.45):
            for budget in baselines.BUDGETS:
                want = own_prune(meth, ratio, budget)
                ckv = tiny_kv.pack(reuse._keep_mask(tiny_kv, meth, ratio, scores, hs, budget))
                for l in range(len(ckv.k)):
                    assert torch.equal(ckv.offsets[l], want.offsets[l]), (meth, ratio, budget, l)
                    assert torch.equal(ckv.k[l], want.k[l]) and torch.equal(ckv.v[l], want.v[l]), (meth, ratio, l)
                assert ckv.kept_ratio == want.kept_ratio
    with pytest.raises(ValueError, match="prefill_online"):  # no silent offline stand-in
        reuse._keep_mask(tiny_kv, reuse.ONLINE, 0.3, scores, hs, "layer")
    assert reuse._keep_mask(tiny_kv, reuse.ONLINE, 1.0, scores, hs, "layer").all()


def synthetic_result():
    """A result dict as run_quality returns it, with a quantized series (bits) and an unknown method."""
    rows = []
    for meth, bits, acc in (("kvzip", 16, 0.9), ("kvzip", 4, 0.8), ("snapkv", None, 0.5), ("mystery", 16, 0.3)):
        for r in (0.1, 0.3, 1.0):
            row = dict(method=meth, ratio=r, relative_accuracy=1.0 if r == 1 else acc * r / 0.3 / 1.1,
                       reconstruction_nll_ratio=1.0 if r == 1 else 1 + 1 / r, agreement=None,
                       kept_by_kind={"digit": r, "punct": r, "word": r})
            if bits is not None:
                row["bits"] = bits
            rows.append(row)
    rows.append(dict(method="random", ratio=0.3, relative_accuracy=None, reconstruction_nll_ratio=2.5))
    rows.append(dict(note="a row of some other kind"))  # no method or ratio: not drawn
    return dict(rows=rows, methods=["kvzip", "snapkv", "random"], n_contexts=2, n_probes=10,
                token_kinds={"digit": 3, "punct": 5, "word": 9})


def test_plot_quality_draws_both_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    drawn = []  # the figure as saved: axes, their titles and lines
    real_savefig = Figure.savefig

    def spy(fig, *a, **k):
        drawn.append([(ax.get_title(), [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()))
                                        for ln in ax.get_lines() if not ln.get_label().startswith("_")])
                      for ax in fig.axes])
        return real_savefig(fig, *a, **k)

    png = tmp_path / "fig.png"
    monkeypatch.setattr(Figure, "savefig", spy)
    labels = reuse.plot_quality(synthetic_result(), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["kvzip", "kvzip int4", "snapkv", "random", "mystery"]  # known methods first
    (acc_title, acc), (nll_title, nll) = drawn[0]
    assert "accuracy" in acc_title and "NLL" in nll_title
    # accuracy: random has no value, so no line; NLL: every series
    assert [name for name, _, _ in acc] == ["kvzip", "kvzip int4", "snapkv", "mystery"]
    assert [name for name, _, _ in nll] == labels
    name, xs, ys = acc[1]
    assert xs == [0.1, 0.3, 1.0] and ys == pytest.approx([0.8 / 3.3, 0.8 / 1.1, 1.0])
    assert nll[0][2] == pytest.approx([11.0, 1 + 1 / 0.3, 1.0])
    plt.close("all")


def test_format_kinds_table():
    table = reuse.format_kinds_table(synthetic_result())
    lines = table.splitlines()
    assert "digit 3 tokens, punct 5 tokens, word 9 tokens" in lines[0]
    assert lines[1].split() == ["method", "ratio", "digit", "punct", "word"]
    assert lines[2].split() == ["kvzip", "0.10", "10.0%", "10.0%", "10.0%"]
    assert "kvzip int4" in table and "mystery" in table and "1.00" not in table  # ratio 1 left out
    assert tasks.TOKEN_KINDS == ("digit", "punct", "word")


def test_kvzip_variants_are_rows_with_their_ratios_kept_fractions_and_scoring_times(tiny):
    """The ablations run as methods: per-method ratios from the preset, head-level rows keep whole
    heads (kept_ratio a multiple of 1 / (L * Hkv)), and each method's scoring time is recorded."""
    m, tok, _ = tiny
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    methods = ("kvzip",) + reuse.KVZIP_VARIANTS
    res = reuse.run_quality(m, tok, methods=methods, n_contexts=1, quick=True, progress=False, quantized=(),
                            **dict(TINY_PRESET, kvzip_ratios=(0.5,), ablation_ratios=(0.3,), head_ratios=(0.3, 0.6)))
    got = {(r["method"], r["ratio"]) for r in res["rows"]}
    want = {("kvzip", 0.5), ("kvzip", 1.0), ("kvzip-head", 0.3), ("kvzip-head", 0.6), ("kvzip-head", 1.0)}
    want |= {(v, r) for v in reuse.KVZIP_VARIANTS[1:] for r in (0.3, 1.0)}
    assert got == want
    for row in res["rows"]:
        if row["method"] == "kvzip-head":
            assert row["kept_ratio"] == round(row["ratio"] * L * Hkv) / (L * Hkv)
        if row["ratio"] == 1.0:
            assert row["kept_ratio"] == 1.0 and row["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert set(res["scoring_seconds"]) == set(methods) and res["scoring_seconds"]["kvzip-head"] == 0.0
    assert all(v > 0 for k, v in res["scoring_seconds"].items() if k != "kvzip-head")
    assert res["head_scores_seconds"] > 0 and torch.tensor(res["head_scores"]).shape == (L, Hkv)
    assert "kvzip-softmax-free" in reuse.format_quality_table(res)
    with pytest.raises(ValueError, match="unknown method"):
        reuse.run_quality(m, tok, methods=("kvzip-bogus",), progress=False)
    with pytest.raises(ValueError, match="budget must be one of"):
        reuse.run_quality(m, tok, budget="head", progress=False)


def test_variant_caches_are_kvzip_prunes_and_layer_budgets_hold(tiny, tiny_kv, monkeypatch):
    """kv.pack(reuse._keep_mask(...)), the cache run_quality evaluates: each variant is kv.prune
    with its own scores or rule (scores recomputed here with kvzip.prefill); the baselines' layer
    budget rule gives per-layer counts equal to the budgets."""
    m, tok, _ = tiny
    kv = tiny_kv
    L, Hkv, n_c = m.cfg.n_layer, m.cfg.n_kv_head, kv.n_context
    monkeypatch.setitem(reuse.VARIANT_CHUNKS, "kvzip-c500", 40)  # several chunks of the ~120-token context
    monkeypatch.setitem(reuse.VARIANT_CHUNKS, "kvzip-c1000", 70)
    before = kv.scores.clone()
    scores, seconds = reuse._score_kvzip_variants(m, tok, kv, reuse.METHODS)
    assert torch.equal(kv.scores, before) and torch.equal(scores["kvzip"], before)  # left as KVzip's own
    want = {"kvzip-softmax-free": kvzip.prefill(m, tok, TINY_CONTEXT, scorer="logits").scores,
            "kvzip-c500": kvzip.prefill(m, tok, TINY_CONTEXT, chunk_size=40).scores,
            "kvzip-c1000": kvzip.prefill(m, tok, TINY_CONTEXT, chunk_size=70).scores}
    for meth, s in want.items():
        torch.testing.assert_close(scores[meth], s)
        assert not torch.equal(s, before), meth
        ckv = kv.pack(reuse._keep_mask(kv, meth, 0.3, scores, None, "layer"))
        assert torch.equal(ckv.head_lengths() - kv.n_prefix, kvzip.keep_mask(s, 0.3).sum(-1))
    uni = kv.pack(reuse._keep_mask(kv, "kvzip-uniform", 0.3, scores, None, "layer"))
    assert (uni.head_lengths() - kv.n_prefix == round(0.3 * n_c)).all()
    hs = torch.rand(L, Hkv)
    head = kv.pack(reuse._keep_mask(kv, "kvzip-head", 0.5, scores, hs, "layer"))
    assert torch.equal(head.head_lengths() - kv.n_prefix, kvzip.head_keep_mask(hs, 0.5, n_c).sum(-1))
    scores["snapkv"] = baselines.method_scores("snapkv", m, tok, kv, "Where is the mill?")
    ckv = kv.pack(reuse._keep_mask(kv, "snapkv", 0.3, scores, None, "layer"))
    assert (ckv.head_lengths() - kv.n_prefix).sum(1).tolist() == baselines.layer_budgets(0.3, L, Hkv, n_c)
    assert reuse.parse_args(["--baseline-budget", "global"]).baseline_budget == "global"
    assert reuse.parse_args([]).baseline_budget == baselines.DEFAULT_BUDGET == "layer"


def test_each_method_runs_at_its_presets_ratios():
    cfg = reuse.QUALITY_PRESETS["default"]
    assert reuse.method_ratios("kvzip", cfg) == tuple(sorted(cfg["kvzip_ratios"])) + (1.0,)
    assert reuse.method_ratios("snapkv", cfg) == reuse.method_ratios("h2o", cfg) == tuple(cfg["baseline_ratios"]) + (1.0,)
    assert reuse.method_ratios("random", cfg) == tuple(cfg["control_ratios"]) + (1.0,)
    assert reuse.method_ratios("kvzip-c500", cfg) == tuple(cfg["ablation_ratios"]) + (1.0,)
    assert reuse.method_ratios("kvzip-head", cfg) == tuple(cfg["head_ratios"]) + (1.0,)
    assert reuse.method_ratios(reuse.ONLINE, cfg) == (0.1, 0.3, 0.5, 1.0)  # beside KVzip's own rows
    assert reuse.method_ratios(reuse.ONLINE, cfg) == reuse.method_ratios("kvzip", cfg)
    assert reuse.ONLINE in reuse.METHODS and reuse.ONLINE in reuse.parse_args(["--methods", reuse.ONLINE]).methods


def test_kvzip_online_rows_are_prefill_online_caches(tiny, monkeypatch):
    """kvzip-online's rows evaluate the caches kvzip.prefill_online returns, one run per context
    and ratio below 1, with ONLINE_CHUNK: with several chunks their kept sets are not offline
    KVzip's (same chunks, same ratio), so a fallback to offline pruning would fail here."""
    m, tok, _ = tiny
    monkeypatch.setattr(reuse, "ONLINE_CHUNK", 40)  # several chunks of the ~100-150-token contexts
    calls, evaluated = [], set()
    real_online, real_evaluate = kvzip.prefill_online, reuse._evaluate

    def spy_online(m_, tok_, context, ratio, **kw):
        ckv = real_online(m_, tok_, context, ratio, **kw)
        calls.append((context, ratio, kw.get("chunk_size"), ckv))
        return ckv

    def spy_evaluate(m_, tok_, cache, ctx, full):
        evaluated.add(id(cache))
        return real_evaluate(m_, tok_, cache, ctx, full)

    monkeypatch.setattr(kvzip, "prefill_online", spy_online)
    monkeypatch.setattr(reuse, "_evaluate", spy_evaluate)
    res = reuse.run_quality(m, tok, methods=("kvzip", reuse.ONLINE), n_contexts=1, quick=True, progress=False,
                            quantized=(), **dict(TINY_PRESET, kvzip_ratios=(0.3,), online_ratios=(0.1, 0.3)))
    res = json.loads(json.dumps(res))  # plain JSON all the way down
    assert [(r, c) for _, r, c, _ in calls] == [(0.1, 40), (0.3, 40)] * 2  # needle, then fact context
    assert all(id(ckv) in evaluated for *_, ckv in calls)
    assert all(len(ckv.trace) >= 2 for *_, ckv in calls)  # several chunks each
    online = {r["ratio"]: r for r in res["rows"] if r["method"] == reuse.ONLINE}
    assert set(online) == {0.1, 0.3, 1.0} and res["online_chunk_size"] == 40
    for r, row in online.items():
        assert row["kept_ratio"] == pytest.approx(r, abs=0.01) and row["n_probes"] == res["n_probes"]
    assert online[1.0]["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert res["scoring_seconds"][reuse.ONLINE] > 0
    # the rows' kept share of each token kind is that of prefill_online's caches
    kinds, kept = [], {0.1: [], 0.3: []}
    for context, r, _, ckv in calls:
        if r == 0.1:
            kinds += [tasks.token_kind(tok.decode([i])) for i in ckv.context_ids]
        kept[r] += (ckv.scores > float("-inf")).float().mean(dim=(0, 1)).tolist()
    for r in (0.1, 0.3):
        want = tasks.kept_by_kind(kept[r], kinds)
        assert online[r]["kept_by_kind"] == pytest.approx(want)
    # not offline KVzip: the same chunks and ratio pruned from the full cache keep another set
    context, _, _, ckv = calls[1]  # the needle context at 0.3
    offline = kvzip.prefill(m, tok, context, chunk_size=40)
    assert not torch.equal(ckv.scores > float("-inf"), kvzip.keep_mask(offline.scores, 0.3).to(ckv.scores.device))
    table = reuse.format_quality_table(res)
    assert f"{reuse.ONLINE:<19}  0.10   16" in table and "prefill_online at each of its ratios, chunks of 40" in table


def test_model_names_pass_through_to_model_load(tiny, tmp_path, monkeypatch, capsys):
    """--model takes a folder (checked at once: a wrong path is a usage error) or a name, which
    goes to model.load unchanged."""
    m, tok, _ = tiny
    assert reuse.parse_args(["--model", "gemma3-270m"]).model == "gemma3-270m"
    for bad, why in ((str(tmp_path / "missing"), "no such folder"), ("./missing", "no such folder"),
                     (str(tmp_path / "f.txt"), "is a file")):
        (tmp_path / "f.txt").write_text("x")
        with pytest.raises(SystemExit):
            reuse.parse_args(["--model", bad])
        assert why in capsys.readouterr().err
    loaded = []
    monkeypatch.setattr(reuse.model_lib, "load", lambda name=None: loaded.append(name) or (m, tok))
    monkeypatch.setitem(reuse.QUALITY_PRESETS, "quick", dict(reuse.QUALITY_PRESETS["quick"], **TINY_PRESET))
    reuse.main(reuse.parse_args(["--model", "gemma3-270m", "--quick", "--methods", "kvzip"]))
    assert loaded == ["gemma3-270m"] and "reuse experiment" in capsys.readouterr().out


def test_plot_quality_gives_every_method_its_own_colour(tmp_path, monkeypatch):
    """More methods than tab10 has colours: none may share one (kvzip-online would look like snapkv)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    colours = {}
    real_savefig = Figure.savefig

    def spy(fig, *a, **k):
        for ln in fig.axes[0].get_lines():
            colours[ln.get_label()] = to_hex(ln.get_color())
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    rows = [dict(method=meth, ratio=r, relative_accuracy=r, reconstruction_nll_ratio=1 / r)
            for meth in reuse.METHODS for r in (0.3, 1.0)]
    reuse.plot_quality(dict(rows=rows, methods=list(reuse.METHODS)), tmp_path / "fig.png")
    assert set(colours) == set(reuse.METHODS) and len(set(colours.values())) == len(reuse.METHODS)
    plt.close("all")
