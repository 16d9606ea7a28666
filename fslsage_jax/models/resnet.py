"""ResNet-18 (He et al. 2016, torchvision's ImageNet layout) split as in FSL-SAGE (Nair et al., ICML 2025).

The network: 7x7 stride-2 stem conv (64, no bias), BatchNorm, ReLU, 3x3 stride-2
max-pool (padding 1), four layers of two BasicBlocks (widths 64, 128, 256, 512;
stride 2 from layer2 on, a 1x1 conv + BN shortcut where the shape changes),
global average pool, dense. On 32x32 inputs (NHWC):

- client = stem + layer1 + layer2: ``[B, 32, 32, 3] -> [B, 4, 4, 128]`` (the cut);
- server = layer3 + layer4 + pool + dense;
- auxiliary = one stride-2 layer of two BasicBlocks of width 256 + pool + dense.

Every module is called as ``module(x, train=False, mask=None)``. ``mask`` (``[B]``
bool, True on the real samples of a padded batch) makes every BatchNorm compute
its training-mode batch statistics over the real samples only. BatchNorm follows
PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; epsilon 1e-5); its
running statistics live in the ``batch_stats`` collection. Flax's running
variance uses the biased batch variance (PyTorch's uses the unbiased one).

Initialisation as torchvision: Kaiming-normal (fan_out, ReLU gain) convolutions,
BatchNorm scale 1 and bias 0, dense weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fslsage_jax.split import SplitModel

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _uniform(bound: float):
    """Initializer U(-bound, bound)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _dense(features: int, fan_in: int, name: str = "fc") -> nn.Dense:
    """PyTorch ``nn.Linear`` default init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    b = fan_in ** -0.5
    return nn.Dense(features, kernel_init=_uniform(b), bias_init=_uniform(b), name=name)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """Bias-free convolution with PyTorch's symmetric padding ``kernel // 2``."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                   use_bias=False, kernel_init=_conv_init, name=name)


def _real_mask(mask: jax.Array | None) -> jax.Array | None:
    """``[B]`` mask -> ``[B, 1, 1, 1]``; an all-padding batch falls back to all rows
    (keeps the statistics finite; such a step's update is discarded by its weights)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    return jnp.where(mask.any(), mask, True)[:, None, None, None]


def batch_norm(x: jax.Array, train: bool, mask4: jax.Array | None, name: str) -> jax.Array:
    """BatchNorm with PyTorch defaults; batch statistics over the ``mask4`` rows in training."""
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    return bn(x, mask=mask4 if train else None)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN) shortcut.

    Attributes:
      features: output channels.
      stride: stride of the first conv and of the shortcut.
    """
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask4: jax.Array | None = None):
        y = _conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(y, train, mask4, "bn1"))
        y = batch_norm(_conv(self.features, 3, 1, "conv2")(y), train, mask4, "bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            x = batch_norm(x, train, mask4, "downsample_bn")
        return nn.relu(y + x)


class ResLayer(nn.Module):
    """``blocks`` BasicBlocks of width ``features``; the first one has ``stride``."""
    features: int
    blocks: int = 2
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask4: jax.Array | None = None):
        for i in range(self.blocks):
            x = BasicBlock(self.features, self.stride if i == 0 else 1, name=f"block{i}")(x, train, mask4)
        return x


def _stem(x, width, train, mask4):
    """conv 7x7/2 (width) -> BN -> ReLU -> max-pool 3x3/2 pad 1 (call inside a compact method)."""
    x = nn.relu(batch_norm(_conv(width, 7, 2, "conv1")(x), train, mask4, "bn1"))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _head(x, num_classes):
    """Global average pool and the dense classifier (call inside a compact method)."""
    x = jnp.mean(x, axis=(1, 2))
    return _dense(num_classes, x.shape[-1])(x)


class ResNetClient(nn.Module):
    """Client part: stem + layer1 + layer2 -> cut activation ``[B, H/8, W/8, 2 * width]``.

    Attributes:
      layers: BasicBlocks in layer1 and layer2.
      width: stem and layer1 width (64 for ResNet-18; layer k has width * 2**(k-1)).
    """
    layers: Sequence[int] = (2, 2)
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False, mask: jax.Array | None = None):
        m = _real_mask(mask)
        x = _stem(x, self.width, train, m)
        x = ResLayer(self.width, self.layers[0], 1, name="layer1")(x, train, m)
        return ResLayer(2 * self.width, self.layers[1], 2, name="layer2")(x, train, m)


class ResNetServer(nn.Module):
    """Server part: layer3 + layer4 + global average pool + dense -> logits."""
    num_classes: int
    layers: Sequence[int] = (2, 2)
    width: int = 64

    @nn.compact
    def __call__(self, z, train: bool = False, mask: jax.Array | None = None):
        m = _real_mask(mask)
        z = ResLayer(4 * self.width, self.layers[0], 2, name="layer3")(z, train, m)
        z = ResLayer(8 * self.width, self.layers[1], 2, name="layer4")(z, train, m)
        return _head(z, self.num_classes)


class ResNetAux(nn.Module):
    """Auxiliary part: one stride-2 layer of ``blocks`` BasicBlocks (width 256) + pool + dense."""
    num_classes: int
    features: int = 256
    blocks: int = 2

    @nn.compact
    def __call__(self, z, train: bool = False, mask: jax.Array | None = None):
        z = ResLayer(self.features, self.blocks, 2, name="layer")(z, train, _real_mask(mask))
        return _head(z, self.num_classes)


class ResNet18(nn.Module):
    """The unsplit ResNet-18; its variable names are the union of the client's and server's
    (``width`` < 64 gives a narrow variant of the same network, for cheap tests)."""
    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False, mask: jax.Array | None = None):
        m = _real_mask(mask)
        x = _stem(x, self.width, train, m)
        for i, (f, s) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
            x = ResLayer(f * self.width, 2, s, name=f"layer{i + 1}")(x, train, m)
        return _head(x, self.num_classes)


def make_resnet18(input_shape: tuple, num_classes: int, width: int = 64) -> SplitModel:
    """The ``resnet18`` split model (cut after layer2) for NHWC images of ``input_shape``.

    Args:
      input_shape: one image's shape ``(H, W, C)``, e.g. ``(32, 32, 3)``.
      num_classes: number of classes of the server and auxiliary heads.
      width: base width; 64 is ResNet-18 (the paper's), smaller values give narrow test variants.
    Returns:
      a :class:`SplitModel` with ``masked_batch_stats=True``.
    """
    return SplitModel("resnet18", ResNetClient(width=width), ResNetServer(num_classes, width=width),
                      ResNetAux(num_classes, features=4 * width), tuple(input_shape), num_classes,
                      masked_batch_stats=True)
