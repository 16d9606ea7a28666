"""One round lifted over clients equals a plain Python loop over clients.

The reference below is independent of the library's algorithm code: a Python loop
over rounds, local steps and clients written from docs/semantics.md with flax ``apply``,
``jax.grad`` / ``jax.vjp`` and optax only (no ``steps``, batch gathering, FIFO or
averaging helpers of the library). It shares only the starting state (``init``) and
the random minibatch order, re-derived here from the round key. Every algorithm,
every strategy (and both step loops) must match it within 1e-5 after two rounds on
uneven shards (smaller last batches, idle clients, two local epochs, a FIFO that
wraps, alignment in both rounds). Alignment uses one minibatch per epoch (batch >=
buffer), so its result does not depend on the alignment shuffle.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays

from conftest import make_toy

M, N_MAX, COUNTS = 3, 7, (7, 5, 4)
BASE = dict(num_clients=M, batch_size=3, local_epochs=2, server_update_interval=2,
            align_interval=1, align_epochs=3, align_batch_size=6, align_buffer_size=6)
ROUNDS = 2


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M, N_MAX, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(M, N_MAX)).astype(np.int32)
    for i, c in enumerate(COUNTS):
        x[i, c:], y[i, c:] = 0, 0
    return ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.asarray(COUNTS, jnp.int32))


def _unstack(tree):
    return [jax.tree_util.tree_map(lambda a: a[i], tree) for i in range(M)]


def _average(items, counts):
    """sum_i n_i x_i / n, leaf by leaf, for every client."""
    n = float(sum(counts))
    avg = jax.tree_util.tree_map(lambda *xs: sum(c * x for c, x in zip(counts, xs)) / n, *items)
    return [avg] * M


def _orders(key, counts, epochs):
    """The round's minibatch order: per epoch and client, a shuffle of the client's samples
    (the engine's convention: split(key) -> order key; one uniform draw per sample slot)."""
    korder, _ = jax.random.split(key)
    keys = jax.random.split(korder, epochs * M).reshape(epochs, M)
    out = []
    for e in range(epochs):
        row = []
        for i, c in enumerate(counts):
            u = np.asarray(jax.random.uniform(keys[e, i], (N_MAX,)))
            row.append([int(j) for j in np.argsort(np.where(np.arange(N_MAX) < c, u, 2.0),
                                                    kind="stable")[:c]])
        out.append(row)
    return out


def _ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def _make_reference_fns(split):
    client = lambda cp, x: split.client.apply({"params": cp}, x)
    server = lambda sp, z: split.server.apply({"params": sp}, z)
    aux = lambda ap, z: split.aux.apply({"params": ap}, z)

    @jax.jit
    def full_grads(cp, sp, x, y):           # d/d(client, server) CE(server(client(x)), y)
        return jax.grad(lambda c, s: _ce(server(s, client(c, x)), y), (0, 1))(cp, sp)

    @jax.jit
    def local_grads(cp, ap, x, y):          # CSE-FSL: d/d(client, aux) CE(aux(client(x)), y)
        return jax.grad(lambda c, a: _ce(aux(a, client(c, x)), y), (0, 1))(cp, ap)

    @jax.jit
    def server_grads(sp, z, y):             # d/d(server, z) CE(server(z), y)
        return jax.grad(lambda s, z: _ce(server(s, z), y), (0, 1))(sp, z)

    @jax.jit
    def client_vjp(cp, x, g):               # push a cut-layer gradient through the client
        return jax.vjp(lambda c: client(c, x), cp)[1](g)[0]

    @jax.jit
    def aux_estimate(ap, z, y):             # FSL-SAGE: g_hat = grad_z CE(aux(z), y)
        return jax.grad(lambda z: _ce(aux(ap, z), y))(z)

    @jax.jit
    def align_grads(ap, sp, z, y):          # d/d(aux) sum (grad_z CE(aux) - grad_z CE(server))^2
        target = jax.grad(lambda z: _ce(server(sp, z), y))(z)
        return jax.grad(lambda a: jnp.sum((jax.grad(lambda z: _ce(aux(a, z), y))(z) - target) ** 2))(ap)

    return dict(client=jax.jit(client), full=full_grads, local=local_grads, server=server_grads,
                vjp=client_vjp, est=aux_estimate, align=align_grads)


def reference_round(algo, f, cfg, st, data, key, rnd):
    """A round of ``algo`` as a Python loop over clients; ``st`` holds per-client lists and
    ``f`` the functions of :func:`_make_reference_fns`."""
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))  # PyTorch Adam
    # the auxiliary model's own optimizer (CSE-FSL training and FSL-SAGE alignment)
    aux_opt = optax.chain(optax.add_decayed_weights(cfg.aux_weight_decay), optax.adam(cfg.aux_lr))
    align_opt = aux_opt

    def step(params, opt_state, grads, o=opt):
        updates, opt_state = o.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    counts = [int(c) for c in data.counts]
    x, y = np.asarray(data.x), np.asarray(data.y)
    B, Q = cfg.batch_size, cfg.server_update_interval
    s_max = -(-N_MAX // B)
    orders = _orders(key, counts, cfg.local_epochs)
    for e in range(cfg.local_epochs):
        for s in range(s_max):
            t = e * s_max + s
            idx = [orders[e][i][s * B:(s + 1) * B] for i in range(M)]   # [] when idle
            act = [len(ix) > 0 for ix in idx]
            k = [e * -(-counts[i] // B) + s for i in range(M)]
            up = [act[i] and k[i] % Q == 0 for i in range(M)]
            xb = [x[i, ix] for i, ix in enumerate(idx)]
            yb = [y[i, ix] for i, ix in enumerate(idx)]
            live = [i for i in range(M) if act[i]]
            if algo in ("fed_avg", "sl_multi_server"):
                # FedAvg's optimizer acts on the pair; SplitFed-MS has two optimizers
                for i in live:
                    gc, gs = f["full"](st["c"][i], st["s"][i], xb[i], yb[i])
                    if algo == "fed_avg":
                        (st["c"][i], st["s"][i]), st["co"][i] = step(
                            (st["c"][i], st["s"][i]), st["co"][i], (gc, gs))
                    else:
                        st["s"][i], st["so"][i] = step(st["s"][i], st["so"][i], gs)
                        st["c"][i], st["co"][i] = step(st["c"][i], st["co"][i], gc)
            elif algo == "sl_single_server":
                z = {i: f["client"](st["c"][i], xb[i]) for i in live}
                for i in live:                      # the one server serves clients in order
                    gs, gz = f["server"](st["s"], z[i], yb[i])
                    st["s"], st["so"] = step(st["s"], st["so"], gs)
                    st["c"][i], st["co"][i] = step(st["c"][i], st["co"][i],
                                                   f["vjp"](st["c"][i], xb[i], gz))
            elif algo == "cse_fsl":
                z = {i: f["client"](st["c"][i], xb[i]) for i in live}     # before the step
                for i in live:
                    gc, ga = f["local"](st["c"][i], st["a"][i], xb[i], yb[i])
                    st["c"][i], st["co"][i] = step(st["c"][i], st["co"][i], gc)
                    st["a"][i], st["ao"][i] = step(st["a"][i], st["ao"][i], ga, aux_opt)
                for i in live:
                    if up[i]:
                        gs, _ = f["server"](st["s"], z[i], yb[i])
                        st["s"], st["so"] = step(st["s"], st["so"], gs)
            elif algo == "fsl_sage":
                z = {i: f["client"](st["c"][i], xb[i]) for i in live}
                for i in live:
                    if up[i]:
                        gs, _ = f["server"](st["s"], z[i], yb[i])
                        st["s"], st["so"] = step(st["s"], st["so"], gs)
                        st["buf"][i] = (st["buf"][i] + list(zip(np.asarray(z[i]), yb[i])))[
                            -cfg.align_buffer_size:]
                if t == 0 and rnd % cfg.align_interval == 0:
                    for i in range(M):              # every client, against the current server
                        if not st["buf"][i]:
                            continue
                        zb = jnp.stack([a for a, _ in st["buf"][i]])
                        ybuf = jnp.asarray([b for _, b in st["buf"][i]])
                        for _ in range(cfg.align_epochs):
                            st["a"][i], st["ao"][i] = step(
                                st["a"][i], st["ao"][i], f["align"](st["a"][i], st["s"], zb, ybuf),
                                align_opt)
                for i in live:
                    g_hat = f["est"](st["a"][i], z[i], yb[i])
                    st["c"][i], st["co"][i] = step(st["c"][i], st["co"][i],
                                                   f["vjp"](st["c"][i], xb[i], g_hat))
    st["c"] = _average(st["c"], counts)
    if algo in ("fed_avg", "sl_multi_server"):
        st["s"] = _average(st["s"], counts)
    if algo == "cse_fsl":
        st["a"] = _average(st["a"], counts)
    return st


# reference key -> where the library State holds it (the one place that names them)
def _fields(algo, state):
    """``{reference key: (value, has a client axis)}`` of the library state."""
    shared, own = state.clients
    if algo in ("fed_avg", "sl_multi_server"):              # per-client server copies
        out = {"c": shared[0], "s": shared[1]}
        return {**out, **({"co": own} if algo == "fed_avg" else {"co": own[0], "so": own[1]})}
    server = {"s": state.server.vars, "so": state.server.opt}
    if algo == "sl_single_server":
        return {"c": shared, "co": own, **server}
    if algo == "cse_fsl":
        return {"c": shared[0], "a": shared[1], "co": own[0], "ao": own[1], **server}
    return {"c": shared, "co": own.opt, "a": own.aux, "ao": own.aux_opt, "buf": own.buffer, **server}


FIELDS = {"c": "client models", "co": "client optimizer states", "s": "server", "so": "server optimizer",
          "a": "auxiliary models", "ao": "auxiliary optimizer states", "buf": "alignment buffers"}
MODELS = ("c", "s", "a")


def _to_lists(algo, state):
    """The library state as the reference's per-client lists (models as their params;
    the toy model has no other variables)."""
    st = {}
    for k, v in _fields(algo, state).items():
        if k in MODELS:
            assert not jax.tree_util.tree_leaves(v.state)
            v = v.params
        shared = k in ("s", "so") and algo not in ("fed_avg", "sl_multi_server")
        st[k] = v if shared else _unstack(v)
    return st


def _buffer_rows(buf):
    """A library FIFO as a list of (z, y), oldest first (a ring: the valid rows are the
    ``size`` positions before ``head``)."""
    n, cap, head = int(buf.size), len(buf.z), int(buf.head)
    return [(np.asarray(buf.z[(head - n + j) % cap]), int(buf.y[(head - n + j) % cap])) for j in range(n)]


@functools.lru_cache(maxsize=None)
def reference(algo):
    split, cfg, data = make_toy(), Config(**BASE), _data()
    state = ALGORITHMS[algo](split, cfg, N_MAX).init(jax.random.key(0))   # identical initial models
    st = _to_lists(algo, state)
    if "buf" in st:
        assert all(int(b.size) == 0 for b in st["buf"])
        st["buf"] = [[] for _ in range(M)]
    f = _make_reference_fns(split)
    for r in range(ROUNDS):
        st = reference_round(algo, f, cfg, st, data, jax.random.key(100 + r), r)
    return st


STRATEGIES = [("vmap", "host"), ("vmap", "scan"), ("map", "host"), ("chunked", "host"),
              ("unroll", "host")]


@pytest.mark.parametrize("strategy, step_loop", STRATEGIES)
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_lifted_round_equals_loop_over_clients(algo, strategy, step_loop):
    cfg = Config(**BASE, strategy=strategy, chunk_size=2, step_loop=step_loop)
    alg = ALGORITHMS[algo](make_toy(), cfg, N_MAX)
    state, data = alg.init(jax.random.key(0)), _data()
    for r in range(ROUNDS):
        state, metrics = alg.run_round(state, data, jax.random.key(100 + r))
    got, want = _to_lists(algo, state), reference(algo)
    assert set(got) == set(want)
    close = lambda a, b, k: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-5, err_msg=f"{algo} {FIELDS[k]}")
    for k in want:
        if k == "buf":
            for g, w in zip(got[k], want[k]):
                g = _buffer_rows(g)
                assert [yy for _, yy in g] == [int(yy) for _, yy in w] and len(g) > 0
                for (gz, _), (wz, _) in zip(g, w):
                    close(gz, wz, k)
            continue
        jax.tree_util.tree_map(lambda a, b: close(a, b, k), got[k], want[k])
    assert int(state.round) == ROUNDS
