"""The round driver shared by all algorithms.

An algorithm supplies three pure pieces (how its state starts, one lockstep
local step for all clients, the end-of-round aggregation); the engine turns
them into ``run_round(state, data, key) -> (state, metrics)``: per-epoch
shuffles, batch gathering with masks for uneven shards, the local steps (one
``lax.scan`` or one compiled step per local step), and on-device metric
accumulation pulled to the host once per round.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.batching import epoch_orders, gather_batch, steps_per_epoch
from fslsage_jax.algorithms.config import ALIGN_CHUNK_BYTES, EVAL_LOGITS_BYTES, Config
from fslsage_jax.algorithms.lifting import auto_settings, branch, lift, sequential
from fslsage_jax.algorithms.trees import broadcast, tree_where, weighted_average
from fslsage_jax.split import SplitModel, Vars, apply_part, cut_shape, init_split, prepare_input

# Every algorithm's state is a ``base.State`` (round, clients=ClientState(shared, own),
# server, frozen); see :mod:`fslsage_jax.algorithms.base`.


def resolve_config(cfg: Config, split: SplitModel) -> Config:
    """``cfg`` with its automatic settings made concrete: ``strategy="auto"`` (the
    measured default for this backend, input shape and number of clients:
    :func:`lifting.auto_strategy`), ``align_client_chunk=0`` and ``eval_batch_size=0``
    (memory bounds, see :class:`Config`)."""
    new = {}
    if cfg.strategy == "auto":
        new.update(auto_settings(jax.default_backend(), tuple(split.input_shape), cfg.num_clients))
    if cfg.align_client_chunk <= 0:
        z_shape, z_dtype = cut_shape(split)
        buf = cfg.align_buffer_size * int(np.prod(z_shape)) * np.dtype(z_dtype).itemsize
        new["align_client_chunk"] = cfg.num_clients if buf <= ALIGN_CHUNK_BYTES else 1
    if cfg.eval_batch_size <= 0:
        per_sample = 4 * split.num_classes * int(np.prod(split.label_shape or (1,)))
        new["eval_batch_size"] = int(min(1000, max(1, 2 ** int(np.log2(max(EVAL_LOGITS_BYTES // per_sample, 1))))))
    return dataclasses.replace(cfg, **new) if new else cfg


def lifter(cfg: Config) -> Callable:
    """``L(fn, shared=0)``: :func:`lifting.lift` with the config's strategy and chunk size."""
    return lambda fn, shared=0: lift(fn, cfg.strategy, cfg.chunk_size, shared)


def init_parts(split: SplitModel, key: jax.Array) -> tuple[Vars, Vars, Vars, Any]:
    """``init_split`` with the frozen weights taken out: ``(client, server, aux, frozen)``,
    ``frozen`` None or ``(client, server, aux)`` frozen trees."""
    parts = [v.shared() for v in init_split(split, key)]
    frozen = tuple(f for _, f in parts)
    return (*(v for v, _ in parts), None if all(f is None for f in frozen) else frozen)


# What the compiled round counts on the device. Message counts (int32): ``z_up`` samples
# whose cut activation went up, ``g_down`` cut-layer gradients sent back, ``aux_down``
# clients that received an aligned auxiliary model, ``models`` clients that exchanged
# their model with the fed server (up and down), ``aux_models`` clients that exchanged
# their auxiliary model with it (CSE-FSL). The ledger (:mod:`fslsage_jax.comm`) turns
# them into bytes.
COUNT_KEYS = ("z_up", "g_down", "aux_down", "models", "aux_models")
METRIC_KEYS = ("loss_sum", "loss_n", "cos_sum", "cos_n", "align_loss_first",
               "align_loss_last") + COUNT_KEYS


def zero_metrics() -> dict:
    """On-device round accumulators (float32 sums, int32 message counts)."""
    return {k: jnp.zeros((), jnp.int32 if k in COUNT_KEYS else jnp.float32) for k in METRIC_KEYS}


class ClientArrays(NamedTuple):
    """Client data on the device: padded ``x [m, n_max, ...]``, ``y [m, n_max, ...]``, ``counts [m]``."""
    x: jax.Array
    y: jax.Array
    counts: jax.Array


