"""
Tests for explain.py (teaching material): the toy example against arithmetic written out here,
the HTML page parsed back and its data compared with kvzip.keep_mask and direct counts (and its
template: every placeholder filled, the shading logic only in the page's script; where chromium is
installed, the script run headless), token kinds, and the command line's failures.

Run: .venv/bin/python -m pytest -q test_explain.py   (CPU only, a few seconds; no default model:
the HTML and --explain runs use a tiny random checkpoint written here)
"""
import html
import json
import math
import os
import re
import shutil
import string
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import errors
import explain
import kvzip
import model

E4 = math.exp(4)


def softmax(logits):
    """Softmax of a short list of logits, by hand."""
    z = sum(math.exp(x) for x in logits)
    return [math.exp(x) / z for x in logits]


@pytest.fixture(scope="module")
def toy():
    return explain.toy_example()


# -----------------------------------------------------------------------------
# The toy example, checked by hand

# K' columns: <p> | A B C D | <p>' A' B' C' D' (prefix | context | the input's own keys).
# A matching key has logit 4 (q = 4e, k = 4e, sqrt(16) = 4), any other 0; row t sees the input's
# keys 0..t only. Head 0 looks for the next token (<p> -> A -> B -> C -> D -> <eos>); head 1 for
# the same token. The visible logits of each row:
HEAD0_LOGITS = [
    [0, 4, 0, 0, 0, 0],  # <p>': looks for A
    [0, 0, 4, 0, 0, 0, 0],  # A': looks for B
    [0, 0, 0, 4, 0, 0, 0, 0],  # B': looks for C
    [0, 0, 0, 0, 4, 0, 0, 0, 0],  # C': looks for D
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # D': looks for <eos>, which no key holds
]
HEAD1_LOGITS = [
    [4, 0, 0, 0, 0, 4],  # <p>': the prefix's <p> and its own key
    [0, 4, 0, 0, 0, 0, 4],
    [0, 0, 4, 0, 0, 0, 0, 4],
    [0, 0, 0, 4, 0, 0, 0, 0, 4],
    [0, 0, 0, 0, 4, 0, 0, 0, 0, 4],
]


def hand_probs(rows):
    return [softmax(r) + [0.0] * (10 - len(r)) for r in rows]  # masked keys get probability 0


def test_toy_ids(toy):
    assert toy["prefix_ids"] == [0] and toy["context_ids"] == [1, 2, 3, 4]
    assert toy["recon_ids"] == [0, 1, 2, 3, 4]  # FIRST_PROMPT -> one marker, postfix -> [], context
    assert toy["key_labels"] == ["<prompt>", "A", "B", "C", "D", "<prompt>'", "A'", "B'", "C'", "D'"]


def test_toy_tokenizer():
    tok = explain.toy_tokenizer()
    assert tok.encode("") == [] and tok.encode("\n\n") == []
    assert tok.encode("\n\nA C") == [1, 3]
    # the template opener + KVzip's instruction: unknown text, one marker
    assert tok.encode(tok.prefix) == kvzip.prefix_ids(tok) == [0]
    assert tok.decode([1, 2, 5]) == "A B"


def test_toy_logits_and_probs_by_hand(toy):
    for g, rows in enumerate((HEAD0_LOGITS, HEAD1_LOGITS)):
        logits = toy["logits"][0, g]  # (n_q, n_k)
        for t, row in enumerate(rows):
            assert logits[t, :len(row)].tolist() == pytest.approx(row, abs=1e-5)
            assert torch.isinf(logits[t, len(row):]).all()  # the causal mask
        assert toy["probs"][0, g].tolist() == [pytest.approx(r, abs=1e-6) for r in hand_probs(rows)]


