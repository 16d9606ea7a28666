"""On-device image augmentation and normalisation (pure, jittable, vmappable JAX).

The CIFAR recipe of FSL-SAGE (Nair et al., ICML 2025) and of the usual ResNet
training: random 32x32 crop of the image zero-padded by 4 pixels on each side,
random horizontal flip with probability 1/2, then per-channel normalisation.
Evaluation data is only normalised. Images stay uint8 on the device until here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel (last axis).

    Args:
      x: uint8 (or 0..255 float) images ``[..., C]``.
      mean, std: C per-channel values on the [0, 1] scale.
    Returns:
      float32 array of the same shape.
    """
    x = x.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(x: jax.Array, rng: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
    """Per-sample random crop of the zero-padded images and random horizontal flip.

    Each sample draws a crop offset uniformly from ``{0..2*pad}^2`` (``(pad, pad)``
    is the identity) and, if ``flip``, a flip with probability 1/2.

    Args:
      x: images ``[B, H, W, C]`` of any dtype.
      rng: PRNG key.
      pad: zero padding on each side (0: no crop).
      flip: whether to flip.
    Returns:
      the augmented images, same shape and dtype as ``x``.
    """
    b, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        off = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda img, o: lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, off)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1], x)
    return x


def make_image_transform(mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD,
                         pad: int = 4, flip: bool = True) -> Callable:
    """The on-device input transform of an image dataset.

    Args:
      mean, std: per-channel normalisation on the [0, 1] scale.
      pad: crop padding for training (0: no crop).
      flip: random horizontal flips for training.
    Returns:
      ``transform(x, rng, train) -> float32 [B, H, W, C]``: ``train`` (a Python
      bool) crops, flips and normalises with ``rng``; otherwise it only
      normalises (``rng`` unused, may be None): evaluation data is never augmented.
    """
    def transform(x: jax.Array, rng: jax.Array | None, train: bool) -> jax.Array:
        if train and (pad > 0 or flip):
            x = random_crop_flip(x, rng, pad, flip)
        return normalize(x, mean, std)
    return transform
