"""Pure single-client step functions of federated split learning.

These are the building blocks every algorithm lifts over the client axis, and
what a user imports into their own JAX code. Each acts on ONE client's
arrays (no client axis) and is safe under ``jax.jit`` and ``jax.vmap``.
Batches carry a per-sample weight ``w`` (1 for a real sample, 0 for padding),
so the last, smaller minibatch of an epoch works at fixed shapes; losses are
means over the real samples, as PyTorch's mean-reduced losses are. Raw client
inputs go through ``split.input_fn`` (on-device augmentation) inside the
client steps; frozen shared weights ride along in ``Vars.frozen`` and are
never returned in the updated variables.

FSL-SAGE (Nair et al., ICML 2025): the client's update direction at the cut
layer is the auxiliary estimate ``g_hat = grad_z L(aux(z), y)``
(:func:`aux_grad_estimate`); every ``l`` rounds the server fits the auxiliary
model so that its cut-layer gradient matches the server's (:func:`align`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fslsage_jax.algorithms.batching import masked_mean, shuffled_order
from fslsage_jax.algorithms.buffer import Buffer, buffer_mask, buffer_positions
from fslsage_jax.algorithms.lifting import branch
from fslsage_jax.algorithms.trees import tree_where
from fslsage_jax.split import SplitModel, Vars, apply_part, batch_mask, prepare_input


def _keys(rng):
    """(dropout key, augmentation key) from one step key (None stays None)."""
    return (None, None) if rng is None else tuple(jax.random.split(rng))


def client_forward(split: SplitModel, cv: Vars, x: jax.Array, rng: jax.Array | None = None,
                   w: jax.Array | None = None):
    """Client forward pass in training mode, keeping what the backward pass needs.

    Args:
      split: the split model.
      cv: client variables.
      x: raw input batch ``[B, ...]`` (``split.input_fn`` is applied here).
      rng: dropout/augmentation key or None (None: no augmentation).
      w: ``[B]`` sample weights (0 = padding), for masked batch statistics.
    Returns:
      ``(z, vjp_fn, new_state)``: the cut activation, a function mapping a
      cut-layer gradient ``g_z`` to ``(grad_params,)``, the updated client state.
    """
    f = lambda p: client_apply(split, cv._replace(params=p), x, rng, w)
    z, vjp_fn, new_state = jax.vjp(f, cv.params, has_aux=True)
    return z, vjp_fn, new_state


def client_apply(split: SplitModel, cv: Vars, x: jax.Array, rng: jax.Array | None = None,
                 w: jax.Array | None = None):
    """The client model in training mode on a raw input batch: ``(z, new_state)``
    (what :func:`client_forward` differentiates; ``rng`` and ``w`` as there)."""
    rng, kaug = _keys(rng)
    x = prepare_input(split, x, kaug, True)
    mask = None if w is None else batch_mask(split, w)
    return apply_part(split.client, cv, x, True, rng, mask)


def client_backward(opt: optax.GradientTransformation, cv: Vars, opt_state: Any,
                    vjp_fn: Callable, g_z: jax.Array, new_state: Any):
    """Push a cut-layer gradient through the client model and take one optimizer step.

    Args:
      opt: the client optimizer.
      cv, opt_state: client variables and optimizer state.
      vjp_fn, new_state: from :func:`client_forward`.
      g_z: gradient of the loss w.r.t. ``z`` (true, or the auxiliary estimate).
    Returns:
      ``(new_cv, new_opt_state)``.
    """
    (grads,) = vjp_fn(g_z)
    updates, opt_state = opt.update(grads, opt_state, cv.params)
    return Vars(optax.apply_updates(cv.params, updates), new_state), opt_state


def part_loss(split: SplitModel, module, v: Vars, z: jax.Array, y: jax.Array, w: jax.Array,
              train: bool = True, rng: jax.Array | None = None):
    """Masked-mean loss of ``module`` on cut activations ``z``: ``(loss, new_state)``."""
    logits, new_state = apply_part(module, v, z, train, rng, batch_mask(split, w) if train else None)
    return masked_mean(split.loss(logits, y), w), new_state


def server_grads(split: SplitModel, sv: Vars, z: jax.Array, y: jax.Array, w: jax.Array,
                 rng: jax.Array | None = None):
    """Server loss and its gradients w.r.t. the server parameters and ``z``.

    Returns:
      ``(loss, grad_params, g_z, new_state)``; ``g_z`` is the true gradient
      dL/dz that SplitFed sends back to the client.
    """
    f = lambda p, z: part_loss(split, split.server, sv._replace(params=p), z, y, w, True, rng)
    (loss, new_state), (gp, gz) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(sv.params, z)
    return loss, gp, gz, new_state


def server_step(split: SplitModel, opt: optax.GradientTransformation, sv: Vars, opt_state: Any,
                z: jax.Array, y: jax.Array, w: jax.Array, rng: jax.Array | None = None):
    """One server optimizer step on L(server(z), y).

    Args:
      split, opt: the split model and the server optimizer.
      sv, opt_state: server variables and optimizer state.
      z, y, w: uploaded cut activations, labels, sample weights.
    Returns:
      ``(new_sv, new_opt_state, g_z, loss)`` where ``g_z`` is dL/dz under the
      server parameters BEFORE the step.
    """
    loss, gp, gz, new_state = server_grads(split, sv, z, y, w, rng)
    updates, opt_state = opt.update(gp, opt_state, sv.params)
    return Vars(optax.apply_updates(sv.params, updates), new_state), opt_state, gz, loss


def aux_grad_estimate(split: SplitModel, av: Vars, z: jax.Array, y: jax.Array, w: jax.Array,
                      rng: jax.Array | None = None) -> jax.Array:
    """FSL-SAGE's estimate of the server's cut-layer gradient.

    Returns:
      ``g_hat = grad_z mean_i L(aux(z)_i, y_i)`` (same shape as ``z``). When the
      auxiliary model equals the server model this is the true gradient.
    """
    f = lambda z: part_loss(split, split.aux, av, z, y, w, True, rng)[0]
    return jax.grad(f)(z)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of two arrays seen as flat vectors (0 if either is zero)."""
    a, b = a.ravel(), b.ravel()
    return jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


