"""Language-model evaluation: greedy decoding through a split model and corpus BLEU.

Decoding runs client then server on a fixed-width token buffer inside one
compiled ``lax.while_loop``; there is no KV cache: every step recomputes the
whole (causal) forward pass over the buffer, which is simple and exact (a
position's logits only depend on the tokens before it) at the cost of
``max_new_tokens`` full forward passes per batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax.split import SplitModel, Vars, apply_part


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate_batch(split: SplitModel, client_vars: Vars, server_vars: Vars, buf: jax.Array,
                    lens: jax.Array, max_new_tokens: int, eos_id: int) -> jax.Array:
    n = buf.shape[0]
    rows = jnp.arange(n)

    def cond(s):
        i, _, done = s
        return (i < max_new_tokens) & ~done.all()

    def body(s):
        i, buf, done = s
        z, _ = apply_part(split.client, client_vars, buf, train=False)
        logits, _ = apply_part(split.server, server_vars, z, train=False)
        nxt = jnp.argmax(logits[rows, lens + i - 1], -1).astype(buf.dtype)
        nxt = jnp.where(done, eos_id, nxt)
        return i + 1, buf.at[rows, lens + i].set(nxt), done | (nxt == eos_id)

    _, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buf, jnp.zeros(n, bool)))
    return buf[rows[:, None], lens[:, None] + jnp.arange(max_new_tokens)[None]]


def greedy_generate(split: SplitModel, client_vars: Vars, server_vars: Vars, prompts, prompt_lens,
                    max_new_tokens: int, eos_id: int, batch_size: int = 8) -> np.ndarray:
    """Greedy (arg-max) continuation of each prompt through client then server.

    Args:
      split: the split language model (client: ids -> z, server: z -> logits).
      client_vars, server_vars: one client's and the server's variables (no client axis,
        frozen weights attached).
      prompts: ``[N, T]`` int token ids, right-padded; ``prompt_lens``: ``[N]`` lengths (>= 1).
      max_new_tokens: tokens to generate; ``max(prompt_lens) + max_new_tokens`` must fit
        the model's context.
      eos_id: end-of-text id; generation of a row stops at it and the rest is ``eos_id``.
      batch_size: prompts decoded per compiled call (the last batch is padded).
    Returns:
      ``[N, max_new_tokens]`` int32 generated tokens (host array).
    """
    prompts, lens = np.asarray(prompts, np.int32), np.asarray(prompt_lens, np.int32)
    n = len(prompts)
    if n == 0:
        return np.zeros((0, max_new_tokens), np.int32)
    if lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lens.max()) + max_new_tokens
    buf = np.full((n, width), eos_id, np.int32)
    for r in range(n):
        buf[r, :lens[r]] = prompts[r, :lens[r]]
    out = []
    for s in range(0, n, batch_size):
        b, ln = buf[s:s + batch_size], lens[s:s + batch_size]
        pad = batch_size - len(b)
        if pad:
            b = np.concatenate([b, np.repeat(b[-1:], pad, 0)])
            ln = np.concatenate([ln, np.repeat(ln[-1:], pad)])
        g = _generate_batch(split, client_vars, server_vars, jnp.asarray(b), jnp.asarray(ln),
                            max_new_tokens, int(eos_id))
        out.append(np.asarray(g)[:batch_size - pad])
    return np.concatenate(out)


def decode_generated(tokenizer, tokens, eos_id: int) -> list[str]:
    """Generated ids ``[N, L]`` -> strings, each cut at its first ``eos_id`` and stripped."""
    out = []
    for row in np.asarray(tokens):
        row = list(row)
        row = row[:row.index(eos_id)] if eos_id in row else row
        out.append(tokenizer.decode(row).strip())
    return out


def corpus_bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) of hypotheses against a
    variable number of references each; returns the score in 0..100."""
    import sacrebleu
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference")
    k = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(k)]
    return float(sacrebleu.corpus_bleu(hyps, streams).score)


__all__ = ["corpus_bleu", "decode_generated", "greedy_generate"]
