"""A server part with BatchNorm: evaluation uses its running statistics (eval mode, no
dropout, each sample on its own), and SplitFed-MS averages the server copies' statistics with
n_i / n like their parameters. References are numpy forward passes and the BatchNorm running
average written out by hand (flax: ``ra <- momentum * ra + (1 - momentum) * batch value``)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.split import SplitModel, Vars, init_split
from conftest import ToyAux, ToyClient

MOMENTUM, EPS = 0.9, 1e-5


class BNServer(nn.Module):
    """BatchNorm over the 6 cut features (batch statistics in train mode), optional dropout,
    then a dense layer to 3 classes."""
    dropout: float = 0.0

    @nn.compact
    def __call__(self, z, train=False):
        h = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS)(z)
        if self.dropout:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(3)(h)


def bn_split(dropout=0.0):
    return SplitModel("toy-bn", ToyClient(), BNServer(dropout), ToyAux(), (4,), 3)


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def client_forward_np(cv, x):
    """The toy client by hand: tanh(x W + b)."""
    d = _np(cv.params)["Dense_0"]
    return np.tanh(x.reshape(len(x), -1) @ d["kernel"] + d["bias"])


def eval_reference(cv, sv, x, y):
    """Eval-mode forward by hand: running statistics, no dropout; (mean CE, accuracy)."""
    z = client_forward_np(cv, x)
    bn, p = _np(sv.state)["batch_stats"]["BatchNorm_0"], _np(sv.params)
    h = (z - bn["mean"]) / np.sqrt(bn["var"] + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
    logits = h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(1) == y).mean())


def _with_running_stats(sv):
    """Running statistics far from any batch's: mean 0.4 * j - 1, variance 0.3 + 0.5 j."""
    j = np.arange(6, dtype=np.float32)
    return sv._replace(state={"batch_stats": {"BatchNorm_0": {
        "mean": jnp.asarray(0.4 * j - 1.0), "var": jnp.asarray(0.3 + 0.5 * j)}}})


def _eval_set(n=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, rng.integers(0, 3, n).astype(np.int32)


def test_evaluation_uses_running_statistics():
    split = bn_split()
    cv, sv, _ = init_split(split, jax.random.key(0))
    sv = _with_running_stats(sv)
    x, y = _eval_set()
    want_loss, want_acc = eval_reference(cv, sv, x, y)
    for batch_size in (1000, 4, 1):      # one batch, padded batches, one sample at a time
        loss, acc = make_evaluate(split, batch_size)(cv, sv, jnp.asarray(x), jnp.asarray(y))
        assert abs(loss - want_loss) < 1e-5 * max(1.0, want_loss), batch_size
        assert abs(acc - want_acc) < 1e-6, batch_size


def test_a_sample_evaluated_alone_equals_it_within_a_batch():
    split = bn_split()
    cv, sv, _ = init_split(split, jax.random.key(1))
    sv = _with_running_stats(sv)
    x, y = _eval_set(6, seed=2)
    evaluate = make_evaluate(split, 1000)
    whole, _ = evaluate(cv, sv, jnp.asarray(x), jnp.asarray(y))
    alone = [evaluate(cv, sv, jnp.asarray(x[i:i + 1]), jnp.asarray(y[i:i + 1]))[0] for i in range(6)]
    assert abs(whole - np.mean(alone)) < 1e-5
    # and the per-sample losses are those of the eval-mode forward pass by hand
    for i, l in enumerate(alone):
        assert abs(l - eval_reference(cv, sv, x[i:i + 1], y[i:i + 1])[0]) < 1e-5 * max(1.0, l)


def test_evaluation_has_no_dropout_and_is_deterministic():
    split = bn_split(dropout=0.5)
    cv, sv, _ = init_split(split, jax.random.key(3))
    sv = _with_running_stats(sv)
    x, y = _eval_set(8, seed=4)
    evaluate = make_evaluate(split, 1000)
    first = evaluate(cv, sv, jnp.asarray(x), jnp.asarray(y))
    assert evaluate(cv, sv, jnp.asarray(x), jnp.asarray(y)) == first
    want_loss, want_acc = eval_reference(cv, sv, x, y)   # dropout is the identity in eval mode
    assert abs(first[0] - want_loss) < 1e-5 * max(1.0, want_loss) and abs(first[1] - want_acc) < 1e-6


# ----------------------------------------------------------------------------- SplitFed-MS
def global_server_stats(algo, state):
    """The global server's BatchNorm statistics (through the public ``global_model``)."""
    _, sv = algo.global_model(state)
    return _np(sv.state)["batch_stats"]["BatchNorm_0"]


def test_multi_server_averages_server_batchnorm_statistics_with_n_i_over_n():
    # lr = 0: the client model stays at its initial value, so client i's cut activation is a
    # fixed z_i. Every sample of client i is the same row, so each training-mode batch has
    # mean z_i and variance 0 whatever the shuffle; counts are multiples of the batch, so
    # client i's server copy takes k_i = n_i / B steps: mean (1 - m^k_i) z_i, var m^k_i
    # (from 0 and 1). The global server's statistics are their n_i / n weighted mean.
    split, B = bn_split(), 2
    counts = np.array([4, 2, 6], np.int32)
    m, n_max = len(counts), int(counts.max())
    rows = np.random.default_rng(5).normal(size=(m, 4)).astype(np.float32)
    x = np.zeros((m, n_max, 4), np.float32)
    for i, n in enumerate(counts):
        x[i, :n] = rows[i]
    y = np.tile(np.arange(n_max, dtype=np.int32) % 3, (m, 1))
    cfg = Config(num_clients=m, batch_size=B, lr=0.0, weight_decay=0.0)
    algo = ALGORITHMS["sl_multi_server"](split, cfg, n_max)
    state = algo.init(jax.random.key(0))
    cv0, _ = _np(algo.global_model(state))
    state, _ = algo.run_round(state, ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts)),
                              jax.random.key(1))

    z = client_forward_np(Vars(cv0.params, cv0.state), rows)                # [m, 6]
    k = counts // B
    decay = MOMENTUM ** k.astype(np.float64)                                 # [m]
    w = counts / counts.sum()
    want_mean = np.einsum("i,i,ij->j", w, 1 - decay, z)
    want_var = np.full(6, np.dot(w, decay))
    got = global_server_stats(algo, state)
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-6)
    # the copies really differ (else any average would pass)
    assert np.abs((1 - decay[0]) * z[0] - want_mean).max() > 1e-2
