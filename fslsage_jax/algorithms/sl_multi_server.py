"""SplitFed-MS, SplitFedV1 (Thapa et al. 2022): split learning with federated
averaging of the client models. Every local step the client sends ``z`` up and
receives the true gradient dL/dz back. Every client has its own server copy; the
copies are averaged on the server side each round (no communication).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.config import Config, optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, add_loss, average_into, count_messages, first,
                                           frozen_parts, global_vars, init_parts, lifter,
                                           make_run_round, resolve_config)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars

NAME = "sl_multi_server"


class MultiServerState(NamedTuple):
    """Every field but ``round`` and ``frozen`` carries a leading client axis."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    server_opt: Any
    frozen: Any = None


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """SplitFed-MS (V1): per-client server copies, averaged each round."""
    cfg = resolve_config(cfg, split)
    m, opt, L = cfg.num_clients, optimizer_for(cfg), lifter(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return MultiServerState(jnp.zeros((), jnp.int32), broadcast(cv, m), broadcast(opt.init(cv.params), m),
                                broadcast(sv, m), broadcast(opt.init(sv.params), m), frozen)

    def client_step(fz, cv, copt, sv, sopt, x, y, w, active, rng):
        kc, ks = jax.random.split(rng)
        z, vjp_fn, cstate = steps.client_forward(split, cv.with_frozen(fz[0]), x, kc, w)
        sv2, sopt2, gz, loss = steps.server_step(split, opt, sv.with_frozen(fz[1]), sopt, z, y, w, ks)
        cv2, copt2 = steps.client_backward(opt, cv, copt, vjp_fn, gz, cstate)
        return tree_where(active, (cv2, copt2, sv2, sopt2), (cv, copt, sv, sopt)) + (loss,)
    client_step = L(client_step, shared=1)

    def step(state, b, t, rng, acc):
        cv, copt, sv, sopt, loss = client_step(
            frozen_parts(state), state.clients, state.client_opt, state.server, state.server_opt,
            b.x, b.y, b.w, b.active, jax.random.split(rng, m))
        state = state._replace(clients=cv, client_opt=copt, server=sv, server_opt=sopt)
        return state, count_messages(add_loss(acc, loss, b.w.sum(1)), b.w, z_up=True, g_down=True)

    def end(state, weights, acc):
        return state._replace(clients=average_into(state.clients, weights),
                              server=average_into(state.server, weights)), acc

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), first(s.server)))


ALGORITHM = AlgorithmDef(
    name=NAME, label="SplitFed-MS", make=make,
    client_fields=("clients", "client_opt", "server", "server_opt"),
    model_bytes=lambda sizes: sizes.client, color="tab:orange",
    persistent_fields=("client_opt", "server_opt"))
