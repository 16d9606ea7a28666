"""The fixed-size FIFO of uploaded (z, y) samples that FSL-SAGE aligns on."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
