"""
explain.py: KVzip taken apart, for reading and teaching. Nothing else in the project imports it
(so these commands are explain.py's, not kvzip.py's: kvzip.py is the algorithm, and imports point down).

    python explain.py --toy                    # the paper's toy example on a hand-set model, every number shown
    python explain.py --explain                # each step on the default model, ~300-token context (< 1 min)
    python explain.py --html kept.html         # one HTML page: which context tokens survive, per ratio and head
    python explain.py --html kept.html --ratio 0.3 --context notes.txt

Map of this file:
  1. the toy: toy_tokenizer / toy_model (a 1-layer model whose weights are set by hand so every
     logit is 0 or 4), reconstruction_attention (the scorer's attention recomputed from the
     queries that the model's `observe` hook hands out), toy_example (the real pipeline: prefill ->
     scores -> prune(0.5) -> generate, everything returned as tensors), format_toy (the printout,
     one _toy_* helper per part)
  2. reading tools: token_texts, token_kinds / kept_by_kind (digits, punctuation, words; the
     kinds themselves are tasks.token_kind, shared with reuse.py),
     token_scores (a (text, score) list of one head and chunk, for pdb sessions)
  3. the picture: write_kept_html - one self-contained HTML file: the context's tokens shaded by
     how many of the (layer, KV head) pairs keep them, a layer x head grid of head budgets whose
     cells show what one head keeps and evicts, a tooltip per token (its score, its kept count),
     for a few ratios (radio buttons). page_data holds every number the page draws, from
     kvzip.keep_mask, prune's own rule (hex_bits packs a keep mask, kept_counts bins the tokens
     for the summary line). The page's markup, CSS and script are the template explain_page.html
     (next to this file); Python fills in data only, and the script does all the drawing
  4. explain_steps: the --explain walk-through on a real model
  5. main(argv): the command line

Shape alphabet as in kvzip.py: L layers, Hkv KV heads, G query heads per KV head, D head dim,
n_p prefix tokens, n_c context tokens, n_q tokens of one reconstruction input, n_k = |K'| =
n_p + (chunk length) + n_q keys the scorer ranks over.
"""
from __future__ import annotations

import os

import errors
from errors import InputError

if __name__ == "__main__":  # our own process: before torch loads OpenMP (see errors.passive_openmp)
    errors.passive_openmp()

import html  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvzip  # noqa: E402
import model as model_lib  # noqa: E402
import tasks  # noqa: E402

HTML_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7)  # the ratios the HTML page lets one switch between


# -----------------------------------------------------------------------------
# 1. The toy example: a model small enough to check by hand
#
# The vocabulary is <prompt>, A, B, C, D, <eos>. Any text the toy tokenizer does not know (the
# chat template's opener, KVzip's instruction and repeat prompts) becomes ONE <prompt> marker, so
# the template pieces cost one position each and the arithmetic stays small.
#
# The weights (1 layer, 2 query heads sharing 1 KV head, head dim 16, hidden size 16):
#   residual dims  0..5   which token this is (one-hot of its id)
#                  6      a constant 1 in every embedding: lm_head turns it into <eos>'s logit
#                  8..13  which token attention copied here (written by head 0 through o_proj)
#   head dims      dim 1 + id marks token id (one-hot). Dims 0 and 8 stay empty: RoPE rotates the pair
#                  (0, D/2) by 1 radian per position whatever rope_theta is; rope_theta = inf
#                  sets every other frequency to 0, so the toy has no position signal at all.
#   keys           k(t) = 4 e[t]             values v(t) = e[t]
#   head 0         q(t) = 4 e[next(t)]       "look up the token that comes next" (a copy head),
#                                            next: <prompt> -> A -> B -> C -> D -> <eos>
#   head 1         q(t) = 4 e[t]             "look at the same token"; its output is dropped
#   so a logit q.k / sqrt(16) is 4 * 4 / 4 = 4 for a match and 0 otherwise.
#   RMSNorm        applied before attention; every embedding has two 1s in 16 dims (mean square
#                  1/8), so the norm multiplies it by sqrt(8): its weight 1/sqrt(8) undoes that.
#                  rms_norm_eps = 0 keeps this exact (no row is ever zero).
#   MLP            all zeros (the residual passes through).
#   lm_head        logit(t) = amount of t copied by head 0 (dims 8..13); logit(<eos>) = 0.5.
#                  The final RMSNorm scales a whole row by one positive factor, which never
#                  changes the argmax: the model emits what head 0 found if it found it with
#                  probability > 0.5, else <eos>.

TOY_VOCAB = ("<prompt>", "A", "B", "C", "D", "<eos>")
TOY_NEXT = {"<prompt>": "A", "A": "B", "B": "C", "C": "D", "D": "<eos>"}  # head 0's lookup
TOY_MATCH = 4.0  # q = 4 e, k = 4 e, D = 16: a matching key's logit is 4 * 4 / sqrt(16) = 4
TOY_EOS_LOGIT = 0.5
TOY_CONTEXT = "A B C D"
TOY_QUERIES = ("A", "C")
_BIAS, _COPY = 6, 8  # residual dims: the constant 1, the first "copied token" dim


class ToyTokenizer:
    """Whitespace-separated known words -> their ids; any other non-blank text -> one <prompt>
    id; blank text -> []. So "A B" -> [1, 2], "\\n\\nC" -> [3], "Repeat the ..." -> [0], "" -> []."""

    vocab = TOY_VOCAB
    prefix = "<|system|> You are a toy. <|user|>"  # unknown text: one <prompt> marker
    postfix = ""  # no assistant opener: a query is just its tokens
    stop_ids = {TOY_VOCAB.index("<eos>")}

    def __init__(self):
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        words = text.split()
        if not words:
            return []
        if all(w in self.ids for w in words):
            return [self.ids[w] for w in words]
        return [self.ids["<prompt>"]]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in self.stop_ids)