class Algorithm(NamedTuple):
    """An algorithm made for one split model and config.

    ``init(key) -> state`` (a ``base.State``); ``run_round(state, data, key) -> (state,
    metrics)`` (compiled; ``metrics`` holds the on-device values of :data:`METRIC_KEYS`,
    read them with ``jax.device_get`` when needed);
    ``global_model(state) -> (client Vars, server Vars)`` after aggregation;
    ``name`` its CLI name.
    """
    name: str
    init: Callable
    run_round: Callable
    global_model: Callable


def add_loss(acc: dict, losses: jax.Array, n: jax.Array) -> dict:
    """Accumulate per-client mean losses weighted by their sample counts."""
    return {**acc, "loss_sum": acc["loss_sum"] + jnp.sum(losses * n),
            "loss_n": acc["loss_n"] + jnp.sum(n)}


def uploads(b, interval: int) -> jax.Array:
    """Which clients upload (z, y) at this step: active and ``k_i % Q == 0``."""
    return b.active & (b.k % interval == 0)


def count_messages(acc: dict, w: jax.Array, *, z_up: bool, g_down: bool) -> dict:
    """Add the real samples of ``w [m, B]`` (0 for padding or a client that sent nothing)
    to the ``z_up`` and/or ``g_down`` counters."""
    n = jnp.sum(w).astype(jnp.int32)
    return {**acc, "z_up": acc["z_up"] + n * z_up, "g_down": acc["g_down"] + n * g_down}


def make_run_round(cfg: Config, step: Callable, end: Callable, n_max: int,
                   state_sharding: Any = None) -> Callable:
    """Compile an algorithm's pieces into ``run_round``.

    Args:
      cfg: the configuration (epochs, batch size, step loop).
      step: ``step(state, batch: Batch, t: int32 lockstep index, rng, acc) -> (state, acc)``.
      end: ``end(state, weights [m], acc) -> (state, acc)`` (aggregation; it may count
        model exchanges beyond the client models', e.g. ``aux_models``).
      n_max: padded shard length (static).
      state_sharding: None, or a sharding (prefix) pytree of the state that every
        compiled program returns its state in (the client axis split over devices).
    Returns:
      ``run_round(state, data: ClientArrays, key) -> (state, metrics dict on the device)``;
      every client that took part exchanged its model with the fed server (``models``).
      The state argument is donated. A batch larger than the largest shard is clamped to
      it (the same steps and results: one step per epoch of each whole shard).
      With ``cfg.strategy == "loop"`` the local steps run eagerly (a Python loop over
      clients of jitted single-client calls: the reference of the benchmarks).
    """
    batch_size = min(cfg.batch_size, n_max)
    num_steps = cfg.local_epochs * steps_per_epoch(n_max, batch_size)
    out = None if state_sharding is None else (state_sharding, None)

    def begin(data, key):
        korder, kstep = jax.random.split(key)
        return epoch_orders(korder, data.counts, n_max, cfg.local_epochs), kstep

    def one(state, acc, data, orders, key, t):
        batch = gather_batch(data.x, data.y, data.counts, orders, t, batch_size)
        return step(state, batch, t, jax.random.fold_in(key, t), acc)

    def finish(state, acc, data):
        state, acc = end(state, data.counts.astype(jnp.float32), acc)
        acc = {**acc, "models": acc["models"] + data.counts.shape[0]}
        return state._replace(round=state.round + 1), acc

    if cfg.step_loop == "scan":
        if cfg.strategy == "loop":
            raise ValueError("strategy 'loop' runs the local steps eagerly; use step_loop='host'")

        @jax.jit(donate_argnums=(0,), out_shardings=out)
        def compiled(state, data, key):
            orders, kstep = begin(data, key)
            def body(carry, t):
                return one(*carry, data, orders, kstep, t), None
            (state, acc), _ = jax.lax.scan(body, (state, zero_metrics()), jnp.arange(num_steps))
            return finish(state, acc, data)

        def run_round(state, data, key):
            return compiled(state, data, key)
        run_round.lower_all = lambda state, data: {"round": compiled.lower(state, data, _KEY)}
        return run_round

    if cfg.step_loop != "host":
        raise ValueError(f"unknown step_loop {cfg.step_loop!r}")
    begin_j = jax.jit(begin)
    one_j = one if cfg.strategy == "loop" else jax.jit(one, donate_argnums=(0, 1), out_shardings=out)
    finish_j = jax.jit(finish, donate_argnums=(0, 1), out_shardings=out)

    # the counters start where the steps return them (replicated over a mesh): else step 1
    # sees a new input sharding and compiles the step program a second time
    zeros_j = jax.jit(zero_metrics, out_shardings=None if state_sharding is None else state_sharding.round)

    def run_round(state, data, key):
        # no eager op here (an eager op waits for the queued steps): the host runs ahead
        orders, kstep = begin_j(data, key)
        acc = zeros_j()
        for t in range(num_steps):
            state, acc = one_j(state, acc, data, orders, kstep, np.int32(t))
        return finish_j(state, acc, data)

    def lower_all(state, data):
        """The round's programs lowered for these (possibly abstract) inputs."""
        orders, kstep = jax.eval_shape(begin, data, _KEY)
        acc = jax.eval_shape(zero_metrics)
        t = jax.ShapeDtypeStruct((), jnp.int32)
        progs = {"round_begin": begin_j.lower(data, _KEY), "round_finish": finish_j.lower(state, acc, data)}
        if cfg.strategy != "loop":
            progs["round_step"] = one_j.lower(state, acc, data, orders, kstep, t)
        return progs
    run_round.lower_all = lower_all
    return run_round


