"""
gpu_check.py: the project's CUDA checks in one prepared run, with one summary table at the end.

    python gpu_check.py          # on a CUDA machine (make gpu-check): about 5 minutes on an H100
    python gpu_check.py --dry    # anywhere: every step at tiny shapes, Triton's interpreter on a CPU

The steps, each one timed:
  1. tests     the kernel and end-to-end tests (test_kernels.py) with the real Triton compiler
  2. scoring   kernels.chunk_max_scores against the reference scorer (kvzip.chunk_scores_reference)
               and against torch's fused attention (SDPA) over the same q and K' (what one fused
               attention pass costs), at the Llama-3.1-8B geometry: 32 query heads, 8 KV heads,
               head dim 128, a 2000-token chunk, a 40-token prefix, n_q = 2030, bfloat16
  3. decode    kernels.varlen_decode_attention over a compressed cache (ratio 0.3 of 124,000 keys)
               against SDPA over the full cache, one new token, with the bytes of K and V each reads
               per second and that as a share of the read bandwidth x.sum() reaches on the device
  4. bench     python bench.py --ctx 124k --ratio 0.3 --device cuda --json FILE, with --synthetic
               where the default model cannot load (model.default_model_problem: its wheel or
               `gguf` missing): then the memory, decode and quantized-decode rows run alone
--dry runs steps 2 and 3 at tiny shapes (a CPU needs TRITON_INTERPRET=1, which --dry sets), runs
step 4's command only as far as bench.py's device check (its arguments must parse, and on a CPU it
must stop there with one line) and bench's synthetic rows at a tiny --ctx on the CPU, and skips
step 1 (the test suite runs those tests anyway). The test suite runs --dry, with and without the
default model, so a typo cannot wait for the first GPU.
Output, as for every command: progress lines on stderr (errors.progress, one as each step starts);
on stdout the results: the output of steps 1 and 4 as they run (pytest's, and bench.py's report,
whose progress goes to stderr too), then the summary table, a line per step.
Nothing imports this file.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import errors

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()
DRY = "--dry" in sys.argv[1:]
if DRY:  # the interpreter must be chosen before triton is imported (kvzip imports it on first use)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import baselines  # noqa: E402
import kvzip  # noqa: E402
import measure  # noqa: E402
import model  # noqa: E402

# Llama-3.1-8B: 32 layers, 32 query heads, 8 KV heads (G = 4), head dim 128, bfloat16
FULL = dict(n_kv_head=8, group=4, head_dim=128, n_prefix=40, n_chunk=2000, n_keys=124_000,
            ratio=0.3, dtype=torch.bfloat16)
TINY = dict(n_kv_head=2, group=2, head_dim=16, n_prefix=5, n_chunk=70, n_keys=600,
            ratio=0.3, dtype=torch.float32)
BENCH_ARGS = ["--ctx", "124k", "--ratio", "0.3", "--device", "cuda"]
DRY_BENCH_ARGS = ["--synthetic", "--quick", "--ctx", "2k", "--device", "cpu"]  # --dry: the synthetic rows, tiny


def time_fn(fn, device, reps):
    """Median seconds per call (triton.testing.do_bench on CUDA; a few timed calls on a CPU)."""
    fn()  # warm-up: compiles a kernel on first use
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return measure.time_interleaved({"fn": fn}, device, reps)["fn"]


def check_scoring(shape, device, reps):
    """Step 2: the fused scorer, the reference and SDPA on the same q (Hkv, G, n_q, D), K'."""
    Hkv, G, D = shape["n_kv_head"], shape["group"], shape["head_dim"]
    n_p, n_c = shape["n_prefix"], shape["n_chunk"]
    n_q = n_c + 30  # a reconstruction input: prompt + postfix + the chunk
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(Hkv, G, n_q, D, generator=g, device=device).to(shape["dtype"])  # (Hkv, G, n_q, D)
    k = torch.randn(Hkv, n_p + n_c + n_q, D, generator=g, device=device).to(shape["dtype"])  # (Hkv, |K'|, D)
    v = torch.randn_like(k)
    kern = kvzip.triton_kernels(device)
    kernel = lambda: kern.chunk_max_scores(q, k, n_p, n_c)  # noqa: E731
    reference = lambda: kvzip.chunk_scores_reference(q, k, n_p, n_c)  # noqa: E731
    # SDPA over the same keys with the same visibility: every cached key, input keys causally
    visible = torch.ones(n_q, k.shape[1], dtype=torch.bool, device=device)
    visible[:, n_p + n_c:] = torch.ones(n_q, n_q, dtype=torch.bool, device=device).tril()
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q.reshape(1, Hkv * G, n_q, D), k[None], v[None], attn_mask=visible, enable_gqa=True)
    err = (kernel() - reference()).abs().max().item()
    t = {name: time_fn(fn, device, reps) for name, fn in
         (("kernels.chunk_max_scores", kernel), ("kvzip.chunk_scores_reference", reference), ("SDPA", sdpa))}
    return dict(shape=f"Hkv {Hkv}, G {G}, D {D}, n_q {n_q}, |K'| {k.shape[1]}, {str(q.dtype)[6:]}",
                max_abs_diff=err, ms={n: s * 1e3 for n, s in t.items()})


