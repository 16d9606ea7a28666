"""CSE-FSL (Mu & Shen 2023): communication-efficient federated split learning.

Each client trains its model together with an auxiliary head on the LOCAL loss
L(aux(z), y); no gradient comes back from the server. The auxiliary model has its
own optimizer (``Config.aux_lr``, ``aux_weight_decay``; the authors' default
Adam 1e-3 without decay). Every Q local steps the client uploads (z, y) and the
shared server takes one step on L(server(z), y). Each round the client models
AND the auxiliary models are averaged (both travel up and down).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.config import Config, aux_optimizer_for, optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, add_loss, average_into, count_messages, first,
                                           frozen_parts, global_vars, init_parts, lifter,
                                           make_run_round, make_serve, resolve_config, uploads)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars

NAME = "cse_fsl"


class CseFslState(NamedTuple):
    """``clients``, ``client_opt``, ``aux``, ``aux_opt`` carry a leading client axis;
    the server is shared."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    server_opt: Any
    aux: Vars
    aux_opt: Any
    frozen: Any = None


def make_step(split: SplitModel, cfg: Config) -> tuple[Callable, Callable]:
    """CSE-FSL's lockstep local step and its end-of-round aggregation, for any state with
    the fields of :class:`CseFslState` (FSL-SAGE's warm start reuses them).

    Returns ``(step(state, b, t, rng, acc) -> (state, acc), end(state, weights, acc) -> (state, acc))``.
    """
    m, opt, aux_opt, L = cfg.num_clients, optimizer_for(cfg), aux_optimizer_for(cfg), lifter(cfg)
    serve = make_serve(split, opt, cfg)

    def client_step(fz, cv, copt, av, aopt, x, y, w, active, rng):
        cv2, copt2, av2, aopt2, z, loss = steps.local_aux_step(
            split, opt, aux_opt, cv.with_frozen(fz[0]), copt, av.with_frozen(fz[2]), aopt, x, y, w, rng)
        return tree_where(active, (cv2, copt2, av2, aopt2), (cv, copt, av, aopt)) + (z,)
    client_step = L(client_step, shared=1)

    def step(state, b, t, rng, acc):
        kc, ks = jax.random.split(rng)
        cv, copt, av, aopt, z = client_step(
            frozen_parts(state), state.clients, state.client_opt, state.aux, state.aux_opt, b.x, b.y, b.w,
            b.active, jax.random.split(kc, m))
        up = uploads(b, cfg.server_update_interval)
        sv, sopt, _, loss = serve(state.server.with_frozen(frozen_parts(state)[1]), state.server_opt, z,
                                  b.y, b.w, up, ks)
        state = state._replace(clients=cv, client_opt=copt, aux=av, aux_opt=aopt,
                               server=sv, server_opt=sopt)
        acc = add_loss(acc, loss, b.w.sum(1) * up)
        return state, count_messages(acc, b.w * up[:, None], z_up=True, g_down=False)

    def end(state, weights, acc):
        state = state._replace(clients=average_into(state.clients, weights),
                               aux=average_into(state.aux, weights))
        return state, {**acc, "aux_models": acc["aux_models"] + weights.shape[0]}
    return step, end


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """CSE-FSL for ``split`` and ``cfg``; client shards padded to ``n_max``."""
    cfg = resolve_config(cfg, split)
    m, opt, aux_opt = cfg.num_clients, optimizer_for(cfg), aux_optimizer_for(cfg)

    def init(key):
        cv, sv, av, frozen = init_parts(split, key)
        return CseFslState(jnp.zeros((), jnp.int32), broadcast(cv, m), broadcast(opt.init(cv.params), m),
                           sv, opt.init(sv.params), broadcast(av, m), broadcast(aux_opt.init(av.params), m),
                           frozen)

    step, end = make_step(split, cfg)
    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), s.server))


ALGORITHM = AlgorithmDef(
    name=NAME, label="CSE-FSL", make=make, client_fields=("clients", "client_opt", "aux", "aux_opt"),
    model_bytes=lambda sizes: sizes.client,       # + the auxiliary model: counted as aux_models
    uses=frozenset({"server_update_interval", "aux_lr", "aux_weight_decay"}), color="tab:purple",
    persistent_fields=("client_opt", "aux_opt"))
