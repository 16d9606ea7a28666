"""Shared pieces of every algorithm: configuration, lifting over the client axis,
the minibatch schedule, masked updates, weighted averaging and the FIFO buffer.

Every simulated client is a slice of one pytree with a leading client axis
``[m, ...]``. Single-client functions are lifted over that axis by
:func:`lift`; the strategy (``vmap``, ``map``, ``chunked``, ``unroll``) only
changes how the same computation is executed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

STRATEGIES = ("vmap", "map", "chunked", "unroll")
STEP_LOOPS = ("scan", "host")


UNROLL_MAX_CLIENTS = 16


def auto_strategy(backend: str, input_shape: tuple, num_clients: int | None = None) -> str:
    """The client-axis strategy measured fastest for a backend and input shape.

    Measured on a 2-core XLA:CPU (jax 0.10.2, the ``cnn`` model, host step
    loop; see BENCHMARKS.md): for 8x8 digits ``vmap`` is fastest (1.4-2x
    ``unroll``, 3-10x ``map``/``chunked``); for 32x32x3 images ``vmap`` lowers the
    per-client convolutions to slow grouped convolutions and ``unroll`` is
    faster (3.4x: 185 vs 55 samples/s, 4 clients, batch 32). ``unroll`` traces every client separately (compile time and program
    size grow with m), so above ``UNROLL_MAX_CLIENTS`` clients ``vmap`` is used.
    Other backends get ``vmap`` until measured otherwise.
    """
    small = num_clients is None or num_clients <= UNROLL_MAX_CLIENTS
    if backend == "cpu" and small and len(input_shape) == 3 and input_shape[0] * input_shape[1] > 16 * 16:
        return "unroll"
    return "vmap"


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a federated split learning run (defaults: the paper's).

    Attributes:
      num_clients: m, number of simulated clients.
      local_epochs: E, local epochs per round.
      batch_size: B, local minibatch size.
      lr, weight_decay: learning rate and weight decay for client, server and
        CSE-FSL auxiliary models.
      optimizer: ``"adam"`` (PyTorch Adam: L2 decay added to the gradient; the
        image recipe) or ``"adamw"`` (decoupled decay; the GPT-2 LoRA recipe).
      adam_eps: Adam epsilon (1e-8; the GPT-2 recipe uses 1e-6).
      warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
      server_update_interval: Q, a client uploads when its local iteration
        index k satisfies k % Q == 0 (CSE-FSL, FSL-SAGE).
      align_interval: l, FSL-SAGE aligns the auxiliary models every l rounds.
      align_epochs, align_batch_size, align_buffer_size, align_lr: alignment
        passes, minibatch, FIFO capacity per client, Adam learning rate.
      strategy: how the client axis is executed (see ``STRATEGIES``).
      chunk_size: clients per vmapped chunk for ``strategy="chunked"``.
      step_loop: ``"scan"`` compiles a whole round as one ``lax.scan`` over the
        local steps; ``"host"`` calls one compiled step per local step from
        Python (never a loop over clients).
    """
    num_clients: int = 3
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    server_update_interval: int = 5
    align_interval: int = 10
    align_epochs: int = 100
    align_batch_size: int = 1000
    align_buffer_size: int = 1000
    align_lr: float = 1e-3
    strategy: str = "vmap"
    chunk_size: int = 8
    step_loop: str = "host"


OPTIMIZERS = ("adam", "adamw")