def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


@torch.no_grad()
def toy_model(max_position: int = 64) -> model_lib.Transformer:
    """The hand-set 1-layer model described above (float32, CPU)."""
    V, C, D = len(TOY_VOCAB), 16, 16
    cfg = model_lib.ModelConfig(architecture="LlamaForCausalLM", vocab_size=V, n_embd=C, n_layer=1,
                                n_head=2, n_kv_head=1, head_dim=D, intermediate_size=4,
                                rms_norm_eps=0.0, rope_theta=math.inf,
                                max_position_embeddings=max_position)
    m = model_lib.Transformer(cfg)
    for p in m.parameters():
        p.zero_()
    ids = {w: i for i, w in enumerate(TOY_VOCAB)}
    blk = m.layers[0]
    for t in range(V):
        m.embed.weight[t, t] = 1.0  # which token
        m.embed.weight[t, _BIAS] = 1.0  # constant 1
        blk.attn.k_proj.weight[1 + t, t] = TOY_MATCH
        blk.attn.v_proj.weight[1 + t, t] = 1.0
        blk.attn.q_proj.weight[D + 1 + t, t] = TOY_MATCH  # head 1: the same token
        if t != ids["<eos>"]:
            blk.attn.o_proj.weight[_COPY + t, 1 + t] = 1.0  # head 0's output -> "copied" dims
            m.lm_head.weight[t, _COPY + t] = 1.0
    for w, nxt in TOY_NEXT.items():
        blk.attn.q_proj.weight[1 + ids[nxt], ids[w]] = TOY_MATCH  # head 0: the next token
    m.lm_head.weight[ids["<eos>"], _BIAS] = TOY_EOS_LOGIT
    blk.attn_norm.weight.fill_(1 / math.sqrt(8))  # embeddings have mean square 1/8
    m.norm.weight.fill_(1 / math.sqrt(8))
    # (mlp_norm stays 0, MLP weights stay 0: the MLP adds nothing)
    m.inv_freq = model_lib.rope_frequencies(cfg)  # [1, 0, 0, ...]: only dims 0 and 8 rotate
    m.eval()
    return m


