"""
bench.py: KVzip's efficiency results (Kim et al., NeurIPS 2025, arXiv 2505.23416), measured here.

    python bench.py --ctx 124k --ratio 0.3     # the main command: ~1.5 min on a 2-core CPU
    python bench.py --ctx 124k --sweep         # ratios 1.0, 0.8, 0.6, 0.3, 0.2 (the paper's figure)
    python bench.py --quick --json out.json    # a small, fast run that writes the figures as JSON

What it measures, every figure in the same run (k = 1000 tokens: the paper's "124K" context of
Llama-3.1-8B is 124,000 tokens, 16.3 GB of bf16 KV):
  1. cache memory at a target geometry (--geometry: llama3.1-8b, qwen2.5-7b, qwen2.5-14b,
     smollm2-135m or the loaded model), full vs compressed at --ratio, counted from real cache
     objects: one layer of model.KVCache and, for every layer, its kvzip.CompressedKV. The per-head
     budgets are the fractions that real KVzip scores of the default model keep at this ratio.
  2. decode attention latency of one new token over one layer, full vs compressed, each through the
     fastest decode path the project has for that cache, with the bandwidth each achieves and the
     read bandwidth of the device measured alongside (decode attention is memory-bound). On a CPU
     this runs in float32, the project's CPU dtype (a CPU without bf16 instructions makes bf16
     matmuls compute-bound: p @ v was ~9x slower in bf16 than in float32 here).
  3. scoring cost on the default model: prefill vs KVzip scoring of the same context (time, peak
     memory); the paper reports scoring at about twice the cost of prefill.
  4. quality at this ratio, short version: needle retrieval relative to the full cache and greedy
     answer agreement. The full comparison with query-aware baselines is `--quality`.
The K/V values of rows 1-2 are synthetic (random, at the target geometry); rows 3-4 and the head
budgets are real (the default model, SmolLM2-135M-Instruct, on haystack contexts).

Map of this file:
  - context generators: haystack, needle_task, fact_task, check_answer (standard library only;
    shared with the tests and kvzip.py's demo)
  - the benchmark: geometries, arguments, measuring tools (timing, bandwidth, peak memory), the
    four measurements, the report (summary card, table, last-line JSON), main()
  - the quality/reuse experiment against query-aware baselines (run_quality, format_quality_table,
    plot_quality): `python bench.py --quality`
Left out on purpose: batching, throughput of whole-model decoding, other GPUs than one.
"""
import os

# Idle OpenMP threads sleep instead of spinning. This must happen before torch loads its OpenMP
# runtime, and an explicit setting by the user wins. Measured on this project's 2-core machine,
# shared with other processes: with the default (spinning) policy one decode step of the default
# model over a compressed cache took 3.6 s instead of 0.09 s, because each of its ~600 small torch
# ops waited for a spinning thread to hand a core back. The header line prints the policy used.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 (after the OpenMP setting above)
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import kvzip  # noqa: E402
import model as model_lib  # noqa: E402

# ---- haystack: seeded filler prose and needle tasks (used by tests, kvzip's demo and the benchmark) ----
#
# The filler is grammatical but uneventful: towns, rivers, gardens, trains, markets, weather.
# It deliberately contains no digits, no "pass key", no doors and none of the needle colours, so a
# needle's label and number occur only where we put them.

_TOWNS = ["Marrowby", "Ashcombe", "Thistlebrook", "Wrenfield", "Halloway", "Dunmere", "Pellingham",
          "Oakhollow", "Saltmarsh", "Fernley", "Cobbleton", "Lowick", "Heronmere", "Millbury",
          "Stonyford", "Brackenridge"]
_RIVERS = ["the Wend", "the Alder", "the Tamsin", "the Lowe", "the Corran", "the Fennick",
           "the Hollin", "the Sorrel"]
_PEOPLE = ["old Mr Harrow", "the baker's daughter", "a retired schoolteacher", "the ferryman",
           "a young painter", "the postmistress", "a travelling tinker", "the miller's son",
           "the parish clerk", "a quiet fisherman", "the innkeeper's wife", "the village doctor"]
_WEATHER = ["mild", "damp", "bright", "blustery", "overcast", "still", "misty", "crisp", "humid",
            "breezy", "gloomy", "fair"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_TIMES = ["at dawn", "in the early afternoon", "towards evening", "before breakfast",
          "after the midday meal", "late at night", "just after sunrise", "at dusk"]
_BIRDS = ["swallows", "starlings", "rooks", "wrens", "herons", "curlews", "thrushes", "finches",
          "sparrows", "gulls"]
_TREES = ["the old beeches", "the willows", "the hawthorn hedges", "the elms", "the sycamores",
          "the birches", "the tall poplars", "the crooked oaks"]
_GOODS = ["apples", "cheeses", "woollen scarves", "jars of honey", "wicker baskets", "clay pots",
          "fresh bread", "beeswax candles", "onions", "lace collars", "leather boots", "dried herbs"]
_FOODS = ["soup", "meat pies", "stew", "roasted vegetables", "warm bread", "apple cake", "porridge",
          "fish and potatoes"]
_FLOWERS = ["lavender", "foxgloves", "sweet peas", "hollyhocks", "roses", "poppies", "dahlias",
            "primroses", "daisies", "snapdragons"]
_VEGETABLES = ["marrows", "leeks", "cabbages", "runner beans", "potatoes", "carrots", "pumpkins"]
_ANIMALS = ["sheep", "goats", "cows", "ponies", "geese", "hens"]

# Sentence templates. Slots: {town} (the paragraph's town), {town2} (another town), {river},
# {person}, {weather}, {season}, {time}, {birds}, {trees}, {goods}, {food}, {flowers},
# {vegetables}, {animals}. A sentence's first letter is capitalized after filling.
# No template puts "a"/"an" before a slot, so articles are always right.
_TEMPLATES = [
    "The weather in {town} was {weather} for most of {season}, and nobody complained about it.",
    "In {town}, the market opens early, and the stalls fill with {goods} long before the church bell rings.",
    "{person} walked along {river} {time}, watching the {birds} gather above the water.",
    "The slow train to {town} stops at every small station, so passengers bring books and patience.",
    "Along the banks of {river}, {trees} lean over the water and drop their leaves into the current.",
    "Every garden in {town} seemed to have its own row of {flowers} that {season}.",
    "Farmers near {town} drove their {animals} to higher fields when the rains came.",
    "{person} said that the road to {town2} had never been so quiet.",
    "The bridge over {river} was mended last {season}, though the old stones still show the scars.",
    "Travellers often stop in {town} for a warm meal and a seat by the fire.",
    "The inn at {town} is known for its {food}, which the cook makes in a huge iron pot.",
    "On {weather} mornings, the fog lifts slowly from {river} and the fields beyond it.",
    "Children in {town} learn the calls of the {birds} before they learn to read.",
    "A narrow lane runs from the square in {town} down to the mill on {river}.",
    "{person} keeps a small garden where {flowers} grow beside rows of beans.",
    "The library in {town} is small, but its reading room has tall windows and a creaking floor.",
    "When the train leaves {town}, it follows {river} for several miles before turning towards the hills.",
    "Most people agree that {season} is the best time to visit {town}.",
    "The traders of {town} argue cheerfully about the price of {goods}.",
    "Heavy clouds rolled in from the coast, and by evening the streets of {town} were wet and shining.",
    "Nobody remembers exactly when the clock tower in {town} was built.",
    "The ferry across {river} runs only in fair weather, and {person} decides what counts as fair.",
    "Beyond the last houses of {town}, the path climbs through {trees} to a windy ridge.",
    "{person} once tried to count the {birds} on the roof of the barn, but gave up before noon.",
    "In the evenings, music drifts from the open windows of the houses near the harbour.",
    "The gardeners of {town} compare their {vegetables} every {season} at a long table in the village hall.",
    "Snow is rare in {town}, but when it falls the whole valley goes quiet.",
    "The station master at {town} knows every regular passenger by name.",
    "A cold wind came down the valley {time}, and the {animals} huddled against the hedges.",
    "Fishermen on {river} say the water runs faster after a week of {weather} weather.",
    "The council of {town} met to discuss the state of the roads, as it does every {season}.",
    "{person} likes to say that a good loaf of bread can mend almost any quarrel.",
    "The hills above {town} are covered with heather, and in late summer they hum with bees.",
    "A carter from {town2} brought {goods} to {town} {time} and sold them all by noon.",
    "It was {weather} in {town} that day.",
    "The kettle was already on.",
    "Nobody was in a hurry.",
    "Evening came slowly over {river}.",
    "{person} waved from the bridge.",
    "The {birds} were back.",
]

# Needle labels: a colour and an object, all distinct within one task. None of these words
# appears in the filler (checked by the tests).
_NEEDLE_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey",
                   "pink", "brown", "silver"]