# Rows per alignment micro-batch: an alignment minibatch is processed this many rows at a
# time (gradients summed), so work follows the filled rows, not the buffer's capacity.
ALIGN_MICRO_BATCH = 32
# A buffer whose cut activations take at most this many bytes is, when more than half of
# its rows are filled, processed whole instead (no micro-batch loop, no gather).
ALIGN_WHOLE_BYTES = 1 << 22


def _whole_buffer_ok(buf: Buffer, rows: jax.Array) -> jax.Array | bool:
    """Whether to process the whole buffer at once rather than ``rows`` in micro-batches."""
    return buf.z.size * buf.z.dtype.itemsize <= ALIGN_WHOLE_BYTES and 2 * rows > buf.z.shape[0]


def _stateless(v: Vars) -> bool:
    return not jax.tree_util.tree_leaves(v.state)


def alignment_targets(split: SplitModel, sv: Vars, buf: Buffer, chunk: int | None = None,
                      rows: jax.Array | None = None) -> jax.Array:
    """True per-sample cut-layer gradients of the buffered samples, current server.

    Returns ``[cap, ...]``: ``n * grad_z mean_i L(server(z_i), y_i)`` over the
    ``n`` valid entries (zero on empty slots). Dividing by a minibatch's valid
    count gives the gradient of that minibatch's mean loss.

    ``chunk``: compute them ``chunk`` samples at a time, only over the newest ``rows``
    ring positions (default: all; the valid entries are the newest ``buf.size``), when the
    server has no batch statistics, where a sample's gradient does not depend on the
    others in its batch (the result is the same). With BatchNorm the whole buffer is
    one batch, as in the authors' code.
    """
    w = buffer_mask(buf)
    cap = buf.z.shape[0]
    f = lambda z: part_loss(split, split.server, sv, z, buf.y, w, True)[0]
    whole = lambda: jax.grad(f)(buf.z) * jnp.maximum(jnp.sum(w), 1.0)
    rows = cap if rows is None else rows
    if chunk is None or chunk >= cap or not _stateless(sv):
        return whole()
    head = jnp.asarray(buf.head, jnp.int32)

    def one_chunk(c, target):
        # chunk c: the ring positions of the samples c*chunk .. (c+1)*chunk - 1 places older
        # than the newest; past the capacity it wraps and rewrites rows with the same values
        idx = (head - (c + 1) * chunk + jnp.arange(chunk)) % cap
        z, y, wc = buf.z[idx], buf.y[idx], w[idx]
        # the gradient of the chunk's SUM of losses = per-sample gradients
        g = jax.grad(lambda z: part_loss(split, split.server, sv, z, y, wc, True)[0])(z)
        return target.at[idx].set(g * jnp.maximum(jnp.sum(wc), 1.0), unique_indices=True)
    n = (jnp.minimum(rows, cap) + chunk - 1) // chunk
    chunks = lambda: jax.lax.fori_loop(0, n, one_chunk, jnp.zeros_like(buf.z))
    return branch(_whole_buffer_ok(buf, rows), whole, chunks)