_KEY = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)   # no backend at import


def average_into(tree_m: Any, weights: jax.Array) -> Any:
    """Weighted average over the client axis, broadcast back to every client."""
    m = weights.shape[0]
    return broadcast(weighted_average(tree_m, weights), m)


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

    def lower(cv, sv, x, y):
        """The evaluation program for one minibatch of the (possibly abstract) set ``x, y``."""
        b = min(batch_size, x.shape[0])
        spec = lambda a: jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype)
        return sums.lower(cv, sv, spec(x), spec(y), jax.ShapeDtypeStruct((b,), jnp.float32))

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
    evaluate.lower = lower
    return evaluate


def make_serve(split: SplitModel, opt, cfg: Config, per_client_opt: bool = False) -> Callable:
    """One shared server consuming the clients' uploads in client order.

    Returns ``serve(sv, sopt, z, y, w, upload, rng) -> (sv, sopt, g_z, loss)``
    where ``z, y, w, upload`` have a client axis (``sv`` may carry frozen
    weights; the returned ``sv`` does not); a client with
    ``upload=False`` leaves the server untouched (its ``g_z`` and ``loss`` are
    zero). When no client uploads, the whole phase is skipped by a branch.
    With ``per_client_opt`` the server's optimizer state ``sopt`` has a client
    axis: client i's update uses and advances its own state (the authors' FedAvg).
    """
    def one(carry, upload, frozen):
        if per_client_opt:
            sv, (sopt, z, y, w, up, rng) = carry, upload
        else:
            (sv, sopt), (z, y, w, up, rng) = carry, upload
        def take(sv, sopt):
            return steps.server_step(split, opt, sv.with_frozen(frozen), sopt, z, y, w, rng)

        def skip(sv, sopt):
            return sv, sopt, jnp.zeros_like(z), jnp.zeros((), jnp.float32)
        # a branch, not a select: a client that does not upload costs nothing
        sv, sopt, gz, loss = branch(up, take, skip, sv, sopt)
        out = (gz, loss)
        return (sv, out + (sopt,)) if per_client_opt else ((sv, sopt), out)
    run = sequential(one, cfg.strategy)

    def serve(sv, sopt, z, y, w, upload, rng):
        frozen, m = sv.frozen, upload.shape[0]
        xs = (z, y, w, upload, jax.random.split(rng, m))

        def go(sv, sopt, xs):
            if per_client_opt:
                sv, (gz, loss, sopt) = run(sv, (sopt,) + xs, frozen)
                return (sv, sopt), (gz, loss)
            return run((sv, sopt), xs, frozen)

        def skip(sv, sopt, xs):
            return (sv, sopt), (jnp.zeros_like(z), jnp.zeros((m,), jnp.float32))
        (sv, sopt), (gz, loss) = branch(jnp.any(upload), go, skip, sv.with_frozen(None), sopt, xs)
        return sv, sopt, gz, loss
    return serve
