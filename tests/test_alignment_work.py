"""Alignment works only over the filled buffer rows, a micro-batch at a time, and still
takes exactly the steps of whole minibatches over the valid rows (hand-written reference)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.batching import shuffled_order
from fslsage_jax.algorithms.buffer import Buffer
from fslsage_jax.split import init_split


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@functools.partial(jax.jit, static_argnums=0)
def _minibatch_loss_and_grad(toy, params, zb, yb, tb):
    """Squared distance between the auxiliary gradient of the minibatch's mean loss and
    the targets, and its gradient in the auxiliary parameters."""
    def loss(p):
        g = jax.grad(lambda zz: jnp.mean(_ce(toy.aux.apply({"params": p}, zz), yb)))(zb)
        return jnp.sum((g - tb) ** 2)
    return jax.value_and_grad(loss)(params)


def _reference_align(toy, sv, av, z, y, n, key, epochs, batch, lr):
    """Whole-minibatch alignment written out: targets are per-sample server gradients,
    each minibatch's loss is the squared distance between the auxiliary gradient of its
    mean loss and the targets over its size, one Adam step per minibatch."""
    cap = z.shape[0]
    per_sample = jax.vmap(jax.grad(lambda zi, yi: _ce(toy.server.apply({"params": sv.params}, zi[None]), yi[None])[0]))
    target = per_sample(z, y)
    opt = optax.adam(lr)
    params, state, losses = av.params, opt.init(av.params), []
    for ekey in jax.random.split(key, epochs):
        order = (np.asarray(shuffled_order(ekey, n, cap)) + cap - n) % cap
        total = 0.0
        for start in range(0, n, batch):
            rows = order[start:min(start + batch, n)]
            zb, yb, tb = z[rows], y[rows], target[rows] / len(rows)

            val, g = _minibatch_loss_and_grad(toy, params, zb, yb, tb)
            upd, state = opt.update(g, state, params)
            params, total = optax.apply_updates(params, upd), total + float(val)
        losses.append(total)
    return params, losses


def _setup(toy, cap=80):
    _, sv, av = init_split(toy, jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (cap, 6))
    y = jax.random.randint(jax.random.key(2), (cap,), 0, 3)
    return sv, av, z, y


def _close(a, b):
    jax.tree_util.tree_map(lambda x, r: np.testing.assert_allclose(x, r, rtol=2e-5, atol=1e-6), a, b)


def test_micro_batched_alignment_equals_whole_minibatches(toy):
    sv, av, z, y = _setup(toy)
    opt = optax.adam(1e-2)
    for n, batch in [(70, 50), (3, 2)]:     # minibatches of 50 (2 micro-batches) + 20; of 2 + 1
        key = jax.random.key(n)
        got, _, (first, last) = steps.align(toy, opt, av, opt.init(av.params), sv, Buffer(z, y, jnp.int32(n)),
                                            key, 2, batch)
        ref, losses = _reference_align(toy, sv, av, z, y, n, key, 2, batch, 1e-2)
        _close(got.params, ref)
        np.testing.assert_allclose([first, last], [losses[0], losses[-1]], rtol=2e-5)


def test_alignment_on_a_wrapped_ring_equals_the_samples_in_a_row(toy):
    """A ring that wrapped (oldest samples in the middle) aligns exactly like the same
    samples laid out oldest first at the end of a buffer."""
    sv, av, z, y = _setup(toy)
    opt = optax.adam(1e-2)
    n, head, cap = 50, 30, z.shape[0]
    pos = (head - n + np.arange(n)) % cap                 # where the ring holds sample v
    zr, yr = z.at[pos].set(z[cap - n:]), y.at[pos].set(y[cap - n:])
    key = jax.random.key(3)
    ring = steps.align(toy, opt, av, opt.init(av.params), sv, Buffer(zr, yr, jnp.int32(n), jnp.int32(head)),
                       key, 2, 32)
    flat = steps.align(toy, opt, av, opt.init(av.params), sv, Buffer(z, y, jnp.int32(n)), key, 2, 32)
    _close(ring[0].params, flat[0].params)
    np.testing.assert_allclose(steps.alignment_targets(toy, sv, Buffer(zr, yr, jnp.int32(n), jnp.int32(head)),
                                                       16)[pos],
                               steps.alignment_targets(toy, sv, Buffer(z, y, jnp.int32(n)))[cap - n:],
                               rtol=1e-5, atol=1e-7)


def test_clients_with_different_fill_share_one_row_bound(toy):
    """Lifted over clients, ``rows`` is the largest fill; each client still aligns on
    its own valid rows only."""
    sv, av, z, y = _setup(toy)
    opt = optax.adam(1e-2)
    fills = jnp.array([70, 20], jnp.int32)
    keys = jax.random.split(jax.random.key(9), 2)
    zz, yy = jnp.stack([z, z[::-1]]), jnp.stack([y, y[::-1]])
    avm = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), av)
    aom = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), opt.init(av.params))
    out, _, _ = jax.jit(jax.vmap(lambda a, o, b, k: steps.align(toy, opt, a, o, sv, b, k, 2, 32, rows=jnp.int32(70))))(
        avm, aom, Buffer(zz, yy, fills, jnp.zeros(2, jnp.int32)), keys)
    for i in range(2):
        ref, _ = _reference_align(toy, sv, av, zz[i], yy[i], int(fills[i]), keys[i], 2, 32, 1e-2)
        _close(jax.tree_util.tree_map(lambda a: a[i], out.params), ref)


def test_one_minibatch_of_the_whole_buffer_equals_whole_minibatches(toy):
    """batch_size >= capacity: every epoch is one minibatch of all valid rows (any shuffle
    gives the same step), taken over the whole ring when mostly filled, else in
    micro-batches; on a wrapped ring, alone and lifted with a shared row bound."""
    sv, av, z, y = _setup(toy)
    opt = optax.adam(1e-2)
    cap, head = z.shape[0], 30
    for n in (70, 20):                     # 70 > cap / 2: the whole ring; 20: micro-batches
        pos = (head - n + np.arange(n)) % cap
        zr, yr = z.at[pos].set(z[cap - n:]), y.at[pos].set(y[cap - n:])
        key = jax.random.key(n)
        got, _, (first, last) = steps.align(toy, opt, av, opt.init(av.params), sv,
                                            Buffer(zr, yr, jnp.int32(n), jnp.int32(head)), key, 3, cap)
        ref, losses = _reference_align(toy, sv, av, z, y, n, key, 3, cap, 1e-2)
        _close(got.params, ref)
        np.testing.assert_allclose([first, last], [losses[0], losses[-1]], rtol=2e-5)
    fills = jnp.array([70, 20], jnp.int32)
    keys = jax.random.split(jax.random.key(5), 2)
    zz, yy = jnp.stack([z, z[::-1]]), jnp.stack([y, y[::-1]])
    avm = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), av)
    aom = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), opt.init(av.params))
    out, _, _ = jax.jit(jax.vmap(lambda a, o, b, k: steps.align(toy, opt, a, o, sv, b, k, 2, 100,
                                                                 rows=jnp.int32(70))))(
        avm, aom, Buffer(zz, yy, fills, jnp.zeros(2, jnp.int32)), keys)
    for i in range(2):
        ref, _ = _reference_align(toy, sv, av, zz[i], yy[i], int(fills[i]), keys[i], 2, 100, 1e-2)
        _close(jax.tree_util.tree_map(lambda a: a[i], out.params), ref)
