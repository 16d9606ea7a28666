"""The local minibatch schedule: per-epoch shuffles, lockstep batches with masks for
uneven shards (ceil(n_i / B) steps per epoch, the last smaller batch included)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    """Mean of per-sample ``values`` [B] over samples with weight ``w`` [B] (0 or 1)."""
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


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
