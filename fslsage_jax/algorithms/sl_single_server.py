"""SplitFed-SS, SplitFedV2 (Thapa et al. 2022): split learning with federated
averaging of the client models and ONE shared server. Every local step the
clients send ``z`` up; the server processes their batches one after another in
client order (a step each) and sends the true gradients dL/dz back.

State: ``clients.shared`` = client models, ``clients.own`` = client optimizer
states, ``server`` = :class:`~fslsage_jax.algorithms.base.Server`.
"""
from __future__ import annotations

from typing import Callable

import jax

from fslsage_jax.algorithms.base import ClientState, Context, Parts, Server, frozen_of
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import add_loss, count_messages

NAME = "sl_single_server"


def shared_server_step(ctx: Context, per_client_server_opt: bool = False, count: bool = True) -> Callable:
    """The lockstep local step of clients sharing one server that serves them in client
    order: client forward, the server's steps (each returning dL/dz), client backward.

    The state has ``clients.shared`` = client models and ``server = Server(vars, opt)``;
    ``clients.own`` is the client optimizer state, or ``(client opt, server opt)`` with
    ``per_client_server_opt`` (every client has its own optimizer state for the shared
    server: the authors' FedAvg reuses this step). ``count``: count the cut-layer
    messages (z up, dL/dz down; FedAvg sends none).
    Returns ``step(state, b, t, rng, acc) -> (state, acc)``.
    """
    serve, forward, update = ctx.serve(per_client_server_opt), ctx.client_forward(), ctx.client_update()

    def step(state, b, t, rng, acc):
        fc, fs, _ = frozen_of(state)
        kc, ks = jax.random.split(rng)
        cv = state.clients.shared
        copt, sopt = state.clients.own if per_client_server_opt else (state.clients.own, state.server.opt)
        z, vjp, cstate = forward(fc, cv, b.x, b.w, jax.random.split(kc, ctx.m))
        sv, sopt, gz, loss = serve(state.server.vars.with_frozen(fs), sopt, z, b.y, b.w, b.active, ks)
        cv, copt = update(cv, copt, vjp(gz)[0], cstate, b.active)
        own = (copt, sopt) if per_client_server_opt else copt
        server = Server(sv, state.server.opt if per_client_server_opt else sopt)
        state = state._replace(clients=ClientState(cv, own), server=server)
        acc = add_loss(acc, loss, b.w.sum(1))
        return state, (count_messages(acc, b.w, z_up=True, g_down=True) if count else acc)
    return step


def build(ctx: Context) -> Parts:
    """SplitFed-SS (V2): one server updated by every client's batch in turn."""
    return Parts(init=lambda cv, sv, av: (cv, ctx.opt.init(cv.params), Server(sv, ctx.opt.init(sv.params))),
                 step=shared_server_step(ctx),
                 global_model=lambda cv, server: (cv, server.vars))


ALGORITHM = AlgorithmDef(name=NAME, label="SplitFed-SS", build=build,
                         model_bytes=lambda sizes: sizes.client, color="tab:green")