def check_decode(shape, device, reps):
    """Step 3: one token over a compressed cache (varlen kernel) vs over the full cache (SDPA)."""
    Hkv, G, D, dtype = shape["n_kv_head"], shape["group"], shape["head_dim"], shape["dtype"]
    S = shape["n_prefix"] + shape["n_keys"]
    g = torch.Generator(device=device).manual_seed(1)
    K = torch.randn(Hkv, S, D, generator=g, device=device).to(dtype)  # (Hkv, S, D): the full cache
    V = torch.randn_like(K)
    q = torch.randn(Hkv, G, D, generator=g, device=device).to(dtype)  # (Hkv, G, D): the new token
    # uneven per-head budgets that keep `ratio` of the context overall, as KVzip's ranking does
    weights = torch.rand(Hkv, generator=torch.Generator().manual_seed(2)).tolist()
    kept = baselines.integer_budgets(weights, round(shape["ratio"] * Hkv * shape["n_keys"]), shape["n_keys"])
    lengths = [shape["n_prefix"] + n for n in kept]
    k_packed = torch.cat([K[h, :n] for h, n in enumerate(lengths)])  # (N, D), head-major
    v_packed = torch.cat([V[h, :n] for h, n in enumerate(lengths)])
    offsets_host = [0] + torch.tensor(lengths).cumsum(0).tolist()
    offsets = torch.tensor(offsets_host, dtype=torch.int64, device=device)
    kern = kvzip.triton_kernels(device)
    compressed = lambda: kern.varlen_decode_attention(q, k_packed, v_packed, offsets,  # noqa: E731
                                                      offsets_host=offsets_host)
    full = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q.reshape(1, Hkv * G, 1, D), K[None], V[None], enable_gqa=True)
    want = torch.stack([torch.softmax(q[h].float() @ k_packed[a:b].float().T / math.sqrt(D), -1)
                        @ v_packed[a:b].float() for h, (a, b) in enumerate(zip(offsets_host, offsets_host[1:]))])
    err = (compressed().float() - want).abs().max().item()
    read_fn, read_bytes = measure.read_probe(device)
    t_full, t_comp, t_read = (time_fn(fn, device, reps) for fn in (full, compressed, read_fn))
    elem = K.element_size()
    full_bytes, comp_bytes = 2 * K.numel() * elem, 2 * k_packed.numel() * elem
    bw = read_bytes / t_read
    return dict(keys=S, ratio=shape["ratio"], max_abs_diff=err, ms_full=t_full * 1e3, ms_compressed=t_comp * 1e3,
                gbps_full=full_bytes / t_full / 1e9, gbps_compressed=comp_bytes / t_comp / 1e9,
                gbps_read=bw / 1e9, share_full=full_bytes / t_full / bw, share_compressed=comp_bytes / t_comp / bw)


def run_step(name, fn, summary):
    """Run one step, timed: its (name, seconds, result) joins the summary."""
    t0 = time.perf_counter()
    errors.progress(f"{name} ...")
    result = fn()
    summary.append((name, time.perf_counter() - t0, result))
    return result


