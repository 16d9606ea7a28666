"""FedAvg (McMahan et al. 2017): every client trains the whole model (client part
then server part) locally; the fed server averages the full models each round.

This textbook FedAvg computes exactly what SplitFed-MS computes; only the bytes
differ (the whole model travels, no cut-layer messages).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.config import Config, optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, add_loss, average_into, first, frozen_parts,
                                           global_vars, init_parts, lifter, make_run_round,
                                           resolve_config)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars

NAME = "fed_avg"


class FedAvgState(NamedTuple):
    """``clients``, ``server`` (every client's copy) and ``client_opt`` (one optimizer
    over the pair) carry a leading client axis."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    frozen: Any = None


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """FedAvg for ``split`` and ``cfg``; client shards padded to ``n_max``."""
    cfg = resolve_config(cfg, split)
    m, opt, L = cfg.num_clients, optimizer_for(cfg), lifter(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return FedAvgState(jnp.zeros((), jnp.int32), broadcast(cv, m),
                           broadcast(opt.init((cv.params, sv.params)), m), broadcast(sv, m), frozen)

    def client_step(fz, cv, sv, os, x, y, w, active, rng):
        new = steps.full_step(split, opt, cv.with_frozen(fz[0]), sv.with_frozen(fz[1]), os, x, y, w, rng)
        return tree_where(active, new[:3], (cv, sv, os)) + (new[3],)
    client_step = L(client_step, shared=1)

    def step(state, b, t, rng, acc):
        cv, sv, os, loss = client_step(frozen_parts(state), state.clients, state.server, state.client_opt,
                                       b.x, b.y, b.w, b.active, jax.random.split(rng, m))
        return state._replace(clients=cv, server=sv, client_opt=os), add_loss(acc, loss, b.w.sum(1))

    def end(state, weights):
        return state._replace(clients=average_into(state.clients, weights),
                              server=average_into(state.server, weights))

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), first(s.server)))


ALGORITHM = AlgorithmDef(
    name=NAME, label="FedAvg", make=make, client_fields=("clients", "client_opt", "server"),
    model_bytes=lambda sizes: sizes.client + sizes.server, color="tab:blue",
    persistent_fields=("client_opt",))