_NEEDLE_OBJECTS = ["door", "box", "gate", "chest", "locker", "safe", "cabinet", "vault", "drawer",
                   "trunk", "crate", "satchel"]
_NEEDLE_TEMPLATE = "The pass key for the {label} is {key}."
_PROBE_TEMPLATE = "The pass key for the {label} is"
_TOKENS_PER_WORD = 1.3  # sizing guess without a tokenizer (measured for SmolLM2 on this filler: see tests)


def _filler_sentences(seed: int):
    """Endless deterministic stream of (sentence, ends_paragraph) for one seed.

    A paragraph has three to seven sentences about one town (plus a second one for {town2}).
    Each string seed gives its own stream; random.Random(str) is stable across runs and machines.
    """
    rng = random.Random(f"haystack-{seed}")
    while True:
        town, town2 = rng.sample(_TOWNS, 2)
        n_sent = rng.randint(3, 7)
        templates = rng.sample(_TEMPLATES, n_sent)  # no repeated sentence within a paragraph
        for i, template in enumerate(templates):
            s = template.format(
                town=town, town2=town2, river=rng.choice(_RIVERS), person=rng.choice(_PEOPLE),
                weather=rng.choice(_WEATHER), season=rng.choice(_SEASONS), time=rng.choice(_TIMES),
                birds=rng.choice(_BIRDS), trees=rng.choice(_TREES), goods=rng.choice(_GOODS),
                food=rng.choice(_FOODS), flowers=rng.choice(_FLOWERS),
                vegetables=rng.choice(_VEGETABLES), animals=rng.choice(_ANIMALS))
            yield s[0].upper() + s[1:], i == n_sent - 1


def _take_sentences(n_words: int, seed: int) -> list[tuple[str, bool]]:
    """The shortest prefix of the seed's sentence stream whose word count is nearest n_words."""
    out, words = [], 0
    for sent, end in _filler_sentences(seed):
        w = len(sent.split())
        if words > 0 and abs(words + w - n_words) >= abs(words - n_words):
            break  # adding this sentence would move us further from n_words
        out.append((sent, end))
        words += w
    return out


def _join(sentences: list[tuple[str, bool]]) -> str:
    """Sentences within a paragraph are joined by a space, paragraphs by a blank line."""
    parts = []
    for i, (sent, end) in enumerate(sentences):
        parts.append(sent)
        if i < len(sentences) - 1:
            parts.append("\n\n" if end else " ")
    return "".join(parts)


def haystack(n_words: int, seed: int = 0) -> str:
    """About n_words words of seeded filler prose (whole sentences; paragraphs split by "\\n\\n").

    Deterministic for a given seed, different for different seeds, and prefix-stable: a longer
    haystack with the same seed starts with the shorter one.
    """
    return _join(_take_sentences(n_words, seed))


def _needle_context(sentences, needles, depths):
    """Insert needle sentences into the filler at the given depth fractions (of filler words).

    Each needle goes at the sentence boundary nearest its depth, inside the current paragraph.
    Returns the joined context.
    """
    counts = [len(s.split()) for s, _ in sentences]
    total = sum(counts)
    cum, c = [0], 0  # cum[i] = filler words before sentence i
    for n in counts:
        c += n
        cum.append(c)
    out = list(sentences)
    # Insert from the deepest needle first so earlier insertion indices stay valid.
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):
        target = depth * total
        i = min(range(len(cum)), key=lambda j: (abs(cum[j] - target), j))  # boundary before sentence i
        # A needle inserted after sentence i-1 continues that sentence's paragraph; if sentence
        # i-1 ended a paragraph, the needle ends it instead.
        if i == 0:
            out.insert(0, (needle, False))
        else:
            prev, prev_end = out[i - 1]
            out[i - 1] = (prev, False)
            out.insert(i, (needle, prev_end))
    return _join(out)


def needle_task(n_tokens: int, n_needles: int = 4, seed: int = 0, tok=None) -> dict:
    """Labelled pass keys hidden in filler prose of about n_tokens tokens.

    Needles read "The pass key for the red door is 48213." (distinct colours, distinct objects,
    distinct 5-digit keys) and sit at depths evenly spaced from 10% to 90% of the filler, in that
    order. With `tok` (anything whose .encode(str) result has a len(): a list of ids, or a
    `tokenizers.Encoding`) the whole context is sized to be within ~3% of n_tokens (binary search
    over whole filler sentences, so this holds from about 300 tokens up; below that one sentence
    is more than 3%); without it we assume _TOKENS_PER_WORD.

    Returns {"context": str,
             "probes": [(prompt, answer), ...]   # completion prompts, e.g. ("The pass key for the red door is", "48213")
             "needles": [{"label", "key", "sentence", "depth"}, ...]}   # in context order
    """
    assert 1 <= n_needles <= len(_NEEDLE_COLOURS), f"n_needles must be in 1..{len(_NEEDLE_COLOURS)}"
    rng = random.Random(f"needles-{seed}")
    labels = [f"{c} {o}" for c, o in zip(rng.sample(_NEEDLE_COLOURS, n_needles),
                                         rng.sample(_NEEDLE_OBJECTS, n_needles))]
    keys = [str(k) for k in rng.sample(range(10000, 100000), n_needles)]  # distinct 5-digit keys
    sentences_n = [_NEEDLE_TEMPLATE.format(label=lab, key=key) for lab, key in zip(labels, keys)]
    depths = [0.5] if n_needles == 1 else [0.1 + 0.8 * i / (n_needles - 1) for i in range(n_needles)]

    if tok is None:
        needle_words = sum(len(s.split()) for s in sentences_n)
        n_words = max(1, round(n_tokens / _TOKENS_PER_WORD) - needle_words)
        context = _needle_context(_take_sentences(n_words, seed), sentences_n, depths)
    else:
        # Token count grows with every added filler sentence, so binary-search the smallest
        # sentence count reaching n_tokens, then keep it or the one before, whichever is closer.
        gen = _filler_sentences(seed)
        stream = [next(gen) for _ in range(max(4, int(n_tokens / _TOKENS_PER_WORD / 8)))]  # >= 8 words/sentence: enough

        def n_tok(n_sent: int) -> int:  # len() works for a list of ids and for a tokenizers.Encoding
            return len(tok.encode(_needle_context(stream[:n_sent], sentences_n, depths)))

        while n_tok(len(stream)) < n_tokens:  # make sure the upper end is long enough
            stream += [next(gen) for _ in range(len(stream))]
        lo, hi = 1, len(stream)
        while lo < hi:
            mid = (lo + hi) // 2
            if n_tok(mid) >= n_tokens:
                hi = mid
            else:
                lo = mid + 1
        best = min([lo, max(1, lo - 1)], key=lambda n: abs(n_tok(n) - n_tokens))
        context = _needle_context(stream[:best], sentences_n, depths)

    needles = [{"label": lab, "key": key, "sentence": s, "depth": d}
               for lab, key, s, d in zip(labels, keys, sentences_n, depths)]
    probes = [(_PROBE_TEMPLATE.format(label=n["label"]), n["key"]) for n in needles]
    return {"context": context, "probes": probes, "needles": needles}


