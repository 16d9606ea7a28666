"""FedAvg (McMahan et al. 2017): every client trains the whole model (client part
then server part) locally; the fed server averages the full models each round.

Two variants (``Config.fedavg_server``):

- ``"copies"`` (default, textbook): every client trains its own copy of the whole
  model with its own optimizer; all copies are averaged. This computes exactly
  what SplitFed-MS computes; only the bytes differ (the whole model travels, no
  cut-layer messages). State: ``clients.shared`` = (client part, server part),
  ``clients.own`` = the optimizer state over the pair.
- ``"shared"`` (the authors' code, whose FedAvg curves the paper shows): every
  client's model is its client part followed by ONE shared server part. In
  lockstep, at each local step the shared server part takes the clients'
  updates one after another in client order, each with that client's own
  optimizer state for it; only the client parts are really averaged. The bytes
  are FedAvg's either way. State: SplitFed-SS's, with ``clients.own`` =
  (client optimizer state, this client's optimizer state for the server part).
"""
from __future__ import annotations

import jax

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.base import ClientState, Context, Parts, Server, frozen_of
from fslsage_jax.algorithms.config import FEDAVG_SERVERS
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import add_loss
from fslsage_jax.algorithms.sl_single_server import shared_server_step
from fslsage_jax.algorithms.trees import tree_where

NAME = "fed_avg"


def build(ctx: Context) -> Parts:
    """FedAvg for ``ctx``: textbook copies or the authors' shared server part."""
    if ctx.cfg.fedavg_server not in FEDAVG_SERVERS:
        raise ValueError(f"fedavg_server {ctx.cfg.fedavg_server!r}: choose from {FEDAVG_SERVERS}")
    split, opt = ctx.split, ctx.opt
    if ctx.cfg.fedavg_server == "shared":
        # SplitFed-SS's step with a per-client optimizer state for the server, no cut-layer bytes
        return Parts(
            init=lambda cv, sv, av: (cv, (opt.init(cv.params), opt.init(sv.params)), Server(sv, None)),
            step=shared_server_step(ctx, per_client_server_opt=True, count=False),
            global_model=lambda cv, server: (cv, server.vars))

    def client_step(fz, cv, sv, os, x, y, w, active, rng):
        new = steps.full_step(split, opt, cv.with_frozen(fz[0]), sv.with_frozen(fz[1]), os, x, y, w, rng)
        return tree_where(active, new[:3], (cv, sv, os)) + (new[3],)
    client_step = ctx.lift(client_step, shared=1)

    def step(state, b, t, rng, acc):
        (cv, sv), os = state.clients
        cv, sv, os, loss = client_step(frozen_of(state), cv, sv, os, b.x, b.y, b.w, b.active,
                                       jax.random.split(rng, ctx.m))
        return state._replace(clients=ClientState((cv, sv), os)), add_loss(acc, loss, b.w.sum(1))

    return Parts(init=lambda cv, sv, av: ((cv, sv), opt.init((cv.params, sv.params)), None),
                 step=step, global_model=lambda shared, server: shared)


ALGORITHM = AlgorithmDef(name=NAME, label="FedAvg", build=build,
                         model_bytes=lambda sizes: sizes.client + sizes.server,
                         uses=frozenset({"fedavg_server"}), color="tab:blue")