def alignment_loss(split: SplitModel, aux_params: Any, aux_state: Any, z: jax.Array,
                   y: jax.Array, w: jax.Array, target: jax.Array, aux_frozen: Any = None,
                   count: jax.Array | None = None) -> jax.Array:
    """Squared error, summed over elements, between the auxiliary cut-layer gradient
    (of the minibatch's mean auxiliary loss) and the server's (``target``, already
    scaled to the same minibatch mean).

    ``count``: the minibatch's number of valid samples when ``z`` holds only part of it
    (a stateless auxiliary model's per-sample gradients are then those of the whole
    minibatch's mean); default: the valid samples of ``w``."""
    g_hat = aux_grad_estimate(split, Vars(aux_params, aux_state, aux_frozen), z, y, w)
    if count is not None:
        g_hat = g_hat * (jnp.maximum(jnp.sum(w), 1.0) / jnp.maximum(count, 1))
    wz = w.reshape(w.shape + (1,) * (z.ndim - 1))
    return jnp.sum(((g_hat - target) * wz) ** 2)


def _prefix_order(key: jax.Array, count: jax.Array, rows: jax.Array, cap: int) -> jax.Array:
    """``shuffled_order(key, count, cap)`` where only the first ``rows >= count`` entries
    are read: sorted over the smallest of 64, 128, ... , ``cap`` entries that covers
    ``rows`` (the same shuffle: the uniform draws of a prefix do not depend on the length)."""
    sizes = [w for w in (64 << i for i in range(max(cap, 64).bit_length())) if w < cap] + [cap]
    if len(sizes) == 1:
        return shuffled_order(key, count, cap)
    branches = [lambda w=w: jnp.pad(shuffled_order(key, count, w), (0, cap - w)) for w in sizes]
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), rows), branches)


def align(split: SplitModel, opt: optax.GradientTransformation, av: Vars, opt_state: Any,
          sv: Vars, buf: Buffer, key: jax.Array, epochs: int, batch_size: int,
          target_scale: str = "minibatch", rows: jax.Array | None = None):
    """Fit the auxiliary model's cut-layer gradient to the server's on a buffer.

    ``epochs`` passes over the valid buffer entries in shuffled minibatches of
    ``batch_size``; one optimizer step per minibatch on :func:`alignment_loss`
    (this differentiates a gradient: second order). Targets are recomputed
    once with the CURRENT server.

    Work follows the filled rows: minibatches and server targets run only over the last
    ``rows`` buffer rows, and a stateless auxiliary model's minibatch is processed
    ``ALIGN_MICRO_BATCH`` rows at a time (its gradient summed: the same step). When one
    minibatch holds the whole buffer (``batch_size >= capacity``) no shuffle can change
    it: each epoch is one step on the valid rows, taken in ring order, and over the whole
    buffer at once when more than half of it is filled and it is small
    (``ALIGN_WHOLE_BYTES``); the server targets likewise.

    Args:
      split, opt: the split model and the alignment optimizer (Adam 1e-3).
      av, opt_state: auxiliary variables and alignment optimizer state.
      sv: server variables (not changed).
      buf: this client's buffer of uploaded (z, y).
      key: shuffling key.
      epochs, batch_size: passes over the buffer and alignment minibatch size.
      target_scale: ``"minibatch"`` or ``"buffer"`` (above).
      rows: an upper bound on the valid entries, the same for every client when lifted
        over clients (default ``buf.size``): loops run over this many rows, so that
        their trip counts are not per client under ``vmap``.
    Returns:
      ``(new_av, new_opt_state, (loss_first_epoch, loss_last_epoch))``, losses
      summed over the epoch's minibatches.
    """
    if target_scale not in ("minibatch", "buffer"):
        raise ValueError(f"target_scale {target_scale!r}: choose minibatch or buffer")
    cap = buf.z.shape[0]
    n_valid = buf.size
    rows = n_valid if rows is None else jnp.minimum(rows, cap)
    mu = min(ALIGN_MICRO_BATCH, batch_size) if _stateless(av) else batch_size
    target = alignment_targets(split, sv, buf, min(batch_size, mu), rows)
    loss_and_grad = jax.value_and_grad(alignment_loss, argnums=1)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, av.params)
    # one minibatch holds every valid row: the shuffle cannot change it (only the order of
    # a sum), so the rows are read in ring order, and over the whole buffer when mostly filled
    whole_set = batch_size >= cap

    def whole(params, count, scale):
        return loss_and_grad(split, params, av.state, buf.z, buf.y, buffer_mask(buf), target * scale,
                             av.frozen, count)

    def epoch(carry, ekey):
        params, ostate = carry
        # a shuffle of the valid entries (the size ring positions before head) first
        order = buffer_positions(buf) if whole_set else (
            _prefix_order(ekey, n_valid, rows, cap) + jnp.asarray(buf.head, jnp.int32) - n_valid) % cap

        def minibatch(j, carry):
            params, ostate, total = carry
            start = j * batch_size
            count = jnp.clip(n_valid - start, 0, batch_size)
            scale = 1.0 / jnp.maximum(count if target_scale == "minibatch" else n_valid, 1)

            def micro(u, acc):
                pos = start + u * mu + jnp.arange(mu)
                idx = order[jnp.minimum(pos, cap - 1)]
                w = ((pos < n_valid) & (pos < start + batch_size)).astype(jnp.float32)
                loss, g = loss_and_grad(split, params, av.state, buf.z[idx], buf.y[idx], w,
                                        target[idx] * scale, av.frozen, count)
                return acc[0] + loss, jax.tree_util.tree_map(jnp.add, acc[1], g)
            n_micro = (jnp.minimum(rows - start, batch_size) + mu - 1) // mu
            micro_all = lambda p, *_: jax.lax.fori_loop(0, n_micro, micro, (jnp.zeros(()), zero_grads))
            loss, grads = branch(whole_set and (mu >= cap or _whole_buffer_ok(buf, rows)),
                                 whole, micro_all, params, count, scale)
            updates, new_os = opt.update(grads, ostate, params)
            new = (optax.apply_updates(params, updates), new_os)
            params, ostate = tree_where(count > 0, new, (params, ostate))
            return params, ostate, total + loss

        n_mb = (rows + batch_size - 1) // batch_size
        params, ostate, total = jax.lax.fori_loop(0, n_mb, minibatch, (params, ostate, jnp.zeros(())))
        return (params, ostate), total

    (params, opt_state), losses = jax.lax.scan(epoch, (av.params, opt_state),
                                               jax.random.split(key, epochs))
    return Vars(params, av.state), opt_state, (losses[0], losses[-1])


