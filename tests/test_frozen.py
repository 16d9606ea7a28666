"""Frozen shared weights and on-device input functions in the engine.

A model whose client and server hold their base weights in the ``"frozen"``
collection must train exactly like the same model with those weights baked in
as constants, keep one copy of them (no client axis), never change them, and
leave them out of optimizer state, averaging and model bytes.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.split import SplitModel, Vars, describe, init_split, model_bytes

W_C = np.linspace(-1, 1, 4 * 6, dtype=np.float32).reshape(4, 6)
W_S = np.linspace(1, -1, 6 * 3, dtype=np.float32).reshape(6, 3)


class Adapted(nn.Module):
    """y = x @ (W0 + a b^T) + c with W0 frozen (collection) or a constant."""
    w0: np.ndarray
    baked: bool
    act: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        w0 = (jnp.asarray(self.w0) if self.baked else
              self.variable("frozen", "w0", lambda: jnp.asarray(self.w0)).value)
        a = self.param("a", nn.initializers.normal(0.5), (w0.shape[0], 1))
        b = self.param("b", nn.initializers.normal(0.5), (1, w0.shape[1]))
        c = self.param("c", nn.initializers.zeros, (w0.shape[1],))
        y = x @ (w0 + a @ b) + c
        return nn.tanh(y) if self.act else y


class Aux(nn.Module):
    @nn.compact
    def __call__(self, z, train=False):
        return nn.Dense(3)(z)


def make(baked: bool) -> SplitModel:
    return SplitModel("adapted", Adapted(W_C, baked), Adapted(W_S, baked, act=False), Aux(), (4,), 3)


def data(m=3, n=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n, 4)).astype(np.float32)
    y = rng.integers(0, 3, (m, n)).astype(np.int32)
    return ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.full((m,), n, jnp.int32))


CFG = Config(num_clients=3, batch_size=4, server_update_interval=2, align_interval=1,
             align_epochs=2, align_batch_size=4, align_buffer_size=8)


def test_frozen_collection_split_out_and_counted_apart():
    split = make(False)
    cv, sv, av = init_split(split, jax.random.key(0))
    assert cv.frozen["w0"].shape == (4, 6) and sv.frozen["w0"].shape == (6, 3) and av.frozen is None
    assert "w0" not in cv.params
    assert model_bytes(cv) == (4 + 6 + 6) * 4            # a, b, c only
    d = describe(split)
    assert d["frozen_counts"] == {"client": 24, "server": 18, "aux": 0, "full": 42}
    assert d["param_counts"]["client"] == 16


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_frozen_equals_baked_constants(algo):
    """Two rounds with frozen weights == two rounds with the same weights as constants."""
    d = data()
    results = {}
    for baked in (False, True):
        split = make(baked)
        a = ALGORITHMS[algo](split, CFG, d.x.shape[1])
        state = a.init(jax.random.key(1))
        if not baked:
            client_vars = [v for v in jax.tree_util.tree_leaves(state.clients, is_leaf=lambda v: isinstance(v, Vars))
                           if isinstance(v, Vars)]
            assert state.frozen is not None and client_vars and all(v.frozen is None for v in client_vars)
            assert state.frozen[0]["w0"].shape == (4, 6)          # one copy, no client axis
            frozen0 = jax.tree_util.tree_map(np.array, state.frozen)
        for r in range(2):
            state, _ = a.run_round(state, d, jax.random.key(10 + r))
        cv, sv = a.global_model(state)
        results[baked] = (jax.tree_util.tree_map(np.asarray, (cv.params, sv.params)),
                          make_evaluate(split)(cv, sv, d.x[0], d.y[0]))
        if not baked:
            for x0, x1 in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(state.frozen)):
                np.testing.assert_array_equal(x0, x1)            # never trained
    for x0, x1 in zip(jax.tree_util.tree_leaves(results[False][0]), jax.tree_util.tree_leaves(results[True][0])):
        np.testing.assert_allclose(x0, x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[False][1], results[True][1], rtol=1e-5)


def test_input_fn_applied_in_training_and_evaluation():
    """input_fn runs on raw client inputs: train mode with a key, eval mode without."""
    seen = []

    def input_fn(x, rng, train):
        seen.append((train, rng is not None))
        return x * 2.0

    split = dataclasses.replace(make(True), input_fn=input_fn)
    plain = make(True)
    d = data()
    out = {}
    for name, s in (("fn", split), ("plain", plain)):
        dd = d if name == "fn" else d._replace(x=d.x * 2.0)
        a = ALGORITHMS["sl_single_server"](s, CFG, d.x.shape[1])
        state, _ = a.run_round(a.init(jax.random.key(1)), dd, jax.random.key(2))
        cv, sv = a.global_model(state)
        out[name] = make_evaluate(s)(cv, sv, dd.x[0] if name == "plain" else d.x[0], d.y[0])
    assert out["fn"] == pytest.approx(out["plain"], rel=1e-5)
    assert (True, True) in seen and (False, False) in seen