def test_toy_scores_by_hand(toy):
    probs = hand_probs(HEAD0_LOGITS) + hand_probs(HEAD1_LOGITS)  # rows of both query heads
    expected = [max(row[j] for row in probs) for j in range(1, 5)]  # context columns A..D
    # in closed form: head 0's row before token j sees 6 + j keys, one of them matching
    assert expected == pytest.approx([E4 / (E4 + 5 + j) for j in range(4)], abs=1e-12)
    assert toy["scores"][0, 0].tolist() == pytest.approx(expected, abs=1e-6)  # kvzip's own scorer
    assert toy["scores_recomputed"][0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    # head 1 loses the max: its match is shared with the input's own copy of the token
    head1 = toy["probs"][0, 1, :, 1:5].amax(dim=0).tolist()
    assert head1 == pytest.approx([E4 / (2 * E4 + 5 + j) for j in range(4)], abs=1e-6)


def test_toy_prune_half(toy):
    assert toy["order"].tolist() == [0, 1, 2, 3]  # A > B > C > D
    assert toy["k_kept"] == 2
    assert toy["keep"].tolist() == [[[True, True, False, False]]]  # A and B survive
    assert toy["head_lengths"].tolist() == [[3]]  # the prefix + A + B
    assert toy["bytes_full"] == 2 * 5 * 16 * 4  # K and V, 5 positions, 16 dims, float32
    assert toy["bytes_compressed"] == 2 * 3 * 16 * 4 + 2 * 8  # 3 kept rows + the (2,) int64 offsets
    assert toy["answers"] == {"A": ("B C D", "B"), "C": ("D", "")}  # C and D were evicted


def test_token_scores_on_the_toy(toy):
    pairs = explain.token_scores(toy["kv"], toy["tok"], 0, 0)
    assert [t for t, _ in pairs] == ["A", "B", "C", "D"]
    assert [s for _, s in pairs] == pytest.approx([E4 / (E4 + 5 + j) for j in range(4)], abs=1e-6)
    with pytest.raises(ValueError, match="layer must be"):
        explain.token_scores(toy["kv"], toy["tok"], 1, 0)
    # one chunk, from scores passed in (as inside score_context, before kv.scores is set)
    other = torch.arange(4.0).view(1, 1, 4)
    assert explain.token_scores(toy["kv"], toy["tok"], 0, 0, scores=other, start=1, end=3) == [("B", 1.0), ("C", 2.0)]
    with pytest.raises(ValueError, match="start <= end"):
        explain.token_scores(toy["kv"], toy["tok"], 0, 0, start=3, end=5)


def test_toy_cli(capsys):
    explain.main(["--toy"])
    out = capsys.readouterr().out
    assert "A 0.9161   B 0.9010   C 0.8864   D 0.8722" in out
    assert "the same numbers" in out
    assert "keeps round(0.5·4) = 2 pairs: A B; evicts: C D" in out
    assert "query 'A': full cache -> 'B C D'   compressed -> 'B'" in out
    assert "so B = e^4/(e^4 + 6) = 0.9010" in out
    assert "= 62.5% of the full cache at ratio 0.5" in out and "(3 of 5 rows kept)" in out  # 400 / 640


# -----------------------------------------------------------------------------
# Token kinds

class FakeTok:
    texts = ["The", " 4", "2", ",", " ", "\n\n", "x1", "—"]

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_token_kinds_and_kept_by_kind():
    kinds = explain.token_kinds(FakeTok(), range(8))
    assert kinds == ["word", "digit", "digit", "punct", "punct", "punct", "word", "punct"]
    keep = torch.zeros(2, 2, 8, dtype=torch.bool)  # (L, Hkv, n_c)
    keep[:, :, 0] = True  # "The": 4 of 4 pairs
    keep[0, 0, 1] = True  # " 4": 1 of 4
    keep[1, :, 3] = True  # ",": 2 of 4
    fr = explain.kept_by_kind(keep, kinds)
    assert fr == pytest.approx({"digit": (1 / 4 + 0) / 2, "punct": (0 + 2 / 4 + 0 + 0) / 4,
                                "word": (1 + 0) / 2})
    assert list(fr) == ["digit", "punct", "word"]
    assert explain.kept_by_kind(keep[..., :1], kinds[:1]) == {"word": 1.0}  # absent kinds left out
    with pytest.raises(ValueError):
        explain.kept_by_kind(keep, kinds[:3])


# -----------------------------------------------------------------------------
# The HTML page

class Page(HTMLParser):
    """Collects the token spans (class "tok"), the heatmap cells (class "cell") and the JSON data
    block (<script id="data">) of the page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens, self.cells, self.tags, self.data, self._cur = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        classes = (a.get("class") or "").split()
        if "tok" in classes or "cell" in classes:
            self._cur = {"kind": "tok" if "tok" in classes else "cell", "attrs": a, "text": ""}
        elif tag == "script" and a.get("id") == "data":
            self._cur = {"kind": "data", "text": ""}

    def handle_data(self, data):
        if self._cur is not None:
            self._cur["text"] += data

    def handle_endtag(self, tag):
        if self._cur is None or tag not in ("span", "td", "script"):
            return
        if self._cur["kind"] == "data":
            self.data = json.loads(self._cur["text"])
        else:
            (self.tokens if self._cur["kind"] == "tok" else self.cells).append(self._cur)
        self._cur = None


def bit(hex_row: str, i: int) -> bool:
    """Bit i of an explain.hex_bits row, read as the page's script reads it."""
    return bool((int(hex_row[i // 4], 16) >> (3 - i % 4)) & 1)


def direct_bins(mask):
    """kept_counts' five bins counted token by token, by the kept fraction c / LH:
    [all, half or more, 10% to half, under 10%, none]."""
    L, Hkv, n_c = mask.shape
    LH, out = L * Hkv, [0] * 5
    for i in range(n_c):
        c = sum(bool(mask[l, h, i]) for l in range(L) for h in range(Hkv))
        out[0 if c == LH else 1 if c / LH >= 0.5 else 2 if c / LH >= 0.1 else 3 if c > 0 else 4] += 1
    return out


def bins_by_kind(bins):
    """kept_counts' (label, n) list as the five bins of direct_bins (a bin left out counts 0)."""
    out = [0] * 5
    for label, n in bins:
        out[0 if label.startswith("all") else 1 if "half or more" in label else 3 if "under 10%" in label
            else 4 if label == "none" else 2] += n
    return out


def check_page(path, tokens, scores, ratios):
    """The page parsed back: its tokens, and every number of its data against kvzip.keep_mask."""
    text = Path(path).read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    L, Hkv, n_c = scores.shape
    d = page.data
    assert [int(t["attrs"]["data-i"]) for t in page.tokens] == list(range(n_c))  # each token once
    assert [t["text"] for t in page.tokens] == list(tokens)
    assert (d["L"], d["Hkv"], d["n_c"]) == (L, Hkv, n_c)
    assert d["ratios"] == [f"{r:g}" for r in ratios] and sorted(d["at"]) == sorted(d["ratios"])
    assert [(int(c["attrs"]["data-l"]), int(c["attrs"]["data-h"])) for c in page.cells] == \
        [(l, h) for h in range(Hkv) for l in range(L)]  # rows: heads, columns: layers
    for c in page.cells:  # head j is layer-major
        assert int(c["attrs"]["data-j"]) == int(c["attrs"]["data-l"]) * Hkv + int(c["attrs"]["data-h"])
    for l in range(L):  # every pair's score, to 3 significant digits
        for h in range(Hkv):
            assert d["scores"][l * Hkv + h] == pytest.approx(scores[l, h].tolist(), rel=5e-3, abs=1e-30)
    for i, (best, bl, bh) in enumerate(d["best"]):
        assert best == pytest.approx(float(scores[:, :, i].max()), rel=5e-3)
        assert float(scores[bl, bh, i]) == float(scores[:, :, i].max())
    kinds = [explain.tasks.token_kind(t) for t in tokens]
    for r in ratios:
        at = d["at"][f"{r:g}"]
        mask = kvzip.keep_mask(scores, r)  # the rule prune uses
        for l in range(L):
            for h in range(Hkv):
                assert [bit(at["keep"][l * Hkv + h], i) for i in range(n_c)] == mask[l, h].tolist()
                assert at["budget"][l * Hkv + h] == int(mask[l, h].sum())
        assert at["count"] == [int(mask[:, :, i].sum()) for i in range(n_c)]
        assert at["k"] == round(r * L * Hkv * n_c) == int(mask.sum())
        if at["k"]:
            kth = sorted(scores.reshape(-1).tolist(), reverse=True)[at["k"] - 1]
            assert at["threshold"] == pytest.approx(kth, rel=1e-3)
        else:  # a tiny ratio of a short context keeps nothing: no threshold
            assert at["threshold"] is None and "no pair kept" in at["summary"]
        assert bins_by_kind(at["bins"]) == direct_bins(mask)
        assert f"keeps {at['k']:,} of the {L * Hkv * n_c:,} context KV pairs" in at["summary"]
        assert at["kinds"] == pytest.approx(explain.kept_by_kind(mask, kinds))
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"https?:|//[a-z]|@import|url\(", text)
    assert not any(tag in ("link", "img", "iframe") or "src" in a for tag, a in page.tags)
    return text, page


def test_hex_bits():
    assert explain.hex_bits([1, 0, 1, 1, 1]) == "b8" and explain.hex_bits([]) == ""
    assert explain.hex_bits([0, 0, 0, 1] * 2 + [1, 1, 1, 1]) == "11f"
    g = torch.Generator().manual_seed(1)
    row = (torch.rand(37, generator=g) < 0.5).tolist()
    assert [bit(explain.hex_bits(row), i) for i in range(37)] == row


def test_kept_counts_by_hand():
    """6 layer-heads: 10% of them is 0.6 heads, so there is no "under 10%" bin."""
    mask = torch.zeros(3, 2, 5, dtype=torch.bool)  # (L, Hkv, n_c)
    mask[:, :, 0] = True  # all 6
    mask[0, 0, 1] = True  # 1 of 6: 17%
    mask[:2, :, 2] = True  # 4 of 6
    mask[:, 0, 3] = True  # 3 of 6: half
    assert explain.kept_counts(mask) == [("all 6", 1), ("3-5 (half or more)", 2), ("1-2", 1), ("none", 1)]
    big = torch.zeros(30, 3, 4, dtype=torch.bool)  # 90 layer-heads: under 10% is 1 to 8 heads
    big.view(90, 4)[:8, 0] = True
    big.view(90, 4)[:9, 1] = True
    big.view(90, 4)[:45, 2] = True
    assert explain.kept_counts(big) == [("all 90", 0), ("45-89 (half or more)", 1), ("9-44", 1),
                                        ("1-8 (under 10%)", 1), ("none", 1)]


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 7), Hkv=st.integers(1, 4), n_c=st.integers(1, 30), ratio=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_kept_counts_match_a_direct_count(L, Hkv, n_c, ratio, seed):
    scores = torch.rand(L, Hkv, n_c, generator=torch.Generator().manual_seed(seed))
    mask = kvzip.keep_mask(scores, ratio)
    bins = explain.kept_counts(mask)
    assert bins_by_kind(bins) == direct_bins(mask)
    assert sum(n for _, n in bins) == n_c and bins[-1][0] == "none" and bins[0][0] == f"all {L * Hkv}"


def test_html_escapes_and_round_trips(tmp_path):
    tokens = ["Hello", " <b>bold</b>", " &amp;", "\n\n", "  ", "\"q\"", " 4", "2", ".", "</script>"]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, len(tokens), generator=g) ** 4
    scores[0, 0, :3] = 0.5  # ties: keep_mask breaks them by index; the page must agree
    path = tmp_path / "kept.html"
    ratios = (0.1, 0.3, 0.5)
    res = explain.write_kept_html(path, tokens, scores, ratios, selected=0.3, n_prefix=2, prefix_text="<sys>")
    text, page = check_page(path, tokens, scores, ratios)
    assert "<b>bold" not in text and text.count("</script>") == 2  # escaped, not markup
    assert sorted(res["kinds"]) == [0.1, 0.3, 0.5] and res["ratios"] == ["0.1", "0.3", "0.5"]
    radios = [a for tag, a in page.tags if tag == "input"]
    assert [a["value"] for a in radios] == ["0.1", "0.3", "0.5"]
    assert [("checked" in a) for a in radios] == [False, True, False]
    # a ratio off the list is added to it
    explain.write_kept_html(path, tokens, scores, ratios, selected=0.25)
    check_page(path, tokens, scores, (0.1, 0.25, 0.3, 0.5))


def test_html_when_a_ratio_keeps_nothing(tmp_path):
    """round(0.1 * 3) = 0 pairs: every token is struck through, and there is no threshold."""
    path = tmp_path / "kept.html"
    scores = torch.tensor([[[0.5, 0.2, 0.9]]])
    explain.write_kept_html(path, ["a", " b", " c"], scores, (0.1, 0.7))
    _, page = check_page(path, ["a", " b", " c"], scores, (0.1, 0.3, 0.7))
    assert page.data["at"]["0.1"]["count"] == [0, 0, 0] and page.data["at"]["0.1"]["k"] == 0


def test_html_template_placeholders_are_all_filled(tmp_path, monkeypatch):
    """The page is explain_page.html with every placeholder filled with data; the template is
    found next to explain.py, whatever the current folder."""
    template = (Path(explain.__file__).parent / "explain_page.html").read_text(encoding="utf-8")
    names = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(template)} - {None}
    assert {"title", "note", "radios", "heatmap", "kinds", "n_c", "tokens", "prefix", "data"} <= names
    monkeypatch.chdir(tmp_path)  # a folder without the template
    path = tmp_path / "kept.html"
    explain.write_kept_html(path, ["a", " b", "\n"], torch.rand(2, 1, 3), (0.5,), title="Title & co",
                            n_prefix=1, prefix_text="sys", note="A note.")
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\$\{?[A-Za-z_]", text)  # no placeholder left over
    assert "<h1>Title &amp; co</h1>" in text and "alone keeps. A note.</p>" in text
    assert "The context (3 tokens)" in text and "<pre>sys</pre>" in text


def test_html_shading_logic_exists_once(tmp_path):
    """The colours and numbers are drawn by the page's script alone: Python writes no colour
    (explain.py has no shading function) and leaves the cells' and tokens' looks to the script."""
    source = Path(explain.__file__).read_text(encoding="utf-8")
    assert "hsl" not in source and "def _shade" not in source
    path = tmp_path / "kept.html"
    explain.write_kept_html(path, ["a", " b", "c"], torch.rand(2, 2, 3), (0.3, 0.7))
    text = path.read_text(encoding="utf-8")
    assert text.count("function shade(") == 1
    markup = text[text.index("<body>"):text.index("<script")]
    assert "style=" not in markup and "hsl" not in markup and "title=" not in markup
    page = Page()
    page.feed(text)
    assert len(page.cells) == 4 and all(c["text"] == "" for c in page.cells)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_the_page_draws_in_headless_chromium(tmp_path):
    """The script runs to its end in a real browser, for the whole page and for one head, and
    writes what the data says: the summary, each cell's number, each token's tooltip."""
    g = torch.Generator().manual_seed(2)
    tokens = ["The", " key", " is", " 4", "2", ".", "\n", "Done"]
    scores = torch.rand(3, 2, len(tokens), generator=g)
    path = tmp_path / "kept.html"
    data = explain.write_kept_html(path, tokens, scores, (0.1, 0.5), selected=0.5)

    def dom(view):
        r = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                            "--v=0", "--dump-dom", f"file://{path}#{view}"], capture_output=True, text=True, timeout=120)
        assert "Uncaught" not in r.stderr, r.stderr  # a JavaScript error, as chromium's console logs it
        page = Page()
        page.feed(r.stdout)
        return r.stdout, page

    out, page = dom("ratio=0.1")
    assert 'data-drawn="yes"' in out, out[-2000:]
    at = data["at"]["0.1"]
    assert html.escape(at["summary"], quote=False) in out
    assert [int(c["text"].replace("<1", "0")) for c in page.cells] == \
        [math.floor(100 * at["budget"][int(c["attrs"]["data-j"])] / len(tokens) + 0.5) for c in page.cells]  # JS Math.round
    for t in page.tokens:
        i = int(t["attrs"]["data-i"])
        assert f"kept by {at['count'][i]} of 6 layer-heads at ratio 0.1" in t["attrs"]["title"]
        assert ("gone" in t["attrs"]["class"]) == (at["count"][i] == 0)
    out, page = dom("ratio=0.5&head=1.0")  # layer 1, KV head 0: head j = 1 * Hkv + 0 = 2
    at, mask = data["at"]["0.5"], kvzip.keep_mask(scores, 0.5)[1, 0]
    assert 'data-drawn="yes"' in out and f"layer 1, KV head 0 keeps {int(mask.sum())} of the 8" in out
    assert [("gone" in t["attrs"]["class"]) for t in page.tokens] == [not k for k in mask.tolist()]
    assert [" on" in c["attrs"]["class"] for c in page.cells] == [c["attrs"]["data-j"] == "2" for c in page.cells]


CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN = ["Given the context, answer to the following question or request without explanation.",
         "Repeat the previous context exactly. Repeat the part of the previous context exactly, starting with",
         "You are a helpful assistant. system user assistant",
         "The pass key for the red door is 48213. The gardeners of Heronmere compare their cabbages."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (2 layers, 4 query heads, 2 KV heads) with a byte-level
    BPE tokenizer trained here: Hugging Face layout, loads through model.load."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tiny")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TRAIN * 4, trainers.BpeTrainer(
        vocab_size=350, special_tokens=CHATML, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.save(str(d / "tokenizer.json"))
    V, C, H, Hkv, D, L, I = tk.get_vocab_size(), 32, 4, 2, 8, 2, 48
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=C, intermediate_size=I,
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hkv, rms_norm_eps=1e-5,
        max_position_embeddings=2048, tie_word_embeddings=True, hidden_act="silu")))
    g = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(V, C, generator=g) * 0.3, "model.norm.weight": torch.ones(C)}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (H * D, C)), ("self_attn.k_proj", (Hkv * D, C)),
                            ("self_attn.v_proj", (Hkv * D, C)), ("self_attn.o_proj", (C, H * D)),
                            ("mlp.gate_proj", (I, C)), ("mlp.up_proj", (I, C)), ("mlp.down_proj", (C, I))):
            w[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
        w[p + "input_layernorm.weight"] = torch.ones(C)
        w[p + "post_attention_layernorm.weight"] = torch.ones(C)
    save_file(w, str(d / "model.safetensors"))
    ctx = d / "context.txt"
    ctx.write_text("The gardeners of Heronmere compare their cabbages <every> summer & winter.\n\n"
                   "The pass key for the red door is 48213.  Repeat: it is 48213!\n", encoding="utf-8")
    return d


def test_html_cli_matches_keep_mask(tiny_dir, tmp_path, capsys):
    out = tmp_path / "kept.html"
    explain.main(["--html", str(out), "--model", str(tiny_dir), "--context", str(tiny_dir / "context.txt"),
                  "--ratio", "0.25"])
    stdout = capsys.readouterr().out
    assert "wrote" in stdout and "by token kind: digit" in stdout
    m, tok = model.load(tiny_dir)
    kv = kvzip.prefill(m, tok, (tiny_dir / "context.txt").read_text(encoding="utf-8"))
    tokens = explain.token_texts(tok, kv.context_ids)
    assert "".join(tokens) == tok.decode(kv.context_ids)
    assert any("\n" in t for t in tokens) and any("<" in t for t in tokens)
    check_page(out, tokens, kv.scores, sorted(explain.HTML_RATIOS + (0.25,)))


def test_explain_cli_on_a_tiny_model(tiny_dir, capsys):
    explain.main(["--explain", "--model", str(tiny_dir), "--context", str(tiny_dir / "context.txt"),
                  "--chunk-size", "16", "--query", "What is the pass key?"])
    out = capsys.readouterr().out
    for step in ("1. The pieces", "chunk 1: context [16, 32)", "4. Scores S (L, Hkv, n_c) = (2, 2, ",
                 "threshold (the k-th largest score)", "6. Bytes", "7. Kept by token kind", "'What is the pass key?'",
                 "not 30%: the ratio counts context pairs only"):
        assert step in out, step
    # the byte arithmetic printed in step 6 holds: kept context pairs + every prefix pair
    m, tok = model.load(tiny_dir)
    kv = kvzip.prefill(m, tok, (tiny_dir / "context.txt").read_text(encoding="utf-8"), chunk_size=16)
    L, Hkv = m.cfg.n_layer, m.cfg.n_kv_head
    k, rows = round(0.3 * L * Hkv * kv.n_context), L * Hkv * (kv.n_prefix + kv.n_context)
    assert f"{k:,} + {L * Hkv * kv.n_prefix:,} prefix = {k + L * Hkv * kv.n_prefix:,} of {rows:,} rows" in out


# -----------------------------------------------------------------------------
# The command line's failures: one line on stderr naming the option, before any model work;
# exit code 2 for a wrong command line, 1 for a file or checkpoint that cannot be used

@pytest.fixture
def no_model_load(monkeypatch):
    """model.load replaced by a trap: these cases must fail before any model work."""
    def trap(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(model, "load", trap)


def run_cli(argv, capsys):
    """explain.py's command line as `python explain.py` runs it (errors.run): (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        errors.run(explain.main, argv, prog="explain.py")
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "secret.txt").write_text("hidden")
    return tmp_path


@pytest.mark.parametrize("argv, code, words", [
    ([], 2, ["one of the arguments --toy --explain --html is required"]),
    (["--toy", "--explain"], 2, ["not allowed with argument"]),
    (["--toy", "--ratio", "1.5"], 2, ["--ratio", "ratio must be in (0, 1]"]),
    (["--toy", "--ratio", "0"], 2, ["--ratio", "ratio must be in (0, 1]"]),
    (["--toy", "--context", "x.txt"], 2, ["--toy uses its own model and context"]),
    (["--explain", "--chunk-size", "4"], 2, ["--chunk-size must be at least 8"]),
    (["--explain", "--query", "why?"], 2, ["--query goes with --explain --context FILE"]),
    (["--explain", "--context", "{d}/secret.txt", "--query", " "], 2, ["--query ' ': empty question"]),
    (["--html", "/no/such/folder/kept.html"], 2, ["--html /no/such/folder/kept.html", "does not exist"]),
    (["--html", "{d}/folder"], 2, ["--html", "folder", "is a folder, expected a file name"]),
    (["--html", "{d}/locked/kept.html"], 2, ["--html", "locked", "is not writable"]),
    (["--html", "{d}/kept.html", "--model", "/no/such/model"], 2, ["--model /no/such/model", "no such folder"]),
    (["--explain", "--context", "/no/such/file.txt"], 1, ["--context /no/such/file.txt", "No such file"]),
    (["--html", "{d}/kept.html", "--context", "{d}/secret.txt"], 1, ["--context", "secret.txt", "Permission denied"]),
    (["--html", "{d}/kept.html", "--context", "{d}/empty.txt"], 1, ["--context", "empty.txt", "empty"]),
    (["--html", "{d}/kept.html", "--context", "{d}/latin1.txt"], 1, ["--context", "latin1.txt", "not UTF-8"]),
    (["--html", "{d}/kept.html", "--context", "{d}/folder"], 1, ["--context", "is a folder"]),
])
def test_bad_arguments_fail_in_one_line_before_loading(argv, code, words, files, no_model_load,
                                                       monkeypatch, capsys):
    (files / "locked").chmod(0o500)
    (files / "secret.txt").chmod(0o000)
    if os.geteuid() == 0:  # root reads and writes past permission bits: refuse as a user would be
        real_access = os.access
        monkeypatch.setattr(errors.os, "access", lambda p, mode: False if Path(p).name == "locked"
                            else real_access(p, mode))
        real_read = Path.read_bytes
        def read_bytes(self):
            if self.name == "secret.txt":
                raise PermissionError(13, "Permission denied", str(self))
            return real_read(self)
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    got, err = run_cli([a.format(d=files) for a in argv], capsys)
    assert (got, len(err)) == (code, 1), err
    assert err[0].startswith("explain.py: error: "), err
    for w in words:
        assert w in err[0], (w, err)
    assert not (files / "kept.html").exists()


def test_a_model_of_another_architecture_fails_in_one_line(tiny_dir, tmp_path, capsys):
    """A checkpoint that cannot be used is exit code 1, in the message style of every command."""
    ckpt = tmp_path / "mistral"
    ckpt.mkdir()
    for f in tiny_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    out = tmp_path / "kept.html"
    for argv in (["--html", str(out)], ["--explain"]):
        got, err = run_cli(argv + ["--model", str(ckpt)], capsys)
        assert (got, len(err)) == (1, 1), err
        assert err[0].startswith(f"explain.py: error: {ckpt / 'config.json'}: unsupported architecture "
                                 "'MistralForCausalLM'"), err
    assert not out.exists()