def make_optimizer(lr: float, weight_decay: float, kind: str = "adam", eps: float = 1e-8,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """The client/server optimizer.

    Args:
      lr: peak learning rate.
      weight_decay: ``"adam"``: PyTorch-style L2 decay added to the gradient;
        ``"adamw"``: decoupled decay (PyTorch ``AdamW``).
      kind: ``"adam"`` or ``"adamw"``.
      eps: Adam epsilon.
      warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
    """
    sched = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr)
    if kind == "adam":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(sched, eps=eps))
    if kind == "adamw":
        return optax.adamw(sched, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {OPTIMIZERS}")


def optimizer_for(cfg: Config) -> optax.GradientTransformation:
    """:func:`make_optimizer` from a :class:`Config`."""
    return make_optimizer(cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.adam_eps, cfg.warmup_steps)


# ----------------------------------------------------------------------------- lifting
class _PerClient:
    """Per-client values that cannot be stacked (e.g. VJP closures traced
    separately by the ``unroll`` strategy); indexed back client by client."""

    def __init__(self, items):
        self.items = list(items)


def _index(tree, i):
    return jax.tree_util.tree_map(lambda x: x.items[i] if isinstance(x, _PerClient) else x[i], tree,
                                  is_leaf=lambda x: isinstance(x, _PerClient))


def _stack(trees):
    try:
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
    except (ValueError, TypeError):
        if isinstance(trees[0], tuple):
            return tuple(_stack(list(parts)) for parts in zip(*trees))
        return _PerClient(trees)


def lift(fn: Callable, strategy: str = "vmap", chunk_size: int = 8) -> Callable:
    """Lift a single-client function over the leading client axis of all its arguments.

    Args:
      fn: ``fn(*args) -> out`` for one client.
      strategy: ``"vmap"`` (one batched computation), ``"map"`` (``lax.map``,
        clients one after another inside the compiled program), ``"chunked"``
        (``lax.map`` over chunks of ``chunk_size`` vmapped clients; the
        last chunk is padded with copies of the last client, then dropped), ``"unroll"`` (clients one after another, unrolled
        at trace time: sequential without a loop body).
    Returns:
      ``lifted(*args_with_client_axis) -> out_with_client_axis``.
    """
    if strategy == "vmap":
        return jax.vmap(fn)
    if strategy == "map":
        return lambda *a: jax.lax.map(lambda t: fn(*t), a)
    if strategy == "unroll":
        def unrolled(*a):
            m = jax.tree_util.tree_leaves(a)[0].shape[0]
            return _stack([fn(*_index(a, i)) for i in range(m)])
        return unrolled
    if strategy == "chunked":
        vfn = jax.vmap(fn)

        def chunked(*a):
            m = jax.tree_util.tree_leaves(a)[0].shape[0]
            c = max(1, min(chunk_size, m))
            n = -(-m // c)
            # pad the client axis to whole chunks by repeating the last client (one trace)
            pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], n * c - m, 0)]) if n * c > m else x
            head = jax.tree_util.tree_map(lambda x: pad(x).reshape(n, c, *x.shape[1:]), a)
            out = jax.lax.map(lambda t: vfn(*t), head)
            return jax.tree_util.tree_map(lambda x: x.reshape(n * c, *x.shape[2:])[:m], out)
        return chunked
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def sequential(fn: Callable, strategy: str = "vmap") -> Callable:
    """Run ``fn(carry, x) -> (carry, y)`` over the client axis of ``xs`` in client order.

    This is how one shared server consumes the clients' uploads one after
    another: a ``lax.scan`` (or an unrolled loop for ``strategy="unroll"``).
    """
    if strategy != "unroll":
        return lambda carry, xs: jax.lax.scan(fn, carry, xs)

    def unrolled(carry, xs):
        ys = []
        for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
            carry, y = fn(carry, _index(xs, i))
            ys.append(y)
        return carry, _stack(ys)
    return unrolled


# ----------------------------------------------------------------------------- tree helpers
def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``pred`` holds, else ``old``, leaf by leaf."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def weighted_average(tree: Any, weights: jax.Array) -> Any:
    """Average a pytree over its leading client axis with weights (n_i / n).

    Args:
      tree: leaves of shape ``[m, ...]``.
      weights: ``[m]``, non-negative; normalised here.
    Returns:
      the average, leaves of shape ``[...]`` (no client axis).
    """
    w = weights / jnp.sum(weights)
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1) if jnp.issubdtype(x.dtype, jnp.floating)
        else x[0], tree)


