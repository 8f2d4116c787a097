"""
bench.py: KVzip's efficiency results (Kim et al., NeurIPS 2025, arXiv 2505.23416), measured here.

    python bench.py --ctx 124k --ratio 0.3     # the main command: about a minute on a 2-core CPU
    python bench.py --ctx 124k --sweep         # ratios 1.0, 0.8, 0.6, 0.3, 0.2 (the paper's figure)
    python bench.py --quick --json out.json    # a small, fast run that writes the figures as JSON
    python bench.py --synthetic                # rows 1, 2 and 5 only: no model needed (the GPU check)
    python bench.py --serving                  # a saved cache, 16 questions together, contexts per GPU

What it measures, every figure in the same run (k = 1000 tokens: the paper's "124K" context of
Llama-3.1-8B is 124,000 tokens, 16.3 GB of bf16 KV):
  1. cache memory at a target geometry (--geometry: llama3.1-8b, qwen2.5-7b, qwen2.5-14b,
     smollm2-135m or the loaded model), full vs compressed at --ratio, counted from real cache
     objects: one layer of model.KVCache and, for every layer, its kvzip.CompressedKV (the stored
     cache, as on a GPU: a CPU cache also holds decode plans, ~1% more, reported on the decode
     row). The per-head budgets are the fractions that real KVzip scores of the default model keep
     at this ratio.
  2. decode attention latency of one new token over one layer, full vs compressed, each through the
     fastest decode path the project has for that cache, with the bandwidth each achieves and the
     read bandwidth of the device measured alongside (decode attention is memory-bound). On a CPU
     this runs in float32, the project's CPU dtype (a CPU without bf16 instructions makes bf16
     matmuls compute-bound: p @ v was ~9x slower in bf16 than in float32 here).
  3. scoring cost on the default model: prefill vs KVzip scoring of the same context (time, peak
     memory); the paper reports scoring at about twice the cost of prefill.
  4. quality at this ratio, short version: needle retrieval relative to the full cache and greedy
     answer agreement. The full comparison with query-aware baselines is reuse.py.
  5. the quantized compressed cache (kv.prune(ratio, bits=16|8|4)): memory at the target geometry
     for bits 16, 8 and 4 at ratio 1.0 and at --ratio, beside the paper's figures for Llama-3.1-8B
     at 124K (16.3 GB full, ~1.2 GB with 4-bit KV at ratio 0.3; the paper's, which count no
     scales), and the decode time of one layer for each bit width, timed side by side.
     Counting: a kept pair costs the same bytes wherever it sits (codes + one fp16 scale and zero
     per 32 values, or D values in the cache's dtype), so one real kvzip.CompressedKV per bit
     width, the decode row's layer at --ratio, gives the bytes per kept pair (K and V); each
     layer's kept pairs times that, plus the int64 offsets, is the total. At bits 16 the same
     count is checked against row 1's layer-by-layer real objects. (Quantizing all 32 layers of a
     124K cache would take minutes on a CPU; a layer of ~300K kept rows takes seconds.)
The K/V values of rows 1-2 are synthetic (random, at the target geometry); rows 3-4 and the head
budgets are real (the default model, SmolLM2-135M-Instruct, on haystack contexts). --synthetic
runs rows 1, 2 and 5 alone, where no model is installed: every head then keeps the same share
and the template prefix has the default model's length (SYNTHETIC_PREFIX).

Map of this file: geometries, arguments, per-head budgets, the memory check (before any model
work: check_memory), the five measurements (1 + 2: measure_geometry; 3 + 4: real_run,
quality_row; 5: measure_quantized; online_memory: KVzip online's peak, by arithmetic), the
report (summary card, table, last-line JSON), main(). The measuring tools (timing, bandwidth, peak memory) are in measure.py, the
contexts in tasks.py. Nothing imports this file.
Left out on purpose: batching, throughput of whole-model decoding, other GPUs than one.
"""
import argparse
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import errors
from errors import InputError

if __name__ == "__main__":
    # Idle OpenMP threads sleep instead of spinning, before torch loads OpenMP; an explicit setting
    # by the user wins (see errors.passive_openmp). The header line prints the policy used.
    errors.passive_openmp()

import torch  # noqa: E402

import baselines  # noqa: E402
import fused  # noqa: E402
import kvzip  # noqa: E402
import model as model_lib  # noqa: E402
import quant  # noqa: E402
import tasks  # noqa: E402
import measure  # noqa: E402
from measure import PeakMemory, proc_status, read_probe, time_interleaved, timed  # noqa: E402

# Synthetic vs real: the memory and decode rows need a cache at the target geometry (Llama-3.1-8B
# at 124k tokens is 16.3 GB), far beyond what the default model produces, so they use random K/V
# of that shape; which pairs are kept does not change bytes or decode time, only how many per head,
# and those counts come from the real model's KVzip scores. Scoring cost and quality are real.

SWEEP_RATIOS = (1.0, 0.8, 0.6, 0.3, 0.2)  # the ratios of the paper's latency/memory figure
# Default --score-ctx on a CPU: one full scoring chunk (KVzip's m = 2000 tokens), the most that
# keeps the main command near a minute on a 2-core CPU. On CUDA the default is the model's limit.
CPU_SCORE_CTX = 2000
QUICK_SCORE_CTX = 300  # --quick
SWEEP_SCORE_CTX = 6000  # --sweep: a second scoring row over 3 chunks (within SmolLM2's 8,192 positions)
SYNTHETIC_PREFIX = 29  # --synthetic: the default model's KVzip template prefix, in tokens (kv.n_prefix)
# The targets each row is checked against (goals for the code, measured side by side in one run):
TARGETS = dict(
    memory_tolerance=0.02,  # compressed bytes within 2% of (n_p + r * n_c) / (n_p + n_c)
    decode_fraction=0.35,  # compressed / full decode time per layer at ratio 0.3 (the paper: ~0.44)
    full_read_share=0.45,  # the full decode path reads K and V at >= 45% of x.sum()'s bandwidth
    scoring_over_prefill=2.5,  # one 2,000-token chunk (the paper: ~2)
    scoring_over_prefill_multi=2.2,  # three chunks (--sweep)
    scoring_peak_over_prefill=1.10,  # scoring's peak memory against the prefill's (the paper: +2%)
    prefill_causal_over_mask=0.85,  # prefill with causal block skipping / with an explicit mask
    int8_over_16_decode=1.5,  # quantized decode rows (5): int8 / 16-bit decode time of one layer at --ratio
    int4_over_16_decode=2.0,  # the same, int4
)
PREFILL_REPS = 3  # rounds of the prefill row (each ~2 x 2.5 s on the project's CPU)
N_NEEDLES, N_QUESTIONS = 4, 2  # quality probes in the scoring context (--quick: 2 and 1)
NEEDLE_MAX_NEW, QA_MAX_NEW = 8, 12  # new tokens for a pass-key completion / a short answer
GB, MB = 1e9, 1e6  # decimal units, as in the paper's "16.3 GB"
QUANT_BITS = (16, 8, 4)  # quant.BITS: the quantized-cache rows (5)
# The paper's memory figures for Llama-3.1-8B at 124K tokens (quoted, not measured here): the full
# FP16 cache, and KVzip at ratio 0.3 with 4-bit KV (scales and zero points not counted).
PAPER_FULL_GB, PAPER_INT4_RATIO_0_3_GB = 16.3, 1.2

# -----------------------------------------------------------------------------
# Geometries: the KV-cache shapes that the memory and decode rows are measured at


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shape of one model's KV cache: all that the memory and decode measurements need."""
    name: str
    n_layers: int  # L
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads Hkv; G = H // Hkv query heads share each one
    head_dim: int  # D
    dtype: str  # of the cached K and V, a torch dtype name: "bfloat16", "float16", "float32"

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads  # G

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def kv_bytes(self, n_tokens: int) -> int:
        """Uncompressed cache: 2 (K and V) * L * Hkv * D * bytes per element * tokens."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize * n_tokens


# From each model's config.json (num_hidden_layers, num_attention_heads, num_key_value_heads,
# hidden_size / num_attention_heads, torch_dtype). Check: Llama-3.1-8B at 124,000 tokens holds
# 2 * 32 * 8 * 128 * 2 B * 124,000 = 16.25 GB, the paper's 16.3 GB.
GEOMETRIES = {
    "llama3.1-8b": Geometry("llama3.1-8b", 32, 32, 8, 128, "bfloat16"),
    "qwen2.5-7b": Geometry("qwen2.5-7b", 28, 28, 4, 128, "bfloat16"),
    "qwen2.5-14b": Geometry("qwen2.5-14b", 48, 40, 8, 128, "bfloat16"),
    "smollm2-135m": Geometry("smollm2-135m", 30, 9, 3, 64, "bfloat16"),
}
GEOMETRY_CHOICES = [*GEOMETRIES, "model"]  # "model": the loaded model's own shape and dtype


def get_geometry(name: str, m=None) -> Geometry:
    if name == "model":
        c = m.cfg
        return Geometry("model", c.n_layer, c.n_head, c.n_kv_head, c.head_dim,
                        str(m.dtype).removeprefix("torch."))
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; choose from {', '.join(GEOMETRY_CHOICES)}")
    return GEOMETRIES[name]


# -----------------------------------------------------------------------------
# Arguments

def parse_ctx(text) -> int:
    """A token count: '124k' -> 124000 (k = 1000, as the paper's "124K"), '4096' -> 4096."""
    s = str(text).strip().lower()
    match = re.fullmatch(r"([0-9]+)(k?)", s)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a token count such as 124k or 4096, got {text!r}")
    n = int(match.group(1)) * (1000 if match.group(2) else 1)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 token, got {text!r}")
    return n


def parse_ratio(text) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < r <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction of context KV pairs "
                                         f"kept), got {text}")
    return r


