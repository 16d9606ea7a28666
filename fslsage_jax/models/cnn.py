"""The small CNN of the FSL-SAGE code base (``simple_conv``), split after the convolutions.

Client: conv5x5(64) ReLU, max-pool 3x3/2, local response norm, conv5x5(64) ReLU,
LRN, max-pool 3x3/2, flatten. Server: dense 384 ReLU, dense 192 ReLU, dense
classes. Auxiliary: one linear layer. It follows the TensorFlow CIFAR-10
tutorial model; any input size works (8x8x64 cut features for 32x32 inputs).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fslsage_jax.split import SplitModel

# PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The original initialises dense weights and biases with N(0, 0.05).
_dense_init = nn.initializers.normal(0.05)


def local_response_norm(x, size: int = 4, alpha: float = 0.001 / 9.0,
                        beta: float = 0.75, k: float = 1.0):
    """Cross-channel LRN over NHWC input, PyTorch ``LocalResponseNorm`` semantics.

    ``x_c / (k + alpha / size * sum_{c' in [c - size//2, c + (size-1)//2]} x_c'^2)^beta``
    with zero padding at the channel ends.
    """
    sq = jnp.pad(x * x, [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)])
    c = x.shape[-1]
    window = sum(sq[..., i:i + c] for i in range(size))
    return x / (k + alpha / size * window) ** beta


def max_pool_3x3_s2(x):
    """Max-pool 3x3, stride 2, padding 1 on every side (the original's ``MaxPool2d(3, 2, 1)``;
    "same" for even sizes) over NHWC input.

    Equal to ``nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))``, computed
    as a max over strided slices of the -inf-padded input, rows then columns (the window
    max is separable). XLA:CPU runs its backward pass (elementwise selects) about 5-8x
    faster than ``reduce_window``'s select-and-scatter. Values are identical; gradients are
    identical wherever a window's maximum is unique; on exact ties the gradient is split
    between the tied elements (JAX's ``max`` convention; the window's total is the same)
    instead of going to one of them. In this model ties occur only between ReLU zeros,
    whose upstream gradient is zero either way.
    """
    h, w = x.shape[-3], x.shape[-2]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    r = [xp[..., i:i + 2 * ho - 1:2, :, :] for i in range(3)]
    r = jnp.maximum(jnp.maximum(r[0], r[1]), r[2])
    c = [r[..., j:j + 2 * wo - 1:2, :] for j in range(3)]
    return jnp.maximum(jnp.maximum(c[0], c[1]), c[2])


_pool = max_pool_3x3_s2


class CNNClient(nn.Module):
    """Client part: two conv blocks, flattened cut activation."""
    features: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (5, 5), padding=2, kernel_init=_conv_init)(x))
        x = local_response_norm(_pool(x))
        x = nn.relu(nn.Conv(self.features, (5, 5), padding=2, kernel_init=_conv_init)(x))
        x = _pool(local_response_norm(x))
        return x.reshape(x.shape[0], -1)


class CNNServer(nn.Module):
    """Server part: dense 384, dense 192, dense classes."""
    num_classes: int

    @nn.compact
    def __call__(self, z, train: bool = False):
        d = lambda n: nn.Dense(n, kernel_init=_dense_init, bias_init=_dense_init)
        return d(self.num_classes)(nn.relu(d(192)(nn.relu(d(384)(z)))))


class LinearAux(nn.Module):
    """Auxiliary part: one linear layer from the cut features to the classes."""
    num_classes: int

    @nn.compact
    def __call__(self, z, train: bool = False):
        z = z.reshape(z.shape[0], -1)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=_dense_init)(z)


def make_cnn(input_shape: tuple, num_classes: int) -> SplitModel:
    """The ``cnn`` split model for images of ``input_shape`` (H, W, C)."""
    return SplitModel("cnn", CNNClient(), CNNServer(num_classes), LinearAux(num_classes),
                      tuple(input_shape), num_classes)