def broadcast(tree: Any, m: int) -> Any:
    """Give every leaf a leading client axis of size ``m`` (copies)."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (m, *x.shape)), tree)


def masked_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    """Mean of per-sample ``values`` [B] over samples with weight ``w`` [B] (0 or 1)."""
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


# ----------------------------------------------------------------------------- schedule
def steps_per_epoch(n: int, batch_size: int) -> int:
    """ceil(n / B): minibatches per epoch, the last smaller one included."""
    return -(-n // batch_size)


def shuffled_order(key: jax.Array, count: jax.Array, n_max: int) -> jax.Array:
    """A random order of ``range(n_max)`` with the ``count`` valid indices first."""
    u = jax.random.uniform(key, (n_max,))
    return jnp.argsort(jnp.where(jnp.arange(n_max) < count, u, 2.0))


class Batch(NamedTuple):
    """One lockstep local step for all clients (leading axis m)."""
    x: jax.Array        # [m, B, ...]
    y: jax.Array        # [m, B, ...]
    w: jax.Array        # [m, B] float 0/1: real sample or padding
    active: jax.Array   # [m] bool: the client has a minibatch at this step
    k: jax.Array        # [m] int32: the client's own local iteration index


def epoch_orders(key: jax.Array, counts: jax.Array, n_max: int, epochs: int) -> jax.Array:
    """Per-epoch, per-client shuffles: int32 ``[E, m, n_max]``."""
    m = counts.shape[0]
    keys = jax.random.split(key, epochs * m).reshape(epochs, m)
    return jax.vmap(jax.vmap(shuffled_order, (0, 0, None)), (0, None, None))(keys, counts, n_max)


def gather_batch(x: jax.Array, y: jax.Array, counts: jax.Array, orders: jax.Array,
                 step: jax.Array, batch_size: int) -> Batch:
    """The minibatch of every client at lockstep step ``step`` (0 .. E*S-1).

    Step ``step`` is epoch ``step // S``, minibatch ``step % S`` with
    S = ceil(n_max / B). A client whose shard has fewer minibatches is inactive
    for the rest of that epoch. Its own local index is ``e * ceil(n_i/B) + s``.
    """
    n_max = x.shape[1]
    s_max = steps_per_epoch(n_max, batch_size)
    e, s = step // s_max, step % s_max
    pos = s * batch_size + jnp.arange(batch_size)
    idx = jax.lax.dynamic_index_in_dim(orders, e, 0, keepdims=False)
    idx = jnp.take(idx, jnp.minimum(pos, n_max - 1), axis=1)                # [m, B]
    take = jax.vmap(lambda a, i: jnp.take(a, i, axis=0))
    w = (pos[None, :] < counts[:, None]).astype(jnp.float32)
    k = e * ((counts + batch_size - 1) // batch_size) + s
    return Batch(take(x, idx), take(y, idx), w, s * batch_size < counts, k.astype(jnp.int32))


# ----------------------------------------------------------------------------- FIFO buffer
class Buffer(NamedTuple):
    """A fixed-size FIFO of (z, y) samples; the newest ``size`` sit at the end, oldest first."""
    z: jax.Array      # [cap, ...]
    y: jax.Array      # [cap, ...]
    size: jax.Array   # int32 scalar, number of valid samples


def buffer_init(capacity: int, z_shape: tuple, y_shape: tuple = (),
                z_dtype=jnp.float32, y_dtype=jnp.int32) -> Buffer:
    """An empty FIFO buffer of ``capacity`` samples."""
    return Buffer(jnp.zeros((capacity, *z_shape), z_dtype), jnp.zeros((capacity, *y_shape), y_dtype),
                  jnp.zeros((), jnp.int32))


def buffer_push(buf: Buffer, z: jax.Array, y: jax.Array, w: jax.Array) -> Buffer:
    """Append the valid rows of a batch (rows with ``w > 0`` must come first).

    Keeps the newest ``capacity`` samples in arrival order, like a list that is
    appended to and then cut to its last ``capacity`` entries.
    """
    cap = buf.z.shape[0]
    n = jnp.sum(w > 0).astype(jnp.int32)
    def shift(old, new):
        both = jnp.concatenate([old, new.astype(old.dtype)])
        return jax.lax.dynamic_slice_in_dim(both, n, cap)
    return Buffer(shift(buf.z, z), shift(buf.y, y), jnp.minimum(buf.size + n, cap))


def buffer_mask(buf: Buffer) -> jax.Array:
    """``[cap]`` float mask of valid entries (the last ``size`` rows)."""
    cap = buf.z.shape[0]
    return (jnp.arange(cap) >= cap - buf.size).astype(jnp.float32)
