"""The small CNN of the FSL-SAGE code base (``simple_conv``), split after the convolutions.

Client: conv5x5(64) ReLU, max-pool 3x3/2, local response norm, conv5x5(64) ReLU,
LRN, max-pool 3x3/2, flatten. Server: dense 384 ReLU, dense 192 ReLU, dense
classes. Auxiliary: one linear layer. It follows the TensorFlow CIFAR-10
tutorial model; any input size works (8x8x64 cut features for 32x32 inputs).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _same_conv_args(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count):
    """Check that a conv call is the stride-1 "same" NHWC/HWIO conv the dot forms cover."""
    kh, kw = k.shape[:2]
    ok = (tuple(strides) == (1, 1) and feature_group_count == 1
          and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
          and [tuple(p) for p in padding] == [((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)]
          and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
          and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1) and x.ndim == 4)
    if not ok:
        raise NotImplementedError("dot-based conv: only stride-1 'same' NHWC convs")


def conv_im2col(x, k, strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for a stride-1 "same" NHWC conv as one matmul of the
    ``[B*H*W, kh*kw*C]`` patch matrix (built from shifted slices) with the kernel."""
    _same_conv_args(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count)
    b, h, w, c = x.shape
    kh, kw, _, o = k.shape
    xp = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], -1)
    y = jnp.dot(cols.reshape(b * h * w, kh * kw * c), k.reshape(kh * kw * c, o), precision=precision)
    return y.reshape(b, h, w, o)


@functools.lru_cache(maxsize=32)
def _toeplitz_pattern(h: int, w: int, kh: int, kw: int) -> np.ndarray:
    """``S[p, q, i*kw + j] = 1`` where input pixel p feeds output pixel q through kernel
    tap (i, j) of a stride-1 "same" conv on an h x w image."""
    s = np.zeros((h * w, h * w, kh * kw), np.float32)
    for q in range(h * w):
        qi, qj = divmod(q, w)
        for i in range(kh):
            for j in range(kw):
                pi, pj = qi + i - (kh - 1) // 2, qj + j - (kw - 1) // 2
                if 0 <= pi < h and 0 <= pj < w:
                    s[pi * w + pj, q, i * kw + j] = 1.0
    return s


def conv_toeplitz(x, k, strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for a stride-1 "same" NHWC conv on a small image as one
    dense matmul ``[B, H*W*C] @ [H*W*C, H*W*O]`` (the conv's Toeplitz matrix, built from
    the kernel by a constant 0/1 pattern). Cheaper than patches when H*W is small."""
    _same_conv_args(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count)
    b, h, w, c = x.shape
    kh, kw, _, o = k.shape
    s = jnp.asarray(_toeplitz_pattern(h, w, kh, kw))
    t = jnp.einsum("pqt,tco->pcqo", s, k.reshape(kh * kw, c, o), precision=precision)
    y = jnp.dot(x.reshape(b, h * w * c), t.reshape(h * w * c, h * w * o), precision=precision)
    return y.reshape(b, h, w, o)


# A Toeplitz matrix up to this size is built; larger convs keep XLA's form.
TOEPLITZ_MAX_BYTES = 16 << 20


def conv_small_toeplitz(x, k, strides, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1, precision=None):
    """:func:`conv_toeplitz` when its matrix has at most ``TOEPLITZ_MAX_BYTES`` (small
    images), else XLA's convolution."""
    args = (x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count)
    h, w, c = x.shape[-3:]
    small = (h * w) ** 2 * c * k.shape[-1] * 4 <= TOEPLITZ_MAX_BYTES
    if small and x.ndim == 4:
        return conv_toeplitz(*args, precision=precision)
    return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation,
                                        dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        precision=precision)


CONV_IMPLS = {"xla": None, "im2col": conv_im2col, "toeplitz": conv_toeplitz,
              "small_toeplitz": conv_small_toeplitz}


def default_conv_impl(train: bool, backend: str | None = None) -> str:
    """The measured fastest conv formulation (a key of ``CONV_IMPLS``).

    Measured on a 2-core XLA:CPU (jax 0.10.2, digits 8x8x1, see BENCHMARKS.md):
    training steps (4 clients vmapped, batch 32, forward + backward) are fastest with
    XLA's convolution (im2col 1.0-2.5x slower, Toeplitz ~1.5x slower; oneDNN and
    XNNPACK flags no faster), so training keeps ``"xla"`` and its numbers are
    unchanged. Inference (``train=False``: evaluation of the averaged client on the
    test set) is ~7x faster with the Toeplitz matmul for the 4x4x64 second conv
    (360 samples: ~0.36 s -> ~0.045 s on a loaded machine). Other backends: ``"xla"``.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu" and not train:
        return "small_toeplitz"
    return "xla"


class CNNClient(nn.Module):
    """Client part: two conv blocks, flattened cut activation.

    ``conv_impl``: how the convolutions are computed: ``"auto"`` (the measured
    default of the backend and mode, :func:`default_conv_impl`), a key of
    ``CONV_IMPLS`` for both convs, or a pair of keys. ``"xla"`` is XLA's convolution;
    ``"im2col"`` and ``"toeplitz"`` compute the same convolution as a matrix product
    (equal to float rounding, ~1e-6); ``"small_toeplitz"`` uses the Toeplitz form
    only while its matrix is small. The parameters (``Conv_0``/``Conv_1``
    ``kernel``/``bias``) are the same for every choice.
    """
    features: int = 64
    conv_impl: str | tuple = "auto"

    def _convs(self, train: bool):
        impl = self.conv_impl
        if impl == "auto":
            impl = default_conv_impl(train)
        if isinstance(impl, str):
            impl = (impl, impl)
        return [CONV_IMPLS[i] for i in impl]

    @nn.compact
    def __call__(self, x, train: bool = False):
        c1, c2 = self._convs(train)
        conv = lambda f: nn.Conv(self.features, (5, 5), padding=2, kernel_init=_conv_init,
                                 conv_general_dilated=f)
        x = nn.relu(conv(c1)(x))
        x = local_response_norm(_pool(x))
        x = nn.relu(conv(c2)(x))
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
