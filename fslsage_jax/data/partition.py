"""Splitting a training set over m clients, and padded client arrays.

- ``iid``: shuffle, equal shards of floor(n/m); the remainder is dropped.
- ``dirichlet`` (Hsu et al. 2019, as in the FSL-SAGE authors' code): client i
  draws class proportions p_i ~ Dir(alpha * 1_C); each client in turn receives
  exactly floor(n/m) samples, drawn one at a time without replacement (no index
  is given twice, across all clients): a class is chosen by p_i renormalised
  over the classes that still have unused samples, then an unused sample of
  that class is taken. Smaller alpha = more heterogeneous clients.

Every shard is returned in random order (not sorted). All randomness comes from
``np.random.default_rng(seed)``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

DISTRIBUTIONS = ("dirichlet", "iid")


def _check_clients(n: int, num_clients: int) -> None:
    if int(num_clients) != num_clients or not 1 <= num_clients <= n:
        raise ValueError(f"num_clients={num_clients} must be an integer between 1 and the "
                         f"{n} samples")


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                         f"with shape {labels.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Equal random shards.

    Args:
      labels: labels ``[n]`` (only their number is used).
      num_clients: m, between 1 and n.
      seed: shuffle seed.
    Returns:
      m int64 index arrays of floor(n/m) each, disjoint, in shuffled (not sorted)
      order; the n mod m left-over samples belong to no client.
    """
    n = len(labels)
    _check_clients(n, num_clients)
    per = n // num_clients
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i * per:(i + 1) * per] for i in range(num_clients)]


def _rank_within_class(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """For each position, how many earlier positions hold the same class."""
    order = np.argsort(classes, kind="stable")
    counts = np.bincount(classes, minlength=num_classes)
    first = np.cumsum(counts) - counts
    rank = np.empty_like(classes)
    rank[order] = np.arange(len(classes)) - first[classes[order]]
    return rank


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int,
                        seed: int) -> list[np.ndarray]:
    """Dirichlet label skew with exactly floor(n/m) samples per client.

    Implements the sequential scheme of the module docstring. It is computed in
    batches, which gives the same distribution: drawing from p_i renormalised
    over the non-exhausted classes is the same as drawing from p_i and skipping
    draws of exhausted classes, so each client draws its remaining quota at
    once, keeps the draws whose class still has samples, and repeats (at most
    C + 1 times). If every class with p_i > 0 is exhausted (possible when tiny
    alpha makes some p_i exactly 0), the client draws uniformly over the
    classes left; the reference code would fail there.

    Args:
      labels: int labels ``[n]`` in ``[0, num_classes)``.
      num_clients: m, between 1 and n.
      alpha: Dirichlet concentration, > 0 (small: skewed; large: near iid).
      num_classes: C.
      seed: seed of the proportions, the draws and the order within each class.
    Returns:
      m disjoint int64 index arrays of floor(n/m) each, in draw order (classes
      interleaved at random, not sorted).
    """
    labels = _check_labels(labels, num_classes)
    n = len(labels)
    _check_clients(n, num_clients)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha} must be a finite number > 0")
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_clients)
    perm = rng.permutation(n)
    pool = perm[np.argsort(labels[perm], kind="stable")]     # each class's samples, shuffled
    size = np.bincount(labels, minlength=num_classes)
    start = np.cumsum(size) - size                           # class c: pool[start[c]:][:size[c]]
    used = np.zeros(num_classes, np.int64)
    per = n // num_clients
    parts = []
    for p in props:
        taken = []
        need = per
        while need > 0:
            alive = used < size
            q = np.where(alive, p, 0.0)
            q = q / q.sum() if q.sum() > 0 else alive / alive.sum()
            draws = rng.choice(num_classes, size=need, p=q)
            rank = _rank_within_class(draws, num_classes)
            keep = rank < size[draws] - used[draws]          # the class still has a sample
            cls, rank = draws[keep], rank[keep]
            taken.append(pool[start[cls] + used[cls] + rank])
            used += np.bincount(cls, minlength=num_classes)
            need -= len(cls)
        parts.append(np.concatenate(taken).astype(np.int64))
    return parts


def partition(labels: np.ndarray, num_clients: int, distribution: str = "iid", alpha: float = 1.0,
              num_classes: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of each client's shard.

    Args:
      labels: int labels ``[n]``.
      num_clients: m, between 1 and n.
      distribution: ``"iid"`` or ``"dirichlet"``.
      alpha: Dirichlet concentration (> 0; unused for iid).
      num_classes: number of classes (default: max label + 1).
      seed: partition seed.
    Returns:
      m disjoint index arrays of floor(n/m) each, unsorted (see the two
      partition functions).
    """
    _check_clients(len(labels), num_clients)
    if distribution == "iid":
        return partition_iid(labels, num_clients, seed)
    if distribution == "dirichlet":
        c = int(num_classes) if num_classes is not None else int(np.max(labels)) + 1
        return partition_dirichlet(labels, num_clients, alpha, c, seed)
    raise ValueError(f"unknown distribution {distribution!r}; choose from {list(DISTRIBUTIONS)}")


class ClientData(NamedTuple):
    """Padded client arrays on the host.

    Attributes:
      x: ``[m, n_max, ...]`` samples; rows past a client's count are zeros.
      y: ``[m, n_max]`` int32 labels; padding is 0.
      counts: ``[m]`` int32 number of real samples per client.
    """
    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """``[m, n_max]`` bool, True on real samples (row index < count)."""
        return np.arange(self.y.shape[1])[None, :] < self.counts[:, None]


def to_client_arrays(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> ClientData:
    """Stack each client's shard into zero-padded arrays (uneven shards allowed).

    Args:
      x: samples ``[n, ...]``.
      y: labels ``[n]``.
      parts: m index arrays into ``x``/``y``; client i's rows keep the order of parts[i].
    Returns:
      :class:`ClientData` with n_max = the largest shard.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(parts) == 0:
        raise ValueError("parts is empty: need at least one client")
    parts = [np.asarray(p, dtype=np.intp) for p in parts]
    counts = np.array([len(p) for p in parts], np.int32)
    m, n_max = len(parts), int(counts.max())
    cx = np.zeros((m, n_max, *x.shape[1:]), x.dtype)
    cy = np.zeros((m, n_max, *y.shape[1:]), np.int32)
    for i, p in enumerate(parts):
        cx[i, :len(p)] = x[p]
        cy[i, :len(p)] = y[p]
    return ClientData(cx, cy, counts)


def class_histogram(data: ClientData, num_classes: int) -> np.ndarray:
    """Per-client class counts over the real (unpadded) rows.

    Args:
      data: padded client arrays.
      num_classes: C; every real label must lie in ``[0, C)``.
    Returns:
      int64 ``[m, C]``; row i sums to ``counts[i]``.
    """
    mask = data.mask
    client, y = np.nonzero(mask)[0], data.y[mask].astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    m = len(data.counts)
    return np.bincount(client * num_classes + y, minlength=m * num_classes).reshape(m, num_classes)
