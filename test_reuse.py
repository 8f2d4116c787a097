"""Tests of reuse.py: the experiment's driver on a tiny model, its answer shortcut, the keep masks
behind the token-kind table, and the figure."""
import json

import pytest
import torch

import baselines
import kvzip
import reuse
import tasks


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
    assert "kvzip          1.00    4" in table
    kinds_table = reuse.format_kinds_table(res)
    assert "digit" in kinds_table and "kvzip" in kinds_table
    png = tmp_path / "quality.png"
    assert reuse.plot_quality(res, png) and png.exists()


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
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_mask_is_what_compress_packs(tiny_kv):
    """_keep_mask (the token-kind table's mask) selects exactly the rows baselines.compress packs,
    for every method: same kept keys, same values, head by head."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(tiny_kv.scores.shape, generator=g)
    for meth in baselines.METHODS:
        for ratio in (0.1, 0.45):
            ckv = baselines.compress(tiny_kv, meth, ratio, scores)
            want = kvzip.CompressedKV.from_full(tiny_kv.cache, tiny_kv.n_prefix, reuse._keep_mask(meth, ratio, scores))
            for l in range(len(ckv.k)):
                assert torch.equal(ckv.offsets[l], want.offsets[l]), (meth, ratio, l)
                assert torch.equal(ckv.k[l], want.k[l]) and torch.equal(ckv.v[l], want.v[l]), (meth, ratio, l)


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
