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

from fslsage_jax.models.layers import conv_patches, conv_rows, local_response_norm, max_pool_3x3_s2
from fslsage_jax.split import SplitModel

__all__ = ["CNNClient", "CNNServer", "CONV_IMPLS", "LinearAux", "conv_im2col", "conv_row_toeplitz", "conv_small_toeplitz",
           "conv_toeplitz", "default_conv_impl", "local_response_norm", "make_cnn", "max_pool_3x3_s2"]

# PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The original initialises dense weights and biases with N(0, 0.05).
_dense_init = nn.initializers.normal(0.05)


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
    """``lax.conv_general_dilated`` for a stride-1 "same" NHWC conv as patch-matrix products
    (:func:`layers.conv_patches`: gathered ``[B*H*W, kh*kw*C]`` patches times the kernel,
    with a hand-written backward pass of two more products)."""
    _same_conv_args(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count)
    return conv_patches(x, k, tuple(tuple(p) for p in padding))


def conv_row_toeplitz(x, k, strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for a stride-1 "same" NHWC conv as one product per
    kernel row with its width-Toeplitz matrix (:func:`layers.conv_rows`: no patch matrix,
    only the rows each kernel row reaches)."""
    _same_conv_args(x, k, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count)
    return conv_rows(x, k, tuple(tuple(p) for p in padding))


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


CONV_IMPLS = {"xla": None, "im2col": conv_im2col, "rows": conv_row_toeplitz, "toeplitz": conv_toeplitz,
              "small_toeplitz": conv_small_toeplitz}


SMALL_IMAGE_PIXELS = 16 * 16


def default_conv_impl(train: bool, backend: str | None = None,
                      image_pixels: int | None = None) -> str | tuple:
    """The measured fastest conv formulation: a key of ``CONV_IMPLS`` or a pair (first, second conv).

    Measured on a 2-core XLA:CPU (jax 0.10.2, see BENCHMARKS.md). Training (``train=True``)
    on small images (``image_pixels`` = H*W up to ``SMALL_IMAGE_PIXELS``, e.g. digits 8x8,
    where every client has its own weights): ``"im2col"`` (patch matmuls) for the first conv
    (vmapped, the XLA convolution is a grouped convolution with one input channel per
    group: 3-10x slower at 64-256 clients) and ``"rows"`` (row-Toeplitz matmuls) for the
    second (4x4x64: 56% of the patch form's multiply-adds; 1.7x faster than patches for
    4 clients x 32 samples, 2.2x at 64 clients in chunks of 2, both on one core). Larger images keep
    ``"xla"`` (the engine runs up to 16 clients unrolled there, where XLA's plain
    convolution is faster; vmapped, ``"im2col"`` is 2-5x faster for 32x32x3).
    Inference (``train=False``: evaluation of the averaged client) is ~7x faster with the
    Toeplitz matmul for the 4x4x64 second conv. Other backends: ``"xla"``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    if not train:
        return "small_toeplitz"
    small = image_pixels is None or image_pixels <= SMALL_IMAGE_PIXELS
    return ("im2col", "rows") if small else "xla"


def _xla_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((2, 2), (2, 2)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _Conv5x5(nn.Module):
    """The parameters of ``nn.Conv(features, (5, 5), padding=2)`` (``kernel`` with PyTorch's
    default init, zero ``bias``) and its convolution without the bias: ``(x * kernel, bias)``."""
    features: int
    impl: str

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", _conv_init, (5, 5, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        f = CONV_IMPLS[self.impl]
        if f is None:
            return _xla_conv(x, k), b
        return f(x, k, (1, 1), ((2, 2), (2, 2)),
                 dimension_numbers=jax.lax.conv_dimension_numbers(
                     x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))), b


class CNNClient(nn.Module):
    """Client part: two conv blocks, flattened cut activation.

    ``conv_impl``: how the convolutions are computed: ``"auto"`` (the measured
    default of the backend and mode, :func:`default_conv_impl`), a key of
    ``CONV_IMPLS`` for both convs, or a pair of keys. ``"xla"`` is XLA's convolution;
    ``"im2col"``, ``"rows"`` and ``"toeplitz"`` compute the same convolution as matrix products
    (equal to float rounding, ~1e-6); ``"small_toeplitz"`` uses the Toeplitz form
    only while its matrix is small. The parameters (``Conv_0``/``Conv_1``
    ``kernel``/``bias``) are the same for every choice. The first block max-pools
    before adding the bias and the ReLU (both monotonic, so the values are the
    same) to run them on the 4x smaller map.
    """
    features: int = 64
    conv_impl: str | tuple = "auto"

    def _impls(self, train: bool, image_pixels: int):
        impl = self.conv_impl
        if impl == "auto":
            impl = default_conv_impl(train, image_pixels=image_pixels)
        return (impl, impl) if isinstance(impl, str) else tuple(impl)

    @nn.compact
    def __call__(self, x, train: bool = False):
        i1, i2 = self._impls(train, x.shape[-3] * x.shape[-2])
        z, b = _Conv5x5(self.features, i1, name="Conv_0")(x)
        x = local_response_norm(nn.relu(max_pool_3x3_s2(z) + b))
        z, b = _Conv5x5(self.features, i2, name="Conv_1")(x)
        x = max_pool_3x3_s2(local_response_norm(nn.relu(z + b)))
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