# ---- invented facts about invented people (short-answer questions) ----

_FIRST_NAMES = [("Mira", "she"), ("Tobias", "he"), ("Elsbeth", "she"), ("Corwin", "he"),
                ("Ada", "she"), ("Fergus", "he"), ("Lenore", "she"), ("Osric", "he"),
                ("Wilma", "she"), ("Jasper", "he"), ("Nell", "she"), ("Rufus", "he")]
_SURNAMES = ["Tallow", "Quillby", "Marchbank", "Pennywhistle", "Ashdown", "Crombie", "Fairweather",
             "Hobbes", "Larkspur", "Mudge", "Thackeray", "Winslow"]
_OCCUPATIONS = ["clockmaker", "beekeeper", "bookbinder", "cooper", "glassblower", "saddler",
                "cartographer", "candlemaker", "farrier", "weaver", "lamplighter", "potter"]
_FACT_PLACES = ["Port Ellery", "Gorsehill", "Kettleby Marsh", "Dunraven", "Little Hapsworth",
                "Brightwater Quay", "Coldharbour", "Yarrowdale", "Fenwick Abbey", "Scarrow",
                "Mossbridge", "Tilbury Downs"]
_FRUITS = ["plum", "quince", "apricot", "pear", "cherry", "fig", "damson", "gooseberry",
           "mango", "peach", "melon", "lemon"]
_PETS = ["goats", "cats", "ducks", "rabbits", "donkeys", "ferrets", "tortoises", "geese", "pigs",
         "canaries", "hedgehogs", "llamas"]


