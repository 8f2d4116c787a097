"""Tests of tasks.py: the seeded haystack, needle and fact generators, and answer checking."""
import re

import pytest

import tasks


# -----------------------------------------------------------------------------
# tasks.py's haystack and task generators

NEEDLE_WORDS = set(tasks._NEEDLE_COLOURS) | set(tasks._NEEDLE_OBJECTS) | {"pass", "key"}


def test_haystack_deterministic_and_seeded():
    a = tasks.haystack(500, seed=0)
    assert a == tasks.haystack(500, seed=0)
    assert a != tasks.haystack(500, seed=1)
    assert tasks.haystack(1000, seed=0).startswith(a)  # prefix-stable
    assert abs(len(a.split()) - 500) <= 15
    assert "\n\n" in a and "\n\n\n" not in a


def test_haystack_filler_is_clean():
    text = tasks.haystack(20000, seed=3)
    assert not re.search(r"\d", text)
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not (words & NEEDLE_WORDS), words & NEEDLE_WORDS
    # every slot was filled
    assert "{" not in text and "}" not in text


def test_every_template_fills():
    # all slots named in templates exist (format raises KeyError otherwise): exercise many paragraphs
    gen = tasks._filler_sentences(7)
    seen = {next(gen)[0] for _ in range(2000)}
    assert len(seen) > 500


def test_needle_task_structure():
    t = tasks.needle_task(2000, n_needles=6, seed=5)
    ctx = t["context"]
    assert len(t["probes"]) == len(t["needles"]) == 6
    assert len({n["label"] for n in t["needles"]}) == 6
    assert len({n["label"].split()[0] for n in t["needles"]}) == 6  # distinct colours
    assert len({n["label"].split()[1] for n in t["needles"]}) == 6  # distinct objects
    positions = [ctx.index(n["sentence"]) for n in t["needles"]]
    assert positions == sorted(positions)  # in depth order
    frac = [p / len(ctx) for p in positions]
    assert 0.05 < frac[0] < 0.15 and 0.85 < frac[-1] < 0.95, frac
    for (prompt, answer), n in zip(t["probes"], t["needles"]):
        assert prompt == f"The pass key for the {n['label']} is"
        assert re.fullmatch(r"\d{5}", answer)
        assert ctx.count(answer) == 1 and ctx.count(prompt) == 1
        assert prompt + " " + answer + "." in ctx
    assert t == tasks.needle_task(2000, n_needles=6, seed=5)
    assert t["context"] != tasks.needle_task(2000, n_needles=6, seed=6)["context"]
    assert len(re.findall(r"\d+", ctx)) == 6  # the only digits are the keys


@pytest.mark.parametrize("n_tokens,n_needles", [(500, 2), (1000, 4), (4000, 4), (8000, 8)])
def test_needle_task_sized_by_tokenizer(gguf_tok, n_tokens, n_needles):
    class Enc:  # tasks.needle_task needs only .encode(str) -> list[int]
        def encode(self, s):
            return gguf_tok.encode(s).ids

    t = tasks.needle_task(n_tokens, n_needles=n_needles, seed=1, tok=Enc())
    n = len(gguf_tok.encode(t["context"]).ids)
    assert abs(n - n_tokens) <= 0.03 * n_tokens, n
    for _, answer in t["probes"]:
        assert t["context"].count(answer) == 1


def test_needle_task_accepts_a_tokenizers_object(gguf_tok):
    t = tasks.needle_task(1000, seed=1, tok=gguf_tok)  # .encode gives an Encoding; len() is its token count
    assert abs(len(gguf_tok.encode(t["context"]).ids) - 1000) <= 30


def test_needle_task_without_tokenizer(gguf_tok):
    t = tasks.needle_task(4000, seed=2)
    n = len(gguf_tok.encode(t["context"]).ids)
    assert 0.8 * 4000 < n < 1.2 * 4000, n


def test_tokens_per_word(gguf_tok):
    text = tasks.haystack(5000, seed=0)
    ratio = len(gguf_tok.encode(text).ids) / len(text.split())
    print(f"\nhaystack: {ratio:.3f} SmolLM2 tokens per word")
    assert abs(ratio - tasks._TOKENS_PER_WORD) < 0.15


# ---- facts and answer checking ----

