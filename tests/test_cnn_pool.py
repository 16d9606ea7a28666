"""The CNN's strided-slice max-pool (custom VJP) equals flax/XLA's reduce_window max-pool."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.models.cnn import max_pool_3x3_s2


def ref_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def window_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 4, 4, 5), (1, 7, 5, 2), (2, 1, 1, 1),
                                   (1, 32, 32, 4)])
def test_values_and_gradients_equal_reduce_window(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    out = max_pool_3x3_s2(x)
    np.testing.assert_array_equal(out, ref_pool(x))
    np.testing.assert_array_equal(out, window_pool(x))
    ct = jax.random.normal(jax.random.key(1), out.shape)
    for ref in (ref_pool, window_pool):
        g = jax.vjp(max_pool_3x3_s2, x)[1](ct)[0]
        g_ref = jax.vjp(ref, x)[1](ct)[0]
        # overlapping windows add their contributions in another order: float rounding only
        np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g != 0, g_ref != 0)
    xr = jax.nn.relu(x)   # ties between ReLU zeros: the same element gets the gradient
    for ref in (ref_pool, window_pool):
        np.testing.assert_allclose(jax.vjp(max_pool_3x3_s2, xr)[1](ct)[0], jax.vjp(ref, xr)[1](ct)[0],
                                   rtol=1e-6, atol=1e-6)


def test_vmapped_over_clients():
    x = jax.random.normal(jax.random.key(2), (3, 4, 8, 8, 6))
    np.testing.assert_array_equal(jax.vmap(max_pool_3x3_s2)(x), jax.vmap(ref_pool)(x))


def test_ties_go_to_the_first_maximum_like_reduce_window():
    # all-equal input: every window is a tie; as XLA's select_and_scatter, the first
    # element of each window (row-major) gets the window's gradient
    x = jnp.zeros((1, 4, 4, 1))
    ct = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    g = jax.vjp(max_pool_3x3_s2, x)[1](ct)[0]
    np.testing.assert_array_equal(g, jax.vjp(ref_pool, x)[1](ct)[0])
    np.testing.assert_array_equal(g, jax.vjp(window_pool, x)[1](ct)[0])
