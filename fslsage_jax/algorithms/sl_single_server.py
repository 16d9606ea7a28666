"""SplitFed-SS, SplitFedV2 (Thapa et al. 2022): split learning with federated
averaging of the client models and ONE shared server. Every local step the
clients send ``z`` up; the server processes their batches one after another in
client order (a step each) and sends the true gradients dL/dz back.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.config import Config, optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, add_loss, average_into, count_messages, first,
                                           frozen_parts, global_vars, init_parts, lifter,
                                           make_run_round, make_serve, resolve_config)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars

NAME = "sl_single_server"


class SingleServerState(NamedTuple):
    """``clients`` and ``client_opt`` carry a leading client axis; the server is shared."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    server_opt: Any
    frozen: Any = None


def make_step(split: SplitModel, cfg: Config, per_client_server_opt: bool = False,
              count: bool = True) -> Callable:
    """The lockstep local step of clients sharing one server that serves them in client
    order: client forward, the server's steps (each returning dL/dz), client backward.

    ``per_client_server_opt``: every client has its own optimizer state for the server
    (``server_opt`` with a client axis: the authors' FedAvg reuses this step);
    ``count``: count the cut-layer messages (z up, dL/dz down; FedAvg sends none).
    Returns ``step(state, b, t, rng, acc) -> (state, acc)``.
    """
    m, opt, L = cfg.num_clients, optimizer_for(cfg), lifter(cfg)
    serve = make_serve(split, opt, cfg, per_client_opt=per_client_server_opt)

    def backward(cv, copt, vjp_fn, gz, cstate, active):
        new = steps.client_backward(opt, cv, copt, vjp_fn, gz, cstate)
        return tree_where(active, new, (cv, copt))
    backward = L(backward)
    forward = L(lambda fc, cv, x, w, r: steps.client_forward(split, cv.with_frozen(fc), x, r, w), shared=1)

    def step(state, b, t, rng, acc):
        fc, fs, _ = frozen_parts(state)
        kc, ks = jax.random.split(rng)
        z, vjp_fn, cstate = forward(fc, state.clients, b.x, b.w, jax.random.split(kc, m))
        sv, sopt, gz, loss = serve(state.server.with_frozen(fs), state.server_opt, z, b.y, b.w,
                                   b.active, ks)
        cv, copt = backward(state.clients, state.client_opt, vjp_fn, gz, cstate, b.active)
        state = state._replace(clients=cv, client_opt=copt, server=sv, server_opt=sopt)
        acc = add_loss(acc, loss, b.w.sum(1))
        return state, (count_messages(acc, b.w, z_up=True, g_down=True) if count else acc)
    return step


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """SplitFed-SS (V2): one server updated by every client's batch in turn."""
    cfg = resolve_config(cfg, split)
    m, opt = cfg.num_clients, optimizer_for(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return SingleServerState(jnp.zeros((), jnp.int32), broadcast(cv, m),
                                 broadcast(opt.init(cv.params), m), sv, opt.init(sv.params), frozen)

    step = make_step(split, cfg)

    def end(state, weights, acc):
        return state._replace(clients=average_into(state.clients, weights)), acc

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), s.server))


ALGORITHM = AlgorithmDef(
    name=NAME, label="SplitFed-SS", make=make, client_fields=("clients", "client_opt"),
    model_bytes=lambda sizes: sizes.client, color="tab:green",
    persistent_fields=("client_opt",))
