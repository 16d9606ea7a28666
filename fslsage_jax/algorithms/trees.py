"""Pytree helpers over the client axis: masked selection, weighted averaging, copies."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``pred`` holds, else ``old``, leaf by leaf."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def weighted_average(tree: Any, weights: jax.Array) -> Any:
    """Average a pytree over its leading client axis with weights (n_i / n).

    Float leaves: the weighted mean (dtype kept). Integer leaves (e.g. an optimizer's
    step count): the value every client holds when they agree (exact), else the
    weighted mean rounded to the nearest integer (independent of client order).
    Other dtypes (bool, PRNG keys) have no average and are refused.

    Args:
      tree: leaves of shape ``[m, ...]``.
      weights: ``[m]``, non-negative; normalised here.
    Returns:
      the average, leaves of shape ``[...]`` (no client axis).
    Raises:
      TypeError: a leaf whose dtype has no average.
    """
    w = weights / jnp.sum(weights)

    def avg(path, x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.tensordot(w.astype(x.dtype), x, axes=1)
        if jnp.issubdtype(x.dtype, jnp.integer):
            mean = jnp.round(jnp.tensordot(w, x.astype(jnp.float32), axes=1)).astype(x.dtype)
            return jnp.where(jnp.all(x == x[0], axis=0), x[0], mean)
        raise TypeError(f"weighted_average: leaf {jax.tree_util.keystr(path)} has dtype {x.dtype}, "
                        f"which has no average")
    return jax.tree_util.tree_map_with_path(avg, tree)


def broadcast(tree: Any, m: int) -> Any:
    """Give every leaf a leading client axis of size ``m`` (copies)."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (m, *x.shape)), tree)