def test_fact_task():
    t = tasks.fact_task(6, seed=0)
    assert t == tasks.fact_task(6, seed=0) and t != tasks.fact_task(6, seed=1)
    assert len(t["questions"]) == 24
    for q, a in t["questions"]:
        assert q.endswith("?") and a in t["context"]
    assert "lives in" in t["context"]
    big = tasks.fact_task(12, seed=4, filler_words=2000)
    assert 1800 < len(big["context"].split()) < 2400
    for e in big["entities"]:
        assert big["context"].count(e["place"]) == 1 and big["context"].count(e["name"]) == 1
    counts = [e["count"] for e in big["entities"]]
    assert len(set(counts)) == len(counts)


def test_check_answer():
    assert tasks.check_answer(" 48213.\nMore text", "48213")
    assert tasks.check_answer("The pass key is 48213!", "48213")
    assert not tasks.check_answer("482139", "48213")
    assert not tasks.check_answer("Something else\n48213", "48213")  # only the first line counts
    assert tasks.check_answer("\nPort Ellery, by the sea.", "Port Ellery")
    assert tasks.check_answer("She lives in port  ellery", "Port Ellery")
    assert not tasks.check_answer("", "x") and not tasks.check_answer("anything", "")


# ---- token kinds ----

def test_token_kind():
    for text, kind in [("The", "word"), (" 4", "digit"), ("2", "digit"), ("48213", "digit"), (",", "punct"),
                       (" ", "punct"), ("\n\n", "punct"), ("", "punct"), ("—", "punct"), ("x1", "word"),
                       (" é", "word"), ("٣", "digit"), (".\n", "punct")]:
        assert tasks.token_kind(text) == kind, text


def test_kept_by_kind():
    kinds = ["word", "digit", "digit", "punct", "word"]
    fr = tasks.kept_by_kind([1.0, 0.25, 0.0, 0.5, 0.0], kinds)
    assert fr == {"digit": 0.125, "punct": 0.5, "word": 0.5}
    assert list(fr) == list(tasks.TOKEN_KINDS)  # a fixed order, whatever the context's order
    assert tasks.kept_by_kind([0.5], ["word"]) == {"word": 0.5}  # absent kinds left out
    assert list(tasks.kept_by_kind([1, 0, 1], ["zzz", "word", "aaa"])) == ["word", "aaa", "zzz"]
    with pytest.raises(ValueError, match="kept has 2 positions"):
        tasks.kept_by_kind([0.5, 0.5], kinds)


def test_needle_task_key_digits():
    t = tasks.needle_task(1500, n_needles=12, seed=3, key_digits=3)
    keys = [n["key"] for n in t["needles"]]
    assert len(set(keys)) == 12 and all(len(k) == 3 and k.isdigit() and k[0] != "0" for k in keys)
    assert sorted(re.findall(r"\d+", t["context"])) == sorted(keys)  # the only digits are the keys
    assert [len(n["key"]) for n in tasks.needle_task(500, seed=3)["needles"]] == [5] * 4  # default: 5 digits
    for bad in (1, 10, 3.0, "3"):
        with pytest.raises(ValueError, match="key_digits"):
            tasks.needle_task(500, key_digits=bad)


def test_varied_needle_task(gguf_tok):
    t = tasks.varied_needle_task(1500, n_needles=16, seed=4, tok=gguf_tok)
    assert t == tasks.varied_needle_task(1500, n_needles=16, seed=4, tok=gguf_tok)
    assert t["context"] != tasks.varied_needle_task(1500, n_needles=12, seed=5, tok=gguf_tok)["context"]
    assert abs(len(gguf_tok.encode(t["context"]).ids) - 1500) <= 0.03 * 1500
    ctx, keys = t["context"], [a for _, a in t["probes"]]
    assert len(set(keys)) == 16 and all(len(k) == 3 for k in keys)
    assert sorted(re.findall(r"\d+", ctx)) == sorted(keys)  # the only digits are the keys
    assert len({p for p, _ in t["probes"]}) == 16  # every needle its own sentence
    for (probe, key), n in zip(t["probes"], t["needles"]):
        assert ctx.count(probe) == 1 and f"{probe} {key}" in ctx and n["sentence"].startswith(probe)
    positions = [ctx.index(n["sentence"]) for n in t["needles"]]
    assert positions == sorted(positions)  # in depth order
    for bad in (0, 17):
        with pytest.raises(ValueError, match="n_needles"):
            tasks.varied_needle_task(500, n_needles=bad)
    with pytest.raises(ValueError, match="key_digits"):
        tasks.varied_needle_task(500, key_digits=1)
