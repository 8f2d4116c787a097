"""Tests of reuse.py: the experiment's driver on a tiny model, and its answer shortcut."""
import importlib.util
import json

import pytest

import baselines
import kvzip
import reuse

def test_quality_driver_reports_every_key(tiny, tmp_path):
    m, tok, _ = tiny
    res = reuse.run_quality(m, tok, ratios=(0.5, 1.0), n_contexts=1, seed=0, quick=True, progress=False,
                      needle_tokens=(150,), needles=(4,), fact_entities=2, fact_filler_words=40,
                      questions_per_context=2, recon_span_tokens=32, needle_max_new=4, qa_max_new=4,
                      quantized=((0.5, 8), (0.5, 4), (1.0, 4)))
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
    at_one = [r for r in plain if r["ratio"] == 1.0]
    assert all(r["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=1e-3) for r in at_one)
    table = reuse.format_quality_table(res)
    assert "kvzip" in table
    # the quantized rows: KVzip's caches stored in int8 / int4, measured like the others
    quantized = {(r["ratio"], r["bits"]): r for r in res["rows"] if r["bits"] != 16}
    assert set(quantized) == {(0.5, 8), (0.5, 4), (1.0, 4)} and all(r["method"] == "kvzip" for r in quantized.values())
    kvzip_half = next(r for r in plain if r["method"] == "kvzip" and r["ratio"] == 0.5)
    assert quantized[(0.5, 8)]["n_probes"] == kvzip_half["n_probes"]
    # int8 is close to the 16-bit cache; int4 alone (ratio 1) moves the NLL, but only a little
    assert quantized[(0.5, 8)]["reconstruction_nll_ratio"] == pytest.approx(kvzip_half["reconstruction_nll_ratio"],
                                                                           abs=0.01)
    assert quantized[(1.0, 4)]["reconstruction_nll_ratio"] != 1.0
    assert quantized[(1.0, 4)]["reconstruction_nll_ratio"] == pytest.approx(1.0, abs=0.2)
    assert "kvzip          1.00    4" in table
    png = tmp_path / "quality.png"  # matplotlib is optional: a PNG only when it is installed
    assert reuse.plot_quality(res, png) == png.exists()


def test_quantized_rows_use_quantized_caches(tiny, monkeypatch):
    """The quantized rows prune with bits=..., and bad configs fail before any work."""
    m, tok, _ = tiny
    calls = []
    prune = kvzip.FullKV.prune

    def spy(self, ratio, *a, **k):
        calls.append((ratio, k.get("bits", 16)))
        return prune(self, ratio, *a, **k)

    monkeypatch.setattr(kvzip.FullKV, "prune", spy)
    reuse.run_quality(m, tok, ratios=(0.5,), methods=("kvzip",), n_contexts=1, quick=True, progress=False,
                      needle_tokens=(120,), needles=(2,), fact_entities=1, fact_filler_words=20,
                      questions_per_context=1, recon_span_tokens=32, needle_max_new=2, qa_max_new=2,
                      quantized=((0.3, 4), (1.0, 8)))
    assert sorted(calls) == sorted([(0.5, 16), (0.3, 4), (1.0, 8)] * 2)  # needle and fact context
    for bad, match in [(((0.3, 3),), "bits must be"), (((0.0, 4),), "ratio must be")]:
        with pytest.raises(ValueError, match=match):
            reuse.run_quality(m, tok, quantized=bad, progress=False)


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
        fact_filler_words=40, questions_per_context=2, recon_span_tokens=32))
    out, png = tmp_path / "reuse.json", tmp_path / "reuse.png"
    res = reuse.main(reuse.parse_args(["--quick", "--model", str(folder), "--json", str(out), "--plot", str(png)]))
    assert "reuse experiment" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
