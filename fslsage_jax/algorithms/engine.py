"""The round driver shared by all algorithms.

An algorithm supplies three pure pieces (how its state starts, one lockstep
local step for all clients, the end-of-round aggregation); the engine turns
them into ``run_round(state, data, key) -> (state, metrics)``: per-epoch
shuffles, batch gathering with masks for uneven shards, the local steps (one
``lax.scan`` or one compiled step per local step), and on-device metric
accumulation pulled to the host once per round.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.common import (Config, broadcast, epoch_orders, gather_batch,
                                           sequential, steps_per_epoch, tree_where,
                                           weighted_average)
from fslsage_jax.split import SplitModel, Vars, apply_part, init_split, prepare_input


class State(NamedTuple):
    """Simulation state. Fields an algorithm does not use are None.

    ``clients``, ``client_opt``, ``aux``, ``aux_opt``, ``buffer`` carry a
    leading client axis ``[m, ...]``; ``server`` and ``server_opt`` do not,
    except for SplitFed-MS and FedAvg, where every client has its own copy.
    ``frozen`` is None or ``(client, server, aux)`` frozen weights, held once for
    all clients (no client axis); the ``Vars`` in the other fields have ``frozen=None``.
    """
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Any = None
    server_opt: Any = None
    aux: Any = None
    aux_opt: Any = None
    buffer: Any = None
    frozen: Any = None


def init_parts(split: SplitModel, key: jax.Array) -> tuple[Vars, Vars, Vars, Any]:
    """``init_split`` with the frozen weights taken out: ``(client, server, aux, frozen)``,
    ``frozen`` None or ``(client, server, aux)`` frozen trees."""
    parts = [v.shared() for v in init_split(split, key)]
    frozen = tuple(f for _, f in parts)
    return (*(v for v, _ in parts), None if all(f is None for f in frozen) else frozen)


def frozen_parts(state: State) -> tuple:
    """``(client, server, aux)`` frozen weights of ``state`` (Nones when there are none)."""
    return (None, None, None) if state.frozen is None else state.frozen


METRIC_KEYS = ("loss_sum", "loss_n", "z_up", "g_down", "cos_sum", "cos_n",
               "align_loss_first", "align_loss_last")


def zero_metrics() -> dict:
    """On-device round accumulators (float32 sums, int32 sample counts)."""
    return {k: jnp.zeros((), jnp.int32 if k in ("z_up", "g_down") else jnp.float32)
            for k in METRIC_KEYS}


class ClientArrays(NamedTuple):
    """Client data on the device: padded ``x [m, n_max, ...]``, ``y [m, n_max, ...]``, ``counts [m]``."""
    x: jax.Array
    y: jax.Array
    counts: jax.Array


class Algorithm(NamedTuple):
    """An algorithm made for one split model and config.

    ``init(key, data) -> State``; ``run_round(state, data, key) -> (state,
    metrics)`` (compiled); ``global_model(state) -> (client Vars, server Vars)``
    after aggregation; ``name`` its CLI name.
    """
    name: str
    init: Callable
    run_round: Callable
    global_model: Callable


def add_loss(acc: dict, losses: jax.Array, n: jax.Array) -> dict:
    """Accumulate per-client mean losses weighted by their sample counts."""
    return {**acc, "loss_sum": acc["loss_sum"] + jnp.sum(losses * n),
            "loss_n": acc["loss_n"] + jnp.sum(n)}


def make_run_round(cfg: Config, step: Callable, end: Callable, n_max: int) -> Callable:
    """Compile an algorithm's pieces into ``run_round``.

    Args:
      cfg: the configuration (epochs, batch size, step loop).
      step: ``step(state, batch: Batch, t: int32 lockstep index, rng, acc) -> (state, acc)``.
      end: ``end(state, weights [m]) -> state`` (aggregation).
      n_max: padded shard length (static).
    Returns:
      ``run_round(state, data: ClientArrays, key) -> (state, metrics dict of host floats)``.
    """
    num_steps = cfg.local_epochs * steps_per_epoch(n_max, cfg.batch_size)

    def begin(data, key):
        korder, kstep = jax.random.split(key)
        return epoch_orders(korder, data.counts, n_max, cfg.local_epochs), kstep

    def one(state, acc, data, orders, key, t):
        batch = gather_batch(data.x, data.y, data.counts, orders, t, cfg.batch_size)
        return step(state, batch, t, jax.random.fold_in(key, t), acc)

    def finish(state, data):
        state = end(state, data.counts.astype(jnp.float32))
        return state._replace(round=state.round + 1)

    if cfg.step_loop == "scan":
        @jax.jit(donate_argnums=(0,))
        def compiled(state, data, key):
            orders, kstep = begin(data, key)
            def body(carry, t):
                return one(*carry, data, orders, kstep, t), None
            (state, acc), _ = jax.lax.scan(body, (state, zero_metrics()), jnp.arange(num_steps))
            return finish(state, data), acc

        def run_round(state, data, key):
            state, acc = compiled(state, data, key)
            return state, jax.device_get(acc)
        return run_round

    if cfg.step_loop != "host":
        raise ValueError(f"unknown step_loop {cfg.step_loop!r}")
    begin_j = jax.jit(begin)
    one_j = jax.jit(one, donate_argnums=(0, 1))
    finish_j = jax.jit(finish, donate_argnums=(0,))

    def run_round(state, data, key):
        orders, kstep = begin_j(data, key)
        acc = zero_metrics()
        for t in range(num_steps):
            state, acc = one_j(state, acc, data, orders, kstep, jnp.int32(t))
        return finish_j(state, data), jax.device_get(acc)
    return run_round


def average_into(tree_m: Any, weights: jax.Array) -> Any:
    """Weighted average over the client axis, broadcast back to every client."""
    m = weights.shape[0]
    return broadcast(weighted_average(tree_m, weights), m)


def first(tree_m: Any) -> Any:
    """Client 0's slice of a client-axis pytree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree_m)


