"""The split-model abstraction: client, server and auxiliary parts of one model.

A split model (Nair et al., ICML 2025, FSL-SAGE; Thapa et al., SplitFed) cuts a
network at a cut layer: the client part maps an input to the cut-layer
activation ``z`` ("smashed data"), the server part maps ``z`` to the output, and
a small auxiliary part also maps ``z`` to the output.

Every part's variables are a :class:`Vars` pair: ``params`` (trainable, seen by
the optimizer) and ``state`` (non-trainable collections that the forward pass
may update, e.g. BatchNorm ``batch_stats``). Both are averaged between rounds
and both count in the model bytes. A model may also hold frozen weights in the
flax collection ``"frozen"`` (e.g. GPT-2's base weights under LoRA): they are
never trained, averaged or sent, and are held ONCE for all clients
(``Vars.frozen``, attached inside a lifted step, never given a client axis). Algorithms only call :func:`apply_part`,
so any flax module trio (CNN, ResNet with BatchNorm, a transformer with a
different loss) plugs in without changing them.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


FROZEN = "frozen"


class Vars(NamedTuple):
    """Variables of one model part: trainable ``params``, non-trainable ``state``
    (both per client), and ``frozen`` weights shared by all clients (or None)."""
    params: Any
    state: Any
    frozen: Any = None

    def shared(self) -> tuple["Vars", Any]:
        """``(self without its frozen weights, the frozen weights)``."""
        return self._replace(frozen=None), self.frozen

    def with_frozen(self, frozen: Any) -> "Vars":
        """The same variables with ``frozen`` attached."""
        return self._replace(frozen=frozen)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels -> [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def argmax_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample 1.0 where the arg-max class equals the label -> [B]."""
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model cut into client, server and auxiliary flax modules.

    Attributes:
      name: model name (e.g. ``"cnn"``).
      client, server, aux: flax modules; each is called as ``module(x, train=...)`` when
        its ``__call__`` takes ``train`` (BatchNorm, dropout), else as ``module(x)``.
      input_shape: shape of one input sample, e.g. ``(8, 8, 1)``.
      num_classes: number of output classes.
      loss: ``(logits, labels) -> [B]`` per-sample training loss.
      correct: ``(logits, labels) -> [B]`` per-sample accuracy (0/1).
      label_shape: shape of one label (``()`` for classification).
      masked_batch_stats: the modules take ``mask=`` ([B] bool, real samples of a
        padded batch) so that batch statistics skip padding (BatchNorm).
      input_fn: ``(x, rng, train) -> x`` applied on the device to raw client
        inputs before the client model (augmentation, normalisation); None: none.
      eval_loss: per-sample evaluation loss (None: ``loss``), e.g. without label smoothing.
      input_dtype: dtype of the raw inputs (float32 images, int32 tokens).
      eval_weight: ``labels -> [B]`` weight of each sample in evaluation averages
        (None: 1), e.g. its number of counted tokens, so that a language model's
        test loss is the token-weighted mean (log perplexity).
    """
    name: str
    client: nn.Module
    server: nn.Module
    aux: nn.Module
    input_shape: tuple
    num_classes: int
    loss: Callable = cross_entropy
    correct: Callable = argmax_correct
    label_shape: tuple = ()
    masked_batch_stats: bool = False
    input_fn: Callable | None = None
    eval_loss: Callable | None = None
    input_dtype: Any = jnp.float32
    eval_weight: Callable | None = None


@functools.lru_cache(maxsize=None)
def takes_train(cls: type) -> bool:
    """Whether modules of class ``cls`` take the ``train=`` keyword (or any keyword).
    Parts that do not are plain flax modules, called without it (no training mode)."""
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return True
    return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _mode(module: nn.Module, train: bool) -> dict:
    return {"train": train} if takes_train(type(module)) else {}


def init_part(module: nn.Module, key: jax.Array, x: jax.Array) -> Vars:
    """Initialise one part on an example batch ``x``; returns its :class:`Vars`."""
    variables = dict(module.init({"params": key, "dropout": key}, x, **_mode(module, False)))
    params = variables.pop("params", {})
    frozen = variables.pop(FROZEN, None)
    return Vars(params, variables, frozen)


def apply_part(module: nn.Module, v: Vars, x: jax.Array, train: bool,
               rng: jax.Array | None = None, mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Pure forward pass of one part.

    Args:
      module: the flax module.
      v: its variables (``v.frozen``, if any, is passed as the ``"frozen"`` collection).
      x: input batch.
      train: training mode (BatchNorm batch statistics, dropout on).
      rng: dropout key (may be None for deterministic modules).
      mask: ``[B]`` real-sample mask, passed as ``mask=`` (only for modules that take it).
    Returns:
      ``(output, new_state)``; ``new_state`` equals ``v.state`` in eval mode.
    """
    variables = {"params": v.params, **v.state}
    if v.frozen is not None:
        variables[FROZEN] = v.frozen
    rngs = {"dropout": rng} if rng is not None else {}
    kw = {} if mask is None else {"mask": mask}
    if train and v.state:
        out, new_state = module.apply(variables, x, rngs=rngs, mutable=list(v.state.keys()),
                                      **_mode(module, True), **kw)
        return out, dict(new_state)
    return module.apply(variables, x, rngs=rngs, **_mode(module, train), **kw), v.state


