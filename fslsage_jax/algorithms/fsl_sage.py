"""FSL-SAGE (Nair et al., ICML 2025): federated split learning via smashed
activation gradient estimation.

Each client updates its model with the auxiliary estimate
``g_hat = grad_z L(aux_i(z), y)`` of the server's cut-layer gradient, pushed
through the client model by its VJP; the auxiliary model is not trained on
that loss. Every Q local steps the client uploads (z, y): the shared server
takes one step on it and appends it to the client's FIFO alignment buffer.
Every l rounds, at local step 0 and after that step's uploads, every auxiliary
model is aligned to the current server (:func:`steps.align`) and sent to its
client. Client models are averaged each round; auxiliary models never are.
The auxiliary model's optimizer is its own (``Config.aux_lr``,
``aux_weight_decay``: the authors' Adam 1e-3 without decay). Optional warm start
(``Config.warm_start``, the authors' option, off by default): the first round(s)
are CSE-FSL's (local auxiliary training, CSE-FSL's messages, no alignment); the
alignment schedule counts rounds from the end of the warm start.

Alignment targets are the server's gradients in training mode (batch statistics
of the buffer); the server's BatchNorm running statistics of that pass are
discarded (the authors' code keeps them: their server sees each aligned client's
whole buffer in one training-mode forward pass).

Simulation semantics: clients run in lockstep; the server consumes the
uploads of a step one after another in client order; in an alignment round all
clients are aligned at once against the server state after the step-0 uploads.

State: ``clients.shared`` = client models, ``clients.own`` = :class:`SageOwn`
(client optimizer state, auxiliary model, its alignment optimizer state, FIFO
buffer), ``server`` = :class:`~fslsage_jax.algorithms.base.Server`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import cse_fsl, steps
from fslsage_jax.algorithms.base import ClientState, Context, Parts, Server, average_shared, frozen_of
from fslsage_jax.algorithms.buffer import Buffer, buffer_init, buffer_push
from fslsage_jax.algorithms.config import aux_optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import add_loss, average_into, count_messages, uploads
from fslsage_jax.algorithms.lifting import branch, lift
from fslsage_jax.split import Vars, cut_shape

NAME = "fsl_sage"


class SageOwn(NamedTuple):
    """What each FSL-SAGE client keeps across rounds (never averaged)."""
    opt: Any          # client optimizer state
    aux: Vars         # auxiliary model
    aux_opt: Any      # its (alignment) optimizer state
    buffer: Buffer    # FIFO of uploaded (z, y)


def build(ctx: Context) -> Parts:
    """FSL-SAGE for ``ctx``."""
    split, cfg, m, opt = ctx.split, ctx.cfg, ctx.m, ctx.opt
    align_opt = aux_optimizer_for(cfg)
    serve, forward, update = ctx.serve(), ctx.client_forward(), ctx.client_update()
    z_shape, z_dtype = cut_shape(split)

    def init(cv, sv, av):
        buf = buffer_init(cfg.align_buffer_size, z_shape, split.label_shape, z_dtype)
        own = SageOwn(opt.init(cv.params), av, align_opt.init(av.params), buf)
        return cv, own, Server(sv, opt.init(sv.params))

    push = ctx.lift_light(buffer_push)
    estimate = ctx.lift_light(lambda fa, av, z, y, w: steps.aux_grad_estimate(split, av.with_frozen(fa), z, y, w),
                        shared=1)
    # alignment: as the local steps, unless align_client_chunk bounds how many clients align at
    # once (vmapped, chunks one after another); rows: the most filled rows of any client, so
    # that loops over rows are shared by all
    bounded = cfg.align_client_chunk < m and cfg.strategy != "loop"
    align_all = lift(lambda fa, sv, rows, av, ao, buf, k: steps.align(
        split, align_opt, av.with_frozen(fa), ao, sv, buf, k, cfg.align_epochs, cfg.align_batch_size,
        cfg.align_target_scale, rows), "chunked" if bounded else cfg.strategy,
        cfg.align_client_chunk if bounded else cfg.chunk_size, shared=3)

    def sage_step(state, b, t, rng, acc):
        fc, fs, fa = frozen_of(state)
        kc, ks, ka = jax.random.split(rng, 3)
        cv, own = state.clients
        z, vjp, cstate = forward(fc, cv, b.x, b.w, jax.random.split(kc, m))
        up = uploads(b, cfg.server_update_interval)
        sv, sopt, g_true, loss = serve(state.server.vars.with_frozen(fs), state.server.opt, z, b.y, b.w,
                                       up, ks)
        # the FIFO is only rewritten at a step with uploads
        buf = branch(jnp.any(up), lambda buf: push(buf, z, b.y, b.w * up[:, None]), lambda buf: buf,
                     own.buffer)

        def do_align(av, ao):
            av, ao, (first_l, last_l) = align_all(fa, sv.with_frozen(fs), jnp.max(buf.size), av, ao,
                                                  buf, jax.random.split(ka, m))
            return av, ao, jnp.mean(first_l), jnp.mean(last_l), jnp.int32(m)
        own_round = state.round - cfg.warm_start          # rounds after the warm start
        aligning = (t == 0) & (own_round >= 0) & (own_round % cfg.align_interval == 0)
        av, ao, l0, l1, sent = branch(aligning, do_align,
                                      lambda av, ao: (av, ao, acc["align_loss_first"],
                                                      acc["align_loss_last"], jnp.int32(0)),
                                      own.aux, own.aux_opt)
        g_hat = estimate(fa, av, z, b.y, b.w)
        cv, copt = update(cv, own.opt, vjp(g_hat)[0], cstate, b.active)
        cos = jax.vmap(steps.cosine)(g_hat, g_true)
        acc = count_messages(add_loss(acc, loss, b.w.sum(1) * up), b.w * up[:, None], z_up=True,
                             g_down=False)
        acc = {**acc, "cos_sum": acc["cos_sum"] + jnp.sum(cos * up), "cos_n": acc["cos_n"] + jnp.sum(up),
               "align_loss_first": l0, "align_loss_last": l1, "aux_down": acc["aux_down"] + sent}
        state = state._replace(clients=ClientState(cv, SageOwn(copt, av, ao, buf)), server=Server(sv, sopt))
        return state, acc

    if not cfg.warm_start:
        return Parts(init=init, step=sage_step, global_model=lambda cv, server: (cv, server.vars))

    # the first ``warm_start`` rounds are CSE-FSL's (its step, messages and averaging)
    cse_clients, cse_server = cse_fsl.local_aux_steps(ctx)

    def cse_step(state, b, t, rng, acc):
        fz = frozen_of(state)
        kc, ks = jax.random.split(rng)
        cv, own = state.clients
        cv, copt, av, ao, z = cse_clients(fz, cv, own.opt, own.aux, own.aux_opt, b, kc)
        srv, loss, up = cse_server(state.server, fz[1], z, b, ks)
        own = own._replace(opt=copt, aux=av, aux_opt=ao)
        return state._replace(clients=ClientState(cv, own), server=srv), cse_fsl.count_uploads(acc, loss, b, up)

    def cse_end(state, weights, acc):
        state, acc = average_shared(state, weights, acc)
        own = state.clients.own
        own = own._replace(aux=average_into(own.aux, weights))
        state = state._replace(clients=state.clients._replace(own=own))
        return state, {**acc, "aux_models": acc["aux_models"] + weights.shape[0]}

    warm = lambda state: state.round < cfg.warm_start
    return Parts(init=init,
                 step=lambda state, *a: branch(warm(state), cse_step, sage_step, state, *a),
                 end=lambda state, *a: branch(warm(state), cse_end, average_shared, state, *a),
                 global_model=lambda cv, server: (cv, server.vars))

def round_metrics(acc: dict) -> dict:
    """Mean cosine between the auxiliary estimate and the true server gradient on the
    uploaded batches; the alignment losses in a round that aligned."""
    out = {"grad_cosine": float(acc["cos_sum"] / acc["cos_n"]) if acc["cos_n"] > 0 else None}
    if acc["aux_down"] > 0:
        out["align_loss_first_epoch"] = float(acc["align_loss_first"])
        out["align_loss_last_epoch"] = float(acc["align_loss_last"])
    return out


ALGORITHM = AlgorithmDef(
    name=NAME, label="FSL-SAGE", build=build,
    model_bytes=lambda sizes: sizes.client,
    uses=frozenset({"server_update_interval", "align_interval", "align_epochs", "align_batch_size",
                    "align_buffer_size", "align_target_scale", "align_client_chunk", "aux_lr", "aux_weight_decay",
                    "warm_start"}),
    round_metrics=round_metrics, color="tab:red")