def global_vars(state: State, client: Vars, server: Vars) -> tuple[Vars, Vars]:
    """The global (client, server) variables with the frozen weights attached."""
    fc, fs, _ = frozen_parts(state)
    return client.with_frozen(fc), server.with_frozen(fs)


def make_evaluate(split: SplitModel, batch_size: int = 1000) -> Callable:
    """``evaluate(client Vars, server Vars, x, y) -> (mean loss, accuracy)`` over a whole set.

    Means are over samples, weighted by ``split.eval_weight`` when set (tokens
    for a language model: the loss is then the log perplexity). Batches of
    ``batch_size`` go through one compiled eval step each; sums stay on the
    device and are pulled once.
    """
    loss = split.eval_loss or split.loss

    @jax.jit
    def sums(cv, sv, x, y, w):
        z, _ = apply_part(split.client, cv, prepare_input(split, x, None, False), False)
        logits, _ = apply_part(split.server, sv, z, False)
        if split.eval_weight is not None:
            w = w * split.eval_weight(y)
        return jnp.sum(loss(logits, y) * w), jnp.sum(split.correct(logits, y) * w), jnp.sum(w)

    def evaluate(cv, sv, x, y):
        n = x.shape[0]
        tot_loss, tot_correct, tot_w = 0.0, 0.0, 0.0
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            w = jnp.ones(xb.shape[0], jnp.float32)
            if xb.shape[0] < batch_size and n > batch_size:   # keep one compiled shape
                pad = batch_size - xb.shape[0]
                xb = jnp.concatenate([xb, jnp.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = jnp.concatenate([yb, jnp.zeros((pad, *yb.shape[1:]), yb.dtype)])
                w = jnp.concatenate([w, jnp.zeros(pad, jnp.float32)])
            l, c, sw = sums(cv, sv, xb, yb, w)
            tot_loss, tot_correct, tot_w = tot_loss + l, tot_correct + c, tot_w + sw
        tot_loss, tot_correct, tot_w = jax.device_get((tot_loss, tot_correct, tot_w))
        tot_w = max(float(tot_w), 1e-30)
        return float(tot_loss) / tot_w, float(tot_correct) / tot_w
    return evaluate


def make_serve(split: SplitModel, opt, cfg: Config) -> Callable:
    """One shared server consuming the clients' uploads in client order.

    Returns ``serve(sv, sopt, z, y, w, upload, rng) -> (sv, sopt, g_z, loss)``
    where ``z, y, w, upload`` have a client axis (``sv`` may carry frozen
    weights; the returned ``sv`` does not); a client with
    ``upload=False`` leaves the server untouched (its ``g_z`` and ``loss`` are
    zero). When no client uploads, the whole phase is skipped by a branch.
    """
    def serve(sv, sopt, z, y, w, upload, rng):
        frozen = sv.frozen
        sv = sv.with_frozen(None)

        def one(carry, upload):
            sv, sopt = carry
            z, y, w, up, rng = upload
            sv2, sopt2, gz, loss = steps.server_step(split, opt, sv.with_frozen(frozen), sopt, z, y, w, rng)
            return tree_where(up, (sv2, sopt2), (sv, sopt)), (gz * up, loss * up)
        run = sequential(one, cfg.strategy)

        m = upload.shape[0]
        xs = (z, y, w, upload, jax.random.split(rng, m))
        def skip(sv, sopt, xs):
            return (sv, sopt), (jnp.zeros_like(z), jnp.zeros((m,), jnp.float32))
        (sv, sopt), (gz, loss) = jax.lax.cond(jnp.any(upload), lambda a, b, c: run((a, b), c),
                                              skip, sv, sopt, xs)
        return sv, sopt, gz, loss
    return serve
