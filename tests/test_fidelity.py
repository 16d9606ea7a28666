"""The authors' options: FedAvg with one shared server part, the auxiliary model's own
optimizer, the CSE-FSL warm start and the alignment target scale."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fslsage_jax.algorithms import ALGORITHMS, steps
from fslsage_jax.algorithms.buffer import Buffer
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.comm import round_bytes, sizes_of
from fslsage_jax.split import Vars, init_split
from conftest import ToyServer, make_toy, toy_client_data, toy_config


def _data(m=3, n=6):
    d = toy_client_data(m, n)
    return ClientArrays(jnp.asarray(d.x), jnp.asarray(d.y), jnp.asarray(d.counts))


def _rounds(algo, cfg, rounds, split=None, n=6):
    split = split or make_toy()
    a = ALGORITHMS[algo](split, cfg, n)
    state, data = a.init(jax.random.key(0)), _data(cfg.num_clients, n)
    accs = []
    for t in range(rounds):
        state, acc = a.run_round(state, data, jax.random.key(100 + t))
        accs.append(acc)
    return state, accs


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def test_fedavg_shared_server_equals_a_sequential_hand_reference():
    """Two clients, one step per round (batch = shard): client i's full-model gradient is
    taken with the server as clients 0..i-1 left it, the server stepping with client i's
    own Adam state; then the client parts are averaged (n_i / n)."""
    split = make_toy()
    cfg = toy_config(num_clients=2, batch_size=4, fedavg_server="shared")
    a = ALGORITHMS["fed_avg"](split, cfg, 4)
    d = toy_client_data()
    data = ClientArrays(jnp.asarray(d.x[:2, :4]), jnp.asarray(d.y[:2, :4]), jnp.asarray([4, 4], jnp.int32))
    state = a.init(jax.random.key(0))
    new, _ = a.run_round(state, data, jax.random.key(1))

    cv, sv, _ = init_split(split, jax.random.key(0))
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
    server, sopts = sv.params, [tx.init(sv.params), tx.init(sv.params)]
    clients = []
    for i in range(2):          # batch = whole shard: the shuffle does not change the mean loss
        x, y = data.x[i], data.y[i]

        def loss(cp, sp):
            z = split.client.apply({"params": cp}, x)
            return _ce(split.server.apply({"params": sp}, z), y)
        gc, gs = jax.grad(loss, argnums=(0, 1))(cv.params, server)
        cu, _ = tx.update(gc, tx.init(cv.params), cv.params)
        clients.append(optax.apply_updates(cv.params, cu))
        su, sopts[i] = tx.update(gs, sopts[i], server)
        server = optax.apply_updates(server, su)
    avg = jax.tree_util.tree_map(lambda p, q: 0.5 * (p + q), *clients)
    for got, want in zip(_leaves(new.server.vars.params), _leaves(server)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(_leaves(jax.tree_util.tree_map(lambda v: v[1], new.clients.shared.params)), _leaves(avg)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # each client keeps its own optimizer state for the server: client 1's saw a different server
    mu = [np.asarray(jax.tree_util.tree_leaves(new.clients.own[1])[1][i]) for i in range(2)]
    assert not np.allclose(mu[0], mu[1])


def test_fedavg_shared_server_changes_the_trajectory_and_keeps_the_bytes():
    cfg = toy_config()
    copies, acc_c = _rounds("fed_avg", cfg, 2)
    shared, acc_s = _rounds("fed_avg", dataclasses.replace(cfg, fedavg_server="shared"), 2)
    assert not np.allclose(_leaves(copies.clients.shared)[0][0], _leaves(shared.clients.shared)[0][0])
    sizes = sizes_of(make_toy())
    mb = ALGORITHMS["fed_avg"].model_bytes(sizes)
    assert [round_bytes(mb, sizes, a) for a in acc_c] == [round_bytes(mb, sizes, a) for a in acc_s]
    assert round_bytes(mb, sizes, acc_s[0])["model_up"] == 3 * (sizes.client + sizes.server)
    # per-client server copies vs one shared server part
    assert copies.server is None and shared.server is not None


def test_cse_fsl_auxiliary_model_has_its_own_optimizer():
    """With the client/server learning rate 0 only the auxiliary model moves (aux_lr);
    with aux_lr 0 it stays at its initial value while the client moves."""
    cfg = toy_config()
    init = ALGORITHMS["cse_fsl"](make_toy(), cfg, 6).init(jax.random.key(0))
    frozen_client, _ = _rounds("cse_fsl", dataclasses.replace(cfg, lr=0.0, weight_decay=0.0), 1)
    same = lambda a, b: all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(_leaves(a), _leaves(b)))
    # (identical clients averaged with weights n_i / n: equal up to rounding)
    assert same(frozen_client.clients.shared[0], init.clients.shared[0])
    assert not same(frozen_client.clients.shared[1], init.clients.shared[1])
    frozen_aux, _ = _rounds("cse_fsl", dataclasses.replace(cfg, aux_lr=0.0), 1)
    assert same(frozen_aux.clients.shared[1], init.clients.shared[1])
    assert not same(frozen_aux.clients.shared[0], init.clients.shared[0])


def test_warm_start_round_is_cse_fsl_then_fsl_sage_aligns():
    cfg = toy_config(align_interval=3)
    warm = dataclasses.replace(cfg, warm_start=1)
    cse, acc_cse = _rounds("cse_fsl", cfg, 1)
    sage, acc_sage = _rounds("fsl_sage", warm, 2)
    sage1, _ = _rounds("fsl_sage", warm, 1)
    # round 0 is exactly CSE-FSL's round (same initial models and keys)
    parts = lambda sage, cse: ((sage.clients.shared, cse.clients.shared[0]),       # client models
                               (sage.clients.own.aux, cse.clients.shared[1]),     # auxiliary models
                               (sage.server.vars, cse.server.vars))               # the server
    for sage_part, cse_part in parts(sage1, cse):
        for a, b in zip(_leaves(sage_part), _leaves(cse_part)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(sage1.clients.own.buffer.size.sum()) == 0                   # CSE-FSL never fills the buffer
    sizes = sizes_of(make_toy())
    mb = ALGORITHMS["fsl_sage"].model_bytes(sizes)
    r0, r1 = (round_bytes(mb, sizes, a) for a in acc_sage)
    assert r0 == round_bytes(ALGORITHMS["cse_fsl"].model_bytes(sizes), sizes, acc_cse[0])
    assert r0["aux_down"] == 0 and r0["model_up"] == 3 * (sizes.client + sizes.aux)
    # round 1 is FSL-SAGE's round 0: it aligns (every client gets its aligned model)
    assert r1["aux_down"] == 3 * sizes.aux and r1["model_up"] == 3 * sizes.client
    assert acc_sage[1]["aux_down"] == 3 and acc_sage[0]["aux_models"] == 3


def test_alignment_target_scale():
    """With the auxiliary model equal to the server, per-minibatch targets equal the
    auxiliary gradients exactly (loss 0); the whole-buffer scale of the authors' code
    makes them smaller by valid entries / minibatch (here 8 / 4), so the loss is not 0."""
    split = dataclasses.replace(make_toy(), aux=ToyServer(3))
    _, sv, _ = init_split(split, jax.random.key(0))
    av = Vars(sv.params, sv.state)
    rng = np.random.default_rng(0)
    buf = Buffer(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)),
                 jnp.int32(8))
    opt = optax.sgd(0.0)
    kw = dict(epochs=1, batch_size=4)
    _, _, (l_mb, _) = steps.align(split, opt, av, opt.init(av.params), sv, buf, jax.random.key(1), **kw)
    _, _, (l_buf, _) = steps.align(split, opt, av, opt.init(av.params), sv, buf, jax.random.key(1),
                                   target_scale="buffer", **kw)
    assert float(l_mb) < 1e-10
    # no BatchNorm: sample j's gradient in a mean over k samples is g_j / k, whatever the shuffle;
    # the auxiliary gradient is g_j / 4, the authors' target g_j / 8
    per_sample = jax.vmap(lambda z, y: jax.grad(
        lambda zz: _ce(split.server.apply({"params": sv.params}, zz[None]), y[None]))(z))(buf.z, buf.y)
    assert float(l_buf) == pytest.approx(float(jnp.sum((per_sample / 4 - per_sample / 8) ** 2)), rel=1e-4)
    with pytest.raises(ValueError, match="target_scale"):
        steps.align(split, opt, av, opt.init(av.params), sv, buf, jax.random.key(1), target_scale="x", **kw)


def test_fedavg_server_option_is_checked():
    with pytest.raises(ValueError, match="fedavg_server"):
        ALGORITHMS["fed_avg"](make_toy(), toy_config(fedavg_server="one"), 6)


def test_memory_plan_of_the_toy_run():
    from fslsage_jax.algorithms.config import Config
    from fslsage_jax.memory import plan
    p = plan("fsl_sage", make_toy(), toy_config(), 6, 10)
    assert set(p["programs"]) == {"round_begin", "round_step", "round_finish", "evaluate"}
    assert p["resident"]["client_data"] == 3 * 6 * (4 * 4 + 4) + 3 * 4      # x, y, counts
    assert p["resident"]["eval_data"] == 10 * (4 * 4 + 4)
    for s in p["programs"].values():
        assert s["peak_bytes"] >= s["argument_bytes"] > 0
    assert p["peak_bytes"] >= p["resident_bytes"]
    assert p["config"]["eval_batch_size"] == 1000 and p["config"]["align_client_chunk"] == 3
    assert Config().eval_batch_size == 0


def test_chunked_alignment_targets_equal_whole_buffer_targets():
    split = make_toy()
    _, sv, _ = init_split(split, jax.random.key(0))
    rng = np.random.default_rng(1)
    buf = Buffer(jnp.asarray(rng.normal(size=(7, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 7)),
                 jnp.int32(5))
    whole = steps.alignment_targets(split, sv, buf)
    np.testing.assert_allclose(steps.alignment_targets(split, sv, buf, chunk=3), whole, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(whole[:2]).sum()) == 0.0            # empty slots (the oldest) get no target
