"""The CNN's dot-based convolutions equal XLA's convolution (float rounding)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.models.cnn import CONV_IMPLS, CNNClient, default_conv_impl


def xla_conv(x, k):
    return nn.Conv(k.shape[-1], k.shape[:2], padding=2).apply(
        {"params": {"kernel": k, "bias": jnp.zeros(k.shape[-1])}}, x)


@pytest.mark.parametrize("impl", ["im2col", "toeplitz", "small_toeplitz"])
@pytest.mark.parametrize("shape", [(3, 4, 4, 8), (2, 8, 8, 1), (2, 5, 3, 2)])
def test_conv_impls_equal_xla(impl, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    k = jax.random.normal(jax.random.key(1), (5, 5, shape[-1], 6)) * 0.1
    conv = lambda x, k: nn.Conv(6, (5, 5), padding=2, conv_general_dilated=CONV_IMPLS[impl]).apply(
        {"params": {"kernel": k, "bias": jnp.zeros(6)}}, x)
    np.testing.assert_allclose(conv(x, k), xla_conv(x, k), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(2), xla_conv(x, k).shape)
    g = jax.vjp(conv, x, k)[1](ct)
    g_ref = jax.vjp(xla_conv, x, k)[1](ct)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_client_same_params_and_outputs_for_every_impl():
    x = jax.random.normal(jax.random.key(3), (6, 8, 8, 1))
    ref = CNNClient(conv_impl="xla")
    v = ref.init(jax.random.key(4), x)
    for impl in ("auto", "im2col", "toeplitz", ("xla", "small_toeplitz"), ("im2col", "xla")):
        m = CNNClient(conv_impl=impl)
        v2 = m.init(jax.random.key(4), x)
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), v, v2))
        for train in (False, True):
            np.testing.assert_allclose(m.apply(v, x, train=train), ref.apply(v, x, train=train),
                                       rtol=1e-5, atol=1e-5)


def test_default_impl():
    assert default_conv_impl(True, "cpu") == ("im2col", "rows")
    assert default_conv_impl(True, "cpu", image_pixels=8 * 8) == ("im2col", "rows")
    assert default_conv_impl(True, "cpu", image_pixels=32 * 32) == "xla"
    assert default_conv_impl(False, "cpu") == "small_toeplitz"
    assert default_conv_impl(False, "gpu") == "xla"
