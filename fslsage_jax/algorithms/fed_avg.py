"""FedAvg (McMahan et al. 2017): every client trains the whole model (client part
then server part) locally; the fed server averages the full models each round."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.common import Config, broadcast, lift, optimizer_for, tree_where
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, State, add_loss, average_into, first,
                                           frozen_parts, global_vars, init_parts, make_run_round)
from fslsage_jax.split import SplitModel

NAME = "fed_avg"


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """FedAvg for ``split`` and ``cfg``; client shards padded to ``n_max``."""
    m, opt = cfg.num_clients, optimizer_for(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return State(jnp.zeros((), jnp.int32), broadcast(cv, m),
                     broadcast(opt.init((cv.params, sv.params)), m), broadcast(sv, m), frozen=frozen)

    def step(state, b, t, rng, acc):
        fc, fs, _ = frozen_parts(state)

        def client_step(cv, sv, os, x, y, w, active, rng):
            new = steps.full_step(split, opt, cv.with_frozen(fc), sv.with_frozen(fs), os, x, y, w, rng)
            return tree_where(active, new[:3], (cv, sv, os)) + (new[3],)

        rngs = jax.random.split(rng, m)
        cv, sv, os, loss = lift(client_step, cfg.strategy, cfg.chunk_size)(
            state.clients, state.server, state.client_opt, b.x, b.y, b.w, b.active, rngs)
        return state._replace(clients=cv, server=sv, client_opt=os), add_loss(acc, loss, b.w.sum(1))

    def end(state, weights):
        return state._replace(clients=average_into(state.clients, weights),
                              server=average_into(state.server, weights))

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), first(s.server)))

ALGORITHM = AlgorithmDef(
    name=NAME, label="FedAvg", make=make, client_fields=("clients", "client_opt", "server"),
    model_bytes=lambda sizes: sizes.client + sizes.server, color="tab:blue")