def fact_task(n_entities: int = 6, seed: int = 0, filler_words: int = 0) -> dict:
    """Invented facts about invented people, and natural questions about them.

    Each person gets a distinct name, occupation, home town, favourite fruit and kind of animal,
    and a distinct animal count, so every question has exactly one right answer. With
    filler_words > 0, about that many words of haystack prose in total are spread evenly before,
    between and after the descriptions.

    Returns {"context": str, "questions": [(question, answer), ...], "entities": [dict, ...]}.
    """
    assert 1 <= n_entities <= len(_FIRST_NAMES), f"n_entities must be in 1..{len(_FIRST_NAMES)}"
    rng = random.Random(f"facts-{seed}")
    picks = [rng.sample(xs, n_entities) for xs in
             (_FIRST_NAMES, _SURNAMES, _OCCUPATIONS, _FACT_PLACES, _FRUITS, _PETS)]
    counts = rng.sample(range(2, 10), min(n_entities, 8)) + rng.sample(range(10, 20), max(0, n_entities - 8))
    entities, paragraphs, questions = [], [], []
    for (first, pron), surname, job, place, fruit, pet, count in zip(*picks, counts):
        name = f"{first} {surname}"
        poss = "Her" if pron == "she" else "His"
        paragraphs.append(f"{name} is a {job} who lives in {place}. {poss} favourite fruit is the "
                          f"{fruit}. {pron.capitalize()} owns {count} {pet}.")
        entities.append(dict(name=name, occupation=job, place=place, fruit=fruit, pet=pet, count=count))
        questions += [(f"Where does {name} live?", place),
                      (f"What is {name}'s job?", job),
                      (f"What is {name}'s favourite fruit?", fruit),
                      (f"How many {pet} does {name} own?", str(count))]
    if filler_words > 0:
        # n_entities + 1 slots of filler, each from its own seed so they read differently.
        per_slot = max(1, filler_words // (n_entities + 1))
        blocks = [haystack(per_slot, seed=seed * 1000 + i) for i in range(n_entities + 1)]
        paragraphs = [x for pair in zip(blocks, paragraphs) for x in pair] + [blocks[-1]]
    return {"context": "\n\n".join(paragraphs), "questions": questions, "entities": entities}


def _normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def check_answer(generated: str, answer: str) -> bool:
    """True if the answer appears in the first non-empty line of the generated text.

    Both sides are normalized (lower case, punctuation and extra whitespace removed) and matched
    on word boundaries, so "48213" matches " 48213." but not "482139".
    """
    lines = generated.strip().splitlines()
    ans = _normalize(answer)
    return bool(ans) and bool(lines) and f" {ans} " in f" {_normalize(lines[0])} "


# =============================================================================
# The benchmark: KVzip's efficiency results, measured on this machine
# =============================================================================
#
# Synthetic vs real: the memory and decode rows need a cache at the target geometry (Llama-3.1-8B
# at 124k tokens is 16.3 GB), far beyond what the default model produces, so they use random K/V
# of that shape; which pairs are kept does not change bytes or decode time, only how many per head,
# and those counts come from the real model's KVzip scores. Scoring cost and quality are real.

SWEEP_RATIOS = (1.0, 0.8, 0.6, 0.3, 0.2)  # the ratios of the paper's latency/memory figure
# Default --score-ctx on a CPU: one full scoring chunk (KVzip's m = 2000 tokens). With the default
# model, prefill + scoring of 2,000 context tokens take about a minute on this project's 2-core CPU
# (measured: 10 s + 48 s). On CUDA the default is the model's context limit.
CPU_SCORE_CTX = 2000
QUICK_SCORE_CTX = 300  # --quick
N_NEEDLES, N_QUESTIONS = 4, 2  # quality probes in the scoring context (--quick: 2 and 1)
NEEDLE_MAX_NEW, QA_MAX_NEW = 8, 12  # new tokens for a pass-key completion / a short answer
READ_PROBE_BYTES = 256 * 2**20  # x.sum() over 256 MiB of float32 measures the read bandwidth
GB, MB = 1e9, 1e6  # decimal units, as in the paper's "16.3 GB"

_T0 = time.perf_counter()


def progress(msg: str):
    """Progress on stderr; stdout holds only the report."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments: one line on stderr and exit code 2 (argparse would add the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="bench.py", description="KVzip's efficiency results, measured on this machine.")
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
    p.add_argument("--quality", action="store_true",
                   help="also run the quality/reuse experiment against query-aware baselines")
    p.add_argument("--plot", metavar="FILE", default="quality.png",
                   help="with --quality: relative accuracy vs ratio per method, as a PNG (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument("--model", metavar="DIR",
                   help="Hugging Face folder for the real-model rows (default: embedded SmolLM2-135M)")
    p.add_argument("--reps", type=parse_positive, default=None,
                   help="timed repeats of each decode path (default 15 on CPU, 30 on CUDA; --quick 3)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Measuring tools: timing, read bandwidth, peak memory

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, seconds) of one call; on CUDA the clock waits for the kernels to finish."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def time_interleaved(fns: dict, device, reps: int, inner: int = 1) -> dict:
    """Median seconds per call of each function, timed side by side.

    Every round calls each function once (`inner` times back to back on CUDA, where one call is
    shorter than the clock's overhead), so all of them see the same load from other processes on
    this machine; the median over `reps` rounds drops the rounds an outside process disturbed.
    """
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def read_probe(device):
    """The device's read bandwidth probe: x.sum() reads every byte of x once, computes ~nothing.
    Returns (fn, bytes read)."""
    x = torch.ones(READ_PROBE_BYTES // 4, dtype=torch.float32, device=device)
    return (lambda: x.sum()), x.numel() * x.element_size()


def _proc_status(field: str):
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory in bytes while a `with` block runs: `with PeakMemory(dev, base) as pm: ...; pm.peak`.

    CUDA: torch.cuda.max_memory_allocated (reset on entry): every tensor held at the peak,
    weights, caches and activations alike.
    CPU: torch keeps no such counter, so we read the kernel's high-water mark of the process's
    resident memory, VmHWM, reset on entry by writing "5" to /proc/self/clear_refs (after handing
    freed memory back to the OS), minus `base` (the resident memory before the model was loaded:
    the Python and torch runtime). That counts what CUDA counts plus the CPU allocator's slack. Where clear_refs cannot be written, a thread
    samples VmRSS every millisecond instead (it may miss a spike shorter than that).
    """

    def __init__(self, device, base: int = 0):
        self.device, self.base, self.peak, self.method = device, base, 0, None
        self._stop, self._thread, self._sampled = threading.Event(), None, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.method = "peak RSS (VmHWM) above the pre-model baseline"
        except OSError:
            self.method = "sampled RSS (1 ms) above the pre-model baseline"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _proc_status("VmRSS") or 0)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled - self.base
        else:
            self.peak = (_proc_status("VmHWM") or 0) - self.base
        return False


def _release_freed_memory():
    """Hand memory that is freed but still cached by glibc's malloc back to the OS (malloc_trim), so
    that resident memory is live memory: otherwise a phase's peak would include what an earlier
    phase freed. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _available_bytes():
    """MemAvailable from /proc/meminfo, or None where unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _kernels():
    """kernels.py (Triton) where it runs: on CUDA, when it imports and has the decode kernel."""
    if not torch.cuda.is_available():
        return None
    try:
        import kernels
    except (ImportError, RuntimeError) as e:
        progress(f"kernels.py unavailable ({type(e).__name__}: {e}); using the torch decode paths")
        return None
    return kernels if hasattr(kernels, "varlen_decode_attention") else None


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
    round(ratio * L * Hkv * n_c), as KVzip's global ranking keeps; no head keeps more than n_c.
    """
    L, Hkv = geo.n_layers, geo.n_kv_heads
    total = round(ratio * L * Hkv * n_c)
    flat = fractions.flatten().double()
    f = flat[torch.arange(L * Hkv) % flat.numel()]  # (L * Hkv,): cycled pattern
    want = f * (total / f.sum()) if f.sum() > 0 else torch.full_like(f, total / f.numel())
    for _ in range(want.numel()):  # water-filling: cap heads at n_c and hand the excess to the rest
        over = want > n_c
        if not over.any():
            break
        excess = (want[over] - n_c).sum()
        want[over] = n_c
        free = want < n_c
        weight = want[free] if want[free].sum() > 0 else torch.ones_like(want[free])
        want[free] += excess * weight / weight.sum()
    counts = want.floor().long()
    short = total - int(counts.sum())  # < number of heads: hand out by largest remainder
    counts[torch.argsort(want - counts, descending=True, stable=True)[:short]] += 1
    counts = counts.clamp(max=n_c).view(L, Hkv)
    assert int(counts.sum()) == total, (int(counts.sum()), total)
    return counts


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


def cache_memory(full, n_p: int, n_c: int, counts):
    """(full bytes, compressed bytes) of all L layers, counted from real cache objects.

    Every layer of the uncompressed cache has the same shape, so it is one layer's KVCache.nbytes
    times L. Each layer's compressed cache is built for real (kvzip.CompressedKV.from_full: packed
    K and V plus the int64 offsets) with that layer's per-head budgets, counted, and freed.
    """
    L = counts.shape[0]
    compressed = 0
    for l in range(L):
        keep = spread_keep_mask(counts[l:l + 1], n_c)  # (1, Hkv, n_c)
        compressed += kvzip.CompressedKV.from_full(full, n_p, keep).nbytes
    return full.nbytes * L, compressed


def _dense_attention_fns():
    """model.py's dense attention functions (reference and SDPA), whatever the model offers."""
    fns = getattr(model_lib, "ATTENTION", {"reference": model_lib.attention})
    return list(dict.fromkeys(fns.values()))


def full_decode_paths(cache, q, kern) -> dict:
    """Every way the project can attend one new token over an uncompressed cache: {name: fn}.

    cache: a one-layer KVCache holding S positions and the new token's K/V at row S.
    q: (Hkv, G, 1, D) the new token's query heads. Each fn returns the attention output.
    """
    S = cache.seq_len
    Hkv, G, _, D = q.shape
    K, V = cache.k[0][:, :S + 1], cache.v[0][:, :S + 1]  # (Hkv, S + 1, D): the context and the new token
    paths = {f"model.{fn.__name__}": (lambda fn=fn: fn(q, K, V, S)) for fn in _dense_attention_fns()}
    # The compressed cache's own decode code, over the uncompressed cache: a packed buffer whose
    # heads all keep S + 1 rows. A view, no copy: the cache's capacity is exactly S + 1.
    flat_k, flat_v = K.reshape(-1, D), V.reshape(-1, D)  # (Hkv * (S + 1), D)
    bounds = [h * (S + 1) for h in range(Hkv + 1)]
    empty = K.new_empty((Hkv, 0, D))  # no tail: the new token is already each head's last row
    paths["kvzip.packed_attention"] = lambda: kvzip.packed_attention(q, flat_k, flat_v, bounds, empty, empty)
    if kern is not None:
        offsets = torch.tensor(bounds, dtype=torch.int64, device=q.device)
        q3 = q[:, :, 0].contiguous()  # (Hkv, G, D)
        paths["kernels.varlen_decode_attention"] = lambda: kern.varlen_decode_attention(q3, flat_k, flat_v, offsets)
    return paths