def parse_positive(text) -> int:
    if not re.fullmatch(r"[0-9]+", str(text).strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = errors.ArgumentParser(prog="bench.py", description="KVzip's efficiency results, measured on this machine.")
    p.add_argument("--ctx", type=parse_ctx, default="124k",
                   help="context tokens of the target cache; k = 1000 (default 124k)")
    p.add_argument("--ratio", type=parse_ratio, default=0.3,
                   help="fraction of context KV pairs kept (default 0.3)")
    p.add_argument("--geometry", choices=GEOMETRY_CHOICES, default="llama3.1-8b",
                   help="KV-cache shape of the memory and decode rows (default llama3.1-8b)")
    p.add_argument("--score-ctx", type=parse_ctx, default=None,
                   help=f"cap on the context tokens of the real-model rows (default: {CPU_SCORE_CTX} "
                        "on CPU, the model's context limit on CUDA); min(--ctx, this) is used")
    p.add_argument("--sweep", action="store_true",
                   help=f"memory and decode rows for ratios {', '.join(map(str, SWEEP_RATIOS))}")
    p.add_argument("--quick", action="store_true",
                   help=f"small and fast: {QUICK_SCORE_CTX}-token real context, fewer probes and repeats")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default auto: cuda when available, else cpu)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument("--model", metavar="DIR_OR_NAME",
                   help=f"Hugging Face folder or a model name ({', '.join(model_lib.MODEL_NAMES)}) for the real-model "
                        "rows (default: embedded SmolLM2-135M)")
    p.add_argument("--reps", type=parse_positive, default=None,
                   help="timed repeats of each decode path (default 15 on CPU, 30 on CUDA; --quick 3)")
    p.add_argument("--synthetic", action="store_true",
                   help="only the rows that need no model (memory, decode, quantized decode), every "
                        "head keeping the same share: for a machine without the default model")
    p.add_argument("--serving", action="store_true",
                   help="only the serving rows: a saved cache's first answer in a fresh process, 16 "
                        "questions together vs one by one, and how many contexts fit on a GPU")
    args = p.parse_args(argv)
    # cheap checks first, so that a long run cannot fail at its end (memory: check_memory in main)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if args.json and (why := errors.check_output(args.json, "--json")):
        p.error(why)
    if args.model and (why := model_lib.model_arg_problem(args.model)):
        p.error(why)
    if args.synthetic:  # these options are about the model, which --synthetic does not load
        for given, option in ((args.model, "--model"), (args.score_ctx, "--score-ctx"),
                              (args.geometry == "model", "--geometry model")):
            if given:
                p.error(f"{option} needs the model, and --synthetic loads none")
        if args.serving:
            p.error("--serving answers with the model, and --synthetic loads none")
    return args


def _kernels(device):
    """kernels.py on CUDA, where the Triton kernels run compiled; None on a CPU, where Triton's
    interpreter would time numpy, not the kernel."""
    return kvzip.triton_kernels(device) if device.type == "cuda" else None


# -----------------------------------------------------------------------------
# Per-head budgets: how many context pairs each head of the target keeps

def head_fractions(scores, ratio: float):
    """Fraction of its context pairs each (layer, KV head) keeps under KVzip's eviction at `ratio`
    (one global ranking of all scores): (L, Hkv) float."""
    return kvzip.keep_mask(scores, ratio).float().mean(dim=-1)


def target_budgets(fractions, geo: Geometry, n_c: int, ratio: float):
    """Kept context pairs per (layer, KV head) of the target geometry: (L, Hkv) int64.

    The real model's per-head fractions are laid over the target's heads in order (layer by layer,
    head by head), cycled when the target has more heads, then scaled so that the total is exactly
    round(ratio * L * Hkv * n_c), as KVzip's global ranking keeps; no head keeps more than n_c
    (baselines.integer_budgets: water-filling, then largest-remainder rounding).
    """
    L, Hkv = geo.n_layers, geo.n_kv_heads
    flat = fractions.flatten().tolist()
    pattern = [flat[i % len(flat)] for i in range(L * Hkv)]  # cycled over the target's heads
    counts = baselines.integer_budgets(pattern, round(ratio * L * Hkv * n_c), n_c)
    return torch.tensor(counts, dtype=torch.int64).view(L, Hkv)


def spread_keep_mask(counts, n_c: int):
    """A keep mask (..., n_c) with counts[...] pairs kept per head, spread evenly over the context.
    Which positions are kept changes neither the bytes nor the decode time; how many does."""
    j = torch.arange(n_c)  # (n_c,)
    c = counts[..., None]  # (..., 1)
    return (j + 1) * c // n_c > j * c // n_c  # position j kept where floor(j * c / n_c) steps up: c of them


def representative_layer(counts) -> int:
    """The layer whose kept total is nearest the mean over layers: the one the decode row times."""
    per_layer = counts.sum(dim=1).double()  # (L,)
    return int((per_layer - per_layer.mean()).abs().argmin())


# -----------------------------------------------------------------------------
# Memory needed, checked before any model work

def geometry_before_load(args, device) -> Geometry:
    """The target geometry without loading the model (--geometry model reads its config.json),
    in the dtype model.load will use on this device."""
    if args.geometry != "model":
        return get_geometry(args.geometry)
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # model.load's defaults
    folder = Path(args.model) if args.model else model_lib.default_model_dir()
    if args.model in model_lib.MODEL_NAMES:
        folder = model_lib.named_model_dir(args.model)  # converted on first use, as load would
    if not args.model and not (folder / "config.json").exists():  # not converted yet: its known shape
        return dataclasses.replace(GEOMETRIES["smollm2-135m"], name="model", dtype=dtype)
    c = model_lib.read_config(folder)
    return Geometry("model", c.n_layer, c.n_head, c.n_kv_head, c.head_dim, dtype)


def synthetic_bytes(geo: Geometry, n_tokens: int, ratios, decode_dtype) -> int:
    """Peak bytes of the memory and decode rows (measure_geometry): one layer of random K/V at the
    target geometry, its copy in the decode dtype where that differs (float32 on a CPU), and a
    compressed copy of each at the largest ratio (the one being timed, the one being counted)."""
    per_elem = torch.empty((), dtype=geo.torch_dtype).element_size()
    if decode_dtype != geo.torch_dtype:
        per_elem += torch.empty((), dtype=decode_dtype).element_size()
    layer_elems = 2 * geo.n_kv_heads * (n_tokens + 1) * geo.head_dim  # K and V, plus the new token
    return math.ceil(layer_elems * per_elem * (1 + max(ratios)))


def check_memory(args, device):
    """Refuse a target whose synthetic layer and caches cannot fit, before any model work."""
    geo = geometry_before_load(args, device)
    decode_dtype = geo.torch_dtype if device.type == "cuda" else torch.float32
    ratios = [args.ratio] + (list(SWEEP_RATIOS) if args.sweep else [])
    need = synthetic_bytes(geo, args.ctx, ratios, decode_dtype)
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        have, where = measure.available_bytes(), "available (MemAvailable)"
    if have is not None and need > have:
        raise InputError(f"--ctx {args.ctx:,} needs about {_size(need)} ({need:,} bytes) for one {geo.name} "
                         f"layer of synthetic K/V and its copies; {_size(have)} ({have:,} bytes) {where}")


def _size(n: int) -> str:
    """Bytes in decimal units: 16.3 GB, 4.1 TB."""
    unit = next((u for u in ("TB", "GB", "MB") if n >= {"TB": 1e12, "GB": GB, "MB": MB}[u]), "kB")
    return f"{n / {'TB': 1e12, 'GB': GB, 'MB': MB, 'kB': 1e3}[unit]:,.1f} {unit}"


# -----------------------------------------------------------------------------
# 1 + 2. Memory and decode latency at the target geometry (synthetic K/V)

