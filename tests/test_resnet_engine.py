"""A BatchNorm ResNet (uint8 inputs augmented on the device) through every algorithm.

The model is ``resnet18``'s code (stem, BasicBlocks with identity and downsample
shortcuts, masked BatchNorm, the same cut) with one block per client layer, one
server block, a one-block auxiliary, width 8 and 16x16 images: compiling the
rounds costs by the number of kernels, not by the image size. The real layout's
byte counts are checked from its shapes alone.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.comm import sizes_of
from fslsage_jax.data.augment import make_image_transform
from fslsage_jax.models.resnet import ResNetAux, ResNetClient, ResNetServer, make_resnet18
from fslsage_jax.split import SplitModel, Vars, model_bytes

M, N, B, H, W = 2, 6, 4, 16, 8     # clients, samples each (uneven batches: 4 + 2), batch, image side, width


def small_resnet(**kw) -> SplitModel:
    """Client: stem + one identity block (W) + one stride-2 downsample block (2W), cut
    [H/8, H/8, 2W]; server: one downsample block (4W) + pool + dense (``layer4`` has no
    block); auxiliary: one downsample block (4W) + pool + dense."""
    return SplitModel("resnet-small", ResNetClient((1, 1), W), ResNetServer(10, (1, 0), W),
                      ResNetAux(10, 4 * W, blocks=1), (H, H, 3), 10, masked_batch_stats=True, **kw)


@pytest.fixture(scope="module")
def setup():
    """The split, the client data, every algorithm and its initial state (host copies: run_round
    donates its input). Called directly, the inits share one compiled parameter initialisation
    (``init_split``) and the few eager ops that give it a client axis: cheaper than compiling
    each whole init."""
    split = small_resnet(input_fn=make_image_transform(), input_dtype=jnp.uint8)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (M, N, H, H, 3), dtype=np.uint8)
    y = rng.integers(0, 10, (M, N)).astype(np.int32)
    data = ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.array([N, N - 1], jnp.int32))
    # vmap: one trace for both clients (auto would unroll them on CPU: twice the program to compile)
    cfg = Config(num_clients=M, batch_size=B, server_update_interval=1, align_interval=1,
                 align_epochs=1, align_batch_size=4, align_buffer_size=8, strategy="vmap")
    algos = {name: ALGORITHMS[name](split, cfg, N) for name in sorted(ALGORITHMS)}
    states = {name: jax.tree_util.tree_map(np.array, a.init(jax.random.key(0))) for name, a in algos.items()}
    return split, data, algos, states


def _client_server(state):
    """(client Vars [m, ...], server Vars) of any algorithm's State; per-client server copies
    (SplitFed-MS, FedAvg) keep their client axis."""
    shared = state.clients.shared
    cv = shared if isinstance(shared, Vars) else shared[0]
    return cv, (shared[1] if state.server is None else state.server.vars)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_one_round_each_algorithm(setup, algo):
    split, data, algos, states = setup
    a, s0 = algos[algo], states[algo]
    s1, acc = a.run_round(jax.tree_util.tree_map(jnp.asarray, s0), data, jax.random.key(1))
    s1 = jax.tree_util.tree_map(np.asarray, s1)          # numpy indexing below: no eager compiles
    assert np.isfinite(acc["loss_sum"]) and acc["loss_n"] > 0
    # BatchNorm statistics are client state: they moved, and were averaged (all clients equal)
    st0, st1 = _client_server(s0)[0].state["batch_stats"], _client_server(s1)[0].state["batch_stats"]
    moved = [not np.allclose(a0, a1) for a0, a1 in zip(jax.tree_util.tree_leaves(st0),
                                                        jax.tree_util.tree_leaves(st1))]
    assert all(moved)
    for leaf in jax.tree_util.tree_leaves(st1):
        np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6)
    # the server keeps its own statistics (trained by the uploads in split algorithms)
    sv0 = _client_server(s0)[1].state["batch_stats"]
    sv1 = _client_server(s1)[1].state["batch_stats"]
    assert any(not np.allclose(a0, a1) for a0, a1 in zip(jax.tree_util.tree_leaves(sv0),
                                                          jax.tree_util.tree_leaves(sv1)))
    loss, accuracy = make_evaluate(split, batch_size=4)(*a.global_model(s1), data.x[0], data.y[0])
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def test_model_bytes_count_batchnorm_statistics(setup):
    split, _, algos, states = setup
    sizes = sizes_of(make_resnet18((32, 32, 3), 10))              # the real layout, from shapes
    assert sizes.client == (683072 + 1920) * 4                    # parameters + BN statistics
    assert sizes.z_per_sample == 4 * 4 * 128 * 4
    # the test model: what sizes_of counts is what an initialised client model holds
    cv, _ = algos["sl_single_server"].global_model(states["sl_single_server"])
    assert sizes_of(split).client == model_bytes(cv) and model_bytes(cv) > 4 * sum(
        x.size for x in jax.tree_util.tree_leaves(cv.params))


def test_first_step_loss_and_batchnorm_average_by_hand():
    # one local step a round (batch 8 >= shards of 6 and 5), no augmentation: the round's loss
    # is the first step's loss, and each client's BatchNorm statistics come from one forward
    # pass over its whole shard with the initial model; the server averages them with n_i / n
    split = small_resnet()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(M, N, H, H, 3)).astype(np.float32)
    y = rng.integers(0, 10, (M, N)).astype(np.int32)
    counts = [N, N - 1]
    cfg = Config(num_clients=M, batch_size=8, server_update_interval=1, strategy="vmap")
    a = ALGORITHMS["sl_multi_server"](split, cfg, N)
    state = a.init(jax.random.key(0))
    c0, s0 = a.global_model(jax.tree_util.tree_map(np.array, state))     # run_round donates
    state, acc = a.run_round(state, ClientArrays(jnp.asarray(x), jnp.asarray(y),
                                                 jnp.asarray(counts, jnp.int32)), jax.random.key(1))

    # by hand: plain flax apply in training mode on each client's real samples only
    @jax.jit
    def by_hand(xi, yi):
        z, cs = split.client.apply({"params": c0.params, **c0.state}, xi, train=True,
                                   mutable=["batch_stats"])
        logits, _ = split.server.apply({"params": s0.params, **s0.state}, z, train=True,
                                       mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, yi[:, None], 1)), cs["batch_stats"]

    losses, stats = [], []
    for i, n in enumerate(counts):
        loss, st = by_hand(x[i, :n], y[i, :n])
        losses.append(float(loss))
        stats.append(st)
    w = np.asarray(counts, np.float64) / sum(counts)
    assert acc["loss_sum"] / acc["loss_n"] == pytest.approx(float(np.dot(w, losses)), rel=1e-5)
    want = jax.tree_util.tree_map(lambda s0_, s1_: w[0] * np.asarray(s0_) + w[1] * np.asarray(s1_),
                                  *stats)
    got = jax.tree_util.tree_map(lambda a_: np.asarray(a_)[0], _client_server(state)[0].state["batch_stats"])
    jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6),
                           got, want)

    # the stem's BatchNorm mean once more from first principles: conv 7x7/2, padding 3, no bias;
    # running mean starts at 0, PyTorch momentum 0.1
    kernel = np.asarray(c0.params["conv1"]["kernel"])
    conv = [jax.lax.conv_general_dilated(x[i, :n], kernel, (2, 2), ((3, 3), (3, 3)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for i, n in enumerate(counts)]
    stem_mean = sum(wi * 0.1 * np.asarray(c).mean((0, 1, 2)) for wi, c in zip(w, conv))
    np.testing.assert_allclose(got["bn1"]["mean"], stem_mean, rtol=1e-4, atol=1e-6)
    assert np.abs(stem_mean).max() > 1e-3                  # not the initial zeros
