"""Tests of bench.py: arguments, geometries, budgets, memory accounting, decode paths, and one
tiny end-to-end run."""
import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import bench
import kvzip
from conftest import HERE


# -----------------------------------------------------------------------------
# arguments

@pytest.mark.parametrize("text, n", [("124k", 124_000), ("124K", 124_000), ("4096", 4096),
                                     ("1k", 1000), (" 2k ", 2000)])
def test_parse_ctx(text, n):
    assert bench.parse_ctx(text) == n


@pytest.mark.parametrize("text", ["0", "0k", "k", "1.5k", "-3", "12m", "abc", ""])
def test_parse_ctx_rejects(text):
    with pytest.raises(Exception):
        bench.parse_ctx(text)


def test_defaults_are_the_main_command():
    args = bench.parse_args([])
    assert (args.ctx, args.ratio, args.geometry) == (124_000, 0.3, "llama3.1-8b")
    assert not (args.sweep or args.quick) and args.json is None


@pytest.mark.parametrize("argv, word", [
    (["--ctx", "0"], "--ctx"), (["--ctx", "12x"], "--ctx"), (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "0"], "--ratio"), (["--ratio", "nan"], "--ratio"),
    (["--geometry", "gpt-5"], "--geometry"), (["--reps", "0"], "--reps"), (["--bogus"], "--bogus"),
    (["--synthetic", "--geometry", "model"], "--geometry model"), (["--synthetic", "--model", "."], "--model"),
    (["--synthetic", "--score-ctx", "1k"], "--score-ctx")])
