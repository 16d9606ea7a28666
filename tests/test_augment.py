"""On-device augmentation: exact crops/flips, their frequencies, evaluation never augmented, jit/vmap."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    make_image_transform,
    normalize,
    random_crop_flip,
)


def test_normalize_by_hand():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    x[0, 0, 0] = (255, 0, 51)
    out = normalize(jnp.asarray(x), CIFAR_MEAN, CIFAR_STD)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_allclose(out[0, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, (0.2 - 0.406) / 0.225],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6, atol=1e-6)


def _candidates(img, pad):
    """All (2*pad+1)^2 crops of the zero-padded image, and their mirror images (numpy)."""
    h, w, _ = img.shape
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    crops = [p[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c[:, ::-1] for c in crops]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_every_output_is_a_padded_crop_or_its_mirror(dtype):
    x = np.random.default_rng(0).integers(1, 256, (12, 6, 5, 3)).astype(dtype)
    out = random_crop_flip(jnp.asarray(x), jax.random.key(0), pad=2)
    assert out.shape == x.shape and out.dtype == dtype
    for img, o in zip(x, np.asarray(out)):
        assert any(np.array_equal(o, c) for c in _candidates(img, 2))
    assert not np.array_equal(np.asarray(out), x)
    np.testing.assert_array_equal(out, random_crop_flip(jnp.asarray(x), jax.random.key(0), pad=2))


def test_crop_offsets_and_flip_frequencies():
    """A bright pixel (255) with a dimmer right neighbour (100) in a 12x12 image, 8,100 draws, pad 4:
    the pair's order tells the flip, its position the crop shift (-4..4 each way, uniform)."""
    n, h, w, r, c = 8100, 12, 12, 6, 6
    x = np.zeros((n, h, w, 1), np.uint8)
    x[:, r, c], x[:, r, c + 1] = 255, 100
    out = np.asarray(random_crop_flip(jnp.asarray(x), jax.random.key(1), pad=4))[..., 0]
    rows, cols = np.nonzero(out == 255)[1:]
    assert len(rows) == n                                      # the pixel is never cropped away
    flipped = out[np.arange(n), rows, cols - 1] == 100         # neighbour now on the left
    assert np.all(flipped | (out[np.arange(n), rows, np.minimum(cols + 1, w - 1)] == 100))
    assert abs(flipped.mean() - 0.5) < 0.03                    # std 0.0056
    dy, dx = rows - r, np.where(flipped, w - 1 - cols, cols) - c
    assert dy.min() == dx.min() == -4 and dy.max() == dx.max() == 4
    counts = np.zeros((9, 9), int)
    np.add.at(counts, (dy + 4, dx + 4), 1)
    assert counts.min() > 50 and counts.max() < 160            # each offset 1/81: mean 100, std ~10
    assert 60 < counts[4, 4] < 140                             # the identity crop, about n / 81
    for marg in (counts.sum(0), counts.sum(1)):                # each shift 1/9: mean 900, std ~28
        assert np.all(np.abs(marg - 900) < 150)


def test_transform_train_and_eval():
    t = make_image_transform(CIFAR_MEAN, CIFAR_STD)
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
    ev = t(x, None, False)
    np.testing.assert_array_equal(ev, normalize(x, CIFAR_MEAN, CIFAR_STD))       # never augmented
    np.testing.assert_array_equal(t(x, jax.random.key(5), False), ev)
    tr = t(x, jax.random.key(5), True)
    assert tr.shape == x.shape and tr.dtype == jnp.float32
    np.testing.assert_array_equal(tr, normalize(random_crop_flip(x, jax.random.key(5)), CIFAR_MEAN, CIFAR_STD))
    assert not np.allclose(tr, ev)
    assert not np.allclose(tr, t(x, jax.random.key(6), True))
    # no augmentation configured: train == eval
    np.testing.assert_array_equal(make_image_transform(pad=0, flip=False)(x, jax.random.key(5), True), ev)


def test_jit_and_vmap():
    t = make_image_transform()
    x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (3, 4, 8, 8, 3)), jnp.uint8)   # [m, B, ...]
    keys = jax.random.split(jax.random.key(7), 3)
    jt = jax.jit(t, static_argnums=2)
    np.testing.assert_allclose(jt(x[0], keys[0], True), t(x[0], keys[0], True), rtol=1e-6, atol=1e-6)
    lifted = jax.jit(jax.vmap(functools.partial(t, train=True)))(x, keys)
    for i in range(3):
        np.testing.assert_allclose(lifted[i], t(x[i], keys[i], True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jt(x[1], None, False), t(x[1], None, False), rtol=1e-6, atol=1e-6)
