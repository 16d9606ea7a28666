"""The cnn model's hand-written layers (custom VJPs, patch-matmul convolution) against
independent references: ``lax.conv_general_dilated``, flax ``nn.max_pool`` and the LRN
formula written out channel by channel, differentiated by ``jax.grad``. Values and
gradients agree to 1e-5 relative (max-abs error over max-abs value), for one client and
vmapped over 4 clients that each have their own weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.models.cnn import CNNClient
from fslsage_jax.models.layers import conv_patches, conv_rows, local_response_norm, max_pool_3x3_s2

RTOL = 1e-5


def close(a, b, rtol=RTOL):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape
        scale = float(np.max(np.abs(y))) or 1.0
        err = float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        assert err <= rtol * scale, (err, scale)


def ref_lrn(x, size=4, alpha=0.001 / 9.0, beta=0.75, k=1.0):
    c = x.shape[-1]
    out = []
    for ch in range(c):
        lo, hi = max(0, ch - size // 2), min(c, ch + (size - 1) // 2 + 1)
        out.append(x[..., ch] / (k + alpha / size * jnp.sum(x[..., lo:hi] ** 2, -1)) ** beta)
    return jnp.stack(out, -1)


def ref_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def ref_conv(x, k, pads=((2, 2), (2, 2))):
    return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def ref_client(variables, x):
    p = variables["params"]
    conv = lambda x, c: ref_conv(x, c["kernel"]) + c["bias"]
    x = ref_lrn(ref_pool(jax.nn.relu(conv(x, p["Conv_0"]))))
    x = ref_pool(ref_lrn(jax.nn.relu(conv(x, p["Conv_1"]))))
    return x.reshape(x.shape[0], -1)


def vjp_of(f, *args, key=9):
    """Value and the VJP of a fixed random cotangent with respect to every argument (jitted)."""
    ct = jax.random.normal(jax.random.key(key), jax.eval_shape(f, *args).shape)

    @jax.jit
    def run(*args):
        y, back = jax.vjp(f, *args)
        return y, back(ct)
    return run(*args)


def normal(i, shape, scale=1.0):
    return jax.random.normal(jax.random.key(i), shape) * scale


@pytest.mark.parametrize("shape,scale", [((2, 4, 4, 8), 1.0), ((3, 3, 5, 1), 30.0), ((1, 2, 2, 64), 30.0)])
def test_lrn_value_and_gradient(shape, scale):
    x = normal(0, shape, scale)
    y, g = vjp_of(local_response_norm, x)
    y_ref, g_ref = vjp_of(ref_lrn, x)
    close(y, y_ref)
    close(g, g_ref)


def test_lrn_other_parameters_and_vmap():
    f = lambda x: local_response_norm(x, 3, 0.1, 0.6, 2.0)
    r = lambda x: ref_lrn(x, 3, 0.1, 0.6, 2.0)
    x = normal(1, (4, 2, 3, 3, 7), 3.0)
    close(vjp_of(jax.vmap(f), x), vjp_of(jax.vmap(r), x))


@pytest.mark.parametrize("shape,relu", [((2, 8, 8, 3), True), ((1, 7, 5, 2), False), ((2, 1, 1, 1), False),
                                        ((1, 32, 32, 4), True)])
def test_pool_value_and_gradient(shape, relu):
    """Equal values; the gradient goes where XLA's select_and_scatter puts it, ties
    (ReLU zeros) included: the first maximum of each window."""
    x = normal(2, shape)
    x = jax.nn.relu(x) if relu else x
    y, (g,) = vjp_of(max_pool_3x3_s2, x)
    y_ref, (g_ref,) = vjp_of(ref_pool, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(g != 0, g_ref != 0)


def test_pool_all_ties_first_maximum():
    x = jnp.zeros((1, 4, 4, 1))
    ct = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    g = jax.vjp(max_pool_3x3_s2, x)[1](ct)[0]
    np.testing.assert_array_equal(g, jax.vjp(ref_pool, x)[1](ct)[0])
    # window (0, 0) covers rows/cols -1..1: its first real element is (0, 0)
    assert float(g[0, 0, 0, 0]) == 1.0


def test_pool_vmapped():
    x = jax.nn.relu(normal(3, (4, 3, 8, 8, 6)))
    close(vjp_of(jax.vmap(max_pool_3x3_s2), x), vjp_of(jax.vmap(ref_pool), x), rtol=1e-6)


@pytest.mark.parametrize("shape,kernel,pads", [
    ((3, 4, 4, 8), (5, 5), ((2, 2), (2, 2))), ((2, 5, 3, 2), (5, 5), ((2, 2), (2, 2))),
    ((2, 6, 7, 3), (4, 2), ((1, 2), (0, 1)))])
def test_conv_patches_value_and_gradients(shape, kernel, pads):
    x, k = normal(4, shape), normal(5, kernel + (shape[-1], 5), 0.2)
    close(vjp_of(lambda x, k: conv_patches(x, k, pads), x, k),
          vjp_of(lambda x, k: ref_conv(x, k, pads), x, k))


@pytest.mark.parametrize("shape,kernel,pads", [
    ((3, 4, 4, 8), (5, 5), ((2, 2), (2, 2))), ((2, 5, 3, 2), (5, 5), ((2, 2), (2, 2))),
    ((2, 6, 7, 3), (4, 2), ((1, 2), (0, 1))), ((2, 6, 6, 3), (3, 3), ((0, 0), (0, 0)))])
def test_conv_rows_value_and_gradients(shape, kernel, pads):
    x, k = normal(4, shape), normal(5, kernel + (shape[-1], 5), 0.2)
    close(vjp_of(lambda x, k: conv_rows(x, k, pads), x, k),
          vjp_of(lambda x, k: ref_conv(x, k, pads), x, k))


def test_conv_rows_vmapped_over_client_kernels():
    x, k = normal(6, (4, 3, 4, 4, 8)), normal(7, (4, 5, 5, 8, 6), 0.2)
    close(vjp_of(jax.vmap(conv_rows), x, k), vjp_of(jax.vmap(ref_conv), x, k))


def test_conv_patches_vmapped_over_client_kernels():
    x, k = normal(6, (4, 3, 4, 4, 8)), normal(7, (4, 5, 5, 8, 6), 0.2)
    close(vjp_of(jax.vmap(conv_patches), x, k), vjp_of(jax.vmap(ref_conv), x, k))


def _client_vars(model, key, x, bias_scale=0.1):
    """Initial variables with non-zero biases (the default init has zero biases); jittable."""
    v = model.init(key, x)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a + bias_scale * jax.random.normal(jax.random.fold_in(key, a.size), a.shape)
        if "bias" in jax.tree_util.keystr(path) else a, v)


@pytest.mark.parametrize("conv_impl,train", [("auto", True), ("auto", False), ("xla", True), ("im2col", True)])
def test_client_equals_reference(conv_impl, train):
    model = CNNClient(features=8, conv_impl=conv_impl)
    x = normal(8, (5, 8, 8, 1))
    v = jax.jit(lambda k: _client_vars(model, k, x))(jax.random.key(0))
    close(vjp_of(lambda v, x: model.apply(v, x, train=train), v, x), vjp_of(ref_client, v, x))


@pytest.mark.parametrize("train", [True, False])
def test_client_vmapped_over_clients_with_own_weights(train):
    model = CNNClient(features=8)
    x = normal(9, (4, 2, 8, 8, 1))
    v = jax.jit(jax.vmap(lambda k: _client_vars(model, k, x[0])))(jax.random.split(jax.random.key(1), 4))
    assert not np.allclose(v["params"]["Conv_1"]["kernel"][0], v["params"]["Conv_1"]["kernel"][1])
    loss = lambda f: (lambda v, x: jnp.sum(jnp.tanh(f(v, x))))
    ours = jax.vmap(jax.value_and_grad(loss(lambda v, x: model.apply(v, x, train=train))))
    ref = jax.vmap(jax.value_and_grad(loss(ref_client)))
    close(jax.jit(ours)(v, x), jax.jit(ref)(v, x))


def test_client_parameters_unchanged():
    """Names, shapes and initial values are those of ``nn.Conv(64, (5, 5), padding=2)``
    layers (checkpoints and byte counts do not change)."""
    x = jnp.zeros((1, 8, 8, 1))
    v = jax.jit(CNNClient().init)(jax.random.key(3), x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {
        "Conv_0": {"kernel": (5, 5, 1, 64), "bias": (64,)},
        "Conv_1": {"kernel": (5, 5, 64, 64), "bias": (64,)}}}

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
            x = nn.Conv(64, (5, 5), padding=2, kernel_init=init)(x)
            return nn.Conv(64, (5, 5), padding=2, kernel_init=init)(x)
    ref = jax.jit(Plain().init)(jax.random.key(3), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v, ref)