def compressed_decode_path(full, n_p: int, n_c: int, counts, q, k_new, v_new, kern):
    """The compressed cache's decode step for one layer with per-head budgets counts (Hkv,).

    Returns (name, fn, bytes of K and V read): fn is CompressedKV.attend, which stores the new
    token in the tail and attends over [kept pairs ; tail] (kvzip.packed_attention on CPU, the
    Triton varlen kernel on CUDA).
    """
    ckv = kvzip.CompressedKV.from_full(full, n_p, spread_keep_mask(counts[None], n_c))
    if ckv.backend == "triton" and kern is None:
        ckv.backend = "torch"  # CUDA without a working kernels.py
    ckv.reserve(1)
    name = ("CompressedKV.attend: kernels.varlen_decode_attention" if ckv.backend == "triton"
            else "CompressedKV.attend: kvzip.packed_attention")
    nbytes = sum(t.numel() * t.element_size() for t in (ckv.k[0], ckv.v[0], k_new, v_new))
    return name, (lambda: ckv.attend(0, q, k_new, v_new)), nbytes


def _check_same(name, out, ref_name, ref):
    """The decode paths must compute the same attention (timing wrong code would be no use)."""
    a, b = out.reshape(-1, out.shape[-1]).float(), ref.reshape(-1, ref.shape[-1]).float()  # (H, D)
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    err = (a - b).abs().max().item()
    if not err <= tol:
        raise RuntimeError(f"decode path {name} disagrees with {ref_name}: max |diff| {err:.3g} > {tol}")


def measure_geometry(geo, n_p, n_c, fractions, ratios, device, decode_dtype, reps, kern):
    """Memory (all layers) and decode latency (one layer) of the target geometry at each ratio.

    fractions: {ratio: (L_real, Hkv_real) per-head kept fractions from the real model's scores}.
    The first ratio also picks the full cache's decode path: every path is run once (as warm-up
    and to drop hopeless ones), the rest are timed side by side, and the fastest one is used.
    """
    S = n_p + n_c
    inner = 20 if device.type == "cuda" else 1
    progress(f"building one {geo.name} layer: {S:,} positions of random {geo.dtype} K/V "
             f"({geo.kv_bytes(S) / geo.n_layers / GB:.2f} GB)")
    full = random_layer(geo, S, geo.torch_dtype, device)
    if decode_dtype == geo.torch_dtype:
        dec = full
    else:  # CPU: decode in the project's CPU dtype (float32), same values
        dec = model_lib.KVCache(1, geo.n_kv_heads, geo.head_dim, S + 1, decode_dtype, device)
        dec.k[0].copy_(full.k[0])
        dec.v[0].copy_(full.v[0])
        dec.seq_len = S
    Hkv, G, D = geo.n_kv_heads, geo.group, geo.head_dim
    g = torch.Generator(device=device).manual_seed(1)
    q, k_new, v_new = (torch.randn(shape, generator=g, device=device).to(decode_dtype)
                       for shape in ((Hkv, G, 1, D), (Hkv, 1, D), (Hkv, 1, D)))
    dec.k[0][:, S] = k_new[:, 0]  # the new token's K/V at row S, as KVCache.attend stores them
    dec.v[0][:, S] = v_new[:, 0]
    full_read = 2 * Hkv * (S + 1) * D * dec.k[0].element_size()  # bytes of K and V over S + 1 keys
    read_fn, read_bytes = read_probe(device)

    paths = full_decode_paths(dec, q, kern)
    probe, ref = {}, None
    for name, fn in paths.items():
        if name == "model.attention" and device.type == "cpu":
            # the reference path broadcasts K and V over the G query heads of a group, and
            # torch.matmul materializes that: 2 * G * (K bytes) of temporaries
            need = G * full_read
            avail = _available_bytes()
            if avail is not None and need > avail // 2:
                progress(f"decode: skipping {name}: it would copy {need / GB:.1f} GB")
                continue
        progress(f"decode: one run of {name} over {S + 1:,} keys per head")
        out, probe[name] = timed(fn, device)
        if ref is None:
            ref = (name, out)
        else:
            _check_same(name, out, *ref)
    best = min(probe.values())
    contenders = [n for n, t in probe.items() if t <= 3 * best]  # a path 3x slower once never wins

    rows, full_name = [], None
    for r in ratios:
        counts = target_budgets(fractions[r], geo, n_c, r)  # (L, Hkv)
        progress(f"ratio {r}: packing all {geo.n_layers} layers' compressed caches to count bytes")
        full_bytes, comp_bytes = cache_memory(full, n_p, n_c, counts)
        layer = representative_layer(counts)
        c_name, c_fn, c_read = compressed_decode_path(dec, n_p, n_c, counts[layer], q, k_new, v_new, kern)
        c_fn()  # warm-up
        fns = {n: paths[n] for n in (contenders if full_name is None else [full_name])}
        fns[c_name] = c_fn
        fns["read"] = read_fn
        progress(f"ratio {r}: timing {len(fns)} functions side by side, {reps} rounds")
        med = time_interleaved(fns, device, reps, inner)
        candidates = {n: med.get(n, t) for n, t in probe.items()}
        if full_name is None:
            full_name = min(contenders, key=med.get)
        rows.append(dict(
            ratio=r, full_bytes=full_bytes, compressed_bytes=comp_bytes,
            expected_fraction=(n_p * geo.n_layers * Hkv + int(counts.sum())) / (S * geo.n_layers * Hkv),
            layer=layer, layer_kept_fraction=c_read / full_read,
            full_ms_per_layer=med[full_name] * 1e3, compressed_ms_per_layer=med[c_name] * 1e3,
            full_read_bytes=full_read, compressed_read_bytes=c_read,
            full_gbps=full_read / med[full_name] / GB, compressed_gbps=c_read / med[c_name] / GB,
            device_gbps=read_bytes / med["read"] / GB,
            full_path=full_name, compressed_path=c_name,
            candidates_ms={n: t * 1e3 for n, t in candidates.items()},
            timed_candidates=sorted(med.keys() & probe.keys())))
    return rows


# -----------------------------------------------------------------------------
# 3 + 4. Scoring cost and quality with the real model

def quality_context(tok, n_tokens: int, n_needles: int, n_questions: int, seed: int = 0):
    """One context of about n_tokens tokens: facts about invented people first, then pass-key
    needles hidden in haystack prose. Returns (context, needle probes, fact questions), each a
    list of (prompt, answer)."""
    facts = fact_task(max(n_questions, 1), seed=seed)
    fact_text = facts["context"] + "\n\n" if n_questions else ""
    questions = [qa for qa in facts["questions"] if qa[0].startswith("Where")][:n_questions]
    n_fact = len(tok.encode(fact_text))
    needles = needle_task(max(n_tokens - n_fact, 40), n_needles=n_needles, seed=seed, tok=tok)
    return fact_text + needles["context"], needles["probes"], questions