def local_aux_step(split: SplitModel, opt_client, opt_aux, cv: Vars, copt, av: Vars, aopt,
                   x: jax.Array, y: jax.Array, w: jax.Array, rng: jax.Array | None = None):
    """CSE-FSL's client step: client and auxiliary models trained together on the
    local loss L(aux(client(x)), y); no gradient from the server.

    Returns:
      ``(new_cv, new_copt, new_av, new_aopt, z, loss)`` where ``z`` is the cut
      activation computed before the step (what the client uploads).
    """
    rng, kaug = _keys(rng)
    x = prepare_input(split, x, kaug, True)

    def f(cp, ap):
        z, cstate = apply_part(split.client, cv._replace(params=cp), x, True, rng, batch_mask(split, w))
        loss, astate = part_loss(split, split.aux, av._replace(params=ap), z, y, w, True, rng)
        return loss, (z, cstate, astate)

    (loss, (z, cstate, astate)), (gc, ga) = jax.value_and_grad(f, (0, 1), has_aux=True)(cv.params, av.params)
    uc, copt = opt_client.update(gc, copt, cv.params)
    ua, aopt = opt_aux.update(ga, aopt, av.params)
    return (Vars(optax.apply_updates(cv.params, uc), cstate), copt,
            Vars(optax.apply_updates(av.params, ua), astate), aopt, z, loss)


def full_step(split: SplitModel, opt, cv: Vars, sv: Vars, opt_state, x, y, w, rng=None):
    """FedAvg's local step: the client trains the whole model (client then server).

    Returns:
      ``(new_cv, new_sv, new_opt_state, loss)``; the optimizer acts on the pair
      ``(client_params, server_params)``.
    """
    rng, kaug = _keys(rng)
    x = prepare_input(split, x, kaug, True)

    def f(params):
        cp, sp = params
        z, cstate = apply_part(split.client, cv._replace(params=cp), x, True, rng, batch_mask(split, w))
        loss, sstate = part_loss(split, split.server, sv._replace(params=sp), z, y, w, True, rng)
        return loss, (cstate, sstate)

    params = (cv.params, sv.params)
    (loss, (cstate, sstate)), g = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    cp, sp = optax.apply_updates(params, updates)
    return Vars(cp, cstate), Vars(sp, sstate), opt_state, loss