def random_layer(geo: Geometry, n_tokens: int, dtype, device, seed: int = 0):
    """One layer of an uncompressed cache at the target geometry, random K/V: a model.KVCache
    holding n_tokens positions, with room for one new token at row n_tokens."""
    cache = model_lib.KVCache(1, geo.n_kv_heads, geo.head_dim, n_tokens + 1, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    cache.k[0].normal_(generator=g)  # (Hkv, n_tokens + 1, D)
    cache.v[0].normal_(generator=g)  # (Hkv, n_tokens + 1, D)
    cache.seq_len = n_tokens
    return cache


def in_decode_dtype(cache, decode_dtype):
    """A one-layer cache in the dtype its decode is timed in: the cache itself, or (on a CPU, where
    the project decodes in float32) a copy of its whole buffer in that dtype, same values."""
    if decode_dtype == cache.k[0].dtype:
        return cache
    Hkv, capacity, D = cache.k[0].shape
    dec = model_lib.KVCache(1, Hkv, D, capacity, decode_dtype, cache.k[0].device)
    dec.k[0].copy_(cache.k[0])
    dec.v[0].copy_(cache.v[0])
    dec.seq_len = cache.seq_len
    return dec


def new_token(geo: Geometry, dtype, device, seed: int):
    """A random new token at the target geometry: its query heads q (Hkv, G, 1, D), and its key
    and value, k_new and v_new (Hkv, 1, D)."""
    Hkv, G, D = geo.n_kv_heads, geo.group, geo.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, device=device).to(dtype)
                 for shape in ((Hkv, G, 1, D), (Hkv, 1, D), (Hkv, 1, D)))


def _inner(device) -> int:
    """Calls per function and timing round (measure.time_interleaved): on CUDA one decode call is
    shorter than the clock's overhead."""
    return 20 if device.type == "cuda" else 1


def online_memory(geo, n_p: int, n_c: int, ratio: float, chunk_size: int, n_q_extra: int) -> dict:
    """The most K/V bytes offline KVzip and KVzip online (kvzip.prefill_online) hold at a
    geometry, from the arithmetic of the caches they hold (no K/V is built): the dense rows
    (geo.kv_bytes) and the packed rows of kept pairs, K and V of one (layer, head, position) each,
    plus the int64 offsets; no CPU decode plans (as on a GPU).

    n_q_extra: the tokens of a reconstruction input beyond its chunk (prompt, quoted ids and
    postfix: kvzip.max_reconstruction_len(tok, 0)).
    Offline: the full cache with room for one input, and the compressed cache beside it while
    prune packs it. Online, at each chunk: the packed prefix and kept pairs of the chunks before,
    the chunk's and its input's dense rows (the first chunk's dense cache holds the prefix too,
    and its packed cache is built beside it); while the next cache is packed, one layer of it
    twice, taken as an equal share (1/L) of the kept pairs: the real share varies by layer.
    """
    L, Hkv = geo.n_layers, geo.n_kv_heads
    pair = geo.kv_bytes(1) // (L * Hkv)  # K and V of one (layer, KV head, position)

    def packed(n_seen):  # the compressed cache after n_seen context tokens
        return pair * (L * Hkv * n_p + round(ratio * (L * Hkv * n_seen))) + L * (Hkv + 1) * 8

    offline = geo.kv_bytes(n_p + n_c + min(chunk_size, n_c) + n_q_extra) + packed(n_c)
    online = 0
    for start in range(0, n_c, chunk_size):
        end = min(start + chunk_size, n_c)
        if start == 0:
            held = geo.kv_bytes(n_p + 2 * end + n_q_extra) + packed(end)  # the input repeats the chunk
        else:
            held = packed(start) + geo.kv_bytes(2 * (end - start) + n_q_extra) + packed(end) // L
        online = max(online, held)
    return dict(full_bytes=geo.kv_bytes(n_p + n_c), offline_peak_bytes=offline, online_peak_bytes=online)


