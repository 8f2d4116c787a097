"""
tasks.py: seeded long contexts for the tests, the benchmark and the experiments, and answer checking.

Everything here is written for this project (no third-party text) and uses the standard library
only, so every context is the same on every machine for a given seed:
  - haystack(n_words, seed)           filler prose: towns, rivers, gardens, trains, markets, weather
  - needle_task(n_tokens, n_needles)  labelled pass keys (5 digits, or key_digits) hidden at evenly spaced depths,
                                      with completion probes ("The pass key for the red door is")
  - varied_needle_task(n_tokens, ...)  numbers in needles that are each a different sentence
                                      ("The village well is exactly 417 feet deep."), with completion probes
  - fact_task(n_entities)             invented facts about invented people, with short questions
  - check_answer / first_line         how a generated answer is judged
  - token_kind / kept_by_kind         digits, punctuation/whitespace, words: what eviction keeps of each

The filler is grammatical but uneventful. It deliberately contains no digits, no "pass key", no
doors and none of the needle colours, so a needle's label and number occur only where we put them.
"""
import random
import re

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


def _sized_needle_context(n_tokens: int, seed: int, needles: list[str], depths: list[float], tok=None) -> str:
    """The seed's filler with the needle sentences inserted at `depths`, about n_tokens tokens in all.

    With `tok` (anything whose .encode(str) result has a len()) the context is within ~3% of
    n_tokens (binary search over whole filler sentences); without it we assume _TOKENS_PER_WORD.
    """
    sentences_n = needles
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
    return context


def needle_task(n_tokens: int, n_needles: int = 4, seed: int = 0, tok=None, key_digits: int = 5) -> dict:
    """Labelled pass keys hidden in filler prose of about n_tokens tokens.

    Needles read "The pass key for the red door is 48213." (distinct colours, distinct objects,
    distinct keys of key_digits digits, 5 by default) and sit at depths evenly spaced from 10% to
    90% of the filler, in that order. With `tok` (anything whose .encode(str) result has a len(): a list of ids, or a
    `tokenizers.Encoding`) the whole context is sized to be within ~3% of n_tokens (binary search
    over whole filler sentences, so this holds from about 300 tokens up; below that one sentence
    is more than 3%); without it we assume _TOKENS_PER_WORD.

    Returns {"context": str,
             "probes": [(prompt, answer), ...]   # completion prompts, e.g. ("The pass key for the red door is", "48213")
             "needles": [{"label", "key", "sentence", "depth"}, ...]}   # in context order
    """
    assert 1 <= n_needles <= len(_NEEDLE_COLOURS), f"n_needles must be in 1..{len(_NEEDLE_COLOURS)}"
    if not (isinstance(key_digits, int) and 2 <= key_digits <= 9):
        raise ValueError(f"key_digits must be an integer in 2..9, got {key_digits!r}")
    rng = random.Random(f"needles-{seed}")
    labels = [f"{c} {o}" for c, o in zip(rng.sample(_NEEDLE_COLOURS, n_needles),
                                         rng.sample(_NEEDLE_OBJECTS, n_needles))]
    keys = [str(k) for k in rng.sample(range(10 ** (key_digits - 1), 10 ** key_digits), n_needles)]  # distinct
    sentences_n = [_NEEDLE_TEMPLATE.format(label=lab, key=key) for lab, key in zip(labels, keys)]
    depths = [0.5] if n_needles == 1 else [0.1 + 0.8 * i / (n_needles - 1) for i in range(n_needles)]

    context = _sized_needle_context(n_tokens, seed, sentences_n, depths, tok)
    needles = [{"label": lab, "key": key, "sentence": s, "depth": d}
               for lab, key, s, d in zip(labels, keys, sentences_n, depths)]
    probes = [(_PROBE_TEMPLATE.format(label=n["label"]), n["key"]) for n in needles]
    return {"context": context, "probes": probes, "needles": needles}


# Needles of varied_needle_task: each its own sentence, so each probe's words occur once in the
# context (only the number differs from what the probe asks). The filler has no digits.
_VARIED_NEEDLES = [
    "The combination of the old lighthouse safe is {key}.",
    "The baker on Mill Lane sold exactly {key} loaves on the day of the fair.",
    "The night ferry ticket to the island costs {key} pennies.",
    "The tallest oak in the churchyard is {key} years old.",
    "The stationmaster's pocket watch has the serial number {key}.",
    "The lost parcel at the post office is marked with the number {key}.",
    "The shepherd on the eastern hill counted {key} sheep in his flock.",
    "The visiting painter sleeps at the inn in room number {key}.",
    "The toll for crossing the stone bridge was raised to {key} coins.",
    "The rowing club's fastest boat is registered as number {key}.",
    "The village well is exactly {key} feet deep.",
    "The organist has played the evening hymn {key} times this year.",
    "The kite festival on the downs drew {key} visitors last spring.",
    "The clock on the town hall has been wound {key} times since it was repaired.",
    "The potter fired {key} blue bowls for the harvest supper.",
    "The beekeeper's hives gave {key} jars of honey after the long summer.",
]


