"""SplitFed (Thapa et al. 2022): split learning with federated averaging of the
client models. Every local step the client sends ``z`` up and receives the true
gradient dL/dz back.

- SplitFed-MS / V1 (``sl_multi_server``): every client has its own server copy;
  the copies are averaged on the server side each round (no communication).
- SplitFed-SS / V2 (``sl_single_server``): one shared server that, at each
  local step, processes the clients' batches one after another in client order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.common import Config, broadcast, lift, optimizer_for, tree_where
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, State, add_loss, average_into, first,
                                           frozen_parts, global_vars, init_parts, make_run_round,
                                           make_serve)
from fslsage_jax.split import SplitModel


def _init(split, cfg, opt, multi_server):
    m = cfg.num_clients

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        copt, sopt = opt.init(cv.params), opt.init(sv.params)
        if multi_server:
            sv, sopt = broadcast(sv, m), broadcast(sopt, m)
        return State(jnp.zeros((), jnp.int32), broadcast(cv, m), broadcast(copt, m), sv, sopt,
                     frozen=frozen)
    return init


def _count(acc, b):
    n = jnp.sum(b.w).astype(jnp.int32)
    return {**acc, "z_up": acc["z_up"] + n, "g_down": acc["g_down"] + n}


def make_multi_server(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """SplitFed-MS (V1): per-client server copies, averaged each round."""
    m, opt = cfg.num_clients, optimizer_for(cfg)

    def step(state, b, t, rng, acc):
        fc, fs, _ = frozen_parts(state)

        def client_step(cv, copt, sv, sopt, x, y, w, active, rng):
            kc, ks = jax.random.split(rng)
            z, vjp_fn, cstate = steps.client_forward(split, cv.with_frozen(fc), x, kc, w)
            sv2, sopt2, gz, loss = steps.server_step(split, opt, sv.with_frozen(fs), sopt, z, y, w, ks)
            cv2, copt2 = steps.client_backward(opt, cv, copt, vjp_fn, gz, cstate)
            return tree_where(active, (cv2, copt2, sv2, sopt2), (cv, copt, sv, sopt)) + (loss,)

        cv, copt, sv, sopt, loss = lift(client_step, cfg.strategy, cfg.chunk_size)(
            state.clients, state.client_opt, state.server, state.server_opt,
            b.x, b.y, b.w, b.active, jax.random.split(rng, m))
        state = state._replace(clients=cv, client_opt=copt, server=sv, server_opt=sopt)
        return state, _count(add_loss(acc, loss, b.w.sum(1)), b)

    def end(state, weights):
        return state._replace(clients=average_into(state.clients, weights),
                              server=average_into(state.server, weights))

    return Algorithm("sl_multi_server", _init(split, cfg, opt, True),
                     make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), first(s.server)))


def make_single_server(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """SplitFed-SS (V2): one server updated by every client's batch in turn."""
    m, opt = cfg.num_clients, optimizer_for(cfg)
    def backward(cv, copt, vjp_fn, gz, cstate, active):
        new = steps.client_backward(opt, cv, copt, vjp_fn, gz, cstate)
        return tree_where(active, new, (cv, copt))
    backward = lift(backward, cfg.strategy, cfg.chunk_size)

    serve = make_serve(split, opt, cfg)

    def step(state, b, t, rng, acc):
        fc, fs, _ = frozen_parts(state)
        forward = lift(lambda cv, x, w, r: steps.client_forward(split, cv.with_frozen(fc), x, r, w),
                       cfg.strategy, cfg.chunk_size)
        kc, ks = jax.random.split(rng)
        z, vjp_fn, cstate = forward(state.clients, b.x, b.w, jax.random.split(kc, m))
        sv, sopt, gz, loss = serve(state.server.with_frozen(fs), state.server_opt, z, b.y, b.w,
                                   b.active, ks)
        cv, copt = backward(state.clients, state.client_opt, vjp_fn, gz, cstate, b.active)
        state = state._replace(clients=cv, client_opt=copt, server=sv, server_opt=sopt)
        return state, _count(add_loss(acc, loss, b.w.sum(1)), b)

    def end(state, weights):
        return state._replace(clients=average_into(state.clients, weights))

    return Algorithm("sl_single_server", _init(split, cfg, opt, False),
                     make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), s.server))

MULTI_SERVER = AlgorithmDef(
    name="sl_multi_server", label="SplitFed-MS", make=make_multi_server,
    client_fields=("clients", "client_opt", "server", "server_opt"),
    model_bytes=lambda sizes: sizes.client, color="tab:orange")

SINGLE_SERVER = AlgorithmDef(
    name="sl_single_server", label="SplitFed-SS", make=make_single_server,
    client_fields=("clients", "client_opt"), model_bytes=lambda sizes: sizes.client,
    color="tab:green")