def prepare_input(split: "SplitModel", x: jax.Array, rng: jax.Array | None, train: bool) -> jax.Array:
    """Raw client inputs -> model inputs through ``split.input_fn`` (identity if None)."""
    if split.input_fn is None:
        return x
    return split.input_fn(x, rng, train)


def batch_mask(split: "SplitModel", w: jax.Array) -> jax.Array | None:
    """The ``mask=`` argument for a batch with sample weights ``w`` (None if unused)."""
    return (w > 0) if split.masked_batch_stats else None


def init_split(split: SplitModel, key: jax.Array) -> tuple[Vars, Vars, Vars]:
    """Initialise client, server and auxiliary variables (no client axis).

    Runs as one compiled program per (hashable) split model: run op by op, a flax
    init dispatches and compiles ~90 small programs (seconds on a CPU). Values
    equal the op-by-op ones up to float rounding (~1 ulp in the random normals).
    """
    try:
        program = _init_program(split)
    except TypeError:                   # an unhashable split model: op by op
        return _init_split(split, key)
    return program(key)


@functools.lru_cache(maxsize=16)
def _init_program(split: SplitModel) -> Callable:
    return jax.jit(functools.partial(_init_split, split))


def _init_split(split: SplitModel, key: jax.Array) -> tuple[Vars, Vars, Vars]:
    kc, ks, ka = jax.random.split(key, 3)
    x = prepare_input(split, jnp.zeros((1, *split.input_shape), split.input_dtype), None, False)
    client = init_part(split.client, kc, x)
    z, _ = apply_part(split.client, client, x, train=False)
    return client, init_part(split.server, ks, z), init_part(split.aux, ka, z)


def cut_shape(split: SplitModel) -> tuple[tuple, Any]:
    """Shape and dtype of one sample's cut-layer activation, from shapes only."""
    client, _, _ = jax.eval_shape(functools.partial(init_split, split), jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *split.input_shape), split.input_dtype)
    z = jax.eval_shape(lambda v, x: apply_part(split.client, v, prepare_input(split, x, None, False),
                                               False)[0], client, x)
    return tuple(z.shape[1:]), z.dtype


def tree_bytes(tree: Any) -> int:
    """Exact bytes of every array leaf in ``tree`` (shape x itemsize)."""
    return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize
               for l in jax.tree_util.tree_leaves(tree))


def tree_size(tree: Any) -> int:
    """Number of elements over every array leaf of ``tree``."""
    return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


def model_bytes(v: Vars) -> int:
    """Bytes a part costs to send: parameters plus non-trainable state (frozen weights
    are never sent)."""
    return tree_bytes(v.params) + tree_bytes(v.state)


def describe(split: SplitModel) -> dict:
    """Parameter and state counts, byte sizes and the cut shape of a split model."""
    client, server, aux = jax.eval_shape(functools.partial(init_split, split), jax.random.key(0))
    z_shape, z_dtype = cut_shape(split)
    parts = {"client": client, "server": server, "aux": aux}
    out = {"model": split.name, "input_shape": list(split.input_shape),
           "num_classes": split.num_classes,
           "cut_shape": list(z_shape),
           "cut_bytes_per_sample": int(np.prod(z_shape)) * np.dtype(z_dtype).itemsize,
           "param_counts": {k: tree_size(v.params) for k, v in parts.items()},
           "state_counts": {k: tree_size(v.state) for k, v in parts.items()},
           "frozen_counts": {k: tree_size(v.frozen) for k, v in parts.items()},
           "model_bytes": {k: model_bytes(v) for k, v in parts.items()}}
    for d in ("param_counts", "state_counts", "frozen_counts", "model_bytes"):
        out[d]["full"] = out[d]["client"] + out[d]["server"]
    return out
