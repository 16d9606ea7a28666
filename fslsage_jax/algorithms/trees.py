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