def real_run(m, tok, n_tokens: int, n_needles: int, n_questions: int, device, base: int):
    """Prefill and KVzip-score one context with the real model: time and peak memory of each.

    kvzip.prefill does exactly these two steps (model.prefill of prefix + context into a cache
    with room for the reconstruction input, then kvzip.score_context); they run here one at a
    time so that each can be timed. Returns (FullKV, needle probes, questions, figures).
    """
    progress("warm-up: prefill + scoring of a 60-word context")
    kvzip.prefill(m, tok, haystack(60, seed=99))  # first calls pay one-time costs; not timed
    context, probes, questions = quality_context(tok, n_tokens, n_needles, n_questions)
    prefix_ids, context_ids = tok.encode(tok.prefix), tok.encode(context)
    n_p = len(prefix_ids)
    room = kvzip.max_reconstruction_len(tok)
    context_ids = context_ids[:m.cfg.max_position_embeddings - n_p - room]  # needle_task is +-3%
    n_c = len(context_ids)
    room = kvzip.max_reconstruction_len(tok, min(kvzip.CHUNK_SIZE, n_c))
    progress(f"scoring cost: prefill of {n_p} + {n_c:,} tokens")
    with PeakMemory(device, base) as mem_prefill:
        cache, t_prefill = timed(lambda: _prefill(m, prefix_ids + context_ids, n_p + n_c + room), device)
    progress(f"scoring cost: KVzip scoring of {n_c:,} tokens (chunks of {kvzip.CHUNK_SIZE})")
    with PeakMemory(device, base) as mem_score:
        scores, t_score = timed(lambda: kvzip.score_context(m, tok, cache, n_p, context_ids), device)
    kv = kvzip.FullKV(cache, scores, n_p, context_ids)
    # Prefill once more, after scoring, so that the two timings bracket it: other processes on this
    # machine come and go, and one run of each would compare two different machine loads.
    progress("scoring cost: prefill again (the prefill time is the mean of the runs before and after scoring)")
    _, t_prefill_after = timed(lambda: _prefill(m, prefix_ids + context_ids, n_p + n_c + room), device)
    row = dict(ctx=n_c, n_prefix=n_p, prefill_s=(t_prefill + t_prefill_after) / 2, scoring_s=t_score,
               prefill_runs_s=[t_prefill, t_prefill_after],
               prefill_peak_bytes=mem_prefill.peak, scoring_peak_bytes=mem_score.peak,
               peak_memory=mem_prefill.method, kv_bytes=kv.nbytes)
    return kv, probes, questions, row


def _prefill(m, ids, capacity):
    cache = m.new_cache(capacity=capacity)
    model_lib.prefill(m, ids, cache)
    return cache


def _first_line(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return _normalize(lines[0]) if lines else ""


def quality_row(m, tok, kv, probes, questions, ratio: float) -> dict:
    """Quality of the compressed cache relative to the full one, on the real context.

    relative_accuracy: needle probes the compressed cache answers right, among those the full cache
    answers right (the 135M default model misses some on its own, so absolute accuracy would
    measure the model); agreement: questions whose first answer line equals the full cache's.
    """
    ckv = kv.prune(ratio)
    full_right = both_right = agree = 0
    for i, (prompt, key) in enumerate(probes):
        progress(f"quality: pass-key probe {i + 1}/{len(probes)}, full and compressed cache")
        full = kvzip.generate(m, tok, prompt, kv, max_new_tokens=NEEDLE_MAX_NEW, template=False)
        comp = kvzip.generate(m, tok, prompt, ckv, max_new_tokens=NEEDLE_MAX_NEW, template=False)
        if check_answer(full, key):
            full_right += 1
            both_right += check_answer(comp, key)
    q_full = q_comp = 0
    for i, (question, answer) in enumerate(questions):
        progress(f"quality: question {i + 1}/{len(questions)}, full and compressed cache")
        full = kvzip.generate(m, tok, question, kv, max_new_tokens=QA_MAX_NEW)
        comp = kvzip.generate(m, tok, question, ckv, max_new_tokens=QA_MAX_NEW)
        agree += _first_line(full) == _first_line(comp)
        q_full += check_answer(full, answer)
        q_comp += check_answer(comp, answer)
    return dict(ratio=ratio, relative_accuracy=both_right / full_right if full_right else None,
                n_probes=len(probes), n_probes_full_right=full_right, n_probes_both_right=both_right,
                agreement=agree / len(questions) if questions else None, n_questions=len(questions),
                n_agree=agree, n_questions_full_right=q_full, n_questions_compressed_right=q_comp)


# -----------------------------------------------------------------------------
# ==== Quality and cache reuse vs query-aware baselines (`--quality`) ====
# ---- the reuse experiment: one compressed cache answers every query of its context ----
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


@torch.no_grad()
def _forward_rollback(m, cache, ids):
    """Logits (T, V) of ids run on top of cache (teacher-forced); the cache is rolled back after."""
    start = cache.seq_len
    try:
        return m(torch.tensor(ids, device=m.device), cache)
    finally:
        cache.truncate(start)


def _greedy_ids(m, tok, cache, q_ids, max_new):
    """What kvzip.generate does, returning token ids instead of text."""
    start = cache.seq_len
    cache.reserve(len(q_ids) + max_new)
    try:
        return model_lib.generate(m, q_ids, cache, max_new, tok.stop_ids)
    finally:
        cache.truncate(start)


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
        out += _greedy_ids(m, tok, cache, q_ids + out, max_new - len(out))
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
        t = needle_task(n_tokens, n_needles=n_needles, seed=1000 * seed + i, tok=tok)
        probes = random.Random(f"quality-needle-{seed}-{i}").sample(t["probes"], n_needles)  # asking order
        out.append(dict(kind="needle", context=t["context"], template=False, queries=probes))
    for i in range(cfg["fact_contexts"]):
        t = fact_task(cfg["fact_entities"], seed=1000 * seed + i, filler_words=cfg["fact_filler_words"])
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
    ref = [_greedy_ids(m, tok, kv.cache, ids, max_new) for ids in q_ids]
    right = [ctx["kind"] == "needle" and check_answer(tok.decode(r), a) for r, (_, a) in zip(ref, ctx["queries"])]
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
                right += check_answer(_answer(m, tok, cache, q_ids, ref, max_new), answer)
        else:
            agree += _first_line(_answer(m, tok, cache, q_ids, ref, max_new)) == _first_line(tok.decode(ref))
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


def run_quality(m, tok, ratios=QUALITY_RATIOS, methods=None, n_contexts=None, seed=0, quick=False,
                progress=True, **overrides) -> dict:
    """The reuse experiment. Returns {"rows": [{method, ratio, relative_accuracy, agreement,
    reconstruction_nll_ratio, n_probes, ...}], plus counts, settings and seconds}.

    n_contexts: contexts per task (needle and fact each; default from the preset); quick: the
    small preset; overrides: any QUALITY_PRESETS key (e.g. needle_tokens=(200,) for tests).
    A measure with nothing to count (no probe the full cache gets right) is None.
    """
    methods = tuple(methods or kvzip.METHODS)
    cfg = dict(QUALITY_PRESETS["quick" if quick else "default"], **overrides)
    if n_contexts is not None:
        cfg["needle_contexts"] = cfg["fact_contexts"] = n_contexts
    for r in ratios:
        kvzip.check_ratio(r)
    t0 = time.perf_counter()

    def log(msg):  # progress goes to stderr, so stdout stays the table / JSON
        if progress:
            print(f"[quality {time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    contexts = _quality_contexts(tok, cfg, seed)
    counts = {(meth, r): [] for meth in methods for r in ratios}  # one count dict per context
    per_context = []
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
                scores[key] = kvzip.method_scores(key, m, tok, kv, first_query, ctx["template"], seed=seed + ci)
        t2 = time.perf_counter()
        for r in ratios:
            res = None  # at ratio 1 every method keeps every pair: one cache, evaluated once
            for meth in methods:
                if r < 1 or res is None:
                    ckv = kvzip.compress(kv, meth, r, scores["snapkv" if meth == "pyramidkv" else meth])
                    res = _evaluate(m, tok, ckv, ctx, full)
                counts[(meth, r)].append(dict(res, probes=sum(right), full_nll=full["nll"],
                                              questions=n_q if ctx["kind"] == "fact" else 0))
        per_context.append(dict(kind=ctx["kind"], n_context=kv.n_context, n_queries=n_q,
                                full_right=sum(right), recon_tokens=full["n_tokens"],
                                full_nll_per_token=full["nll"] / max(1, full["n_tokens"])))
        log(f"context {ci + 1}/{len(contexts)} ({ctx['kind']}, {kv.n_context} tokens, {n_q} queries"
            + (f", {sum(right)} right with the full cache" if ctx["kind"] == "needle" else "")
            + f"): prefill + scoring {t2 - t1:.0f} s, evaluation {time.perf_counter() - t2:.0f} s")

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
                         relative_accuracy_ci95=_wilson_ci(sum(right), sum(probes)),
                         agreement_ci95=_wilson_ci(sum(agree), sum(qs)),
                         reconstruction_nll_ratio_ci95=_bootstrap_ci(nll, full_nll, seed)))
    needle = [c for c in per_context if c["kind"] == "needle"]
    fact = [c for c in per_context if c["kind"] == "fact"]
    return dict(
        rows=rows, methods=list(methods), ratios=list(ratios), seed=seed, quick=quick, config=cfg,
        n_contexts=len(contexts), n_needle_contexts=len(needle), n_fact_contexts=len(fact),
        n_probes_asked=sum(c["n_queries"] for c in needle),
        n_probes=sum(c["full_right"] for c in needle),  # those the full cache gets right: the denominator
        n_questions=sum(c["n_queries"] for c in fact),
        n_recon_tokens=sum(c["recon_tokens"] for c in per_context),
        full_nll_per_token=sum(c["full_nll_per_token"] for c in per_context) / max(1, len(per_context)),
        context_tokens=[c["n_context"] for c in per_context],
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
             f"{'method':<13}{'ratio':>6}  {'relative accuracy':>20}  {'agreement':>20}  "
             f"{'recon. NLL / full':>20}  {'n_probes':>8}"]
    for row in sorted(result["rows"], key=lambda x: (result["methods"].index(x["method"]), x["ratio"])):
        lines.append(f"{row['method']:<13}{row['ratio']:>6.2f}  "
                     f"{cell(row['relative_accuracy'], row['relative_accuracy_ci95'])}  "
                     f"{cell(row['agreement'], row['agreement_ci95'])}  "
                     f"{cell(row['reconstruction_nll_ratio'], row['reconstruction_nll_ratio_ci95'])}  "
                     f"{row['n_probes']:>8}")
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