@torch.no_grad()
def reconstruction_attention(m, kv, ids, start: int, end: int) -> dict:
    """The attention KVzip's scorer sees for one reconstruction input, recomputed for display.

    Runs `ids` (prompt + postfix + context[start:end]) on top of kv.cache, as kvzip.score_context
    does, captures every layer's post-RoPE queries through the model's `observe` hook, and
    recomputes softmax over K' = [prefix keys ; chunk keys ; the input's own keys] with the causal
    mask between input rows and input keys. The cache is rolled back afterwards.
    Returns tensors stacked over layers:
      q (L, Hkv, G, n_q, D), keys (L, Hkv, n_k, D), logits and probs (L, Hkv, G, n_q, n_k)
      (masked logits are -inf, their probs 0), scores (L, Hkv, end - start): max of the chunk
      columns of probs over g and rows - Eq. 2, the numbers kv.scores holds for this chunk.
    """
    cache, n_p = kv.cache, kv.n_prefix
    base = cache.seq_len
    rows = {"q": [], "keys": [], "logits": [], "probs": [], "scores": []}

    def observe(layer, q, k):  # q (Hkv, G, n_q, D), k (Hkv, n_q, D); the cache has not stored k yet
        cached = cache.keys(layer)  # (Hkv, n_p + n_c, D)
        keys = torch.cat([cached[:, :n_p], cached[:, n_p + start:n_p + end], k], dim=1).float()  # (Hkv, n_k, D)
        n_q, n_k = q.shape[2], keys.shape[1]
        logits = q.float() @ keys.unsqueeze(1).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (Hkv, G, n_q, n_k)
        # row t may see every cached key and the input's keys 0..t
        col = torch.arange(n_k, device=q.device)[None, :] - (n_k - n_q)  # input-key index, < 0: cached
        logits = logits.masked_fill(col > torch.arange(n_q, device=q.device)[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        rows["q"].append(q.float())
        rows["keys"].append(keys)
        rows["logits"].append(logits)
        rows["probs"].append(probs)
        rows["scores"].append(probs[..., n_p:n_p + end - start].amax(dim=(1, 2)))  # (Hkv, end - start)

    try:
        m(torch.tensor(ids, device=m.device), cache, last_only=True, observe=observe)
    finally:
        cache.truncate(base)  # drop the input's K/V: the cache is left as found
    return {name: torch.stack(t) for name, t in rows.items()}


def toy_example(ratio: float = 0.5, context: str = TOY_CONTEXT, queries=TOY_QUERIES,
                max_new_tokens: int = 4) -> dict:
    """The paper's toy example, run through the real pipeline on the hand-set model.

    kvzip.prefill (prefix + context, then scoring by reconstruction) -> kv.scores -> kv.prune(ratio)
    -> kvzip.generate from the full and the compressed cache. Returns every printed number:
      vocab, prefix_ids, context_ids, recon_ids (prompt + postfix + context), n_p, n_c, n_q,
      key_labels (n_k names for K' columns), q, keys, logits, probs (one layer: see
      reconstruction_attention), scores_recomputed (L, Hkv, n_c), scores (kv.scores, the same),
      order (flat indices, best first, ties to the lower index), k_kept, keep (L, Hkv, n_c) bool,
      head_lengths (L, Hkv), bytes_full, bytes_compressed, bytes_packed_kv, bytes_offsets,
      answers {query: (full, compressed)}, ratio; and kv (the FullKV) and tok, to poke further.
    """
    tok, m = toy_tokenizer(), toy_model()
    kv = kvzip.prefill(m, tok, context, backend="reference")
    (start, end, recon), = kvzip.reconstruction_inputs(tok, kv.context_ids)  # one chunk: 4 tokens
    att = reconstruction_attention(m, kv, recon, start, end)
    keep = kvzip.keep_mask(kv.scores, ratio)  # (L, Hkv, n_c): the rule prune uses
    ckv = kv.prune(ratio)
    answers = {q: (kvzip.generate(m, tok, q, kv, max_new_tokens),
                   kvzip.generate(m, tok, q, ckv, max_new_tokens)) for q in queries}
    prefix_ids = kvzip.prefix_ids(tok)  # template opener + INSTRUCTION: one marker here
    n_p = kv.n_prefix
    name = lambda i: TOY_VOCAB[i]  # noqa: E731
    labels = ([f"{name(i)}" for i in prefix_ids[:n_p]] + [name(i) for i in kv.context_ids]
              + [f"{name(i)}'" for i in recon])  # ' marks the input's own keys
    packed = sum(t.numel() * t.element_size() for t in ckv.k + ckv.v)
    return {
        "vocab": TOY_VOCAB, "prefix_ids": prefix_ids, "context_ids": kv.context_ids, "recon_ids": recon,
        "n_p": n_p, "n_c": kv.n_context, "n_q": len(recon), "key_labels": labels,
        "q": att["q"][0], "keys": att["keys"][0], "logits": att["logits"][0], "probs": att["probs"][0],
        "scores_recomputed": att["scores"], "scores": kv.scores,
        "order": torch.sort(kv.scores.reshape(-1), descending=True, stable=True).indices,
        "k_kept": int(keep.sum()), "keep": keep, "head_lengths": ckv.head_lengths(),
        "bytes_full": kv.nbytes, "bytes_compressed": ckv.nbytes, "bytes_packed_kv": packed,
        "bytes_offsets": sum(o.numel() * o.element_size() for o in ckv.offsets),
        "answers": answers, "ratio": ratio, "kv": kv, "tok": tok,
    }


def format_toy(d: dict) -> str:
    """The toy example as text: the tensors of toy_example(), laid out to be checked by hand.
    Each part below returns its lines; a line starting with "\\n" opens a new paragraph."""
    out = (_toy_model_and_ids(d) + _toy_attention_tables(d) + _toy_scores(d) + _toy_ranking(d)
           + _toy_bytes(d) + _toy_answers(d))
    return "\n".join(s.rstrip() for s in out)


def _toy_model_and_ids(d: dict) -> list[str]:
    """The title, the hand-set model in brief, and part 1: every piece's token ids."""
    V, n_p, n_c, n_q = d["vocab"], d["n_p"], d["n_c"], d["n_q"]
    names = lambda ids: " ".join(V[i] for i in ids)  # noqa: E731
    return ["KVzip on a toy model that can be checked by hand",
            "=" * 48,
            "Model: 1 layer, 2 query heads sharing 1 KV head, head dim 16, weights set by hand",
            "(explain.py, section 1): keys 4·e[t]; head 0 queries 4·e[next(t)] (next: "
            + " -> ".join(["<prompt>"] + [TOY_NEXT[k] for k in TOY_NEXT]) + "),",
            "head 1 queries 4·e[t]; so logit = q·k/√16 = 4 for a match, else 0. Values e[t]; head 0's",
            "output is the copied token's logit, <eos> has logit 0.5. No MLP, no RoPE (rope_theta = inf).",
            "",
            "1. Token ids (each piece encoded on its own)",
            "   vocab:  " + "  ".join(f"{i} {t}" for i, t in enumerate(V)),
            f"   prefix   n_p = {n_p}: {d['prefix_ids']}  {names(d['prefix_ids'])}   (template opener + "
            "kvzip.INSTRUCTION: unknown text -> one marker)",
            f"   context  n_c = {n_c}: {d['context_ids']}  {names(d['context_ids'])}",
            f"   reconstruction input n_q = {n_q}: {d['recon_ids']}  {names(d['recon_ids'])}",
            f"     = FIRST_PROMPT {kvzip.FIRST_PROMPT!r} -> one marker, + postfix '' -> [], + the context",
            f"   cache after prefill: positions 0..{n_p + n_c - 1} = {names(d['prefix_ids'][:n_p] + d['context_ids'])}",
            ""]


def _toy_attention_tables(d: dict) -> list[str]:
    """Part 2's tables: for each query head, the scorer's logits and probabilities, one row per
    reconstruction input token and one column per key of K', then each context column's max."""
    V, n_p, n_c, n_q = d["vocab"], d["n_p"], d["n_c"], d["n_q"]
    Hkv, G = d["probs"].shape[:2]
    w = 7  # column width
    out = ["2. Scoring: the reconstruction input runs on top of the cache. The scorer ranks keys",
           "   K' = [prefix ; context ; the input's own keys] (' = input key; row t sees input keys <= t)",
           "   logit = q·k/√16, p = softmax over the keys a row sees, · = masked (causal)"]
    short = lambda s: s.replace("<prompt>", "<p>")  # noqa: E731  (keeps the columns narrow)
    groups = [(0, n_p), (n_p, n_p + n_c), (n_p + n_c, n_p + n_c + n_q)]

    def line(label, cells):  # cells: n_k strings, split into prefix | context | input
        return f"   {label:<7}" + " |".join("".join(f"{c:>{w}}" for c in cells[a:b]) for a, b in groups)

    names_row = "   " + " " * 7 + " |".join(f"{s:>{w * (b - a)}}" for s, (a, b) in
                                           zip(("prefix", "context", "input (causal)"), groups))
    head = [names_row, line("row", [short(s) for s in d["key_labels"]])]
    ctx = slice(n_p, n_p + n_c)
    for h in range(Hkv):
        for g in range(G):
            what = "looks up the next token" if g == 0 else "looks at the same token"
            masked = d["logits"][h, g] == float("-inf")  # (n_q, n_k)
            for title, m_, fmt in (("logits", d["logits"][h, g], ".0f"), ("probabilities", d["probs"][h, g], ".3f")):
                out.append(f"\n   query head g={g} ({what}): {title}" if title == "logits" else f"   {title}")
                out += head if title == "logits" else []
                for t in range(n_q):
                    cells = ["·" if masked[t, j] else format(float(m_[t, j]), fmt) for j in range(m_.shape[1])]
                    out.append(line(short(V[d["recon_ids"][t]]) + "'", cells))
            colmax = d["probs"][h, g, :, ctx].amax(dim=0)
            out.append(line("max", [""] * n_p + [f"{float(x):.3f}" for x in colmax] + [""] * n_q).rstrip()
                       + "  <- max over rows")
    return out


def _toy_scores(d: dict) -> list[str]:
    """The rest of part 2: the scores, checked against kvzip's scorer and against the closed form."""
    V = d["vocab"]
    s = d["scores"][0, 0]
    same = torch.allclose(d["scores_recomputed"], d["scores"], atol=1e-6)
    e4 = math.exp(TOY_MATCH)
    return ["\n   score S = max over rows and both query heads of the context columns:",
            "   " + "   ".join(f"{V[i]} {float(x):.4f}" for i, x in zip(d["context_ids"], s)),
            f"   (kv.scores from kvzip.prefill: {'the same numbers' if same else 'DIFFERENT: ' + str(d['scores'])})",
            f"   by hand: A = e^4/(e^4 + 5) = {e4 / (e4 + 5):.4f}: row <prompt>' sees 6 keys, one matches;"
            " each later row sees one more key,",
            f"   so B = e^4/(e^4 + 6) = {e4 / (e4 + 6):.4f}, C = e^4/(e^4 + 7), D = e^4/(e^4 + 8). Here the ranking"
            " comes only from that growing denominator;",
            "   a real model's scores spread over orders of magnitude (python explain.py --explain, step 4)"]


def _toy_ranking(d: dict) -> list[str]:
    """Part 3: the global order of all pairs, and what prune keeps of it."""
    V = d["vocab"]
    L, Hkv, n_c = d["scores"].shape
    total = L * Hkv * n_c
    flat = d["scores"].reshape(-1)  # (L*Hkv*n_c,), position = flat index % n_c
    keep = d["keep"][0, 0]
    kept = [V[i] for i, k in zip(d["context_ids"], keep) if k]
    gone = [V[i] for i, k in zip(d["context_ids"], keep) if not k]
    return [f"\n3. Ranking: one global order over all L·Hkv·n_c = {total} pairs (ties: lower index first)",
            "   " + "   ".join(f"{r + 1}. {V[d['context_ids'][int(i) % n_c]]} {float(flat[i]):.4f}"
                               for r, i in enumerate(d["order"])),
            f"   prune({d['ratio']}) keeps round({d['ratio']}·{total}) = {d['k_kept']} pairs: {' '.join(kept)};"
            f" evicts: {' '.join(gone) or '-'}; the prefix is always kept",
            f"   head_lengths (L, Hkv), prefix included: {d['head_lengths'].tolist()}"]


def _toy_bytes(d: dict) -> list[str]:
    """Part 4: the full and the compressed cache's bytes, and why their ratio is not the ratio."""
    n = d["n_p"] + d["n_c"]  # cached positions
    kept_rows = int(d["head_lengths"].sum())
    return [f"\n4. Bytes: full cache {d['bytes_full']} B (K and V of {n} positions x 16 dims x 4 B);"
            f" compressed {d['bytes_compressed']} B (packed K and V {d['bytes_packed_kv']} B"
            f" + offsets {d['bytes_offsets']} B)",
            f"   = {d['bytes_compressed'] / d['bytes_full']:.1%} of the full cache at ratio {d['ratio']}: the ratio"
            f" counts context pairs only, the prefix is never evicted ({kept_rows} of {n} rows"
            " kept), and the offsets cost a little"]


def _toy_answers(d: dict) -> list[str]:
    """Part 5: greedy answers from the full and the compressed cache."""
    return (["\n5. Greedy answers (query ids = \"\\n\\n\" + query, + postfix)"]
            + [f"   query {q!r}: full cache -> {full!r}   compressed -> {comp!r}"
               for q, (full, comp) in d["answers"].items()]
            + ["   (an evicted pair cannot be copied: the next-token head finds no match, spreads its"
               " attention, and <eos>'s 0.5 wins)"])


# -----------------------------------------------------------------------------
# 2. Reading tools

def token_texts(tok, ids) -> list[str]:
    """Each id decoded on its own. (A byte-level token holding part of a UTF-8 character shows
    as the replacement character; the context's text as a whole is unaffected.)"""
    return [tok.decode([i]) for i in ids]


def token_kinds(tok, ids) -> list[str]:
    """tasks.token_kind of each token of ids: "digit", "punct" (punctuation/whitespace) or "word"."""
    return [tasks.token_kind(t) for t in token_texts(tok, ids)]


def kept_by_kind(keep_mask, kinds) -> dict:
    """{kind: fraction of that kind's (layer, head, position) pairs kept}, pooled over layers and
    heads; keep_mask (L, Hkv, n_c) bool, kinds n_c strings. Kinds absent from the context are left
    out. (tasks.kept_by_kind on the per-position fractions; reuse.py pools the same way.)"""
    if keep_mask.shape[-1] != len(kinds):
        raise ValueError(f"keep_mask has {keep_mask.shape[-1]} positions, kinds has {len(kinds)}")
    return tasks.kept_by_kind(keep_mask.float().mean(dim=(0, 1)).tolist(), kinds)  # (n_c,) fractions


def token_scores(kv, tok, layer: int, head: int, scores=None, start: int = 0,
                 end: int | None = None) -> list[tuple[str, float]]:
    """[(token text, KVzip score)] of context positions start..end-1 for one (layer, KV head), in
    order of position: a view for pdb, e.g. sorted(token_scores(kv, tok, 3, 0), key=lambda p: -p[1])[:10].
    scores: (L, Hkv, n_c), default kv.scores; pass score_context's `scores` to look at a chunk while
    it is being scored (kv.scores is only set once every chunk is done)."""
    scores = kv.scores if scores is None else scores
    if scores is None:
        raise ValueError("this FullKV has no scores yet (prefill(..., score=False), or scoring is under "
                         "way): pass scores=")
    L, Hkv, n_c = scores.shape
    if not (0 <= layer < L and 0 <= head < Hkv):
        raise ValueError(f"layer must be in [0, {L}) and head in [0, {Hkv}), got ({layer}, {head})")
    end = n_c if end is None else end
    if not 0 <= start <= end <= n_c:
        raise ValueError(f"need 0 <= start <= end <= {n_c}, got start={start}, end={end}")
    return list(zip(token_texts(tok, kv.context_ids[start:end]), scores[layer, head, start:end].tolist()))


def format_kinds(fracs: dict, kinds=None) -> str:
    counts = {k: kinds.count(k) for k in fracs} if kinds is not None else {}
    return ", ".join(f"{k} {v:.0%}" + (f" (n={counts[k]})" if k in counts else "") for k, v in fracs.items())


# -----------------------------------------------------------------------------
# 3. The picture: which tokens are kept, as one HTML file
#
# The page itself - markup, CSS and the script that draws it - is explain_page.html, next to this
# file. Python computes the numbers (page_data: from kvzip.keep_mask, prune's own rule) and fills
# the template's placeholders with escaped text, plain markup (one span per token, one cell per
# head) and those numbers as one JSON block. The script draws every colour, number and tooltip
# from that block, so the shading rule exists once, in the script's shade().

PAGE_TEMPLATE = Path(__file__).parent / "explain_page.html"  # the module's folder, not the current one


def _rkey(r: float) -> str:  # a ratio as the page writes it: 0.3 -> "0.3"
    return f"{r:g}"


def hex_bits(bits) -> str:
    """A row of booleans as hex digits, four per digit, the first boolean the digit's high bit
    (padded with False): [1, 0, 1, 1, 1] -> "b8". The page reads bit i as
    (parseInt(s[i >> 2], 16) >> (3 - (i & 3))) & 1. Why: a mask over 403 tokens is then 101
    characters, where a JSON list of true/false would be about 2,400."""
    bits = [bool(b) for b in bits]
    bits += [False] * (-len(bits) % 4)
    return "".join("0123456789abcdef"[8 * a + 4 * b + 2 * c + d]
                   for a, b, c, d in zip(*[iter(bits)] * 4))


def kept_counts(mask) -> list[tuple[str, int]]:
    """How many layer-heads keep each token, in bins a reader can check: [(label, number of
    tokens)], from "all" down to "none", the bins summing to n_c; mask (L, Hkv, n_c) bool.
    With LH = L*Hkv layer-heads the bins are: all LH; half or more (but not all); 10% or more
    (but under half); 1 to under 10%; none. A bin whose range holds no count (e.g. "under 10%"
    when LH < 10) is left out."""
    L, Hkv, _ = mask.shape
    LH = L * Hkv
    count = mask.sum(dim=(0, 1))  # (n_c,) layer-heads keeping each token
    tenth, half = -(-LH // 10), -(-LH // 2)  # the least counts that are >= 10%, >= 50% of LH
    span = lambda lo, hi: str(lo) if lo == hi else f"{lo}-{hi}"  # noqa: E731
    bins = [(f"all {LH}", LH, LH), (f"{span(half, LH - 1)} (half or more)", half, LH - 1),
            (span(tenth, half - 1), tenth, half - 1), (f"{span(1, tenth - 1)} (under 10%)", 1, tenth - 1),
            ("none", 0, 0)]
    return [(label, int(((count >= lo) & (count <= hi)).sum())) for label, lo, hi in bins if lo <= hi]


def _summary(mask, k: int, threshold: float | None) -> str:
    """The line the page shows at one ratio when no head is chosen."""
    L, Hkv, n_c = mask.shape
    bins = " · ".join(f"{label}: {n}" for label, n in kept_counts(mask))
    cut = "no pair kept" if threshold is None else f"threshold score {threshold:.3g}"
    return (f"keeps {k:,} of the {L * Hkv * n_c:,} context KV pairs ({L} layers x {Hkv} KV heads x "
            f"{n_c} tokens; {cut}). Tokens by how many of the {L * Hkv} "
            f"layer-heads keep them: {bins}")


def page_data(tokens, scores, ratios) -> dict:
    """The numbers the page draws, one JSON object. scores (L, Hkv, n_c); heads are numbered
    layer-major, j = l * Hkv + h. For every ratio, from kvzip.keep_mask (prune's own rule):
      {"L", "Hkv", "n_c", "ratios": ["0.1", ...],
       "scores": L*Hkv lists of n_c scores (3 significant digits),
       "best": per token [highest score over the layer-heads, its l, its h],
       "at": {ratio: {"keep": L*Hkv hex_bits rows (head j's keep mask over the context),
                      "count": n_c ints (layer-heads keeping each token), "budget": L*Hkv ints
                      (tokens each head keeps), "k": pairs kept, "threshold": the k-th largest
                      score or null when k = 0, "bins": kept_counts, "summary": the page's line,
                      "kinds": kept_by_kind}}}"""
    L, Hkv, n_c = scores.shape
    if len(tokens) != n_c:
        raise ValueError(f"{len(tokens)} tokens for {n_c} scored positions")
    kinds = [tasks.token_kind(t) for t in tokens]
    flat = scores.reshape(L * Hkv, n_c).float()  # (L*Hkv, n_c), row j = head (j // Hkv, j % Hkv)
    best, where = flat.max(dim=0)  # (n_c,) each
    ordered = torch.sort(flat.reshape(-1), descending=True, stable=True).values
    at = {}
    for r in ratios:
        mask = kvzip.keep_mask(scores, r)  # (L, Hkv, n_c)
        k = int(mask.sum())  # round(r * L*Hkv*n_c), 0 for a tiny ratio of a short context
        threshold = float(ordered[k - 1]) if k else None
        rows = mask.reshape(L * Hkv, n_c)
        at[_rkey(r)] = {
            "keep": [hex_bits(row.tolist()) for row in rows], "count": mask.sum(dim=(0, 1)).tolist(),
            "budget": rows.sum(dim=1).tolist(), "k": k,
            "threshold": None if threshold is None else float(f"{threshold:.4g}"),
            "bins": kept_counts(mask), "summary": _summary(mask, k, threshold),
            "kinds": kept_by_kind(mask, kinds)}
    return {"L": L, "Hkv": Hkv, "n_c": n_c, "ratios": [_rkey(r) for r in ratios],
            "scores": [[float(f"{x:.3g}") for x in row] for row in flat.tolist()],
            "best": [[float(f"{float(s):.3g}"), int(j) // Hkv, int(j) % Hkv] for s, j in zip(best, where)],
            "at": at}


def _json_for_script(data) -> str:
    """JSON safe inside <script>: "</" would end the element early; JSON reads "<\\/" as "</"."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def _radios(ratios, selected: float) -> str:
    """One radio button per ratio; `selected` is checked (the page's first view)."""
    return "".join(f'<label><input type="radio" name="ratio" value="{_rkey(r)}"'
                   f'{" checked" if r == selected else ""}>{r:.0%}</label>' for r in ratios)


def _heatmap_rows(L: int, Hkv: int) -> str:
    """The heatmap's rows: a header of layer numbers, then one row per KV head with one cell per
    layer (data-j: the head's index in page_data's lists); the script writes each cell."""
    rows = ['<tr><th class="rh">layer</th>' + "".join(f"<th>{l}</th>" for l in range(L)) + "</tr>"]
    for h in range(Hkv):
        tds = "".join(f'<td class="cell" data-j="{l * Hkv + h}" data-l="{l}" data-h="{h}"></td>'
                      for l in range(L))
        rows.append(f'<tr><th class="rh">head {h}</th>{tds}</tr>')
    return "".join(rows)


def _kind_rows(kinds) -> str:
    """One row per token kind present in the context: its name, its count, and a cell the script
    fills with the kept fraction."""
    return "".join(f'<tr><td>{k}</td><td>{kinds.count(k)} tokens</td><td class="kind" data-kind="{k}"></td></tr>'
                   for k in tasks.TOKEN_KINDS if k in kinds)


def _token_spans(tokens) -> str:
    """One span per context token holding its escaped text; joined with nothing between them, as
    the page lays the text out by the tokens' own whitespace."""
    return "".join(f'<span class="tok{" nl" if chr(10) in t else ""}" data-i="{i}">{html.escape(t)}</span>'
                   for i, t in enumerate(tokens))  # nl: the page draws a return mark before the break


def _prefix_details(n_prefix: int, prefix_text: str) -> str:
    if not n_prefix:
        return ""
    return (f"<details><summary>The {n_prefix}-token prefix (chat template and instruction) "
            f"is never evicted</summary><pre>{html.escape(prefix_text)}</pre></details>")


def write_kept_html(path, tokens, scores, ratios=HTML_RATIOS, selected: float = 0.3,
                    title: str = "What KVzip keeps", n_prefix: int = 0, prefix_text: str = "",
                    note: str = "") -> dict:
    """Write one self-contained HTML page showing which context tokens KVzip keeps.

    tokens: n_c strings (each context token's text); scores (L, Hkv, n_c). Radio buttons switch
    the ratio; the context's tokens are shaded by how many layer-heads keep them, and clicking a
    head in the budget heatmap shows what that one head keeps (evicted tokens struck through).
    `selected` is the ratio shown first (added to `ratios` if missing); the address's #ratio=0.1
    or #ratio=0.1&head=L.H opens another view. No network, fonts or external files. The page is
    PAGE_TEMPLATE with its placeholders filled: the tokens as <span class="tok" data-i>, and
    page_data's numbers as JSON. Returns page_data's dict, plus "kinds" {ratio: kept_by_kind}.
    """
    L, Hkv, n_c = scores.shape
    ratios = sorted(set(float(r) for r in ratios) | {float(selected)})
    for r in ratios:
        kvzip.check_ratio(r)
    data = page_data(tokens, scores, ratios)
    template = string.Template(PAGE_TEMPLATE.read_text(encoding="utf-8"))
    page = template.substitute(  # substitute, not safe_substitute: a placeholder left unfilled is an error
        title=html.escape(title), note=html.escape(note), radios=_radios(ratios, float(selected)),
        heatmap=_heatmap_rows(L, Hkv), kinds=_kind_rows([tasks.token_kind(t) for t in tokens]), n_c=n_c,
        tokens=_token_spans(tokens), prefix=_prefix_details(n_prefix, prefix_text),
        data=_json_for_script(data))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return {**data, "kinds": {r: data["at"][_rkey(r)]["kinds"] for r in ratios}}


# -----------------------------------------------------------------------------
# 4. The walk-through on a real model

def _ids_brief(ids, n=6) -> str:
    if len(ids) <= 2 * n:
        return str(list(ids))
    return f"[{', '.join(map(str, ids[:n]))}, ..., {', '.join(map(str, ids[-n:]))}]"


def _quantiles(x: torch.Tensor, qs=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)) -> str:
    vals = torch.quantile(x.reshape(-1).double(), torch.tensor(qs, dtype=torch.float64))
    return "  ".join(f"{'min' if q == 0 else 'max' if q == 1 else f'q{round(q * 100)}'} {float(v):.3g}"
                     for q, v in zip(qs, vals))


def explain_steps(m, tok, context: str, probes, ratio: float = 0.3, chunk_size: int = 128,
                  template: bool = False, out=print) -> dict:
    """Print KVzip's steps on a real model; probes: [(prompt, expected answer or None)].
    Returns {"kv", "ckv", "keep", "answers"} for further poking."""
    cfg = m.cfg
    prefix_ids = kvzip.prefix_ids(tok)
    out(f"KVzip, step by step: {cfg.architecture}, L = {cfg.n_layer} layers, {cfg.n_head} query heads "
        f"sharing Hkv = {cfg.n_kv_head} KV heads (G = {cfg.group}), D = {cfg.head_dim}, {m.dtype}")
    t0 = time.perf_counter()
    kv = kvzip.prefill(m, tok, context, chunk_size=chunk_size, backend="reference")  # the spec path, to read
    t_prefill = time.perf_counter() - t0
    n_p, n_c, ids = kv.n_prefix, kv.n_context, kv.context_ids
    out("\n1. The pieces, each encoded on its own (BPE would merge across a joined seam)")
    out(f"   prefix  n_p = {n_p:4d}: {_ids_brief(prefix_ids[:n_p])}  {tok.decode(prefix_ids[:n_p])[:60]!r}...")
    out(f"   context n_c = {n_c:4d}: {_ids_brief(ids)}")
    out(f"           starts {tok.decode(ids[:12])!r} ... ends {tok.decode(ids[-12:])!r}")
    shape = tuple(kv.cache.keys(0).shape)
    out(f"\n2. Prefill: prefix + context -> dense cache, per layer K and V {shape} (Hkv, n_p + n_c, D): "
        f"{kv.nbytes / 2**20:.2f} MiB")
    out(f"\n3. Scoring by reconstruction, chunks of {chunk_size} context tokens (the paper uses "
        f"{kvzip.CHUNK_SIZE}); each input = prompt + postfix + chunk, run on top of the cache:")
    post = tok.encode(tok.postfix)
    for c, (start, end, r_ids) in enumerate(kvzip.reconstruction_inputs(tok, ids, chunk_size)):
        n_prompt = len(r_ids) - len(post) - (end - start)
        out(f"   chunk {c}: context [{start}, {end}), n_q = {len(r_ids)} ids {_ids_brief(r_ids, 4)}")
        out(f"            = prompt {n_prompt} {tok.decode(r_ids[:n_prompt])!r} + postfix {len(post)} "
            f"+ chunk {end - start}")
        out(f"            scorer keys K' = prefix {n_p} + chunk {end - start} + input {len(r_ids)} "
            f"= {n_p + end - start + len(r_ids)}")
    out(f"   prefill + scoring: {t_prefill:.1f} s")
    s = kv.scores
    out(f"\n4. Scores S (L, Hkv, n_c) = {tuple(s.shape)} {s.dtype}: the max attention each pair gets")
    out(f"   {_quantiles(s)}")
    per_layer = s.mean(dim=(1, 2))
    out("   mean per layer: " + " ".join(f"{float(x):.2f}" for x in per_layer))
    layer, head = cfg.n_layer // 2, 0
    top = sorted(token_scores(kv, tok, layer, head), key=lambda p: -p[1])[:8]
    out(f"   top tokens of layer {layer}, head {head} (token_scores): "
        + ", ".join(f"{t!r} {v:.2f}" for t, v in top))

    total = cfg.n_layer * cfg.n_kv_head * n_c
    k = round(ratio * total)
    thr = float(torch.sort(s.reshape(-1), descending=True, stable=True).values[k - 1])
    keep = kvzip.keep_mask(s, ratio)
    ckv = kv.prune(ratio)
    out(f"\n5. Eviction at ratio {ratio}: one global ranking of all L·Hkv·n_c = {total:,} pairs, keep the "
        f"top k = round({ratio}·{total}) = {k:,}")
    out(f"   threshold (the k-th largest score) = {thr:.4g}; kept {int(keep.sum()):,}")
    budgets = keep.sum(dim=(1, 2))
    out(f"   kept pairs per layer (of Hkv·n_c = {cfg.n_kv_head * n_c}): "
        + " ".join(str(int(b)) for b in budgets))
    frac = keep.float().mean(dim=-1)  # (L, Hkv)
    out("   kept % per head (rows: KV head, columns: layer 0..L-1):")
    for h in range(cfg.n_kv_head):
        out(f"     head {h}: " + " ".join(f"{round(100 * float(x)):3d}" for x in frac[:, h]))
    out(f"   spread of head budgets: min {float(frac.min()):.0%}, median "
        f"{statistics.median(frac.reshape(-1).tolist()):.0%}, max {float(frac.max()):.0%}")
    assert torch.equal(ckv.head_lengths(), keep.sum(dim=-1) + n_p)  # prune packed exactly this mask
    rows, all_rows = int(ckv.head_lengths().sum()), cfg.n_layer * cfg.n_kv_head * (n_p + n_c)
    out(f"\n6. Bytes: full {kv.nbytes:,} B -> compressed {ckv.nbytes:,} B ({ckv.nbytes / kv.nbytes:.1%}, not "
        f"{ratio:.0%}: the ratio counts context pairs only;")
    out(f"   the prefix is never evicted, so {k:,} + {all_rows - total:,} prefix = {rows:,} of {all_rows:,} rows "
        f"stay = {rows / all_rows:.1%}, plus {sum(o.numel() for o in ckv.offsets) * 8:,} B of offsets)")
    kinds = token_kinds(tok, ids)
    out(f"\n7. Kept by token kind: {format_kinds(kept_by_kind(keep, kinds), kinds)}")
    out("\n8. Answers, greedy, from the full and the compressed cache:")
    answers = []
    for prompt, expected in probes:
        full = kvzip.generate(m, tok, prompt, kv, 16, template=template).strip().splitlines()
        comp = kvzip.generate(m, tok, prompt, ckv, 16, template=template).strip().splitlines()
        full, comp = (full[0] if full else ""), (comp[0] if comp else "")
        answers.append((full, comp))
        exp = f" (expected {expected})" if expected else ""
        mark = lambda a: ("   right" if tasks.check_answer(a, expected) else "   WRONG") if expected else ""  # noqa: E731
        out(f"   {prompt!r}{exp}\n     full:       {full!r}{mark(full)}\n     compressed: {comp!r}{mark(comp)}")
    return {"kv": kv, "ckv": ckv, "keep": keep, "answers": answers}


# -----------------------------------------------------------------------------
# 5. Command line

def _prefill(m, tok, context: str, path):
    """kvzip.prefill; a context too long for the model is reported with the file it came from."""
    try:
        return kvzip.prefill(m, tok, context)
    except InputError as e:
        raise InputError(f"--context {path}: {e}" if path else str(e)) from None


def main(argv=None):
    p = errors.ArgumentParser(prog="explain.py", description="KVzip explained: a hand-checkable toy, a step-by-step "
                                "walk-through, and an HTML picture of what is kept.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--toy", action="store_true", help="the toy example on a hand-set 1-layer model")
    mode.add_argument("--explain", action="store_true", help="each step on a real model (default: SmolLM2)")
    mode.add_argument("--html", metavar="PATH", help="write an HTML page of the kept tokens to PATH")
    p.add_argument("--ratio", type=float, help="fraction of context KV pairs kept "
                   "(default 0.5 for --toy, 0.3 otherwise; --html also shows " + ", ".join(map(str, HTML_RATIOS)) + ")")
    p.add_argument("--context", metavar="FILE", help="text file to use as the context "
                   "(default: a seeded haystack with two pass keys)")
    p.add_argument("--query", action="append", help="a question for --explain with --context (repeatable)")
    p.add_argument("--model", metavar="DIR_OR_NAME",
                   help=f"Hugging Face folder or a model name: {', '.join(model_lib.MODEL_NAMES)} "
                        "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--chunk-size", type=int, default=128,
                   help="context tokens per reconstruction chunk in --explain (default 128, so that "
                   f"chunking shows; kvzip's default is {kvzip.CHUNK_SIZE})")
    args = p.parse_args(argv)

    ratio = args.ratio if args.ratio is not None else (0.5 if args.toy else 0.3)
    try:
        kvzip.check_ratio(ratio)
    except ValueError as e:
        p.error(f"--ratio: {e}")
    if args.toy and (args.context or args.model or args.query):
        p.error("--toy uses its own model and context: drop --context, --model and --query")
    if args.query and not (args.explain and args.context):
        p.error("--query goes with --explain --context FILE")
    if args.chunk_size < kvzip.N_OVERLAP:
        p.error(f"--chunk-size must be at least {kvzip.N_OVERLAP}, got {args.chunk_size}")
    for q in args.query or []:
        if not q.strip():
            p.error(f"--query {q!r}: empty question")
    # the output and the inputs are checked before the model loads: the page is written after
    # the model has loaded and scored the context, a failure then would waste that work
    if args.html and (why := errors.check_output(args.html, "--html")):
        p.error(why)
    if args.model and (why := model_lib.model_arg_problem(args.model)):
        p.error(why)

    if args.toy:
        print(format_toy(toy_example(ratio)))
        return

    # a file or checkpoint that cannot be used: InputError, one line and exit code 1 (errors.run)
    context = errors.read_text(args.context, "--context") if args.context else None
    m, tok = model_lib.load(args.model)

    if args.explain:
        if context is None:
            task = tasks.needle_task(300, 2, seed=0, tok=tok)
            context, probes, template = task["context"], task["probes"], False  # completion probes
        else:
            qs = args.query or ["Summarize the context in one sentence.", "What is the last sentence of the context?"]
            probes, template = [(q, None) for q in qs], True
        explain_steps(m, tok, context, probes, ratio, args.chunk_size, template)
        return

    if context is None:
        context = tasks.needle_task(400, 2, seed=0, tok=tok)["context"]
    t0 = time.perf_counter()
    kv = _prefill(m, tok, context, args.context)
    tokens = token_texts(tok, kv.context_ids)
    name = os.path.basename(os.path.normpath(args.model)) if args.model else "SmolLM2-135M-Instruct"
    res = write_kept_html(args.html, tokens, kv.scores, HTML_RATIOS, ratio,
                          title=f"What KVzip keeps: {name}, {kv.n_context} context tokens",
                          n_prefix=kv.n_prefix, prefix_text=tok.decode(kvzip.prefix_ids(tok)))
    print(f"wrote {args.html}: {kv.n_context} context tokens, {m.cfg.n_layer} layers x "
          f"{m.cfg.n_kv_head} KV heads, ratios {', '.join(res['ratios'])} "
          f"({time.perf_counter() - t0:.1f} s)")
    kinds = [tasks.token_kind(t) for t in tokens]
    for r, fr in res["kinds"].items():
        print(f"  kept at ratio {_rkey(r)} by token kind: {format_kinds(fr, kinds)}")


if __name__ == "__main__":
    errors.run(main, prog="explain.py")
