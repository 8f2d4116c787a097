"""
Tests for explain.py (teaching material): the toy example against arithmetic written out here,
the HTML page parsed back and compared with kvzip.keep_mask (and its template: every placeholder
filled, the shading logic only in the page's script), token kinds, and the command line.

Run: .venv/bin/python -m pytest -q test_explain.py   (CPU only, a few seconds; no default model:
the HTML and --explain runs use a tiny random checkpoint written here)
"""
import json
import math
import os
import re
import string
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

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
    """Collects the token spans (class "tok") and heatmap cells (class "cell") of the page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens, self.cells, self.tags, self._cur = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        classes = (a.get("class") or "").split()
        if "tok" in classes or "cell" in classes:
            self._cur = {"kind": "tok" if "tok" in classes else "cell", "attrs": a, "text": ""}

    def handle_data(self, data):
        if self._cur is not None:
            self._cur["text"] += data

    def handle_endtag(self, tag):
        if self._cur is not None and tag in ("span", "td"):
            (self.tokens if self._cur["kind"] == "tok" else self.cells).append(self._cur)
            self._cur = None


def parse_kept(attr: str) -> dict:
    return {float(r): float(f) for r, f in (p.split(":") for p in attr.split())}


def check_page(path, tokens, scores, ratios):
    text = Path(path).read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    L, Hkv, n_c = scores.shape
    assert [int(t["attrs"]["data-i"]) for t in page.tokens] == list(range(n_c))  # each token once
    assert [t["text"] for t in page.tokens] == list(tokens)
    for r in ratios:
        keep = kvzip.keep_mask(scores, r).float()  # the rule prune uses
        per_token = keep.mean(dim=(0, 1))
        for t in page.tokens:
            i = int(t["attrs"]["data-i"])
            assert parse_kept(t["attrs"]["data-kept"])[r] == pytest.approx(float(per_token[i]), abs=5e-5)
        budgets = keep.mean(dim=-1)  # (L, Hkv)
        assert len(page.cells) == L * Hkv
        for c in page.cells:
            l, h = int(c["attrs"]["data-l"]), int(c["attrs"]["data-h"])
            assert parse_kept(c["attrs"]["data-kept"])[r] == pytest.approx(float(budgets[l, h]), abs=5e-5)
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"https?:|//[a-z]|@import|url\(", text)
    assert not any(tag in ("link", "img", "iframe") or "src" in a for tag, a in page.tags)
    return text, page


def test_html_escapes_and_round_trips(tmp_path):
    tokens = ["Hello", " <b>bold</b>", " &amp;", "\n\n", "  ", "\"q\"", " 4", "2", "."]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, len(tokens), generator=g)
    scores[0, 0, :3] = 0.5  # ties: keep_mask breaks them by index; the page must agree
    path = tmp_path / "kept.html"
    ratios = (0.1, 0.3, 0.5)
    res = explain.write_kept_html(path, tokens, scores, ratios, selected=0.3, n_prefix=2, prefix_text="<sys>")
    text, page = check_page(path, tokens, scores, ratios)
    assert "<b>bold" not in text  # escaped, not markup
    assert sorted(res["kept"]) == [0.1, 0.3, 0.5]
    radios = [a for tag, a in page.tags if tag == "input"]
    assert [a["value"] for a in radios] == ["0.1", "0.3", "0.5"]
    assert [("checked" in a) for a in radios] == [False, True, False]
    assert all(a["data-summary"].startswith("keeps ") for a in radios)  # the line the script shows
    # a ratio off the list is added to it
    explain.write_kept_html(path, tokens, scores, ratios, selected=0.25)
    check_page(path, tokens, scores, (0.1, 0.25, 0.3, 0.5))


def test_html_template_placeholders_are_all_filled(tmp_path, monkeypatch):
    """The page is explain_page.html with every placeholder filled with data; the template is
    found next to explain.py, whatever the current folder."""
    template = (Path(explain.__file__).parent / "explain_page.html").read_text(encoding="utf-8")
    names = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(template)} - {None}
    assert {"title", "note", "radios", "heatmap", "kinds", "n_c", "tokens", "prefix"} <= names
    monkeypatch.chdir(tmp_path)  # a folder without the template
    path = tmp_path / "kept.html"
    explain.write_kept_html(path, ["a", " b", "\n"], torch.rand(2, 1, 3), (0.5,), title="Title & co",
                            n_prefix=1, prefix_text="sys", note="A note.")
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\$\{?[A-Za-z_]", text)  # no placeholder left over
    assert "<h1>Title &amp; co</h1>" in text and "budgets. A note.</p>" in text
    assert "The context (3 tokens)" in text and "<pre>sys</pre>" in text


def test_html_shading_logic_exists_once(tmp_path):
    """The colours and numbers are drawn by the page's script alone: Python writes no colour
    (explain.py has no shading function) and leaves the cells' text to the script."""
    source = Path(explain.__file__).read_text(encoding="utf-8")
    assert "hsl" not in source and "def _shade" not in source
    path = tmp_path / "kept.html"
    explain.write_kept_html(path, ["a", " b", "c"], torch.rand(2, 2, 3), (0.3, 0.7))
    text = path.read_text(encoding="utf-8")
    assert text.count("function shade(") == 1
    markup = text[text.index("<body>"):text.index("<script>")]
    assert "style=" not in markup and "hsl" not in markup
    page = Page()
    page.feed(text)
    assert len(page.cells) == 4 and all(c["text"] == "" for c in page.cells)
    swatches = [a for tag, a in page.tags if "sw" in (a.get("class") or "").split()]
    assert len(swatches) == 12 and all("data-f" in a for a in swatches)  # the script paints them


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