def test_bad_arguments_one_line_exit_2(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.py: error:") and word in err


def test_bad_arguments_from_the_command_line():
    r = subprocess.run([sys.executable, "bench.py", "--ratio", "1.5"], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "(0, 1]" in r.stderr


# -----------------------------------------------------------------------------
# geometries, budgets, masks

def test_llama_geometry_matches_the_paper():
    geo = bench.get_geometry("llama3.1-8b")
    assert (geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.group) == (32, 32, 8, 128, 4)
    assert round(geo.kv_bytes(124_000) / 1e9, 1) == 16.3  # the paper's 16.3 GB at 124K tokens
    with pytest.raises(ValueError, match="unknown geometry"):
        bench.get_geometry("gpt-5")


def test_model_geometry_reads_the_loaded_model():
    cfg = SimpleNamespace(n_layer=2, n_head=4, n_kv_head=2, head_dim=16)
    geo = bench.get_geometry("model", SimpleNamespace(cfg=cfg, dtype=torch.float32))
    assert (geo.n_layers, geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.dtype) == (2, 4, 2, 16, "float32")


@pytest.mark.parametrize("ratio", [1.0, 0.8, 0.3, 0.2, 0.01])
@pytest.mark.parametrize("geometry", ["llama3.1-8b", "smollm2-135m", "qwen2.5-7b"])
def test_target_budgets_total_and_cap(ratio, geometry):
    geo = bench.get_geometry(geometry)
    n_c = 1000
    # a skewed real pattern from 5 "layers" x 3 heads: some heads keep everything, some nothing
    fractions = torch.tensor([[1.0, 0.0, 0.5], [0.9, 0.1, 0.3], [1.0, 1.0, 0.0],
                              [0.2, 0.2, 0.2], [0.05, 0.6, 0.95]])
    counts = bench.target_budgets(fractions, geo, n_c, ratio)
    assert counts.shape == (geo.n_layers, geo.n_kv_heads) and counts.dtype == torch.int64
    assert int(counts.sum()) == round(ratio * geo.n_layers * geo.n_kv_heads * n_c)
    assert int(counts.min()) >= 0 and int(counts.max()) <= n_c
    if ratio == 1.0:
        assert bool((counts == n_c).all())


def test_target_budgets_follow_the_pattern():
    """Same number of heads: the pattern is copied as is (it already keeps `ratio` overall)."""
    geo = bench.Geometry("t", 2, 4, 2, 16, "float32")
    fractions = torch.tensor([[0.1, 0.3], [0.5, 0.3]])  # mean 0.3
    assert bench.target_budgets(fractions, geo, 100, 0.3).tolist() == [[10, 30], [50, 30]]


def test_spread_keep_mask_keeps_exactly_the_budget():
    counts = torch.tensor([[0, 1, 7, 50, 99, 100]])
    keep = bench.spread_keep_mask(counts, 100)
    assert keep.shape == (1, 6, 100) and keep.sum(-1).tolist() == counts.tolist()
    assert bench.representative_layer(torch.tensor([[1, 1], [5, 5], [3, 3]])) == 2  # mean 6 per layer


def test_cache_memory_counts_real_objects():
    """Compressed bytes = kept rows of K and V plus the int64 offsets, layer by layer."""
    geo = bench.Geometry("t", 3, 4, 2, 8, "float32")
    n_p, n_c = 5, 40
    full = bench.random_layer(geo, n_p + n_c, torch.float32, torch.device("cpu"))
    counts = torch.tensor([[10, 20], [0, 40], [12, 12]])
    full_bytes, comp = bench.cache_memory(full, n_p, n_c, counts)
    assert full_bytes == 3 * 2 * 2 * (n_p + n_c) * 8 * 4
    rows = int(counts.sum()) + 3 * 2 * n_p
    assert comp == rows * 2 * 8 * 4 + 3 * (2 + 1) * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_memory_equals_every_layer_built_for_real(dtype):
    """measure_quantized's bytes (one real layer's bytes per kept pair, times every layer's kept
    pairs) equal the nbytes of all L layers' CompressedKV built for real at each bit width."""
    geo = bench.Geometry("t", 3, 4, 2, 64, str(dtype).removeprefix("torch."))
    n_p, n_c, ratio = 5, 40, 0.3
    full = bench.random_layer(geo, n_p + n_c, dtype, torch.device("cpu"))
    counts = bench.target_budgets(torch.tensor([[0.1, 0.6], [0.0, 0.5], [0.3, 0.3]]), geo, n_c, ratio)
    full_bytes, comp = bench.cache_memory(full, n_p, n_c, counts)
    memory, decode = bench.measure_quantized(geo, n_p=n_p, n_c=n_c, counts=counts, ratio=ratio, full_bytes=full_bytes,
                                             comp_bytes=comp, device=torch.device("cpu"), decode_dtype=torch.float32,
                                             reps=1, kern=None)
    assert [(row["bits"], row["ratio"]) for row in memory] == [(16, 1.0), (8, 1.0), (4, 1.0), (16, 0.3), (8, 0.3),
                                                              (4, 0.3)]
    for row in memory:
        keep = torch.ones(3, 2, n_c, dtype=torch.bool) if row["ratio"] == 1.0 else bench.spread_keep_mask(counts, n_c)
        real = sum(kvzip.CompressedKV.from_full(full, n_p, keep[l:l + 1], "reference", bits=row["bits"]).nbytes
                   for l in range(3))  # the stored cache, without the CPU's decode plans (as cache_memory)
        assert row["bytes"] == real and row["fraction_of_full"] == real / full_bytes
    by = {(row["bits"], row["ratio"]): row["bytes"] for row in memory}
    assert by[(16, 0.3)] == comp
    assert by[(4, 1.0)] < by[(8, 1.0)] < by[(16, 1.0)]
    assert [d["bits"] for d in decode] == [16, 8, 4] and all(d["ms_per_layer"] > 0 for d in decode)


def test_llama_int4_at_0_3_stays_within_1_6_gb():
    """The issue's bound at the paper's geometry (124K tokens, Llama-3.1-8B), everything counted:
    int4 codes, fp16 scale and zero per 32 values, the offsets (here from the formula that
    test_quantized_memory_equals_every_layer_built_for_real checks against real objects)."""
    geo = bench.get_geometry("llama3.1-8b")
    n_p, n_c = 30, 124_000
    rows = round(0.3 * geo.n_layers * geo.n_kv_heads * n_c) + geo.n_layers * geo.n_kv_heads * n_p
    total = rows * 2 * geo.head_dim * (4 + 1) / 8 + geo.n_layers * (geo.n_kv_heads + 1) * 8
    assert 1.4e9 < total <= 1.6e9


def test_decode_paths_agree():
    """Every full-cache path and the compressed path at ratio 1 compute the same attention."""
    geo = bench.Geometry("t", 1, 6, 2, 16, "float32")
    n_p, n_c = 3, 50
    full = bench.random_layer(geo, n_p + n_c, torch.float32, torch.device("cpu"))
    q, k_new, v_new = torch.randn(2, 3, 1, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    full.k[0][:, n_p + n_c] = k_new[:, 0]
    full.v[0][:, n_p + n_c] = v_new[:, 0]
    outs = {name: fn() for name, fn in bench.full_decode_paths(full, q, None).items()}
    assert {"kvzip.packed_attention", "fused.packed_attention_fused", "fused.packed_decode",
            "model.attention"} <= set(outs)
    ref = outs["model.attention"]
    for name, out in outs.items():
        bench._check_same(name, out, "model.attention", ref)
    full.k[0][:, n_p + n_c] = 0  # the compressed path must use its own tail, not this row
    name, fn, nbytes, plan_bytes = bench.compressed_decode_path(full, n_p=n_p, n_c=n_c, counts=torch.tensor([n_c, n_c]),
                                                                q=q, k_new=k_new, v_new=v_new, kern=None)
    assert name.endswith("fused.packed_decode") and plan_bytes > 0  # the CPU's one-token path
    bench._check_same("compressed", fn(), "model.attention", ref)
    assert nbytes == 2 * (2 * (n_p + n_c) + 2) * 16 * 4


def test_kernel_decode_path_agrees():
    """The Triton varlen kernel (bench's CUDA path; here through Triton's interpreter) computes
    the same attention over the uncompressed cache viewed as a packed one."""
    pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")
    import kernels
    geo = bench.Geometry("t", 1, 4, 2, 16, "float32")
    n_p, n_c = 3, 40
    full = bench.random_layer(geo, n_p + n_c, torch.float32, torch.device("cpu"))
    q = torch.randn(2, 2, 1, 16)
    paths = bench.full_decode_paths(full, q, kernels)
    ref = paths["model.attention"]()
    bench._check_same("kernel", paths["kernels.varlen_decode_attention"](), "model.attention", ref)


# -----------------------------------------------------------------------------
# one tiny end-to-end run

REQUIRED_KEYS = {
    "ctx": None, "ratio": None, "device": None,
    "geometry": {"name", "n_layers", "n_heads", "n_kv_heads", "head_dim", "dtype"},
    "memory": {"full_bytes", "compressed_bytes", "quantized"},
    "decode": {"full_ms_per_layer", "compressed_ms_per_layer", "full_gbps", "compressed_gbps",
               "device_gbps"},
    "scoring": {"ctx", "prefill_s", "scoring_s", "prefill_peak_bytes", "scoring_peak_bytes"},
    "quality": {"ratio", "relative_accuracy", "n_probes"},
    "prefill": {"n_tokens", "mask_s", "causal_s", "reps"},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """bench.main on a tiny configuration (the default model, a ~150-token real context)."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    args = bench.parse_args(["--ctx", "1k", "--ratio", "0.5", "--geometry", "model", "--quick",
                             "--score-ctx", "150", "--reps", "1", "--json", str(path)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = bench.main(args)
    return res, json.loads(path.read_text()), out.getvalue()


def test_tiny_run_json_keys(tiny_run):
    res, data, _ = tiny_run
    for key, sub in REQUIRED_KEYS.items():
        assert key in data, key
        if sub:
            assert sub <= set(data[key]), (key, sub - set(data[key]))
    assert data["ctx"] == 1000 and data["ratio"] == 0.5 and data["device"] in ("cpu", "cuda")
    assert data["geometry"]["name"] == "model" and data["geometry"]["n_layers"] == 30
    assert 0 < data["memory"]["compressed_bytes"] < data["memory"]["full_bytes"]
    assert data["scoring"]["ctx"] <= 200 and data["scoring"]["prefill_s"] > 0  # whole sentences: ~150
    assert data["quality"]["n_probes"] == 2 and data["quality"]["ratio"] == 0.5
    frac = data["memory"]["compressed_bytes"] / data["memory"]["full_bytes"]
    assert abs(frac / data["memory"]["expected_fraction"] - 1) < 0.02
    quantized = data["memory"]["quantized"]
    assert {(row["bits"], row["ratio"]) for row in quantized} == {(b, r) for b in (16, 8, 4) for r in (1.0, 0.5)}
    for row in quantized:
        assert set(row) == {"bits", "ratio", "bytes", "fraction_of_full"}
        assert row["fraction_of_full"] == row["bytes"] / data["memory"]["full_bytes"]
        if (row["bits"], row["ratio"]) == (16, 0.5):
            assert row["bytes"] == data["memory"]["compressed_bytes"]
    assert [d["bits"] for d in data["quantized_decode"]] == [16, 8, 4]


def test_tiny_run_report(tiny_run):
    _, data, out = tiny_run
    lines = out.strip().splitlines()
    assert lines[0].startswith("KVzip benchmark") and "geometry model" in out
    assert "1,000 tokens" in out and "python reuse.py" in out
    assert "quantized cache, kv.prune(ratio, bits=...)" in out
    row = next(x for x in lines if x.startswith("prefill, "))  # causal block skipping vs explicit mask
    assert f"{data['prefill']['n_tokens']:,} real tokens" in row and f"<= {bench.TARGETS['prefill_causal_over_mask']}" in row
    last = json.loads(lines[-1])  # the last line is a one-line JSON summary
    assert last["ctx"] == 1000 and last["geometry"] == "model"


def test_report_shows_the_multi_chunk_scoring_row(tiny_run):
    """--sweep adds a scoring row over several chunks; the report shows it with its own target."""
    res, _, _ = tiny_run
    mc = dict(res["scoring"], ctx=6000, n_chunks=3)
    text = bench.format_report(dict(res, scoring_multi_chunk=mc))
    line = next(x for x in text.splitlines() if "6,000 real tokens, 3 chunks" in x)
    assert f"<= {bench.TARGETS['scoring_over_prefill_multi']}" in line
    assert "3 chunks" not in bench.format_report(res)


def test_synthetic_run_needs_no_model(tmp_path, monkeypatch):
    """--synthetic: rows 1, 2 and 5 alone, every head keeping the ratio; the model is never loaded."""
    monkeypatch.setattr(bench.model_lib, "load", lambda *a, **k: pytest.fail("--synthetic loaded a model"))
    path = tmp_path / "out.json"
    args = bench.parse_args(["--synthetic", "--ctx", "1k", "--ratio", "0.5", "--quick", "--reps", "1",
                             "--json", str(path)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(args)
    data, text = json.loads(path.read_text()), out.getvalue()
    assert data["synthetic_only"] and data["scoring"] is None and data["quality"] is None
    assert data["n_prefix"] == bench.SYNTHETIC_PREFIX and data["decode"]["layer_kept_fraction"] == pytest.approx((30 + 500) / (30 + 1000))  # + the new token
    assert [d["bits"] for d in data["quantized_decode"]] == [16, 8, 4]
    assert "real: none (--synthetic" in text and "KVzip scoring cost" not in text and "pass keys" not in text
    last = json.loads(text.strip().splitlines()[-1])
    assert last["scoring_over_prefill"] is None and last["relative_accuracy"] is None


def test_serving_step_and_capacity_on_paper():
    """The serving rows at a tiny geometry: the packed bytes shrink with the bits, and the capacity
    rows are the GPU's bytes minus the weights over the measured bytes of one context (16-bit rows
    counted in bfloat16)."""
    geo = bench.Geometry("t", 3, 4, 2, 32, "bfloat16")
    step = bench.batched_step_at_geometry(geo, 300, 0.3, torch.device("cpu"), reps=1, n_p=4)
    assert 0.2 < step["kept_rows"] < 0.45 and step["dtype"] == "float32"
    assert step["layer_packed_bytes"][4] < step["layer_packed_bytes"][8] < step["layer_packed_bytes"][16]
    cap = bench.capacity_on_paper(step, geo)
    full = step["layer_full_bytes"] / 2 * 3  # float32 here, counted in bfloat16, 3 layers
    assert cap["full"]["bytes"] == full
    assert cap["full"]["fits"]["80 GB"] == int((80e9 - bench.LLAMA_8B_WEIGHT_BYTES) // full)
    assert cap["0.3 + int4"]["bytes"] == step["layer_packed_bytes"][4] * 3
    text = bench.format_serving(dict(n_context=300, ratio=0.3, load_average="0", first_answer=None,
                                     answering=dict(n_queries=16, sequential_tok_s=1.0, batched_tok_s=8.0,
                                                    speedup=8.0, same_answers=True),
                                     step=step, capacity=cap))
    assert "8.0x" in text and "0.3 + int4" in text


def test_hybrid_memory_counts_what_the_real_caches_hold(tmp_path):
    """bench.hybrid_memory at a tiny Gemma 3 (two sliding layers, window 6, one global layer)
    against a real prefill: the window cache's bytes, every layer holding every position, and the
    compressed caches at 0.3 in 16, 8 and 4 bits (reference backend: no decode plans)."""
    import model
    from test_gemma import CONTEXT, write_tiny_gemma
    write_tiny_gemma(tmp_path)
    m, tok = model.load(tmp_path)
    kv = kvzip.prefill(m, tok, CONTEXT, backend="reference")
    got = bench.hybrid_memory(m.cfg, kv.n_prefix, kv.n_context, 0.3, dtype=torch.float32)
    assert got["full"] == kv.cache.nbytes < got["no_windows"] == kv.dense_nbytes
    for bits in (16, 8, 4):
        assert got["compressed"][bits] == kv.prune(0.3, bits=bits).nbytes, bits
    assert got["compressed"][4] < got["compressed"][8] < got["compressed"][16] < got["full"]
