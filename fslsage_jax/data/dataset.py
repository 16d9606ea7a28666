"""The :class:`Dataset` type every image source returns (its own module so that the
sources and the CIFAR reader both import it without importing each other)."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A classification dataset: images ``[N, H, W, C]`` (float32, or uint8 with a ``transform``),
    int32 labels ``[N]``.

    ``transform``: the on-device ``transform(x, rng, train) -> float32`` the raw
    images need (augmentation, normalisation), or None to use them as they are.
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    transform: Callable | None = None