# ==== end of the quality/reuse experiment ====


# -----------------------------------------------------------------------------
# The report: summary card, table, JSON

def _gb(n):
    return f"{n / GB:.2f} GB"


def _ms(s):
    return f"{s:,.1f} ms"


def _mark(ok):
    return "ok" if ok else "MISSED"


def format_report(res: dict) -> str:
    """Summary card, then one table: each row a pair of figures (A, B), their ratio B/A, the target."""
    geo, sc, q, d, mem = res["geometry"], res["scoring"], res["quality"], res["decode"], res["memory"]
    r, L = res["ratio"], geo["n_layers"]
    decode_note = ("" if d["dtype"] == geo["dtype"] else
                   f"; decode timed in {d['dtype']}, the project's dtype on this device")
    lines = [
        f"KVzip benchmark | {res['device_name']} | torch {torch.__version__} | "
        f"load average {res['load_average']} on {os.cpu_count()} CPUs",
        f"geometry {geo['name']}: {L} layers, {geo['n_heads']} query heads, {geo['n_kv_heads']} KV "
        f"heads, head dim {geo['head_dim']}, {geo['dtype']}",
        f"context --ctx {_ctx_text(res['ctx'])} = {res['ctx']:,} tokens (+ {res['n_prefix']} template "
        f"prefix tokens, never evicted); ratio {r} = fraction of context KV pairs kept",
        f"synthetic: random K/V at the target geometry (memory and decode rows{decode_note})",
        f"real: {res['model_name']} on a {sc['ctx']:,}-token haystack (scoring and quality rows; the "
        f"per-head budgets are the fractions its heads keep at ratio {r}, cycled over the target's "
        f"{L} x {geo['n_kv_heads']} KV heads)",
        "",
    ]
    exp = mem["expected_fraction"]
    mem_frac = mem["compressed_bytes"] / mem["full_bytes"]
    dec_frac = d["compressed_ms_per_layer"] / d["full_ms_per_layer"]
    t_frac = sc["scoring_s"] / sc["prefill_s"]
    m_frac = sc["scoring_peak_bytes"] / sc["prefill_peak_bytes"] if sc["prefill_peak_bytes"] > 0 else math.nan
    bw_full = d["full_gbps"] / d["device_gbps"]

    def row(label, a, b, ratio="", target=""):
        return f"{label:42}{a:>13}{b:>13}{ratio:>8}   {target}".rstrip()

    lines += [
        row("", "full cache", "compressed", "ratio", "target"),
        row(f"KV cache memory, {L} layers", _gb(mem["full_bytes"]), _gb(mem["compressed_bytes"]),
            f"{mem_frac:.3f}", f"{exp:.3f} expected (+-2%): {_mark(abs(mem_frac / exp - 1) <= 0.02)}"),
        row(f"decode attention, 1 layer (median of {d['reps']})", _ms(d["full_ms_per_layer"]),
            _ms(d["compressed_ms_per_layer"]), f"{dec_frac:.3f}",
            f"<= 0.40: {_mark(dec_frac <= 0.40)} (this layer keeps {d['layer_kept_fraction']:.3f} of its bytes)"),
        row("  K+V bytes read / latency", f"{d['full_gbps']:.2f} GB/s", f"{d['compressed_gbps']:.2f} GB/s", "",
            f"full >= 40% of the {d['device_gbps']:.2f} GB/s read: {bw_full:.0%}, {_mark(bw_full >= 0.40)}"),
        row("", "prefill", "scoring", "", ""),
        row(f"KVzip scoring cost, {sc['ctx']:,} real tokens", f"{sc['prefill_s']:.1f} s*", f"{sc['scoring_s']:.1f} s",
            f"{t_frac:.2f}", f"<= 2.5 (paper ~2): {_mark(t_frac <= 2.5)}"),
        row("  peak memory", f"{sc['prefill_peak_bytes'] / MB:,.0f} MB", f"{sc['scoring_peak_bytes'] / MB:,.0f} MB",
            f"{m_frac:.2f}", f"<= 1.2: {_mark(m_frac <= 1.2)}"),
        row("", "full cache", "compressed", "", ""),
        row(f"quality at ratio {r}: pass keys right", f"{q['n_probes_full_right']} of {q['n_probes']}",
            f"{q['n_probes_both_right']} of those", _fmt(q["relative_accuracy"]),
            "relative accuracy (paper: ~0.97 at 0.3)"),
        row("  questions answered right", f"{q['n_questions_full_right']} of {q['n_questions']}",
            f"{q['n_questions_compressed_right']} of {q['n_questions']}"),
        row("  same greedy answer as the full cache", "", f"{q['n_agree']} of {q['n_questions']}",
            _fmt(q["agreement"]), "agreement (first answer line, exact)"),
        row("  vs query-aware baselines (SnapKV, ...)", "", "", "", "python bench.py --quality"),
    ]
    tried = ", ".join(f"{n} {t:,.1f} ms" + ("" if n in d["timed_candidates"] else " (one run)")
                      for n, t in d["candidates_ms"].items())
    lines += [
        "",
        f"decode, full cache: {tried}; the fastest is used. Compressed: {d['compressed_path']}.",
        f"decode layer {d['layer']}: its kept total is nearest the mean over layers. Read bandwidth: "
        f"x.sum() over {READ_PROBE_BYTES // 2**20} MiB, timed in the same rounds.",
        f"peak memory: {sc['peak_memory']}: weights, caches and activations. * prefill: mean of "
        f"{' and '.join(f'{t:.1f}' for t in sc['prefill_runs_s'])} s, run before and after scoring.",
    ]
    if res.get("sweep"):
        lines += ["", f"sweep: {geo['name']} at {res['ctx']:,} tokens (full cache {_gb(mem['full_bytes'])}); "
                      "each row times its compressed layer side by side with the full one",
                  f"{'ratio':>6}{'KV memory':>12}{'/ full':>8}{'decode/layer':>14}{'full, same rounds':>19}"
                  f"{'/ full':>8}{'GB/s':>7}"]
        for row_ in res["sweep"]:
            lines.append(f"{row_['ratio']:>6}{_gb(row_['compressed_bytes']):>12}"
                         f"{row_['compressed_bytes'] / row_['full_bytes']:>8.3f}"
                         f"{_ms(row_['compressed_ms_per_layer']):>14}{_ms(row_['full_ms_per_layer']):>19}"
                         f"{row_['compressed_ms_per_layer'] / row_['full_ms_per_layer']:>8.3f}"
                         f"{row_['compressed_gbps']:>7.2f}")
    return "\n".join(lines)


