"""FSL-SAGE checks that fail when the algorithm is broken (issue 13, item 10).

Accuracy bounds alone pass with alignment disabled or the client frozen, so these
pin what the algorithm must do, on a toy split small enough to compile in seconds:

- alignment makes the auxiliary estimate point along the server's true cut-layer
  gradient (``grad_cosine``) and lowers the gradient-matching loss;
- one round moves the client in the direction of the TRUE full-pipeline gradient,
  computed here independently with ``jax.grad`` of server(client(x));
- auxiliary models are never averaged: each client keeps its own aligned copy.

Setting: 2 clients, 32 samples each, batch 32 (one local step a round), Q = 1, an
alignment at round 0 on the 32 uploaded samples (100 epochs, Adam lr 1e-2). Measured
over seeds 0-3 (jax 0.10.2, CPU): cosine(client update, -true gradient) 0.63, 0.78, 0.52,
0.81 aligned vs 0.28, 0.27, -0.26, 0.27 with alignment disabled; round-0 ``grad_cosine``
0.63 aligned vs -0.03 disabled; alignment loss 0.030 -> 0.0047 over its 100 epochs.
"""
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.simulate import RunOptions, Task, run_simulation

from conftest import make_toy

M, N = 2, 32
SEEDS = (0, 1, 2, 3)
CFG = Config(num_clients=M, batch_size=N, server_update_interval=1, align_interval=1,
             align_epochs=100, align_batch_size=N, align_buffer_size=N, aux_lr=1e-2)


def _shards(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, N, 4)).astype(np.float32)
    y = ((x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0.5)).astype(np.int32)
    return x, y, np.full((M,), N, np.int32)


def _flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(tree)])


@functools.partial(jax.jit, static_argnums=0)
def _true_client_gradient(split, client_params, server_params, x, y):
    """d/d(client params) of mean CE(server(client(x)), y) over all samples (the global
    objective with weights n_i / n), written with flax ``apply`` and ``jax.grad`` only."""
    def loss(cp):
        z = split.client.apply({"params": cp}, x)
        logits = split.server.apply({"params": server_params}, z)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.grad(loss)(client_params)


@pytest.fixture(scope="module")
def rounds():
    """One FSL-SAGE round per seed: (initial client, server, state after the round, x, y)."""
    split = make_toy()
    alg = ALGORITHMS["fsl_sage"](split, CFG, N)
    out = []
    for seed in SEEDS:
        x, y, counts = _shards(seed)
        state = alg.init(jax.random.key(seed))
        c0, s0 = jax.tree_util.tree_map(np.array, alg.global_model(state))  # run_round donates
        state, _ = alg.run_round(state, ClientArrays(*map(jnp.asarray, (x, y, counts))),
                                 jax.random.key(100 + seed))
        out.append((c0, s0, state, x.reshape(M * N, 4), y.reshape(-1)))
    return split, alg, out


def test_client_update_follows_the_true_gradient(rounds):
    split, alg, out = rounds
    cosines = []
    for c0, s0, state, x, y in out:
        c1, _ = alg.global_model(state)
        update = _flat(jax.tree_util.tree_map(lambda a, b: a - b, c1.params, c0.params))
        g = _flat(_true_client_gradient(split, c0.params, s0.params, x, y))
        assert float(jnp.linalg.norm(update)) > 1e-4, "the client did not move"
        cosines.append(float(jnp.dot(update, -g) / (jnp.linalg.norm(update) * jnp.linalg.norm(g))))
    # measured 0.63, 0.78, 0.52, 0.81 (mean 0.69); alignment off: 0.28, 0.27, -0.26, 0.27 (0.14)
    assert min(cosines) > 0.35 and np.mean(cosines) > 0.5, cosines


def test_auxiliary_models_are_never_averaged(rounds):
    # every client starts from the same auxiliary model and is aligned on its own uploads:
    # after the round the copies differ (averaging them at round end would make them equal)
    for _, _, state, _, _ in rounds[2]:
        leaves = jax.tree_util.tree_leaves(state.clients.own.aux.params)
        gap = max(float(np.max(np.abs(np.asarray(a[0]) - np.asarray(a[1])))) for a in leaves)
        assert gap > 1e-3, gap


def test_alignment_raises_grad_cosine_and_lowers_its_loss(tmp_path):
    x, y, counts = _shards(0)
    run_simulation("fsl_sage", Task(make_toy(), CFG, types.SimpleNamespace(x=x, y=y, counts=counts),
                                    x[0, :4], y[0, :4]),
                   RunOptions(rounds=1, seed=0, out_dir=str(tmp_path), progress=False))
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # measured: 0.63 aligned; with alignment off -0.03
    assert rec["grad_cosine"] is not None and rec["grad_cosine"] > 0.5, rec["grad_cosine"]
    # measured 0.030 -> 0.0047 (sum over the epoch's minibatches, mean over clients)
    first, last = rec["align_loss_first_epoch"], rec["align_loss_last_epoch"]
    assert first > 0 and last < 0.3 * first, (first, last)
