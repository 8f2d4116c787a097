"""Tests of reuse.py: the experiment's driver on a tiny model, and its answer shortcut."""
import importlib.util
import json

import pytest

import torch

import baselines
import kvzip
import model
import reuse
from conftest import TINY_CONTEXT

TINY_PRESET = dict(needle_tokens=(150,), needles=(4,), fact_entities=2, fact_filler_words=40,
                   questions_per_context=2, recon_span_tokens=32, needle_max_new=4, qa_max_new=4,
                   calibration_tokens=120)


def test_quality_driver_reports_every_key(tiny, tmp_path):
    m, tok, _ = tiny
    res = reuse.run_quality(m, tok, ratios=(0.5, 1.0), methods=baselines.METHODS, n_contexts=1, seed=0,
                            quick=True, progress=False, needle_tokens=(150,), needles=(4,), fact_entities=2,
                            fact_filler_words=40, questions_per_context=2, recon_span_tokens=32,
                            needle_max_new=4, qa_max_new=4)
    res = json.loads(json.dumps(res))  # plain JSON all the way down
    for key in ("rows", "n_contexts", "n_probes", "n_probes_asked", "n_questions", "seconds", "methods", "ratios"):
        assert key in res
    assert len(res["rows"]) == len(baselines.METHODS) * 2
    for row in res["rows"]:
        for key in ("method", "ratio", "relative_accuracy", "agreement", "reconstruction_nll_ratio", "n_probes"):
            assert key in row
        assert row["method"] in baselines.METHODS
    at_one = [r for r in res["rows"] if r["ratio"] == 1.0]
    assert all(r["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3) for r in at_one)
    assert "kvzip" in reuse.format_quality_table(res)
    png = tmp_path / "quality.png"  # matplotlib is optional: a PNG only when it is installed
    assert reuse.plot_quality(res, png) == png.exists()


def test_answer_shortcut_equals_generate(tiny, tiny_kv):
    """The driver's teacher-forced shortcut gives kvzip.generate's text. `ref` is only a hint, so
    wrong hints (diverging at the first token, later, too short, too long) must not matter."""
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
                for hint in hints:
                    hint = hint[:max_new]
                    assert reuse._answer(m, tok, ckv, ids, hint, max_new) == want, (ratio, q, max_new, hint)


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
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
    # the head scores computed for kvzip-head were written, for this model, and are read back next time
    m, _ = model.load(folder)
    assert kvzip.load_head_scores(heads, m).tolist() == res["head_scores"]



def test_kvzip_variants_are_rows_with_their_ratios_kept_fractions_and_scoring_times(tiny):
    """The ablations run as methods: per-method ratios from the preset, head-level rows keep whole
    heads (kept_ratio a multiple of 1 / (L * Hkv)), and each method's scoring time is recorded."""
    m, tok, _ = tiny
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    methods = ("kvzip",) + reuse.KVZIP_VARIANTS
    res = reuse.run_quality(m, tok, methods=methods, n_contexts=1, quick=True, progress=False,
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
    """reuse._compress: each variant is kv.prune with its own scores or rule (scores recomputed
    here with kvzip.prefill); the baselines' layer budget rule gives per-layer counts equal to
    the budgets."""
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
        ckv = reuse._compress(kv, meth, 0.3, scores, None, "layer")
        assert torch.equal(ckv.head_lengths() - kv.n_prefix, kvzip.keep_mask(s, 0.3).sum(-1))
    uni = reuse._compress(kv, "kvzip-uniform", 0.3, scores, None, "layer")
    assert (uni.head_lengths() - kv.n_prefix == round(0.3 * n_c)).all()
    hs = torch.rand(L, Hkv)
    head = reuse._compress(kv, "kvzip-head", 0.5, scores, hs, "layer")
    assert torch.equal(head.head_lengths() - kv.n_prefix, kvzip.head_keep_mask(hs, 0.5, n_c).sum(-1))
    scores["snapkv"] = baselines.method_scores("snapkv", m, tok, kv, "Where is the mill?")
    ckv = reuse._compress(kv, "snapkv", 0.3, scores, None, "layer")
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