def step_text(step, result, out_json) -> str:
    """A step's result in the summary table: the figures of scoring and decode, passed or FAILED
    for a command's exit code, the text of a skipped or dry step."""
    if step == "scoring":
        ms = result["ms"]
        return (f"{result['shape']}: " + ", ".join(f"{n} {t:,.2f} ms" for n, t in ms.items())
                + f"; fused / SDPA {ms['kernels.chunk_max_scores'] / ms['SDPA']:.2f}, "
                f"max |fused - reference| {result['max_abs_diff']:.1e}")
    if step == "decode":
        return (f"{result['keys']:,} keys, ratio {result['ratio']}: full (SDPA) {result['ms_full']:.3f} ms "
                f"{result['gbps_full']:.0f} GB/s ({result['share_full']:.0%}), compressed (varlen kernel) "
                f"{result['ms_compressed']:.3f} ms {result['gbps_compressed']:.0f} GB/s "
                f"({result['share_compressed']:.0%}); compressed / full "
                f"{result['ms_compressed'] / result['ms_full']:.2f}; x.sum() reads {result['gbps_read']:.0f} GB/s; "
                f"max |diff| {result['max_abs_diff']:.1e}")
    if isinstance(result, int):
        text = "passed" if result == 0 else f"FAILED (exit code {result})"
        return text + f": {out_json}" if step == "bench" and result == 0 else text
    if isinstance(result, tuple):  # bench: (exit code, why its rows are synthetic only)
        code, why = result
        return step_text(step, code, out_json) + (f"; synthetic rows only ({why})" if why else "")
    return str(result)


def dry_bench(bench_cmd, why_synthetic) -> str:
    """Step 4 in --dry on a CPU: the GPU run's command must parse and stop at the device check (one
    line, exit code 2) before loading anything; then bench's synthetic rows run at a tiny size."""
    r = subprocess.run(bench_cmd, capture_output=True, text=True, timeout=120)
    ok = r.returncode == 2 and "CUDA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    text = (("arguments parse; " if ok else "UNEXPECTED: ") + " ".join(bench_cmd[1:])
            + f" -> {r.stderr.strip()!r}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        r = subprocess.run([sys.executable, "bench.py", *DRY_BENCH_ARGS, "--json", out],
                           capture_output=True, text=True, timeout=300)
        ran = r.returncode == 0 and json.loads(Path(out).read_text())["synthetic_only"]
    text += f"; bench.py {' '.join(DRY_BENCH_ARGS)}: " + ("ran" if ran else f"FAILED: {r.stderr.strip()[-300:]!r}")
    return text + (f"; the GPU run would add --synthetic ({why_synthetic})" if why_synthetic else "")


def main(argv=None) -> dict:
    p = errors.ArgumentParser(prog="gpu_check.py", description="The project's CUDA checks in one run.")
    p.add_argument("--dry", action="store_true", help="tiny shapes, anywhere (interpreter on a CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.dry and device.type != "cuda":
        p.error("no CUDA device: run with --dry for the tiny-shape check on this machine")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry on a CPU needs TRITON_INTERPRET=1 set before Python starts (python gpu_check.py --dry sets it)")
    shape, reps = (TINY, 3) if args.dry else (FULL, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    summary = []

    if args.dry:
        summary.append(("tests", 0.0, "skipped in --dry: the test suite runs test_kernels.py"))
    else:
        run_step("tests", lambda: subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "test_kernels.py"], check=False).returncode, summary)
    run_step("scoring", lambda: check_scoring(shape, device, reps), summary)
    run_step("decode", lambda: check_decode(shape, device, reps), summary)
    out_json = "gpu_check_bench.json"
    why_synthetic = model.default_model_problem()
    bench_cmd = [sys.executable, "bench.py", *BENCH_ARGS, "--json", out_json]
    bench_cmd += ["--synthetic"] if why_synthetic else []
    if args.dry and device.type == "cpu":
        run_step("bench", lambda: dry_bench(bench_cmd, why_synthetic), summary)
    else:
        run_step("bench", lambda: (subprocess.run(bench_cmd, check=False).returncode, why_synthetic), summary)

    header = f"gpu_check | {name} | torch {torch.__version__}" + (" | --dry: tiny shapes" if args.dry else "")
    print("\n".join([header, f"{'step':<9}{'seconds':>9}  result"]
                    + [f"{step:<9}{seconds:>9.1f}  {step_text(step, result, out_json)}"
                       for step, seconds, result in summary]))
    res = dict(device=name, dry=args.dry, steps={s: r for s, _, r in summary})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    errors.run(main, prog="gpu_check.py")
