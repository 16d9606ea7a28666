"""CSE-FSL (Mu & Shen 2023): communication-efficient federated split learning.

Each client trains its model together with an auxiliary head on the LOCAL loss
L(aux(z), y); no gradient comes back from the server. Every Q local steps the
client uploads (z, y) and the shared server takes one step on L(server(z), y).
Each round the client models AND the auxiliary models are averaged.
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

NAME = "cse_fsl"


def uploads(b, interval: int) -> jax.Array:
    """Which clients upload at this step: active and ``k_i % Q == 0``."""
    return b.active & (b.k % interval == 0)


def count_uploads(acc: dict, b, up: jax.Array, with_grads: bool = False) -> dict:
    """Add the uploaded samples (and the gradients sent back, if any) to ``acc``."""
    n = jnp.sum(b.w * up[:, None]).astype(jnp.int32)
    acc = {**acc, "z_up": acc["z_up"] + n}
    if with_grads:
        acc["g_down"] = acc["g_down"] + n
    return acc


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """CSE-FSL for ``split`` and ``cfg``; client shards padded to ``n_max``."""
    m, opt = cfg.num_clients, optimizer_for(cfg)
    serve = make_serve(split, opt, cfg)

    def init(key):
        cv, sv, av, frozen = init_parts(split, key)
        return State(jnp.zeros((), jnp.int32), broadcast(cv, m), broadcast(opt.init(cv.params), m),
                     sv, opt.init(sv.params), broadcast(av, m), broadcast(opt.init(av.params), m),
                     frozen=frozen)

    def step(state, b, t, rng, acc):
        fc, fs, fa = frozen_parts(state)

        def client_step(cv, copt, av, aopt, x, y, w, active, rng):
            cv2, copt2, av2, aopt2, z, loss = steps.local_aux_step(
                split, opt, opt, cv.with_frozen(fc), copt, av.with_frozen(fa), aopt, x, y, w, rng)
            return tree_where(active, (cv2, copt2, av2, aopt2), (cv, copt, av, aopt)) + (z,)

        kc, ks = jax.random.split(rng)
        cv, copt, av, aopt, z = lift(client_step, cfg.strategy, cfg.chunk_size)(
            state.clients, state.client_opt, state.aux, state.aux_opt, b.x, b.y, b.w, b.active,
            jax.random.split(kc, m))
        up = uploads(b, cfg.server_update_interval)
        sv, sopt, _, loss = serve(state.server.with_frozen(fs), state.server_opt, z, b.y, b.w, up, ks)
        state = state._replace(clients=cv, client_opt=copt, aux=av, aux_opt=aopt,
                               server=sv, server_opt=sopt)
        return state, count_uploads(add_loss(acc, loss, b.w.sum(1) * up), b, up)

    def end(state, weights):
        return state._replace(clients=average_into(state.clients, weights),
                              aux=average_into(state.aux, weights))

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), s.server))

ALGORITHM = AlgorithmDef(
    name=NAME, label="CSE-FSL", make=make, client_fields=("clients", "client_opt", "aux", "aux_opt"),
    model_bytes=lambda sizes: sizes.client + sizes.aux, uses=frozenset({"server_update_interval"}),
    color="tab:purple")
