"""Single-client step functions against numbers computed by hand."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.batching import gather_batch, epoch_orders
from fslsage_jax.algorithms.buffer import buffer_init, buffer_mask, buffer_positions, buffer_push
from fslsage_jax.algorithms.lifting import lift
from fslsage_jax.algorithms.trees import weighted_average
from fslsage_jax.split import Vars, init_split


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_aux_estimate_is_true_gradient_when_aux_is_server(toy):
    split = dataclasses.replace(toy, aux=toy.server)
    _, sv, _ = init_split(split, jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (5, 6))
    y = jnp.array([0, 1, 2, 1, 0])
    w = jnp.array([1, 1, 1, 1, 0.0])
    _, _, g_true, _ = steps.server_grads(split, sv, z, y, w)
    g_hat = steps.aux_grad_estimate(split, sv, z, y, w)
    np.testing.assert_array_equal(np.asarray(g_hat), np.asarray(g_true))
    assert float(steps.cosine(g_hat, g_true)) == pytest.approx(1.0, abs=1e-6)
    assert not np.any(np.asarray(g_hat)[4])          # padded sample gets no gradient


def test_aux_estimate_matches_hand_computed_linear_softmax(toy):
    # aux(z) = z W + b; d/dz mean_i CE = (softmax(z W + b) - onehot(y)) W^T / n_valid
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    z = rng.normal(size=(4, 6)).astype(np.float32)
    y = np.array([2, 0, 1, 1])
    w = np.array([1, 1, 1, 0], np.float32)
    av = Vars({"Dense_0": {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}}, {})
    got = np.asarray(steps.aux_grad_estimate(toy, av, jnp.asarray(z), jnp.asarray(y), jnp.asarray(w)))
    p = _softmax(z @ W + b)
    want = (p - np.eye(3)[y]) @ W.T / 3.0 * w[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_server_step_returns_pre_step_gradient_and_moves_params(toy):
    _, sv, _ = init_split(toy, jax.random.key(0))
    opt = optax.sgd(0.1)
    z = jax.random.normal(jax.random.key(2), (4, 6))
    y = jnp.array([0, 1, 2, 0])
    w = jnp.ones(4)
    _, gp, gz, _ = steps.server_grads(toy, sv, z, y, w)
    sv2, _, gz2, _ = steps.server_step(toy, opt, sv, opt.init(sv.params), z, y, w)
    np.testing.assert_array_equal(np.asarray(gz), np.asarray(gz2))
    jax.tree_util.tree_map(lambda a, g, b: np.testing.assert_allclose(b, a - 0.1 * g, rtol=1e-6),
                           sv.params, gp, sv2.params)


def test_client_backward_equals_full_chain_rule(toy):
    cv, sv, _ = init_split(toy, jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (4, 4))
    y = jnp.array([0, 1, 2, 0])
    w = jnp.ones(4)
    opt = optax.sgd(1.0)
    z, vjp_fn, st = steps.client_forward(toy, cv, x)
    _, _, gz, _ = steps.server_grads(toy, sv, z, y, w)
    cv2, _ = steps.client_backward(opt, cv, opt.init(cv.params), vjp_fn, gz, st)

    def full(cp):
        z = toy.client.apply({"params": cp}, x)
        logits = toy.server.apply({"params": sv.params}, z)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    g = jax.grad(full)(cv.params)
    jax.tree_util.tree_map(lambda a, g, b: np.testing.assert_allclose(b, a - g, rtol=1e-5, atol=1e-7),
                           cv.params, g, cv2.params)


def test_alignment_lowers_gradient_matching_loss(toy):
    _, sv, av = init_split(toy, jax.random.key(0))
    buf = buffer_init(8, (6,))
    z = jax.random.normal(jax.random.key(4), (6, 6))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    buf = buffer_push(buf, z, y, jnp.ones(6))
    opt = optax.adam(1e-2)

    def matching_loss(aux):
        target = steps.alignment_targets(toy, sv, buf)
        w = buffer_mask(buf)
        return float(steps.alignment_loss(toy, aux.params, aux.state, buf.z, buf.y, w,
                                          target / jnp.sum(w)))
    before = matching_loss(av)
    av2, _, (first, last) = steps.align(toy, opt, av, opt.init(av.params), sv, buf,
                                        jax.random.key(5), epochs=30, batch_size=8)
    after = matching_loss(av2)
    assert first == pytest.approx(before, rel=1e-5)   # one minibatch = whole buffer
    assert after < 0.5 * before
    assert last < first


def test_alignment_targets_are_per_sample_server_gradients(toy):
    _, sv, _ = init_split(toy, jax.random.key(0))
    buf = buffer_push(buffer_init(5, (6,)), jax.random.normal(jax.random.key(6), (3, 6)),
                      jnp.array([0, 1, 2]), jnp.ones(3))
    t = np.asarray(steps.alignment_targets(toy, sv, buf))
    assert not t[3:].any()                               # empty slots
    for i in range(3):                                   # ring positions 0..2 hold them
        zi, yi = buf.z[i:i + 1], buf.y[i:i + 1]
        _, _, gi, _ = steps.server_grads(toy, sv, zi, yi, jnp.ones(1))
        np.testing.assert_allclose(t[i], np.asarray(gi)[0], rtol=1e-5, atol=1e-7)


def test_fifo_keeps_newest_in_order_and_respects_capacity():
    buf = buffer_init(4, (1,))
    pushes = [([1, 2, 3], [1, 1, 0]), ([4, 5, 6], [1, 1, 1]), ([7, 8, 9], [0, 0, 0]),
              ([10, 11, 12], [1, 0, 0])]
    seen = []
    for vals, mask in pushes:
        z = jnp.array(vals, jnp.float32)[:, None]
        buf = buffer_push(buf, z, jnp.array(vals), jnp.array(mask, jnp.float32))
        seen += [v for v, k in zip(vals, mask) if k]
        newest = seen[-4:]
        assert int(buf.size) == len(newest)
        in_order = np.asarray(buffer_positions(buf))[:len(newest)]
        assert np.asarray(buf.z[:, 0])[in_order].tolist() == newest
        assert np.asarray(buf.y)[in_order].tolist() == newest
        mask = np.zeros(4)
        mask[in_order] = 1
        np.testing.assert_array_equal(buffer_mask(buf), mask)
    assert seen[-4:] == [4, 5, 6, 10]


def test_fifo_is_a_ring_written_in_place():
    """Pushes write after the newest rows and overwrite the oldest: [1 2 3] then [4 5]
    in a ring of 4 leave 5 at position 0 (not a shifted copy)."""
    buf = buffer_push(buffer_init(4, ()), jnp.arange(1.0, 4.0), jnp.arange(1, 4), jnp.ones(3))
    buf = buffer_push(buf, jnp.array([4.0, 5.0]), jnp.array([4, 5]), jnp.ones(2))
    assert np.asarray(buf.z).tolist() == [5.0, 2.0, 3.0, 4.0]
    assert int(buf.head) == 1 and int(buf.size) == 4


def test_fifo_batch_larger_than_capacity():
    buf = buffer_push(buffer_init(3, ()), jnp.arange(5.0), jnp.arange(5), jnp.ones(5))
    in_order = np.asarray(buffer_positions(buf))
    assert np.asarray(buf.z)[in_order].tolist() == [2.0, 3.0, 4.0] and int(buf.size) == 3


def test_weighted_average_by_hand():
    tree = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": jnp.array([0.0, 10.0, 20.0])}
    avg = weighted_average(tree, jnp.array([1.0, 1.0, 2.0]))
    np.testing.assert_allclose(avg["a"], [(1 + 3 + 10) / 4, (2 + 4 + 12) / 4])
    np.testing.assert_allclose(avg["b"], (0 + 10 + 40) / 4)


def test_weighted_average_floats_weighted_integers_equal_across_clients_kept():
    # float leaves: the n_i / n weighted mean, dtype kept, no client axis
    w = jnp.array([2.0, 1.0, 1.0])
    tree = {"p": jnp.array([[1.0, -2.0], [3.0, 4.0], [5.0, 8.0]]),
            "half": jnp.array([1.0, 2.0, 4.0], jnp.bfloat16),
            # integer leaves (e.g. an optimizer step counter) that every client holds equally:
            # the result is that value, exactly, even beyond float32's 2**24
            "count": jnp.array([7, 7, 7], jnp.int32),
            "big": jnp.full((3, 2), 2 ** 30 + 1, jnp.int32)}
    avg = weighted_average(tree, w)
    np.testing.assert_allclose(avg["p"], [(2 + 3 + 5) / 4, (-4 + 4 + 8) / 4], rtol=1e-6)
    assert avg["p"].dtype == jnp.float32 and avg["half"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(avg["half"]), (2 + 2 + 4) / 4)
    assert avg["count"].dtype == jnp.int32 and int(avg["count"]) == 7
    np.testing.assert_array_equal(avg["big"], [2 ** 30 + 1] * 2)
    # the same under jit, and invariant to the order of the clients (weights permuted along)
    perm = jnp.array([2, 0, 1])
    again = jax.jit(weighted_average)(jax.tree_util.tree_map(lambda a: a[perm], tree), w[perm])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.float32(a), np.float32(b), rtol=1e-6), again, avg)


def test_weighted_average_unequal_integer_leaves_take_rounded_weighted_mean():
    # uneven shards: clients took 10, 4 and 4 optimizer steps; weights n_i = 2, 1, 1
    avg = weighted_average({"count": jnp.array([10, 4, 4], jnp.int32)}, jnp.array([2.0, 1.0, 1.0]))
    assert avg["count"].dtype == jnp.int32 and int(avg["count"]) == (20 + 4 + 4) // 4
    # and so it does not depend on which client comes first
    avg = weighted_average({"count": jnp.array([4, 10, 4], jnp.int32)}, jnp.array([1.0, 2.0, 1.0]))
    assert int(avg["count"]) == 7


def test_schedule_uneven_last_batch_and_local_index():
    counts = jnp.array([5, 4, 1])
    n_max, B, E = 5, 2, 2
    x = jnp.arange(3 * 5, dtype=jnp.float32).reshape(3, 5)
    y = x.astype(jnp.int32)
    orders = epoch_orders(jax.random.key(0), counts, n_max, E)
    seen = {i: [] for i in range(3)}
    expect_active = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    for t in range(E * 3):
        b = gather_batch(x, y, counts, orders, jnp.int32(t), B)
        s = t % 3
        assert np.asarray(b.active).tolist() == [bool(a) for a in expect_active[s]]
        ks = np.asarray(b.k)
        assert ks[0] == (t // 3) * 3 + s and ks[1] == (t // 3) * 2 + s
        for i in range(3):
            n_valid = int(np.asarray(b.w[i]).sum())
            assert n_valid == max(0, min(B, int(counts[i]) - s * B))
            seen[i] += np.asarray(b.x[i])[:n_valid].tolist()
    for i in range(3):   # every epoch visits each real sample exactly once
        real = sorted(np.asarray(x[i, :int(counts[i])]).tolist() * E)
        assert sorted(seen[i]) == real


@pytest.mark.parametrize("strategy", ["vmap", "map", "chunked", "unroll"])
def test_lift_strategies_agree(strategy):
    f = lambda a, b: (jnp.sin(a) @ b, jnp.sum(a))
    a, b = jax.random.normal(jax.random.key(0), (5, 3, 4)), jax.random.normal(jax.random.key(1), (5, 4))
    want = jax.vmap(f)(a, b)
    got = jax.jit(lift(f, strategy, chunk_size=2))(a, b)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_weighted_average_refuses_leaves_without_an_average():
    with pytest.raises(TypeError, match="has no average"):
        weighted_average({"flag": jnp.array([True, False])}, jnp.array([1.0, 1.0]))