def hybrid_memory(cfg, n_p: int, n_c: int, ratio: float, bits=(16, 8, 4), dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Bytes of a hybrid sliding-window model's KV cache (Gemma 3: model.ModelConfig cfg) for n_p
    prefix + n_c context tokens, counted from real cache objects with random K/V: the full cache as
    model.WindowKVCache holds it (global layers every position, sliding layers their last window - 1),
    the same positions with no sliding windows (every layer every position), and KVzip's compressed
    cache at `ratio` for each of `bits` (kvzip.CompressedKV.from_full: the global layers' kept pairs,
    packed, the windows whole; built with the reference backend, so without a CPU's decode plans).
    The kept count does not depend on the scores (exactly round(ratio * pairs)): random ones do."""
    n, L, Hkv, D = n_p + n_c, cfg.n_layer, cfg.n_kv_head, cfg.head_dim
    g = torch.Generator().manual_seed(seed)
    full = model_lib.WindowKVCache(L, Hkv, D, 0, dtype, "cpu", "reference", windows=cfg.windows)
    for i, w in enumerate(cfg.windows):  # what the cache holds after n positions, set directly
        rows = n if w is None else min(n, w - 1)
        full.k[i] = torch.randn(Hkv, rows, D, generator=g).to(dtype)  # (Hkv, rows, D)
        full.v[i] = torch.randn(Hkv, rows, D, generator=g).to(dtype)
        full.first[i] = n - rows  # the position of row 0
    full.seq_len = n
    scores = torch.rand(len(kvzip.scored_layers(cfg.windows)), Hkv, n_c, generator=g)  # (L', Hkv, n_c)
    keep = kvzip.keep_mask(scores, ratio)
    compressed = {b: kvzip.CompressedKV.from_full(full, n_p, keep, "reference", bits=b).nbytes for b in bits}
    per_position = 2 * Hkv * D * full.k[0].element_size()  # K and V of one position in one layer
    return dict(n_p=n_p, n_c=n_c, ratio=ratio, dtype=str(dtype).removeprefix("torch."), full=full.nbytes,
                no_windows=per_position * L * n, compressed=compressed)


def cache_memory(full, n_p: int, n_c: int, counts):
    """(full bytes, compressed bytes) of all L layers, counted from real cache objects.

    Every layer of the uncompressed cache has the same shape, so it is one layer's KVCache.nbytes
    times L. Each layer's compressed cache is built for real (kvzip.CompressedKV.from_full: packed
    K and V plus the int64 offsets) with that layer's per-head budgets, counted, and freed. What is
    counted is the stored cache, as on a GPU: built with the reference backend, so without the
    decode plans a CPU cache also holds (fused.DecodePlan; the decode row reports their bytes).
    """
    L = counts.shape[0]
    compressed = 0
    for l in range(L):
        keep = spread_keep_mask(counts[l:l + 1], n_c)  # (1, Hkv, n_c)
        compressed += kvzip.CompressedKV.from_full(full, n_p, keep, "reference").nbytes
    return full.nbytes * L, compressed


def full_decode_paths(cache, q, kern) -> dict:
    """Every way the project can attend one new token over an uncompressed cache: {name: fn}.

    cache: a one-layer KVCache holding S positions and the new token's K/V at row S.
    q: (Hkv, G, 1, D) the new token's query heads. Each fn returns the attention output.
    """
    S = cache.seq_len
    Hkv, G, _, D = q.shape
    K, V = cache.k[0][:, :S + 1], cache.v[0][:, :S + 1]  # (Hkv, S + 1, D): the context and the new token
    paths = {f"model.{fn.__name__}": (lambda fn=fn: fn(q, K, V, S))
             for fn in (model_lib.attention, model_lib.attention_sdpa)}
    # The compressed cache's own decode code, over the uncompressed cache: a packed buffer whose
    # heads all keep S + 1 rows. A view, no copy: the cache's capacity is exactly S + 1.
    flat_k, flat_v = K.reshape(-1, D), V.reshape(-1, D)  # (Hkv * (S + 1), D)
    bounds = [h * (S + 1) for h in range(Hkv + 1)]
    empty = K.new_empty((Hkv, 0, D))  # no tail: the new token is already each head's last row
    paths["kvzip.packed_attention"] = lambda: kvzip.packed_attention(q, flat_k, flat_v, bounds, empty, empty)
    if q.device.type == "cpu":  # torch's fused CPU attention with each row's log-sum-exp
        paths["fused.packed_attention_fused"] = (
            lambda: fused.packed_attention_fused(q, flat_k, flat_v, bounds, empty, empty))
        plan = fused.DecodePlan(flat_k, flat_v, bounds)
        paths["fused.packed_decode"] = lambda: fused.packed_decode(q, flat_k, flat_v, plan, empty, empty)
    if kern is not None:
        offsets = torch.tensor(bounds, dtype=torch.int64, device=q.device)
        q3 = q[:, :, 0].contiguous()  # (Hkv, G, D)
        paths["kernels.varlen_decode_attention"] = lambda: kern.varlen_decode_attention(q3, flat_k, flat_v, offsets)
    return paths


def compressed_decode_path(full, *, n_p: int, n_c: int, counts, q, k_new, v_new, kern):
    """The compressed cache's decode step for one layer with per-head budgets counts (Hkv,).

    full: the one-layer uncompressed cache (n_p prefix + n_c context positions) it is packed from;
    q (Hkv, G, 1, D), k_new and v_new (Hkv, 1, D): the new token.
    Returns (name, fn, bytes of K and V read, bytes of the layer's decode plan): fn is
    CompressedKV.attend, which stores the new token in the tail and attends over [kept pairs ;
    tail] through the project's default decode path for the device (fused.packed_decode over the
    layer's DecodePlan on a CPU, the Triton varlen kernel on CUDA, which needs no plan).
    """
    backend = "auto" if kern is None else "triton"
    ckv = kvzip.CompressedKV.from_full(full, n_p, spread_keep_mask(counts[None], n_c), backend)
    ckv.reserve(1)
    name = ("CompressedKV.attend: kernels.varlen_decode_attention" if kern is not None
            else "CompressedKV.attend: fused.packed_decode")
    nbytes = sum(t.numel() * t.element_size() for t in (ckv.k[0], ckv.v[0], k_new, v_new))
    plan_bytes = ckv.plans[0].nbytes if ckv.plans else 0
    return name, (lambda: ckv.attend(0, q, k_new, v_new)), nbytes, plan_bytes


def _check_same(name, out, ref_name, ref):
    """The decode paths must compute the same attention (timing wrong code would be no use)."""
    a, b = out.reshape(-1, out.shape[-1]).float(), ref.reshape(-1, ref.shape[-1]).float()  # (H, D)
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    err = (a - b).abs().max().item()
    if not err <= tol:
        raise RuntimeError(f"decode path {name} disagrees with {ref_name}: max |diff| {err:.3g} > {tol}")


def pick_full_path(paths: dict, device, reps: int, n_keys: int):
    """The fastest of the full cache's decode paths: (its name, {name: ms} of every path, the
    names timed side by side).

    Every path is run once, as warm-up, to check that all compute the same attention, and to drop
    the hopeless ones (3x slower than the best); the rest are timed side by side among themselves.
    Only the winner is then timed beside the compressed path: with every contender in the same
    rounds, the slow paths' large temporaries disturb the short calls around them, and the
    compressed path's time drifts.
    """
    probe, ref = {}, None
    for name, fn in paths.items():
        errors.progress(f"decode: one run of {name} over {n_keys:,} keys per head")
        out, probe[name] = timed(fn, device)
        if ref is None:
            ref = (name, out)
        else:
            _check_same(name, out, *ref)
    best = min(probe.values())
    contenders = [name for name, t in probe.items() if t <= 3 * best]
    pick_rounds = max(3, reps // 3)
    errors.progress(f"decode: timing {len(contenders)} full-cache paths side by side, {pick_rounds} rounds")
    picked = time_interleaved({name: paths[name] for name in contenders}, device, pick_rounds, _inner(device))
    candidates_ms = {name: picked.get(name, t) * 1e3 for name, t in probe.items()}
    return min(picked, key=picked.get), candidates_ms, sorted(picked)


def measure_geometry(geo, *, n_p, n_c, fractions, ratios, device, decode_dtype, reps, kern):
    """Memory (all layers) and decode latency (one layer) of the target geometry at each ratio.

    fractions: {ratio: (L_real, Hkv_real) per-head kept fractions from the real model's scores}.
    The full cache's decode path is picked first (pick_full_path), then used at every ratio.
    """
    S = n_p + n_c
    errors.progress(f"building one {geo.name} layer: {S:,} positions of random {geo.dtype} K/V "
                    f"({geo.kv_bytes(S) / geo.n_layers / GB:.2f} GB)")
    full = random_layer(geo, S, geo.torch_dtype, device)
    dec = in_decode_dtype(full, decode_dtype)
    Hkv, D = geo.n_kv_heads, geo.head_dim
    q, k_new, v_new = new_token(geo, decode_dtype, device, seed=1)
    dec.k[0][:, S] = k_new[:, 0]  # the new token's K/V at row S, as KVCache.attend stores them
    dec.v[0][:, S] = v_new[:, 0]
    full_read = 2 * Hkv * (S + 1) * D * dec.k[0].element_size()  # bytes of K and V over S + 1 keys
    read_fn, read_bytes = read_probe(device)

    paths = full_decode_paths(dec, q, kern)
    full_name, candidates, timed_candidates = pick_full_path(paths, device, reps, S + 1)
    rows = []
    for r in ratios:
        counts = target_budgets(fractions[r], geo, n_c, r)  # (L, Hkv)
        errors.progress(f"ratio {r}: packing all {geo.n_layers} layers' compressed caches to count bytes")
        full_bytes, comp_bytes = cache_memory(full, n_p, n_c, counts)
        layer = representative_layer(counts)
        c_name, c_fn, c_read, plan_bytes = compressed_decode_path(
            dec, n_p=n_p, n_c=n_c, counts=counts[layer], q=q, k_new=k_new, v_new=v_new, kern=kern)
        c_fn()  # warm-up
        fns = {full_name: paths[full_name], c_name: c_fn, "read": read_fn}
        errors.progress(f"ratio {r}: timing {full_name}, the compressed path and the read probe side by side, "
                        f"{reps} rounds")
        med = time_interleaved(fns, device, reps, _inner(device))
        rows.append(dict(
            ratio=r, full_bytes=full_bytes, compressed_bytes=comp_bytes,
            expected_fraction=(n_p * geo.n_layers * Hkv + int(counts.sum())) / (S * geo.n_layers * Hkv),
            layer=layer, layer_kept_fraction=c_read / full_read, plan_bytes=plan_bytes,
            full_ms_per_layer=med[full_name] * 1e3, compressed_ms_per_layer=med[c_name] * 1e3,
            full_read_bytes=full_read, compressed_read_bytes=c_read,
            full_gbps=full_read / med[full_name] / GB, compressed_gbps=c_read / med[c_name] / GB,
            device_gbps=read_bytes / med["read"] / GB,
            full_path=full_name, compressed_path=c_name,
            candidates_ms=candidates, timed_candidates=timed_candidates))
    return rows


# -----------------------------------------------------------------------------
# 5. The quantized compressed cache: memory for bits 16 / 8 / 4, decode time per bit width

def measure_quantized(geo, *, n_p, n_c, counts, ratio, full_bytes, comp_bytes, device, decode_dtype, reps, kern):
    """Memory rows for bits 16, 8, 4 at ratio 1.0 and at `ratio`, and one layer's decode time per
    bit width. counts: (L, Hkv) kept context pairs per head at `ratio` (target_budgets);
    full_bytes, comp_bytes: row 1's real counts (cache_memory), the check of the bits-16 count.

    Returns (memory rows [{bits, ratio, bytes, fraction_of_full}], decode rows [{bits, ratio,
    ms_per_layer, layer, path}]). The bytes: see the file's docstring, item 5.
    """
    L, Hkv, D = geo.n_layers, geo.n_kv_heads, geo.head_dim
    layer = representative_layer(counts)
    kept = counts[layer]  # (Hkv,)
    # Only the kept rows matter for bytes and decode time, not their positions (as for row 2): a
    # random layer of n_p + the longest head's kept count, each head keeping its own count of it.
    n_kept = int(kept.max())
    src = random_layer(geo, n_p + n_kept, geo.torch_dtype, device, seed=2)  # the cache's own dtype
    dec = in_decode_dtype(src, decode_dtype)
    keep = spread_keep_mask(kept[None], n_kept)  # (1, Hkv, n_kept)
    backend = "auto" if kern is None else "triton"  # the default decode path of the device
    q, k_new, v_new = new_token(geo, decode_dtype, device, seed=3)
    offsets_bytes = (Hkv + 1) * 8  # one int64 offsets tensor per layer
    rows_at = {1.0: [Hkv * (n_p + n_c)] * L, ratio: (Hkv * n_p + counts.sum(dim=1)).tolist()}
    memory, fns = [], {}
    for bits in QUANT_BITS:
        errors.progress(f"quantized cache: one {geo.name} layer of {n_p * Hkv + int(kept.sum()):,} kept pairs "
                        f"at {bits} bits")
        ckv = kvzip.CompressedKV.from_full(dec, n_p, keep, backend, bits=bits)  # decoded below
        # Counted: codes, scales and zeros, which do not depend on the input dtype; at bits 16 the
        # cache's own dtype, without the CPU's decode plan, as row 1 counts it.
        counted = ckv if bits != 16 else kvzip.CompressedKV.from_full(src, n_p, keep, "reference", bits=16)
        n_rows = int(counted.head_lengths().sum())
        per_row, rest = divmod(counted.nbytes - offsets_bytes, n_rows)  # bytes of one kept pair, K and V
        per_value = 8 * geo.torch_dtype.itemsize if bits == 16 else bits + 32 / min(32, D)  # + fp16 scale, zero
        assert rest == 0 and per_row == 2 * D * per_value / 8, (bits, per_row, rest)
        for r, per_layer in rows_at.items():
            total = sum(int(n) * per_row + offsets_bytes for n in per_layer)
            memory.append(dict(bits=bits, ratio=r, bytes=total, fraction_of_full=total / full_bytes))
        ckv.reserve(1)
        fns[bits] = (lambda c=ckv: c.attend(0, q, k_new, v_new))
    at_ratio_16 = next(row["bytes"] for row in memory if row["bits"] == 16 and row["ratio"] == ratio)
    if at_ratio_16 != comp_bytes:
        raise RuntimeError(f"bits-16 bytes per pair times kept pairs, {at_ratio_16:,}, differ from the "
                           f"layer-by-layer count {comp_bytes:,}")
    # As many rounds as the decode row: an int8/int4 step now costs about what a bits-16 one does
    # (on a CPU too, fused.quantized_decode), so 15 rounds of the three add about a second.
    rounds = reps
    errors.progress(f"quantized cache: timing one layer's decode at bits {QUANT_BITS} side by side, {rounds} rounds")
    for fn in fns.values():
        fn()  # warm-up
    med = time_interleaved({str(b): fn for b, fn in fns.items()}, device, rounds, _inner(device))
    path = "CompressedKV.attend: " + ("kernels.varlen_decode_attention" if kern is not None else
                                      "fused.packed_decode at bits 16, fused.quantized_decode at 8 and 4")
    decode = [dict(bits=b, ratio=ratio, ms_per_layer=med[str(b)] * 1e3, layer=layer, path=path, rounds=rounds,
                   threads=torch.get_num_threads()) for b in fns]
    return sorted(memory, key=lambda row: (-row["ratio"], -row["bits"])), decode


# -----------------------------------------------------------------------------
# 3 + 4. Scoring cost and quality with the real model

def quality_context(tok, n_tokens: int, *, n_needles: int, n_questions: int, seed: int = 0):
    """One context of about n_tokens tokens: facts about invented people first, then pass-key
    needles hidden in haystack prose. Returns (context, needle probes, fact questions), each a
    list of (prompt, answer)."""
    facts = tasks.fact_task(max(n_questions, 1), seed=seed)
    fact_text = facts["context"] + "\n\n" if n_questions else ""
    questions = [qa for qa in facts["questions"] if qa[0].startswith("Where")][:n_questions]
    n_fact = len(tok.encode(fact_text))
    needles = tasks.needle_task(max(n_tokens - n_fact, 40), n_needles=n_needles, seed=seed, tok=tok)
    return fact_text + needles["context"], needles["probes"], questions


def fitting_context(m, tok, n_tokens: int, *, n_needles: int, n_questions: int, seed: int = 0):
    """quality_context sized to fit the model: the generators size a context to within ~3% of
    n_tokens, so shrink the target until prefill accepts it."""
    limit = kvzip.max_context_tokens(m, tok)
    while True:
        context, probes, questions = quality_context(tok, n_tokens, n_needles=n_needles,
                                                     n_questions=n_questions, seed=seed)
        if len(tok.encode(context)) <= limit:
            return context, probes, questions
        n_tokens = int(n_tokens * 0.97)


def scoring_cost(m, tok, context: str, *, device, base: int):
    """Prefill and KVzip-score one context with the real model: time and peak memory of each.

    The two steps of kvzip.prefill, one at a time so that each can be timed: prefill(score=False)
    (prefix + context into a cache with room for the reconstruction input), then score_context
    (the project's default path for the device). Returns (FullKV, figures).
    """
    errors.progress(f"scoring cost: prefill of the prefix + {len(tok.encode(context)):,} context tokens")
    with PeakMemory(device, base) as mem_prefill:
        kv, t_prefill = timed(lambda: kvzip.prefill(m, tok, context, score=False), device)
    n_chunks = math.ceil(kv.n_context / kvzip.CHUNK_SIZE)
    errors.progress(f"scoring cost: KVzip scoring of {kv.n_context:,} tokens ({n_chunks} chunk(s) of at most "
                    f"{kvzip.CHUNK_SIZE})")
    with PeakMemory(device, base) as mem_score:
        _, t_score = timed(lambda: kvzip.score_context(m, tok, kv), device)
    # Prefill once more, after scoring, so that the two timings bracket it: other processes on this
    # machine come and go, and one run of each would compare two different machine loads.
    errors.progress("scoring cost: prefill again (the prefill time is the mean of the runs before and after scoring)")
    _, t_prefill_after = timed(lambda: kvzip.prefill(m, tok, context, score=False), device)
    row = dict(ctx=kv.n_context, n_chunks=n_chunks, n_prefix=kv.n_prefix,
               prefill_s=(t_prefill + t_prefill_after) / 2, scoring_s=t_score,
               prefill_runs_s=[t_prefill, t_prefill_after],
               prefill_peak_bytes=mem_prefill.peak, scoring_peak_bytes=mem_score.peak,
               peak_memory=mem_prefill.method, kv_bytes=kv.nbytes)
    return kv, row


def real_run(m, tok, n_tokens: int, *, n_needles: int, n_questions: int, device, base: int):
    """The scoring cost of one real context with quality probes in it: (FullKV, probes,
    questions, figures)."""
    errors.progress("warm-up: prefill + scoring of a 60-word context")
    kvzip.prefill(m, tok, tasks.haystack(60, seed=99))  # first calls pay one-time costs; not timed
    context, probes, questions = fitting_context(m, tok, n_tokens, n_needles=n_needles, n_questions=n_questions)
    kv, row = scoring_cost(m, tok, context, device=device, base=base)
    return kv, probes, questions, row


def prefill_paths(m, tok, kv, *, device, reps: int) -> dict:
    """Prefill of the real context (prefix + context ids of kv) through the dense cache's fused
    attention, model.attention_sdpa (causal block skipping), against one explicit-mask SDPA call
    per chunk, model.attention_sdpa_mask; same chunks (model.prefill's default), timed side by side."""
    ids = kvzip.prefix_ids(tok) + kv.context_ids

    def run(attention):
        cache = m.new_cache()
        cache.attention = attention  # the function KVCache.attend calls (see KVCache.__init__)
        return model_lib.prefill(m, ids, cache)

    paths = {"mask": lambda: run(model_lib.attention_sdpa_mask), "causal": lambda: run(model_lib.attention_sdpa)}
    _check_same("model.attention_sdpa", paths["causal"](), "model.attention_sdpa_mask", paths["mask"]())
    t = time_interleaved(paths, device, reps)
    return dict(n_tokens=len(ids), mask_s=t["mask"], causal_s=t["causal"], reps=reps)


def quality_row(m, tok, kv, *, probes, questions, ratio: float) -> dict:
    """Quality of the compressed cache relative to the full one, on the real context.

    relative_accuracy: needle probes the compressed cache answers right, among those the full cache
    answers right (the 135M default model misses some on its own, so absolute accuracy would
    measure the model); agreement: questions whose first answer line equals the full cache's.
    """
    ckv = kv.prune(ratio)
    full_right = both_right = agree = 0
    for i, (prompt, key) in enumerate(probes):
        errors.progress(f"quality: pass-key probe {i + 1}/{len(probes)}, full and compressed cache")
        full = kvzip.generate(m, tok, prompt, kv, max_new_tokens=NEEDLE_MAX_NEW, template=False)
        comp = kvzip.generate(m, tok, prompt, ckv, max_new_tokens=NEEDLE_MAX_NEW, template=False)
        if tasks.check_answer(full, key):
            full_right += 1
            both_right += tasks.check_answer(comp, key)
    qa_full = qa_comp = 0
    for i, (question, answer) in enumerate(questions):
        errors.progress(f"quality: question {i + 1}/{len(questions)}, full and compressed cache")
        full = kvzip.generate(m, tok, question, kv, max_new_tokens=QA_MAX_NEW)
        comp = kvzip.generate(m, tok, question, ckv, max_new_tokens=QA_MAX_NEW)
        agree += tasks.first_line(full) == tasks.first_line(comp)
        qa_full += tasks.check_answer(full, answer)
        qa_comp += tasks.check_answer(comp, answer)
    return dict(ratio=ratio, relative_accuracy=both_right / full_right if full_right else None,
                n_probes=len(probes), n_probes_full_right=full_right, n_probes_both_right=both_right,
                agreement=agree / len(questions) if questions else None, n_questions=len(questions),
                n_agree=agree, n_questions_full_right=qa_full, n_questions_compressed_right=qa_comp)


# -----------------------------------------------------------------------------
# The report: summary card, table, JSON

def _gb(n):
    return f"{n / GB:.2f} GB"


def _ms(ms):
    return f"{ms:,.1f} ms"


def _mark(ok):
    return "ok" if ok else "MISSED"


def _row(label, a, b, ratio="", target=""):
    """One line of the report's table: the row's label, figures A and B, their ratio, its target."""
    return f"{label:42}{a:>13}{b:>13}{ratio:>8}   {target}".rstrip()


def format_report(res: dict) -> str:
    """Summary card, then one table: each row a pair of figures (A, B), their ratio B/A, the target.
    Then notes on the decode row, the quantized-cache table, and the sweep's table (--sweep)."""
    lines = _summary_card(res) + [""] + _measured_rows(res) + _quality_rows(res) + [""] + _decode_notes(res)
    if res["memory"].get("quantized"):
        lines += [""] + format_quantized(res)
    if res.get("sweep"):
        lines += [""] + _sweep_table(res)
    return "\n".join(lines)


def _summary_card(res: dict) -> list[str]:
    """The machine, the target geometry and context, and which rows are synthetic, which real."""
    geo, d, sc = res["geometry"], res["decode"], res["scoring"]
    r, L = res["ratio"], geo["n_layers"]
    decode_note = ("" if d["dtype"] == geo["dtype"] else
                   f"; decode timed in {d['dtype']}, the project's dtype on this device")
    return [
        f"KVzip benchmark | {res['device_name']} | torch {torch.__version__} | "
        f"load average {res['load_average']} on {os.cpu_count()} CPUs",
        f"geometry {geo['name']}: {L} layers, {geo['n_heads']} query heads, {geo['n_kv_heads']} KV "
        f"heads, head dim {geo['head_dim']}, {geo['dtype']}",
        f"context --ctx {_ctx_text(res['ctx'])} = {res['ctx']:,} tokens (+ {res['n_prefix']} template "
        f"prefix tokens, never evicted); ratio {r} = fraction of context KV pairs kept",
        f"synthetic: random K/V at the target geometry (memory and decode rows{decode_note})",
        f"real: {res['model_name']} on a {sc['ctx']:,}-token haystack (scoring and quality rows; the "
        f"per-head budgets are the fractions its heads keep at ratio {r}, cycled over the target's "
        f"{L} x {geo['n_kv_heads']} KV heads)" if sc else
        f"real: none (--synthetic: no scoring or quality rows; every KV head keeps {r} of the context)",
    ]


def _measured_rows(res: dict) -> list[str]:
    """The table's memory, decode and scoring rows, each against its target (TARGETS)."""
    sc, d, mem = res["scoring"], res["decode"], res["memory"]
    L = res["geometry"]["n_layers"]
    exp = mem["expected_fraction"]
    mem_frac = mem["compressed_bytes"] / mem["full_bytes"]
    dec_frac = d["compressed_ms_per_layer"] / d["full_ms_per_layer"]
    bw_full = d["full_gbps"] / d["device_gbps"]
    lines = [
        _row("", "full cache", "compressed", "ratio", "target"),
        _row(f"KV cache memory, {L} layers", _gb(mem["full_bytes"]), _gb(mem["compressed_bytes"]),
             f"{mem_frac:.3f}", f"{exp:.3f} expected (+-{TARGETS['memory_tolerance']:.0%}): "
             f"{_mark(abs(mem_frac / exp - 1) <= TARGETS['memory_tolerance'])}"),
        _row(f"decode attention, 1 layer (median of {d['reps']})", _ms(d["full_ms_per_layer"]),
             _ms(d["compressed_ms_per_layer"]), f"{dec_frac:.3f}",
             f"<= {TARGETS['decode_fraction']}: {_mark(dec_frac <= TARGETS['decode_fraction'])} "
             f"(this layer keeps {d['layer_kept_fraction']:.3f} of its bytes)"),
        _row("  K+V bytes read / latency", f"{d['full_gbps']:.2f} GB/s", f"{d['compressed_gbps']:.2f} GB/s", "",
             f"full >= {TARGETS['full_read_share']:.0%} of the {d['device_gbps']:.2f} GB/s read: {bw_full:.0%}, "
             f"{_mark(bw_full >= TARGETS['full_read_share'])}"),
    ]
    return lines + (_scoring_rows(res) if sc else [])


def _scoring_rows(res: dict) -> list[str]:
    """The table's scoring rows (the real model): time and peak memory against the prefill's."""
    sc = res["scoring"]
    t_frac = sc["scoring_s"] / sc["prefill_s"]
    m_frac = sc["scoring_peak_bytes"] / sc["prefill_peak_bytes"] if sc["prefill_peak_bytes"] > 0 else math.nan
    lines = [
        _row("", "prefill", "scoring", "", ""),
        _row(f"KVzip scoring cost, {sc['ctx']:,} real tokens", f"{sc['prefill_s']:.1f} s*", f"{sc['scoring_s']:.1f} s",
             f"{t_frac:.2f}", f"<= {TARGETS['scoring_over_prefill']} (paper ~2): "
             f"{_mark(t_frac <= TARGETS['scoring_over_prefill'])}"),
        _row("  peak memory", f"{sc['prefill_peak_bytes'] / MB:,.0f} MB", f"{sc['scoring_peak_bytes'] / MB:,.0f} MB",
             f"{m_frac:.2f}", f"<= {TARGETS['scoring_peak_over_prefill']:.2f}: "
             f"{_mark(m_frac <= TARGETS['scoring_peak_over_prefill'])}"),
    ]
    pf = res.get("prefill")
    if pf:
        pf_frac = pf["causal_s"] / pf["mask_s"]
        lines += [
            _row("", "mask", "causal", "", ""),
            _row(f"prefill, {pf['n_tokens']:,} real tokens (median of {pf['reps']})", f"{pf['mask_s']:.2f} s",
                 f"{pf['causal_s']:.2f} s", f"{pf_frac:.2f}", f"<= {TARGETS['prefill_causal_over_mask']}: "
                 f"{_mark(pf_frac <= TARGETS['prefill_causal_over_mask'])}"),
        ]
    mc = res.get("scoring_multi_chunk")
    if mc:
        mc_frac = mc["scoring_s"] / mc["prefill_s"]
        mc_mem = mc["scoring_peak_bytes"] / mc["prefill_peak_bytes"] if mc["prefill_peak_bytes"] > 0 else math.nan
        lines += [
            _row(f"  {mc['ctx']:,} real tokens, {mc['n_chunks']} chunks", f"{mc['prefill_s']:.1f} s*",
                 f"{mc['scoring_s']:.1f} s", f"{mc_frac:.2f}", f"<= {TARGETS['scoring_over_prefill_multi']} "
                 f"(paper ~2): {_mark(mc_frac <= TARGETS['scoring_over_prefill_multi'])}"),
            _row("    peak memory", f"{mc['prefill_peak_bytes'] / MB:,.0f} MB",
                 f"{mc['scoring_peak_bytes'] / MB:,.0f} MB", f"{mc_mem:.2f}",
                 f"<= {TARGETS['scoring_peak_over_prefill']:.2f}: "
                 f"{_mark(mc_mem <= TARGETS['scoring_peak_over_prefill'])}"),
        ]
    return lines


def _quality_rows(res: dict) -> list[str]:
    """The table's quality rows: the compressed cache's answers against the full cache's."""
    qual = res["quality"]
    if qual is None:  # --synthetic
        return []
    return [
        _row("", "full cache", "compressed", "", ""),
        _row(f"quality at ratio {res['ratio']}: pass keys right",
             f"{qual['n_probes_full_right']} of {qual['n_probes']}", f"{qual['n_probes_both_right']} of those",
             _fmt(qual["relative_accuracy"]),
             "relative accuracy (paper: ~0.97 at 0.3)"),
        _row("  questions answered right", f"{qual['n_questions_full_right']} of {qual['n_questions']}",
             f"{qual['n_questions_compressed_right']} of {qual['n_questions']}"),
        _row("  same greedy answer as the full cache", "", f"{qual['n_agree']} of {qual['n_questions']}",
             _fmt(qual["agreement"]), "agreement (first answer line, exact)"),
        _row("  vs query-aware baselines (SnapKV, ...)", "", "", "", "python reuse.py"),
    ]


def _decode_notes(res: dict) -> list[str]:
    """Below the table: which decode paths were tried, the decode layer, how peaks are measured."""
    d, sc = res["decode"], res["scoring"]
    tried = ", ".join(f"{name} {t:,.1f} ms" + ("" if name in d["timed_candidates"] else " (one run)")
                      for name, t in d["candidates_ms"].items())
    return [
        f"decode, full cache: {tried}, timed side by side among themselves; the fastest is then timed "
        f"beside the compressed path. Compressed: {d['compressed_path']}"
        + (f" (its DecodePlan: {d['plan_bytes'] / MB:.2f} MB, {d['plan_bytes'] / (d['compressed_read_bytes']):.2%} "
           f"of the layer's K+V, held by a CPU cache, not in the memory row)." if d.get("plan_bytes") else "."),
        f"decode layer {d['layer']}: its kept total is nearest the mean over layers. Read bandwidth: "
        f"x.sum() over {measure.READ_PROBE_BYTES // 2**20} MiB, timed in the same rounds.",
    ] + ([f"peak memory: {sc['peak_memory']}: weights, caches and activations. * prefill: mean of "
          f"{' and '.join(f'{t:.1f}' for t in sc['prefill_runs_s'])} s, run before and after scoring."]
         if sc else [])


def _sweep_table(res: dict) -> list[str]:
    """--sweep: memory and decode time at every ratio of SWEEP_RATIOS."""
    geo, mem = res["geometry"], res["memory"]
    lines = [f"sweep: {geo['name']} at {res['ctx']:,} tokens (full cache {_gb(mem['full_bytes'])}); "
             "each row times its compressed layer side by side with the full one",
             f"{'ratio':>6}{'KV memory':>12}{'/ full':>8}{'decode/layer':>14}{'full, same rounds':>19}"
             f"{'/ full':>8}{'GB/s':>7}"]
    for row in res["sweep"]:
        lines.append(f"{row['ratio']:>6}{_gb(row['compressed_bytes']):>12}"
                     f"{row['compressed_bytes'] / row['full_bytes']:>8.3f}"
                     f"{_ms(row['compressed_ms_per_layer']):>14}{_ms(row['full_ms_per_layer']):>19}"
                     f"{row['compressed_ms_per_layer'] / row['full_ms_per_layer']:>8.3f}"
                     f"{row['compressed_gbps']:>7.2f}")
    return lines


def format_quantized(res: dict) -> list[str]:
    """The quantized-cache table: bytes for bits 16 / 8 / 4 at ratio 1.0 and --ratio, the paper's
    figures beside them (Llama-3.1-8B at 124K only), and the decode time of one layer per bit width."""
    geo, r = res["geometry"], res["ratio"]
    ms = {d["bits"]: d["ms_per_layer"] for d in res.get("quantized_decode") or []}
    paper_geo = geo["name"] == "llama3.1-8b" and res["ctx"] == 124_000
    paper = {(16, 1.0): f"{PAPER_FULL_GB} GB (FP16 full)", (4, 0.3): f"~{PAPER_INT4_RATIO_0_3_GB} GB (no scales)"}
    lines = [f"quantized cache, kv.prune(ratio, bits=...): {geo['name']} at {res['ctx']:,} tokens; bytes of "
             "codes + fp16 scale and zero per 32 values + offsets",
             f"{'bits':>6}{'ratio':>7}{'KV memory':>12}{'/ full':>8}{'decode/layer':>14}"
             f"{'paper, Llama-3.1-8B 124K':>28}"]
    for row in res["memory"]["quantized"]:
        timed_ms = _ms(ms[row["bits"]]) if row["ratio"] == r and row["bits"] in ms else ""
        cited = paper.get((row["bits"], row["ratio"]), "") if paper_geo else ""
        lines.append(f"{row['bits']:>6}{row['ratio']:>7}{_gb(row['bytes']):>12}{row['fraction_of_full']:>8.3f}"
                     f"{timed_ms:>14}{cited:>28}".rstrip())
    path = (res.get("quantized_decode") or [{}])[0].get("path", "")
    rounds = (res.get("quantized_decode") or [{}])[0].get("rounds", "")
    threads = (res.get("quantized_decode") or [{}])[0].get("threads", "")
    lines.append(f"decode/layer: one new token over the layer nearest the mean at ratio {r}, bits 16 / 8 / 4 "
                 f"timed side by side, median of {rounds} ({path}; int8/int4 dequantized "
                 + ("inside the kernel's tile loads)." if "kernels" in path else
                    f"as code * scale in blocks of {fused.QUANT_BLOCK:,} rows, the zeros folded into the "
                    f"products, on {threads} threads)."))
    if 16 in ms:
        for bits in (8, 4):
            if bits in ms:
                target = TARGETS[f"int{bits}_over_16_decode"]
                lines.append(f"int{bits} / 16-bit decode: {ms[bits] / ms[16]:.2f}, target <= {target}: "
                             f"{_mark(ms[bits] / ms[16] <= target)}")
    return lines


def _ctx_text(n: int) -> str:
    """124000 -> '124k': the resolved --ctx echoed in the form it was probably typed."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


# -----------------------------------------------------------------------------
# main

def real_rows(args: argparse.Namespace, device, base: int, ratios) -> dict:
    """Rows 3 and 4 with the real model, and what rows 1, 2 and 5 take from it: the template
    prefix's length, the per-head budget fractions at each ratio, the model's geometry and dtype."""
    n_needles, n_questions = (2, 1) if args.quick else (N_NEEDLES, N_QUESTIONS)
    errors.progress(f"loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})")
    m, tok = model_lib.load(args.model, device=device)
    geo = get_geometry(args.geometry, m)
    limit = kvzip.max_context_tokens(m, tok)
    default_score = limit if device.type == "cuda" else QUICK_SCORE_CTX if args.quick else CPU_SCORE_CTX
    n_score = min(args.ctx, args.score_ctx or default_score, limit)
    if args.score_ctx and args.score_ctx > limit:
        errors.progress(f"--score-ctx {args.score_ctx:,} is beyond the model's context limit: using {limit:,}")
    errors.progress(f"--ctx {args.ctx:,} tokens; real-model context {n_score:,} tokens")

    # The real model first, before the big synthetic caches take memory (peaks are measured here).
    kv, probes, questions, scoring = real_run(m, tok, n_score, n_needles=n_needles, n_questions=n_questions,
                                              device=device, base=base)
    quality = quality_row(m, tok, kv, probes=probes, questions=questions, ratio=args.ratio)
    prefill = prefill_paths(m, tok, kv, device=device, reps=1 if args.quick else PREFILL_REPS)
    fractions = {r: head_fractions(kv.scores, r).cpu() for r in ratios}
    n_p = kv.n_prefix
    del kv
    multi_chunk = None
    if args.sweep and not args.quick:  # the regime of the paper's ~2x: each chunk's forward sees the whole cache
        n_multi = min(SWEEP_SCORE_CTX, limit)
        context, _, _ = fitting_context(m, tok, n_multi, n_needles=4, n_questions=0, seed=1)
        multi_chunk = scoring_cost(m, tok, context, device=device, base=base)[1]
    return dict(n_p=n_p, fractions=fractions, geo=geo, dtype=m.dtype, scoring=scoring, quality=quality,
                multi_chunk=multi_chunk, prefill=prefill, model_name=args.model or "SmolLM2-135M-Instruct (default model)")


def synthetic_rows(args: argparse.Namespace, ratios) -> dict:
    """What real_rows gives rows 1, 2 and 5, without a model (--synthetic): every head keeps the
    same share of the context, and the prefix has the default model's length."""
    return dict(n_p=SYNTHETIC_PREFIX, fractions={r: torch.full((1, 1), r) for r in ratios},
                geo=get_geometry(args.geometry), dtype=torch.float32, scoring=None, quality=None,
                multi_chunk=None, prefill=None, model_name=None)


def main(args: argparse.Namespace) -> dict:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    base = (proc_status("VmRSS") or 0) if device.type == "cpu" else 0  # runtime, before the model
    reps = args.reps or (3 if args.quick else 30 if device.type == "cuda" else 15)
    check_memory(args, device)
    if args.serving:
        return serving_main(args)
    ratios = [args.ratio] + ([r for r in SWEEP_RATIOS if r != args.ratio] if args.sweep else [])
    real = synthetic_rows(args, ratios) if args.synthetic else real_rows(args, device, base, ratios)
    geo, n_p, fractions, scoring, quality = (real[k] for k in ("geo", "n_p", "fractions", "scoring", "quality"))

    kern = _kernels(device)
    decode_dtype = geo.torch_dtype if device.type == "cuda" else real["dtype"]  # float32 on a CPU
    timing = dict(device=device, decode_dtype=decode_dtype, reps=reps, kern=kern)  # both time alike
    rows = measure_geometry(geo, n_p=n_p, n_c=args.ctx, fractions=fractions, ratios=ratios, **timing)
    main_row = rows[0]
    quantized, quantized_decode = measure_quantized(
        geo, n_p=n_p, n_c=args.ctx, counts=target_budgets(fractions[args.ratio], geo, args.ctx, args.ratio),
        ratio=args.ratio, full_bytes=main_row["full_bytes"], comp_bytes=main_row["compressed_bytes"], **timing)

    res = dict(
        ctx=args.ctx,
        ratio=args.ratio, device=device.type, device_name=_device_name(device),
        load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        model_name=real["model_name"], synthetic_only=args.synthetic, n_prefix=n_p,
        geometry=dict(name=geo.name, n_layers=geo.n_layers, n_heads=geo.n_heads,
                      n_kv_heads=geo.n_kv_heads, head_dim=geo.head_dim, dtype=geo.dtype),
        memory=dict(full_bytes=main_row["full_bytes"], compressed_bytes=main_row["compressed_bytes"],
                    expected_fraction=main_row["expected_fraction"], synthetic=True,
                    quantized=quantized),
        quantized_decode=quantized_decode,
        decode={k: main_row[k] for k in (
            "full_ms_per_layer", "compressed_ms_per_layer", "full_gbps", "compressed_gbps",
            "device_gbps", "full_path", "compressed_path", "layer", "layer_kept_fraction",
            "full_read_bytes", "compressed_read_bytes", "plan_bytes", "candidates_ms", "timed_candidates")}
        | dict(dtype=str(decode_dtype).removeprefix("torch."), reps=reps),
        scoring=scoring, quality=quality,
        sweep=sorted(rows, key=lambda row: -row["ratio"]) if args.sweep else None,
        scoring_multi_chunk=real["multi_chunk"], prefill=real["prefill"],
    )
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}")
    summary = dict(ctx=res["ctx"], ratio=res["ratio"], device=res["device"], geometry=geo.name,
                   memory_fraction=round(main_row["compressed_bytes"] / main_row["full_bytes"], 4),
                   decode_fraction=round(main_row["compressed_ms_per_layer"] / main_row["full_ms_per_layer"], 4),
                   scoring_over_prefill=round(scoring["scoring_s"] / scoring["prefill_s"], 3) if scoring else None,
                   relative_accuracy=quality["relative_accuracy"] if quality else None)
    print(json.dumps(summary))
    return res


# -----------------------------------------------------------------------------
# Serving: compress once, answer many (--serving)

SERVE_QUERIES, SERVE_NEW = 16, 32  # questions answered together, new tokens each
GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}  # H100 80 GB and H200 141 GB, as sold (decimal GB)
LLAMA_8B_WEIGHT_BYTES = 8.03e9 * 2  # Llama-3.1-8B's parameters in bfloat16


def first_answer_seconds(context_file, saved_file, query: str, reps: int = 2) -> dict:
    """Wall-clock seconds of a fresh `python kvzip.py` to its first answer: from the raw text
    (load the model, prefill, score, prune, save, answer) and from the saved file (load the model
    and the file, answer), alternated so that both see the same load; the median of reps each."""
    import statistics
    import subprocess
    import sys
    import time
    here = Path(__file__).resolve().parent
    cmds = {"from_text": ["--context", str(context_file), "--ratio", "0.3", "--save", str(saved_file)],
            "from_file": ["--load", str(saved_file)]}
    times = {k: [] for k in cmds}
    for _ in range(reps):
        for name, argv in cmds.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(here / "kvzip.py"), *argv, "--query", query,
                            "--max-new-tokens", "8"], check=True, capture_output=True, cwd=here)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def batched_answering(m, tok, ckv, questions, device) -> dict:
    """SERVE_QUERIES questions with up to SERVE_NEW new tokens each over one compressed cache:
    together (kvzip.generate with the list) and one after another, timed back to back."""
    import time
    ids = [kvzip.query_ids(tok, q, template=False) for q in questions]  # completion probes: no early stop
    kvzip.generate_ids_batched(m, tok, ids[:2], ckv, 4)  # warm-up
    measure.sync(device)
    t0 = time.perf_counter()
    seq = [kvzip.generate_ids(m, tok, x, ckv, SERVE_NEW) for x in ids]
    measure.sync(device)
    t1 = time.perf_counter()
    bat = kvzip.generate_ids_batched(m, tok, ids, ckv, SERVE_NEW)
    measure.sync(device)
    t2 = time.perf_counter()
    n_seq, n_bat = sum(map(len, seq)), sum(map(len, bat))
    return dict(n_queries=len(questions), new_tokens=n_bat, sequential_s=t1 - t0, batched_s=t2 - t1,
                sequential_tok_s=n_seq / (t1 - t0), batched_tok_s=n_bat / (t2 - t1),
                speedup=(n_bat / (t2 - t1)) / (n_seq / (t1 - t0)), same_answers=seq == bat)


