"""Datasets as host arrays: ``digits`` (real, bundled with scikit-learn, offline)
and ``synthetic`` (random images of any shape, for speed tests)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A classification dataset: float32 images ``[N, H, W, C]``, int32 labels ``[N]``."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def load_digits(seed: int = 0, test_fraction: float = 0.2, data_dir: str | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    Args:
      seed: seed of the stratified train/test split (the only randomness).
      test_fraction: share of the test set (0.2 -> 1,437 train / 360 test).
      data_dir: unused (the data ships with scikit-learn).
    Returns:
      a :class:`Dataset`, images scaled to [0, 1], shape ``[N, 8, 8, 1]``.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                          random_state=seed)
    return Dataset("digits", xtr, ytr, xte, yte, 10)


def make_synthetic(seed: int = 0, n_train: int = 1024, n_test: int = 256,
                   shape: tuple = (32, 32, 3), num_classes: int = 10,
                   data_dir: str | None = None) -> Dataset:
    """Random standard-normal images with uniform labels, for speed tests.

    Each class adds its own fixed random pattern (scale 0.5) to its images, so
    the labels are learnable and a run can be sanity-checked.
    """
    rng = np.random.default_rng(seed)
    patterns = 0.5 * rng.standard_normal((num_classes, *shape)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, num_classes, n).astype(np.int32)
        return rng.standard_normal((n, *shape)).astype(np.float32) + patterns[y], y
    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes)


DATASETS = {"digits": load_digits, "synthetic": make_synthetic}


def load_dataset(name: str, seed: int = 0, data_dir: str | None = None, **kwargs) -> Dataset:
    """Load a dataset by name (see ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](seed=seed, data_dir=data_dir, **kwargs)
