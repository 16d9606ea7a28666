"""CSE-FSL (Mu & Shen 2023): communication-efficient federated split learning.

Each client trains its model together with an auxiliary head on the LOCAL loss
L(aux(z), y); no gradient comes back from the server. The auxiliary model has its
own optimizer (``Config.aux_lr``, ``aux_weight_decay``; the authors' default
Adam 1e-3 without decay). Every Q local steps the client uploads (z, y) and the
shared server takes one step on L(server(z), y). Each round the client models
AND the auxiliary models are averaged (both travel up and down).

State: ``clients.shared`` = (client model, auxiliary model), ``clients.own`` =
(client optimizer state, auxiliary optimizer state), ``server`` =
:class:`~fslsage_jax.algorithms.base.Server`.
"""
from __future__ import annotations

from typing import Callable

import jax

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.base import Context, Parts, Server, average_shared, frozen_of
from fslsage_jax.algorithms.config import aux_optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import add_loss, count_messages, uploads
from fslsage_jax.algorithms.trees import tree_where

NAME = "cse_fsl"


def local_aux_steps(ctx: Context) -> tuple[Callable, Callable]:
    """CSE-FSL's lifted client step and shared-server step, on plain arguments (FSL-SAGE's
    warm start reuses them on its own state).

    Returns ``(clients(fz, cv, copt, av, aopt, b, rng) -> (cv, copt, av, aopt, z),
    server(server: Server, fs, z, b, rng) -> (Server, loss, up))``.
    """
    split, opt, aux_opt = ctx.split, ctx.opt, aux_optimizer_for(ctx.cfg)
    serve = ctx.serve()

    def client_step(fz, cv, copt, av, aopt, x, y, w, active, rng):
        cv2, copt2, av2, aopt2, z, loss = steps.local_aux_step(
            split, opt, aux_opt, cv.with_frozen(fz[0]), copt, av.with_frozen(fz[2]), aopt, x, y, w, rng)
        return tree_where(active, (cv2, copt2, av2, aopt2), (cv, copt, av, aopt)) + (z,)
    lifted = ctx.lift(client_step, shared=1)

    def clients(fz, cv, copt, av, aopt, b, rng):
        return lifted(fz, cv, copt, av, aopt, b.x, b.y, b.w, b.active, jax.random.split(rng, ctx.m))

    def server(srv, fs, z, b, rng):
        up = uploads(b, ctx.cfg.server_update_interval)
        sv, sopt, _, loss = serve(srv.vars.with_frozen(fs), srv.opt, z, b.y, b.w, up, rng)
        return Server(sv, sopt), loss, up
    return clients, server


def count_uploads(acc: dict, loss, b, up) -> dict:
    """The server's loss on the uploaded samples and the z-up messages of a step."""
    acc = add_loss(acc, loss, b.w.sum(1) * up)
    return count_messages(acc, b.w * up[:, None], z_up=True, g_down=False)


def average_with_aux(state, weights, acc):
    """Average ``clients.shared`` (client and auxiliary models); the auxiliary models
    are exchanged with the fed server too (``aux_models``)."""
    state, acc = average_shared(state, weights, acc)
    return state, {**acc, "aux_models": acc["aux_models"] + weights.shape[0]}


def build(ctx: Context) -> Parts:
    """CSE-FSL for ``ctx``."""
    opt, aux_opt = ctx.opt, aux_optimizer_for(ctx.cfg)
    clients, server = local_aux_steps(ctx)

    def step(state, b, t, rng, acc):
        fz = frozen_of(state)
        kc, ks = jax.random.split(rng)
        (cv, av), (copt, aopt) = state.clients
        cv, copt, av, aopt, z = clients(fz, cv, copt, av, aopt, b, kc)
        srv, loss, up = server(state.server, fz[1], z, b, ks)
        state = state._replace(clients=state.clients._replace(shared=(cv, av), own=(copt, aopt)), server=srv)
        return state, count_uploads(acc, loss, b, up)

    return Parts(init=lambda cv, sv, av: ((cv, av), (opt.init(cv.params), aux_opt.init(av.params)),
                                          Server(sv, opt.init(sv.params))),
                 step=step, end=average_with_aux,
                 global_model=lambda shared, server: (shared[0], server.vars))


ALGORITHM = AlgorithmDef(
    name=NAME, label="CSE-FSL", build=build,
    model_bytes=lambda sizes: sizes.client,       # + the auxiliary model: counted as aux_models
    uses=frozenset({"server_update_interval", "aux_lr", "aux_weight_decay"}), color="tab:purple")
