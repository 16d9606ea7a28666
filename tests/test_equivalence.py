"""One round lifted over clients equals a plain Python loop over clients.

The reference below is written independently of the engine: it walks the
clients and the local steps in Python and calls only the public single-client
functions (``steps``) and helpers (schedule, FIFO, weighted average). Every
algorithm, every strategy (and both step loops) must match it within 1e-5
after two rounds on uneven shards (smaller last batches, idle clients, two
local epochs, a FIFO that wraps, alignment in both rounds).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fslsage_jax.algorithms import ALGORITHMS, steps
from fslsage_jax.algorithms.batching import epoch_orders, gather_batch, steps_per_epoch
from fslsage_jax.algorithms.buffer import buffer_push
from fslsage_jax.algorithms.config import Config, make_optimizer
from fslsage_jax.algorithms.trees import weighted_average
from fslsage_jax.algorithms.engine import ClientArrays

from conftest import make_toy

M, N_MAX, COUNTS = 3, 7, (7, 5, 4)
BASE = dict(num_clients=M, batch_size=3, local_epochs=2, server_update_interval=2,
            align_interval=1, align_epochs=3, align_batch_size=4, align_buffer_size=6)
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


def _restack(items):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *items)


def _avg_all(items, counts):
    avg = weighted_average(_restack(items), jnp.asarray(counts, jnp.float32))
    return [avg] * M


def reference_round(algo, split, cfg, st, data, key, rnd):
    """A round of ``algo`` as a Python loop over clients; ``st`` is a dict of per-client lists."""
    opt = make_optimizer(cfg.lr, cfg.weight_decay)
    aopt = make_optimizer(cfg.aux_lr, cfg.aux_weight_decay)
    fwd = jax.jit(functools.partial(steps.client_forward, split))
    bwd = jax.jit(functools.partial(steps.client_backward, opt))
    srv = jax.jit(functools.partial(steps.server_step, split, opt))
    full = jax.jit(functools.partial(steps.full_step, split, opt))
    local = jax.jit(functools.partial(steps.local_aux_step, split, opt, aopt))
    est = jax.jit(functools.partial(steps.aux_grad_estimate, split))
    aln = jax.jit(functools.partial(steps.align, split, aopt, epochs=cfg.align_epochs,
                                    batch_size=cfg.align_batch_size))
    korder, kstep = jax.random.split(key)
    orders = epoch_orders(korder, data.counts, N_MAX, cfg.local_epochs)
    counts = [int(c) for c in data.counts]
    for t in range(cfg.local_epochs * steps_per_epoch(N_MAX, cfg.batch_size)):
        b = gather_batch(data.x, data.y, data.counts, orders, jnp.int32(t), cfg.batch_size)
        rng = jax.random.fold_in(kstep, t)
        act = [bool(a) for a in b.active]
        up = [act[i] and int(b.k[i]) % cfg.server_update_interval == 0 for i in range(M)]
        xb, yb, wb = b.x, b.y, b.w
        if algo == "fed_avg":
            rngs = jax.random.split(rng, M)
            for i in range(M):
                if act[i]:
                    st["c"][i], st["s"][i], st["co"][i], _ = full(
                        st["c"][i], st["s"][i], st["co"][i], xb[i], yb[i], wb[i], rngs[i])
        elif algo == "sl_multi_server":
            rngs = jax.random.split(rng, M)
            for i in range(M):
                if act[i]:
                    kc, ks = jax.random.split(rngs[i])
                    z, vjp_fn, cs = fwd(st["c"][i], xb[i], kc)
                    st["s"][i], st["so"][i], gz, _ = srv(st["s"][i], st["so"][i], z, yb[i], wb[i], ks)
                    st["c"][i], st["co"][i] = bwd(st["c"][i], st["co"][i], vjp_fn, gz, cs)
        elif algo == "sl_single_server":
            kc, ks = jax.random.split(rng)
            crng, srng = jax.random.split(kc, M), jax.random.split(ks, M)
            outs = [fwd(st["c"][i], xb[i], crng[i]) for i in range(M)]
            for i in range(M):                      # the server serves clients in order
                if act[i]:
                    st["s"], st["so"], gz, _ = srv(st["s"], st["so"], outs[i][0], yb[i], wb[i], srng[i])
                    st["c"][i], st["co"][i] = bwd(st["c"][i], st["co"][i], outs[i][1], gz, outs[i][2])
        elif algo == "cse_fsl":
            kc, ks = jax.random.split(rng)
            crng, srng = jax.random.split(kc, M), jax.random.split(ks, M)
            zs = [None] * M
            for i in range(M):
                if act[i]:
                    (st["c"][i], st["co"][i], st["a"][i], st["ao"][i], zs[i], _) = local(
                        st["c"][i], st["co"][i], st["a"][i], st["ao"][i],
                        xb[i], yb[i], wb[i], crng[i])
            for i in range(M):
                if up[i]:
                    st["s"], st["so"], _, _ = srv(st["s"], st["so"], zs[i], yb[i], wb[i], srng[i])
        elif algo == "fsl_sage":
            kc, ks, ka = jax.random.split(rng, 3)
            crng, srng, arng = (jax.random.split(k, M) for k in (kc, ks, ka))
            outs = [fwd(st["c"][i], xb[i], crng[i]) for i in range(M)]
            for i in range(M):
                if up[i]:
                    st["s"], st["so"], _, _ = srv(st["s"], st["so"], outs[i][0], yb[i], wb[i], srng[i])
                    st["buf"][i] = buffer_push(st["buf"][i], outs[i][0], yb[i], wb[i])
            if t == 0 and rnd % cfg.align_interval == 0:
                for i in range(M):
                    st["a"][i], st["ao"][i], _ = aln(st["a"][i], st["ao"][i], st["s"], st["buf"][i],
                                                     arng[i])
            for i in range(M):
                if act[i]:
                    g_hat = est(st["a"][i], outs[i][0], yb[i], wb[i])
                    st["c"][i], st["co"][i] = bwd(st["c"][i], st["co"][i], outs[i][1], g_hat, outs[i][2])
    st["c"] = _avg_all(st["c"], counts)
    if algo in ("fed_avg", "sl_multi_server"):
        st["s"] = _avg_all(st["s"], counts)
    if algo == "cse_fsl":
        st["a"] = _avg_all(st["a"], counts)
    return st


FIELDS = {"c": "clients", "co": "client_opt", "s": "server", "so": "server_opt", "a": "aux",
          "ao": "aux_opt", "buf": "buffer"}
PER_CLIENT_SERVER = ("fed_avg", "sl_multi_server")


def _to_lists(algo, state):
    st = {}
    for k, f in FIELDS.items():
        v = getattr(state, f, None)
        if v is None:
            continue
        shared = k in ("s", "so") and algo not in PER_CLIENT_SERVER
        st[k] = v if shared else _unstack(v)
    return st


@functools.lru_cache(maxsize=None)
def reference(algo):
    split, cfg, data = make_toy(), Config(**BASE), _data()
    state = ALGORITHMS[algo](split, cfg, N_MAX).init(jax.random.key(0))   # identical initial models
    st = _to_lists(algo, state)
    for r in range(ROUNDS):
        st = reference_round(algo, split, cfg, st, data, jax.random.key(100 + r), r)
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
    for k in want:
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                    atol=1e-5, err_msg=f"{algo} {FIELDS[k]}"),
            got[k], want[k])
    assert int(state.round) == ROUNDS
