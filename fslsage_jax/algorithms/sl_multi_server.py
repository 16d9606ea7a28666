"""SplitFed-MS, SplitFedV1 (Thapa et al. 2022): split learning with federated
averaging of the client models. Every local step the client sends ``z`` up and
receives the true gradient dL/dz back. Every client has its own server copy; the
copies are averaged on the server side each round (no communication).

State: ``clients.shared`` = (client model, server copy), ``clients.own`` =
(client optimizer state, server-copy optimizer state), ``server`` = None.
"""
from __future__ import annotations

import jax

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.base import ClientState, Context, Parts, frozen_of
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import add_loss, count_messages
from fslsage_jax.algorithms.trees import tree_where

NAME = "sl_multi_server"


def build(ctx: Context) -> Parts:
    """SplitFed-MS (V1): per-client server copies, averaged each round."""
    split, opt = ctx.split, ctx.opt

    def client_step(fz, cv, sv, copt, sopt, x, y, w, active, rng):
        kc, ks = jax.random.split(rng)
        z, vjp_fn, cstate = steps.client_forward(split, cv.with_frozen(fz[0]), x, kc, w)
        sv2, sopt2, gz, loss = steps.server_step(split, opt, sv.with_frozen(fz[1]), sopt, z, y, w, ks)
        cv2, copt2 = steps.client_backward(opt, cv, copt, vjp_fn, gz, cstate)
        return tree_where(active, (cv2, sv2, copt2, sopt2), (cv, sv, copt, sopt)) + (loss,)
    client_step = ctx.lift(client_step, shared=1)

    def step(state, b, t, rng, acc):
        (cv, sv), (copt, sopt) = state.clients
        cv, sv, copt, sopt, loss = client_step(frozen_of(state), cv, sv, copt, sopt, b.x, b.y, b.w,
                                               b.active, jax.random.split(rng, ctx.m))
        state = state._replace(clients=ClientState((cv, sv), (copt, sopt)))
        return state, count_messages(add_loss(acc, loss, b.w.sum(1)), b.w, z_up=True, g_down=True)

    return Parts(init=lambda cv, sv, av: ((cv, sv), (opt.init(cv.params), opt.init(sv.params)), None),
                 step=step, global_model=lambda shared, server: shared)


ALGORITHM = AlgorithmDef(name=NAME, label="SplitFed-MS", build=build,
                         model_bytes=lambda sizes: sizes.client, color="tab:orange")