def batched_step_at_geometry(geo: Geometry, n_c: int, ratio: float, device, reps: int, n_p: int = 32) -> dict:
    """One attention step of SERVE_QUERIES queries over a synthetic compressed layer at the target
    geometry (random K/V, a random 30%-style keep mask with per-head rates), together
    (kvzip.BatchedTails) vs SERVE_QUERIES single-query steps (CompressedKV.attend, the decode
    path of one query). Also the packed bytes of the layer at bits 16, 8 and 4 (in the
    geometry's dtype), for the capacity rows."""
    Hkv, G, D, B = geo.n_kv_heads, geo.group, geo.head_dim, SERVE_QUERIES
    dtype = geo.torch_dtype if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    S = n_p + n_c
    full = model_lib.KVCache(1, Hkv, D, S, dtype, device)
    full.k[0].copy_(torch.randn(Hkv, S, D, generator=g))
    full.v[0].copy_(torch.randn(Hkv, S, D, generator=g))
    full.seq_len = S
    rates = ratio * (0.5 + torch.rand(Hkv, 1, generator=g))  # per-head rates around the ratio
    keep = (torch.rand(1, Hkv, n_c, generator=g) < rates / rates.mean() * ratio).to(device)
    ckv = kvzip.CompressedKV.from_full(full, n_p, keep, "auto")
    packed = {16: sum(quant.nbytes(t) for t in ckv.k + ckv.v + ckv.offsets)}
    for bits in (8, 4):
        packed[bits] = kvzip.CompressedKV.from_full(full, n_p, keep, "auto", bits=bits).nbytes
    full_bytes = full.nbytes
    del full
    q = torch.randn(Hkv, G, B, D, generator=g).to(device, dtype)
    k_new, v_new = (torch.randn(Hkv, B, D, generator=g).to(device, dtype) for _ in range(2))
    tails = kvzip.BatchedTails(ckv, B, 1)
    tails.set_rows(torch.arange(B, device=device), torch.full((B,), S, device=device))

    def together():
        return tails.attend(0, q, k_new, v_new)

    def one_by_one():
        ckv.reserve(1)
        for i in range(B):
            ckv.attend(0, q[:, :, i:i + 1], k_new[:, i:i + 1], v_new[:, i:i + 1])

    t = time_interleaved({"together": together, "one_by_one": one_by_one}, device, reps)
    kept = (keep.sum().item() + Hkv * n_p) / (Hkv * S)
    return dict(geometry=geo.name, n_c=n_c, kept_rows=kept, together_ms=1e3 * t["together"],
                one_by_one_ms=1e3 * t["one_by_one"], fraction=t["together"] / t["one_by_one"],
                layer_full_bytes=full_bytes, layer_packed_bytes=packed, dtype=str(dtype).removeprefix("torch."))


