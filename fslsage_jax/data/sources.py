"""Datasets as host arrays: ``digits`` (real, bundled with scikit-learn, offline),
``synthetic`` (random images of any shape, for speed tests) and ``cifar10`` /
``cifar100`` (uint8 images, see :mod:`fslsage_jax.data.cifar`).

Imports go one way: ``sources`` -> ``cifar`` -> ``dataset`` (the :class:`Dataset` type)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from fslsage_jax.data.cifar import load_cifar10, load_cifar100
from fslsage_jax.data.dataset import Dataset
from fslsage_jax.runtime import user_cache_dir

__all__ = ["DATASETS", "DATASET_SHAPES", "READS_DATA_DIR", "Dataset", "dataset_shape", "digits_cache_path",
           "load_dataset", "load_digits", "make_synthetic"]


_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def digits_cache_path(seed: int = 0, test_fraction: float = 0.2) -> str | None:
    """Where :func:`load_digits` keeps a split: ``$FSLSAGE_JAX_DATA_CACHE`` or
    ``$XDG_CACHE_HOME/fslsage_jax/data`` (``~/.cache/...``), one ``.npz`` per
    scikit-learn version, seed and test fraction; None without scikit-learn."""
    from importlib import metadata
    try:
        version = metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        return None
    return os.path.join(user_cache_dir("data", "FSLSAGE_JAX_DATA_CACHE"),
                        f"digits-sklearn{version}-seed{seed}-test{test_fraction!r}.npz")


def load_digits(seed: int = 0, test_fraction: float = 0.2, data_dir: str | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    The split is kept in :func:`digits_cache_path` after the first call, so later runs
    skip importing scikit-learn (1.7 s on a 2-core CPU); the file is safe to delete.

    Args:
      seed: seed of the stratified train/test split (the only randomness).
      test_fraction: share of the test set (0.2 -> 1,437 train / 360 test).
      data_dir: unused (the data ships with scikit-learn); accepted so that
        every loader takes the same arguments.
    Returns:
      a :class:`Dataset`, images scaled from 0..16 to [0, 1], shape ``[N, 8, 8, 1]``.
    """
    path = digits_cache_path(seed, test_fraction)
    if path is not None and os.path.exists(path):
        try:
            with np.load(path) as f:
                return Dataset("digits", *(f[k] for k in _SPLIT_KEYS), 10)
        except (OSError, KeyError, ValueError):
            pass                            # unreadable: computed again and rewritten
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    raw = sklearn_digits()
    x = (raw.images / 16.0).astype(np.float32)[..., None]
    y = raw.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    if path is not None:
        _save_npz_atomic(path, dict(zip(_SPLIT_KEYS, (x_tr, y_tr, x_te, y_te))))
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


def _save_npz_atomic(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` through a temporary file and a rename; a cache that
    cannot be written is skipped."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def make_synthetic(seed: int = 0, n_train: int = 1024, n_test: int = 256,
                   shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10,
                   data_dir: str | None = None) -> Dataset:
    """Random images with uniform random labels, for speed tests.

    Each image is standard-normal noise plus a fixed pattern of its class
    (drawn once per class, standard normal scaled by 0.5, shared by train and
    test), so the labels are weakly learnable and a training run can be
    sanity-checked: accuracy should rise above 1 / num_classes.

    Args:
      seed: the only source of randomness.
      n_train, n_test: number of train and test samples.
      shape: image shape ``(H, W, C)``.
      num_classes: number of labels.
      data_dir: unused.
    Returns:
      a :class:`Dataset` of float32 images ``[N, *shape]`` and int32 labels.
    """
    if n_train < 0 or n_test < 0 or num_classes < 1:
        raise ValueError(f"need n_train, n_test >= 0 and num_classes >= 1, got "
                         f"{n_train}, {n_test}, {num_classes}")
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    patterns = 0.5 * rng.standard_normal((num_classes, *shape)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, num_classes, n).astype(np.int32)
        return rng.standard_normal((n, *shape)).astype(np.float32) + patterns[y], y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes)


DATASETS = {"digits": load_digits, "synthetic": make_synthetic, "cifar10": load_cifar10,
            "cifar100": load_cifar100}

# the datasets whose loader reads ``data_dir`` (the others ignore it)
READS_DATA_DIR = frozenset({"cifar10", "cifar100"})

# what a model needs to know about a dataset without loading it (``--describe`` offline)
DATASET_SHAPES = {"digits": ((8, 8, 1), 10), "synthetic": ((32, 32, 3), 10),
                  "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}


def dataset_shape(name: str) -> tuple[tuple[int, ...], int]:
    """``(input shape of one sample, number of classes)`` of a named dataset, without loading it."""
    if name not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASET_SHAPES)}")
    return DATASET_SHAPES[name]


def load_dataset(name: str, seed: int = 0, data_dir: str | None = None, **kwargs) -> Dataset:
    """Load a dataset by name.

    Args:
      name: a key of ``DATASETS`` (``"digits"``, ``"synthetic"``, ``"cifar10"``, ``"cifar100"``).
      seed: the dataset's seed (train/test split or generation).
      data_dir: where downloaded data lives (CIFAR; unused by digits and synthetic).
      **kwargs: passed on to the loader (e.g. ``n_train`` for synthetic).
    Returns:
      the :class:`Dataset`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](seed=seed, data_dir=data_dir, **kwargs)
