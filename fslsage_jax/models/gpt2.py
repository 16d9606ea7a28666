"""GPT-2 with LoRA on the attention query and value projections, split for FSL.

A compact Flax GPT-2 (Radford et al. 2019): learned token and position
embeddings, pre-LN blocks (``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``), causal
multi-head attention with a fused ``c_attn`` projection in Hugging Face's
``Conv1D`` layout (kernel ``[in, out]``, columns ``q | k | v``), GELU (tanh
approximation), a final layer norm and an LM head tied to the token embedding.

LoRA (Hu et al. 2022, ``loralib.MergedLinear`` with ``enable_lora=[True, False,
True]``): ``q += s * dropout(x) @ A_q @ B_q`` and the same for ``v``, with
``s = lora_alpha / lora_rank``, ``A`` kaiming-uniform (``U(-1/sqrt(in),
1/sqrt(in))`` as loralib), ``B = 0``; one dropout mask is shared by the query
and value paths (loralib drops the input once); it is on in train mode when a
``"dropout"`` rng is given (train mode without one: off). LoRA dropout is the only
dropout, as in the LoRA GPT-2 recipe and the FSL-SAGE code (their GPT-2 has no
embedding, attention or residual dropout).

Variables: the pretrained (frozen) weights are declared in the flax collection
``"frozen"``; only the LoRA ``A``/``B`` matrices are ``"params"``. The split:

- client: ``wte + wpe`` and the first ``n_client_blocks`` blocks, token ids
  ``[B, T]`` int32 -> hidden state ``[B, T, D]``;
- server: the remaining blocks, ``ln_f`` and the tied head -> logits ``[B, T, V]``
  (its frozen collection holds its own reference ``wte`` for the head);
- aux: ``n_aux_blocks`` blocks, ``ln_f``, tied head. ``aux_mode="full"``
  follows the FSL-SAGE code (``models/aux_models/gpt2.py``): the auxiliary blocks
  are randomly initialised (normal 0.02, layer norms 1/0, biases 0), have no LoRA
  and are fully trainable (the authors' ``mark_only_lora_as_trainable`` is applied
  to the client and server only); only the tied ``wte`` is frozen.
  ``aux_mode="lora"`` (default, as in the paper: only LoRA parameters are trained and
  travel): the auxiliary blocks are frozen like the others, with
  trainable LoRA on q/v (so only LoRA travels, as docs/semantics.md says);
  :func:`fslsage_jax.models.gpt2_weights.load_gpt2_weights` then fills them with
  copies of the pretrained blocks that follow the cut.

Random initialisation of the frozen token embedding uses a fixed key
(``GPT2Config.wte_seed``) so that the client, server and auxiliary copies made
by ``init_split`` are equal (the head stays tied) whatever the run's key.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fslsage_jax.split import SplitModel

IGNORE = -1
"""Target value of positions that do not count in the loss (MR, separator, padding)."""


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 shape, split and LoRA settings (field names follow ``transformers.GPT2Config``)."""
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 16
    layer_norm_epsilon: float = 1e-5
    n_client_blocks: int = 1
    n_aux_blocks: int = 3
    lora_rank: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    aux_mode: str = "lora"
    initializer_range: float = 0.02
    wte_seed: int = 0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 < self.n_client_blocks < self.n_layer:
            raise ValueError(f"need 0 < n_client_blocks < n_layer, got {self.n_client_blocks}, "
                             f"{self.n_layer}")
        if self.aux_mode not in ("full", "lora"):
            raise ValueError(f"aux_mode must be 'full' or 'lora', got {self.aux_mode!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


GPT2_MEDIUM = GPT2Config()
# Tiny: the real vocabulary (so the GPT-2 tokenizer works), 4 blocks of width 64. Its random
# frozen weights use std 0.1: at GPT-2's 0.02 the logits of a random model are nearly uniform and
# LoRA-only training barely moves (measured: 40 Adam steps, lr 1e-2, 32 E2E rows: train loss
# 10.83 -> 10.62 at 0.02, 11.18 -> 9.87 at 0.1).
GPT2_TINY = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                       n_aux_blocks=1, initializer_range=0.1)


# transformers' names of the tanh-approximated GELU this model computes: ``gelu_new`` and
# ``gelu_pytorch_tanh`` are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); ``gelu_fast`` is the
# same expression written as tanh(0.7978845608 x (1 + 0.044715 x^2)).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# ``transformers.GPT2Config`` fields that change the computation, with the value this model
# reproduces (a field absent from the config object counts as that value).
_HF_REQUIRED = {
    "scale_attn_weights": True,               # scores / sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": False,  # no extra 1 / (layer + 1)
    "add_cross_attention": False,             # no cross-attention sub-layers
    "tie_word_embeddings": True,              # LM head = wte^T
}


