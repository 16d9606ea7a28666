"""The fixed-size FIFO of uploaded (z, y) samples that FSL-SAGE aligns on.

A ring: a push writes its rows in place after the newest ones (no copy of the
buffer), overwriting the oldest when it is full. Read it in arrival order with
:func:`buffer_positions` or mask it with :func:`buffer_mask`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Buffer(NamedTuple):
    """A fixed-size FIFO of (z, y) samples: the newest ``size`` rows, in arrival order,
    sit at the ``size`` ring positions before ``head`` (``head = 0``: the last ``size``
    rows, oldest first)."""
    z: jax.Array        # [cap, ...]
    y: jax.Array        # [cap, ...]
    size: jax.Array     # int32 scalar, number of valid samples
    head: Any = 0       # int32 scalar, the ring position the next sample is written to


def buffer_init(capacity: int, z_shape: tuple, y_shape: tuple = (),
                z_dtype=jnp.float32, y_dtype=jnp.int32) -> Buffer:
    """An empty FIFO buffer of ``capacity`` samples."""
    return Buffer(jnp.zeros((capacity, *z_shape), z_dtype), jnp.zeros((capacity, *y_shape), y_dtype),
                  jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_push(buf: Buffer, z: jax.Array, y: jax.Array, w: jax.Array) -> Buffer:
    """Append the valid rows of a batch (rows with ``w > 0`` must come first).

    Keeps the newest ``capacity`` samples in arrival order, like a list that is
    appended to and then cut to its last ``capacity`` entries. The rows are written
    in place (a scatter of the batch), not by copying the buffer.
    """
    cap = buf.z.shape[0]
    n = jnp.sum(w > 0).astype(jnp.int32)
    head = jnp.asarray(buf.head, jnp.int32)
    j = jnp.arange(z.shape[0])
    # row j goes to head + j; rows past the valid ones, or older than the last cap of them, nowhere
    pos = jnp.where((j < n) & (j >= n - cap), (head + j) % cap, cap)
    put = lambda old, new: old.at[pos].set(new.astype(old.dtype), mode="drop")
    return Buffer(put(buf.z, z), put(buf.y, y), jnp.minimum(buf.size + n, cap), (head + n) % cap)


def buffer_positions(buf: Buffer) -> jax.Array:
    """``[cap]`` int32: ring position of the ``v``-th oldest valid sample at index ``v``
    (``v < size``; the rest continue the ring)."""
    cap = buf.z.shape[0]
    return (jnp.asarray(buf.head, jnp.int32) - buf.size + jnp.arange(cap)) % cap


def buffer_mask(buf: Buffer) -> jax.Array:
    """``[cap]`` float mask of valid entries (the ``size`` positions before ``head``)."""
    cap = buf.z.shape[0]
    age = (jnp.asarray(buf.head, jnp.int32) - 1 - jnp.arange(cap)) % cap    # 0: the newest
    return (age < buf.size).astype(jnp.float32)
