"""Splitting a training set over m clients, and padded client arrays.

- ``iid``: shuffle, equal shards of floor(n/m).
- ``dirichlet`` (Hsu et al. 2019, as in the FSL-SAGE code): client i draws class
  proportions p_i ~ Dir(alpha); each client receives floor(n/m) samples, drawn
  without replacement one at a time by p_i renormalised over the classes that
  still have samples. Smaller alpha = more heterogeneous clients.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal random shards of floor(n/m) indices (shuffled order); the rest is dropped."""
    n = len(labels)
    per = n // num_clients
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i * per:(i + 1) * per] for i in range(num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int,
                        seed: int) -> list[np.ndarray]:
    """Dirichlet label skew with floor(n/m) samples per client (see module docstring)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    per = len(labels) // num_clients
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    left = np.array([len(p) for p in pools], np.int64)
    props = rng.dirichlet(alpha * np.ones(num_classes), size=num_clients)
    parts = []
    for i in range(num_clients):
        take = []
        for _ in range(per):
            p = props[i] * (left > 0)
            if p.sum() <= 0:          # the client's classes are all used up: any class left
                p = (left > 0).astype(np.float64)
            c = rng.choice(num_classes, p=p / p.sum())
            left[c] -= 1
            take.append(pools[c][left[c]])
        parts.append(np.array(take, np.int64))
    return parts


def partition(labels: np.ndarray, num_clients: int, distribution: str = "iid", alpha: float = 1.0,
              num_classes: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of each client's shard.

    Args:
      labels: int labels ``[n]``.
      num_clients: m.
      distribution: ``"iid"`` or ``"dirichlet"``.
      alpha: Dirichlet concentration (> 0).
      num_classes: number of classes (default: max label + 1).
      seed: partition seed.
    """
    n = len(labels)
    if num_clients < 1 or num_clients > n:
        raise ValueError(f"num_clients={num_clients} must be between 1 and the {n} samples")
    if distribution == "iid":
        return partition_iid(labels, num_clients, seed)
    if distribution == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        c = int(num_classes if num_classes is not None else np.max(labels) + 1)
        return partition_dirichlet(labels, num_clients, alpha, c, seed)
    raise ValueError(f"unknown distribution {distribution!r}; choose from ['dirichlet', 'iid']")


class ClientData(NamedTuple):
    """Padded client arrays: ``x [m, n_max, ...]``, ``y [m, n_max]``, ``counts [m]``."""
    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """``[m, n_max]`` True on real samples."""
        return np.arange(self.x.shape[1])[None, :] < self.counts[:, None]


def to_client_arrays(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> ClientData:
    """Stack each client's shard into zero-padded arrays (uneven shards allowed)."""
    m, n_max = len(parts), max(len(p) for p in parts)
    cx = np.zeros((m, n_max, *x.shape[1:]), x.dtype)
    cy = np.zeros((m, n_max, *y.shape[1:]), np.int32)
    for i, p in enumerate(parts):
        cx[i, :len(p)], cy[i, :len(p)] = x[p], y[p]
    return ClientData(cx, cy, np.array([len(p) for p in parts], np.int32))


def class_histogram(data: ClientData, num_classes: int) -> np.ndarray:
    """``[m, C]`` number of real samples of each class per client."""
    return np.stack([np.bincount(data.y[i, :c], minlength=num_classes)
                     for i, c in enumerate(data.counts)])