def config_from_hf(hf_config, **overrides) -> GPT2Config:
    """A :class:`GPT2Config` from a ``transformers.GPT2Config`` (shape fields) plus overrides.

    Refuses a configuration this model cannot reproduce: an activation other than the tanh
    GELU (``gelu_new``), ``n_inner`` other than ``4 * n_embd``, ``scale_attn_weights=False``,
    ``scale_attn_by_inverse_layer_idx=True``, ``add_cross_attention=True`` or untied
    embeddings. Accepted as they are: ``reorder_and_upcast_attn`` (in float32, as here, it
    computes the same scores, only in another order), and the residual, embedding and
    attention dropout rates (this model has LoRA dropout only, as the LoRA recipe).

    Raises:
      ValueError naming the field and its value.
    """
    def refuse(field, value, why):
        raise ValueError(f"GPT-2 config: {field}={value!r} is not supported ({why})")

    act = getattr(hf_config, "activation_function", "gelu_new")
    if act not in _TANH_GELU:
        refuse("activation_function", act, f"this model computes the tanh GELU, one of {_TANH_GELU}")
    for field, want in _HF_REQUIRED.items():
        value = getattr(hf_config, field, want)
        if bool(value) != want:
            refuse(field, value, f"this model computes {field}={want}")
    n_inner = getattr(hf_config, "n_inner", None)
    if n_inner is not None and n_inner != 4 * hf_config.n_embd:
        refuse("n_inner", n_inner, f"this model's MLP width is 4 * n_embd = {4 * hf_config.n_embd}")
    shape = {k: getattr(hf_config, k) for k in
             ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")}
    return GPT2Config(**{**shape, **overrides})


def layer_norm(x, scale, bias, eps):
    """Layer norm over the last axis (biased variance, eps inside the square root)."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def causal_attention(q, k, v, n_head):
    """Causal multi-head attention; q, k, v ``[B, T, D]`` -> ``[B, T, D]``."""
    b, t, d = q.shape
    split = lambda a: a.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    w = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d // n_head)
    causal = jnp.tril(jnp.ones((t, t), bool))
    w = jnp.where(causal, w, jnp.finfo(w.dtype).min)
    a = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(w, -1), v)
    return a.transpose(0, 2, 1, 3).reshape(b, t, d)


_normal = lambda std: nn.initializers.normal(std)
_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # loralib's kaiming(a=sqrt5)


class Block(nn.Module):
    """One pre-LN transformer block. ``frozen``: base weights in the ``"frozen"``
    collection (else trainable ``"params"``); ``lora``: add LoRA on q and v."""
    config: GPT2Config
    frozen: bool = True
    lora: bool = True

    def _w(self, name, init, shape):
        if self.frozen:
            return self.variable("frozen", name, lambda: init(self.make_rng("params"), shape)).value
        return self.param(name, init, shape)

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        d, std = c.n_embd, c.initializer_range
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        w = {n: self._w(n, init, shape) for n, init, shape in [
            ("ln_1_scale", ones, (d,)), ("ln_1_bias", zeros, (d,)),
            ("c_attn_kernel", _normal(std), (d, 3 * d)), ("c_attn_bias", zeros, (3 * d,)),
            ("attn_proj_kernel", _normal(std), (d, d)), ("attn_proj_bias", zeros, (d,)),
            ("ln_2_scale", ones, (d,)), ("ln_2_bias", zeros, (d,)),
            ("c_fc_kernel", _normal(std), (d, 4 * d)), ("c_fc_bias", zeros, (4 * d,)),
            ("mlp_proj_kernel", _normal(std), (4 * d, d)), ("mlp_proj_bias", zeros, (d,))]}
        h = layer_norm(x, w["ln_1_scale"], w["ln_1_bias"], c.layer_norm_epsilon)
        q, k, v = jnp.split(h @ w["c_attn_kernel"] + w["c_attn_bias"], 3, axis=-1)
        if self.lora:
            r = c.lora_rank
            # no "dropout" rng (e.g. a train-mode pass only for gradients): no dropout
            drop = train and c.lora_dropout > 0 and self.has_rng("dropout")
            hd = nn.Dropout(c.lora_dropout, deterministic=not drop)(h)
            s = c.lora_alpha / r
            q = q + s * (hd @ self.param("lora_q_a", _lora_a_init, (d, r))
                         @ self.param("lora_q_b", nn.initializers.zeros, (r, d)))
            v = v + s * (hd @ self.param("lora_v_a", _lora_a_init, (d, r))
                         @ self.param("lora_v_b", nn.initializers.zeros, (r, d)))
        x = x + causal_attention(q, k, v, c.n_head) @ w["attn_proj_kernel"] + w["attn_proj_bias"]
        h = layer_norm(x, w["ln_2_scale"], w["ln_2_bias"], c.layer_norm_epsilon)
        h = jax.nn.gelu(h @ w["c_fc_kernel"] + w["c_fc_bias"], approximate=True)
        return x + h @ w["mlp_proj_kernel"] + w["mlp_proj_bias"]


def _wte(module: nn.Module, c: GPT2Config):
    """The frozen token embedding ``[V, D]``, randomly initialised from ``c.wte_seed``."""
    init = lambda: _normal(c.initializer_range)(jax.random.key(c.wte_seed), (c.vocab_size, c.n_embd))
    return module.variable("frozen", "wte", init).value


class GPT2Client(nn.Module):
    """Embeddings and the first ``n_client_blocks`` blocks: ids ``[B, T]`` -> ``[B, T, D]``."""
    config: GPT2Config
    lora: bool = True

    @nn.compact
    def __call__(self, ids, train: bool = False):
        c = self.config
        wte = _wte(self, c)
        wpe = self.variable("frozen", "wpe", lambda: _normal(c.initializer_range)(
            self.make_rng("params"), (c.n_positions, c.n_embd))).value
        x = wte[ids] + wpe[jnp.arange(ids.shape[-1])]
        for i in range(c.n_client_blocks):
            x = Block(c, lora=self.lora, name=f"h_{i}")(x, train)
        return x


class GPT2Head(nn.Module):
    """Blocks ``first..first+n_blocks-1``, final layer norm and the tied LM head:
    ``[B, T, D]`` -> logits ``[B, T, V]``. ``frozen_blocks=False``: trainable blocks
    without LoRA (the FSL-SAGE auxiliary model)."""
    config: GPT2Config
    first: int
    n_blocks: int
    frozen_blocks: bool = True
    lora: bool = True

    @nn.compact
    def __call__(self, z, train: bool = False):
        c = self.config
        x = z
        for i in range(self.first, self.first + self.n_blocks):
            x = Block(c, frozen=self.frozen_blocks, lora=self.lora, name=f"h_{i}")(x, train)
        col = "frozen" if self.frozen_blocks else "params"
        if self.frozen_blocks:
            scale = self.variable(col, "ln_f_scale", lambda: jnp.ones((c.n_embd,))).value
            bias = self.variable(col, "ln_f_bias", lambda: jnp.zeros((c.n_embd,))).value
        else:
            scale = self.param("ln_f_scale", nn.initializers.ones, (c.n_embd,))
            bias = self.param("ln_f_bias", nn.initializers.zeros, (c.n_embd,))
        return layer_norm(x, scale, bias, c.layer_norm_epsilon) @ _wte(self, c).T


class GPT2Full(nn.Module):
    """The unsplit model (all blocks, no split) with the same variable layout as the
    client and server parts combined: ids -> logits. For tests and references."""
    config: GPT2Config
    lora: bool = True

    @nn.compact
    def __call__(self, ids, train: bool = False):
        c = self.config
        z = GPT2Client(c, lora=self.lora, name="client")(ids, train)
        return GPT2Head(c, c.n_client_blocks, c.n_layer - c.n_client_blocks, lora=self.lora,
                        name="server")(z, train)


def make_parts(c: GPT2Config, lora: bool = True) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(client, server, aux)`` flax modules of the split (``lora=False``: the base model)."""
    client = GPT2Client(c, lora=lora)
    server = GPT2Head(c, c.n_client_blocks, c.n_layer - c.n_client_blocks, lora=lora)
    if c.aux_mode == "full":
        aux = GPT2Head(c, c.n_client_blocks, c.n_aux_blocks, frozen_blocks=False, lora=False)
    else:
        aux = GPT2Head(c, c.n_client_blocks, c.n_aux_blocks, lora=lora)
    return client, server, aux


def lm_token_losses(logits: jax.Array, y: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy ``[B, T]`` with label smoothing, 0 where ``y < 0``.

    ``(1 - s) * -log p[y] + s * mean_v(-log p[v])`` (optax/PyTorch label smoothing,
    the FSL-SAGE ``MaskingCrossEntropyLoss``).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[..., None], -1)[..., 0]
    tok = (1.0 - smoothing) * nll - smoothing * logp.mean(-1) if smoothing else nll
    return jnp.where(y >= 0, tok, 0.0)


def lm_loss_sums(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample ``(sum of token cross-entropies, number of counted tokens)``, both ``[B]``.

    Token-weighted perplexity over a set = ``exp(sum(sums) / sum(counts))``.
    """
    return lm_token_losses(logits, y).sum(-1), (y >= 0).sum(-1).astype(jnp.float32)


def lm_loss(logits: jax.Array, y: jax.Array, smoothing: float = 0.1) -> jax.Array:
    """Per-sample training loss ``[B]``: mean over the sample's counted tokens
    (``y >= 0``) of label-smoothed cross-entropy; 0 for a sample without any."""
    n = (y >= 0).sum(-1)
    return lm_token_losses(logits, y, smoothing).sum(-1) / jnp.maximum(n, 1)


def lm_eval_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample mean token cross-entropy without smoothing ``[B]`` (0 if no token counts)."""
    return lm_loss(logits, y, smoothing=0.0)


def lm_token_count(y: jax.Array) -> jax.Array:
    """Per-sample number of counted target tokens ``[B]`` (float32)."""
    return (y >= 0).sum(-1).astype(jnp.float32)


def lm_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample fraction of counted tokens whose arg-max equals the target ``[B]``."""
    m = y >= 0
    hit = ((jnp.argmax(logits, -1) == y) & m).sum(-1)
    return hit / jnp.maximum(m.sum(-1), 1)


@dataclasses.dataclass(frozen=True)
class SmoothedLMLoss:
    """:func:`lm_loss` with a fixed label smoothing, as a value (equal splits hash equal)."""
    smoothing: float = 0.1

    def __call__(self, logits: jax.Array, y: jax.Array) -> jax.Array:
        return lm_loss(logits, y, self.smoothing)


def make_gpt2(config: GPT2Config = GPT2_MEDIUM, seq_len: int = 512,
              label_smoothing: float = 0.1) -> SplitModel:
    """The ``gpt2`` split model for token sequences of length ``seq_len``.

    Args:
      config: model shape, split and LoRA settings (:data:`GPT2_MEDIUM`, :data:`GPT2_TINY`).
      seq_len: tokens per sample (at most ``config.n_positions``).
      label_smoothing: of the training loss (the eval loss has none).
    Returns:
      a :class:`SplitModel` with int32 inputs ``[seq_len]``, targets ``[seq_len]``
      (``IGNORE = -1`` where not counted) and ``num_classes = vocab_size``.
    """
    if not 0 < seq_len <= config.n_positions:
        raise ValueError(f"seq_len must be in 1..{config.n_positions}, got {seq_len}")
    client, server, aux = make_parts(config)
    return SplitModel("gpt2", client, server, aux, (seq_len,), config.vocab_size,
                      loss=SmoothedLMLoss(label_smoothing),
                      correct=lm_correct, label_shape=(seq_len,), eval_loss=lm_eval_loss,
                      input_dtype=jnp.int32, eval_weight=lm_token_count)


def tie_embeddings(client, server, aux):
    """The three parts' :class:`~fslsage_jax.split.Vars` with the server's and the
    auxiliary's frozen ``wte`` replaced by the client's array (one copy in memory)."""
    def tie(v):
        return v.with_frozen({**v.frozen, "wte": client.frozen["wte"]})
    return client, tie(server), tie(aux)


def lora_param_count(config: GPT2Config) -> int:
    """Trainable LoRA parameters of client + server: ``n_layer * 2 * 2 * n_embd * rank``."""
    return config.n_layer * 2 * 2 * config.n_embd * config.lora_rank


__all__ = [
    "GPT2_MEDIUM",
    "GPT2_TINY",
    "IGNORE",
    "Block",
    "GPT2Client",
    "GPT2Config",
    "GPT2Full",
    "GPT2Head",
    "SmoothedLMLoss",
    "config_from_hf",
    "lm_correct",
    "lm_eval_loss",
    "lm_loss",
    "lm_loss_sums",
    "lm_token_losses",
    "lora_param_count",
    "make_gpt2",
    "make_parts",
    "tie_embeddings",
]