def _ctx_text(n: int) -> str:
    """124000 -> '124k': the resolved --ctx echoed in the form it was probably typed."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


# -----------------------------------------------------------------------------
# main

def main(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = (_proc_status("VmRSS") or 0) if device.type == "cpu" else 0  # runtime, before the model
    reps = args.reps or (3 if args.quick else 30 if device.type == "cuda" else 15)
    n_needles, n_questions = (2, 1) if args.quick else (N_NEEDLES, N_QUESTIONS)

    progress(f"loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})")
    m, tok = model_lib.load(args.model)
    geo = get_geometry(args.geometry, m)
    limit = m.cfg.max_position_embeddings - len(tok.encode(tok.prefix)) - kvzip.max_reconstruction_len(tok)
    default_score = limit if device.type == "cuda" else QUICK_SCORE_CTX if args.quick else CPU_SCORE_CTX
    n_score = min(args.ctx, args.score_ctx or default_score, limit)
    if args.score_ctx and args.score_ctx > limit:
        progress(f"--score-ctx {args.score_ctx:,} is beyond the model's context limit: using {limit:,}")
    progress(f"--ctx {args.ctx:,} tokens; real-model context {n_score:,} tokens")

    # The real model first, before the big synthetic caches take memory (peaks are measured here).
    kv, probes, questions, scoring = real_run(m, tok, n_score, n_needles, n_questions, device, base)
    quality = quality_row(m, tok, kv, probes, questions, args.ratio)
    ratios = [args.ratio] + ([r for r in SWEEP_RATIOS if r != args.ratio] if args.sweep else [])
    fractions = {r: head_fractions(kv.scores, r).cpu() for r in ratios}
    n_p = kv.n_prefix
    quality_reuse = None
    if args.quality:
        quality_reuse = run_quality(m, tok, quick=args.quick)
        if plot_quality(quality_reuse, args.plot):
            progress(f"wrote {args.plot}")
        else:
            progress("matplotlib is not installed: no plot (optional; pip install matplotlib)")
    del kv

    kern = _kernels()
    decode_dtype = geo.torch_dtype if device.type == "cuda" else m.dtype
    rows = measure_geometry(geo, n_p, args.ctx, fractions, ratios, device, decode_dtype, reps, kern)
    main_row = rows[0]

    res = dict(
        ctx=args.ctx,
        ratio=args.ratio, device=device.type, device_name=_device_name(device),
        load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        model_name=args.model or "SmolLM2-135M-Instruct (default model)", n_prefix=n_p,
        geometry=dict(name=geo.name, n_layers=geo.n_layers, n_heads=geo.n_heads,
                      n_kv_heads=geo.n_kv_heads, head_dim=geo.head_dim, dtype=geo.dtype),
        memory=dict(full_bytes=main_row["full_bytes"], compressed_bytes=main_row["compressed_bytes"],
                    expected_fraction=main_row["expected_fraction"], synthetic=True),
        decode={k: main_row[k] for k in (
            "full_ms_per_layer", "compressed_ms_per_layer", "full_gbps", "compressed_gbps",
            "device_gbps", "full_path", "compressed_path", "layer", "layer_kept_fraction",
            "full_read_bytes", "compressed_read_bytes", "candidates_ms", "timed_candidates")}
        | dict(dtype=str(decode_dtype).removeprefix("torch."), reps=reps),
        scoring=scoring, quality=quality,
        sweep=sorted(rows, key=lambda row: -row["ratio"]) if args.sweep else None,
    )
    if quality_reuse is not None:  # the reuse experiment: rows under quality.rows, its counts beside them
        res["quality"]["rows"] = quality_reuse["rows"]
        res["quality"]["reuse"] = {k: v for k, v in quality_reuse.items() if k != "rows"}
    print(format_report(res))
    if quality_reuse is not None:
        print()
        print(format_quality_table(quality_reuse))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}")
    summary = dict(ctx=res["ctx"], ratio=res["ratio"], device=res["device"], geometry=geo.name,
                   memory_fraction=round(main_row["compressed_bytes"] / main_row["full_bytes"], 4),
                   decode_fraction=round(main_row["compressed_ms_per_layer"] / main_row["full_ms_per_layer"], 4),
                   scoring_over_prefill=round(scoring["scoring_s"] / scoring["prefill_s"], 3),
                   relative_accuracy=quality["relative_accuracy"])
    print(json.dumps(summary))
    return res


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
    main(parse_args())
