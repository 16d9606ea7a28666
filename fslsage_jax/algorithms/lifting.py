"""Lifting single-client functions over the leading client axis.

Every simulated client is a slice of one pytree with a leading client axis
``[m, ...]``. :func:`lift` runs a single-client function over that axis and
:func:`sequential` runs a shared server over the clients' uploads in client
order; the strategy (``vmap``, ``map``, ``chunked``, ``unroll``, ``loop``) only
changes how the same computation executes. ``loop`` is the per-client Python
loop of jitted single-client calls that most FL code runs (the benchmarks'
reference); it only makes sense outside ``jax.jit``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms.config import STRATEGIES

UNROLL_MAX_CLIENTS = 16
AUTO_CHUNK_SIZE = 4


def auto_strategy(backend: str, input_shape: tuple, num_clients: int | None = None) -> str:
    """The client-axis strategy measured fastest for a backend and input shape.

    Measured on a 2-core XLA:CPU (jax 0.10.2, the ``cnn`` model, host step loop; see
    BENCHMARKS.md). Images up to 16x16 (digits): ``vmap`` up to ``AUTO_CHUNK_SIZE``
    clients (0.168 s vs 0.186 s a 4-client round), ``chunked`` in chunks of
    ``AUTO_CHUNK_SIZE`` above (their convolutions are matrix products and a chunk's
    working set stays in cache: 0.187 vs 0.257 s at 16 clients, 0.266 vs 0.370 s at 64;
    one program whatever the number of clients). 32x32x3 images: ``vmap`` lowers the
    per-client convolutions to slow grouped convolutions and ``unroll`` is faster (3.4x:
    185 vs 55 samples/s, 4 clients, batch 32); ``unroll`` traces every client separately
    (compile time grows with m), so only up to ``UNROLL_MAX_CLIENTS`` clients, ``vmap``
    above. Other inputs and backends: ``vmap``. With ``chunked``, see :func:`auto_settings`.
    """
    if backend != "cpu" or len(input_shape) != 3:
        return "vmap"
    if input_shape[0] * input_shape[1] <= 16 * 16:
        return "vmap" if num_clients is not None and num_clients <= AUTO_CHUNK_SIZE else "chunked"
    small = num_clients is None or num_clients <= UNROLL_MAX_CLIENTS
    return "unroll" if small else "vmap"


def auto_settings(backend: str, input_shape: tuple, num_clients: int | None = None) -> dict:
    """``{"strategy": ...}`` from :func:`auto_strategy`, with ``"chunk_size":
    AUTO_CHUNK_SIZE`` when it is ``chunked``."""
    strategy = auto_strategy(backend, input_shape, num_clients)
    return {"strategy": strategy, **({"chunk_size": AUTO_CHUNK_SIZE} if strategy == "chunked" else {})}


def _index(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _stack(trees):
    """Per-client outputs stacked on a new leading axis (they must have one structure
    and shape: a mismatch is a real error and raises)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def lift(fn: Callable, strategy: str = "vmap", chunk_size: int = 8, shared: int = 0) -> Callable:
    """Lift a single-client function over the leading client axis of its arguments.

    Args:
      fn: ``fn(*args) -> out`` for one client.
      strategy: ``"vmap"`` (one batched computation), ``"map"`` (``lax.map``,
        clients one after another inside the compiled program), ``"chunked"``
        (``lax.map`` over chunks of ``chunk_size`` vmapped clients; the
        last chunk is padded with copies of the last client, then dropped),
        ``"unroll"`` (clients one after another, unrolled at trace time:
        sequential without a loop body), ``"loop"`` (a Python loop calling the
        jitted single-client function once per client: the per-client loop of
        other FL code, for reference measurements; use it outside ``jax.jit``).
      chunk_size: clients per chunk for ``"chunked"``.
      shared: the first ``shared`` arguments have no client axis (the same for
        every client, e.g. frozen weights or the server's variables).
    Returns:
      ``lifted(*args) -> out_with_client_axis``.
    """
    if strategy == "loop":
        jfn = jax.jit(fn)

        def looped(*a):
            head, mapped = a[:shared], a[shared:]
            m = jax.tree_util.tree_leaves(mapped)[0].shape[0]
            return _stack([jfn(*head, *_index(mapped, i)) for i in range(m)])
        return looped
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")

    def lifted(*a):
        head, mapped = a[:shared], a[shared:]
        one = lambda *t: fn(*head, *t)
        if strategy == "vmap":
            return jax.vmap(one)(*mapped)
        if strategy == "map":
            return jax.lax.map(lambda t: one(*t), mapped)
        m = jax.tree_util.tree_leaves(mapped)[0].shape[0]
        if strategy == "unroll":
            return _stack([one(*_index(mapped, i)) for i in range(m)])
        c = max(1, min(chunk_size, m))                                   # chunked
        n = -(-m // c)
        # pad the client axis to whole chunks by repeating the last client (one trace)
        pad = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], n * c - m, 0)]) if n * c > m else x
        chunks = jax.tree_util.tree_map(lambda x: pad(x).reshape(n, c, *x.shape[1:]), mapped)
        out = jax.lax.map(lambda t: jax.vmap(one)(*t), chunks)
        return jax.tree_util.tree_map(lambda x: x.reshape(n * c, *x.shape[2:])[:m], out)
    return lifted


def sequential(fn: Callable, strategy: str = "vmap") -> Callable:
    """Run ``fn(carry, x, *shared) -> (carry, y)`` over the client axis of ``xs`` in client order.

    This is how one shared server consumes the clients' uploads one after
    another: a ``lax.scan``, an unrolled loop for ``strategy="unroll"``, or a
    Python loop of jitted calls for ``strategy="loop"``. Returns
    ``run(carry, xs, *shared) -> (carry, ys)``.
    """
    if strategy not in ("unroll", "loop"):
        return lambda carry, xs, *shared: jax.lax.scan(lambda c, x: fn(c, x, *shared), carry, xs)
    one = jax.jit(fn) if strategy == "loop" else fn

    def unrolled(carry, xs, *shared):
        ys = []
        for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
            carry, y = one(carry, _index(xs, i), *shared)
            ys.append(y)
        return carry, _stack(ys)
    return unrolled


def branch(pred: Any, true_fn: Callable, false_fn: Callable, *operands):
    """``lax.cond`` inside a trace; a plain Python ``if`` when ``pred`` is concrete
    (the ``loop`` strategy runs its glue eagerly, and then only one branch runs)."""
    if isinstance(pred, jax.core.Tracer):
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)