def capacity_on_paper(step: dict, geo: Geometry) -> dict:
    """How many n_c-token compressed contexts fit beside Llama-3.1-8B's bfloat16 weights on each GPU,
    from the measured packed bytes of one layer (times the geometry's layers; 16-bit rows counted in
    bfloat16, 2 bytes a value, whatever dtype the layer was built in here)."""
    per_value = 2 / torch.empty(0, dtype=getattr(torch, step["dtype"])).element_size()
    L = geo.n_layers
    per_context = {"full": step["layer_full_bytes"] * per_value * L,
                   "0.3": step["layer_packed_bytes"][16] * per_value * L,
                   "0.3 + int8": step["layer_packed_bytes"][8] * L,
                   "0.3 + int4": step["layer_packed_bytes"][4] * L}
    return {name: dict(bytes=b, fits={gpu: int((cap - LLAMA_8B_WEIGHT_BYTES) // b) for gpu, cap in GPU_BYTES.items()})
            for name, b in per_context.items()}


def serving_main(args) -> dict:
    import tempfile
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    geo = get_geometry(args.geometry)
    m, tok = model_lib.load(args.model, device=device)
    n = min(args.ctx, args.score_ctx or CPU_SCORE_CTX)
    task = tasks.varied_needle_task(n, n_needles=SERVE_QUERIES, seed=0, tok=tok, key_digits=3)
    context, asked = task["context"], [p for p, _ in task["probes"]]  # completion probes
    errors.progress(f"serving: prefill and score {len(tok.encode(context)):,} context tokens")
    kv = kvzip.prefill(m, tok, context)
    ckv = kv.prune(args.ratio)
    errors.progress(f"serving: {len(asked)} questions, {SERVE_NEW} new tokens each, together and one by one")
    answering = batched_answering(m, tok, ckv, asked, device)
    with tempfile.TemporaryDirectory() as d:
        ctx_file, saved = Path(d) / "doc.txt", Path(d) / "doc.kvz"
        ctx_file.write_text(context)
        errors.progress("serving: first answer in a fresh process, from the text and from the saved file")
        first = first_answer_seconds(ctx_file, saved, "What is the tallest oak in the churchyard?") \
            if args.model is None else None
        file_bytes = saved.stat().st_size if saved.exists() else None
    errors.progress(f"serving: one step of {SERVE_QUERIES} queries at the {geo.name} geometry, {args.ctx:,} tokens")
    step = batched_step_at_geometry(geo, args.ctx, args.ratio, device, reps=args.reps or 5)
    res = dict(n_context=kv.n_context, ratio=args.ratio, answering=answering, first_answer=first,
               saved_file_bytes=file_bytes, compressed_nbytes=ckv.nbytes, step=step,
               capacity=capacity_on_paper(step, geo),
               load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a")
    print(format_serving(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def format_serving(res: dict) -> str:
    a, st = res["answering"], res["step"]
    lines = [f"serving rows ({res['n_context']:,}-token real context, ratio {res['ratio']}, load {res['load_average']})"]
    if res["first_answer"]:
        f = res["first_answer"]
        lines.append(f"first answer, fresh process: from the text {f['from_text']:.1f} s (prefill + score + prune + "
                     f"save + answer), from the saved file {f['from_file']:.1f} s (load + answer); "
                     f"file {res['saved_file_bytes'] / 2**20:.2f} MiB")
    lines.append(f"{a['n_queries']} questions x {SERVE_NEW} new tokens over one compressed cache: one by one "
                 f"{a['sequential_tok_s']:.1f} tok/s, together {a['batched_tok_s']:.1f} tok/s = {a['speedup']:.1f}x "
                 f"(target >= 6x); same answers: {a['same_answers']}")
    lines.append(f"one step of {SERVE_QUERIES} queries, {st['geometry']} layer, {st['n_c']:,} tokens, "
                 f"{st['kept_rows']:.1%} rows kept: together {st['together_ms']:.1f} ms, one by one "
                 f"{st['one_by_one_ms']:.1f} ms = {st['fraction']:.2f} of it (target <= 0.25)")
    for name, c in res["capacity"].items():
        lines.append(f"  {name:>11}: {c['bytes'] / 1e9:6.2f} GB a context; beside the weights fit "
                     + ", ".join(f"{k}: {v}" for k, v in c["fits"].items()))
    return "\n".join(lines)


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return (f"cpu: {name}, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


if __name__ == "__main__":
    errors.run(lambda: main(parse_args()), prog="bench.py")