def varied_needle_task(n_tokens: int, n_needles: int = 8, seed: int = 0, tok=None, key_digits: int = 3) -> dict:
    """Numbers hidden in filler prose of about n_tokens tokens, each in a sentence of its own kind.

    Unlike needle_task, whose needles share one template ("The pass key for the red door is ..."),
    every needle here is a different sentence ("The village well is exactly 417 feet deep."), drawn
    without repetition from _VARIED_NEEDLES, with distinct numbers of key_digits digits, at depths
    evenly spaced from 10% to 90% of the filler. The probe is the sentence up to the number
    ("The village well is exactly"). A 135M model cannot tell many same-template needles apart
    even with its full cache (it answers with some other needle's key), so a probe measures what
    compression loses only when its needle is distinct; see the reuse experiment's presets.
    Sizing as needle_task. Returns the same keys as needle_task ("label": the probe).
    """
    if not 1 <= n_needles <= len(_VARIED_NEEDLES):
        raise ValueError(f"n_needles must be in 1..{len(_VARIED_NEEDLES)}, got {n_needles!r}")
    if not (isinstance(key_digits, int) and 2 <= key_digits <= 9):
        raise ValueError(f"key_digits must be an integer in 2..9, got {key_digits!r}")
    rng = random.Random(f"varied-needles-{seed}")
    templates = rng.sample(_VARIED_NEEDLES, n_needles)
    keys = [str(k) for k in rng.sample(range(10 ** (key_digits - 1), 10 ** key_digits), n_needles)]
    sentences_n = [t.format(key=k) for t, k in zip(templates, keys)]
    depths = [0.5] if n_needles == 1 else [0.1 + 0.8 * i / (n_needles - 1) for i in range(n_needles)]
    context = _sized_needle_context(n_tokens, seed, sentences_n, depths, tok)
    probes = [t[:t.index(" {key}")] for t in templates]
    needles = [{"label": p, "key": k, "sentence": s, "depth": d}
               for p, k, s, d in zip(probes, keys, sentences_n, depths)]
    return {"context": context, "probes": list(zip(probes, keys)), "needles": needles}


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


def first_line(text: str) -> str:
    """The first non-empty line of a generated answer, normalized (the part that is judged: the
    small default model often goes on with unrelated text after answering)."""
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return _normalize(lines[0]) if lines else ""


def check_answer(generated: str, answer: str) -> bool:
    """True if the answer appears in the first non-empty line of the generated text.

    Both sides are normalized (lower case, punctuation and extra whitespace removed) and matched
    on word boundaries, so "48213" matches " 48213." but not "482139".
    """
    ans = _normalize(answer)
    return bool(ans) and f" {ans} " in f" {first_line(generated)} "


# ---- token kinds: which kinds of token an eviction keeps ----

TOKEN_KINDS = ("digit", "punct", "word")


def token_kind(text: str) -> str:
    """The kind of one token's text: "word" if it has a letter; else "digit" if it has a digit;
    else "punct" (punctuation and/or whitespace, the empty string included). " 4" is a digit
    token, "x1" a word, "\\n\\n" and "," punct."""
    if any(c.isalpha() for c in text):
        return "word"
    if any(c.isdigit() for c in text):
        return "digit"
    return "punct"


def kept_by_kind(kept: list[float], kinds: list[str]) -> dict:
    """{kind: mean of kept[i] over the positions i of that kind}, kinds in TOKEN_KINDS order, then
    any others sorted; kinds absent from `kinds` are left out.

    kept[i] is the fraction of position i's (layer, KV head) pairs that an eviction keeps, so the
    result is the kept fraction of each kind's pairs, pooled over layers and heads (and over
    contexts, when the lists of several contexts of one model are concatenated)."""
    if len(kept) != len(kinds):
        raise ValueError(f"kept has {len(kept)} positions, kinds has {len(kinds)}")
    out = {}
    for kind in TOKEN_KINDS + tuple(sorted(set(kinds) - set(TOKEN_KINDS))):
        vals = [f for f, k in zip(kept, kinds) if k == kind]
        if vals:
            out[kind] = sum(vals) / len(vals)
    return out
