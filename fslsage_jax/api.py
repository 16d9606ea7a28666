"""The entry for your own model and data: :func:`train`.

Give it an algorithm (a name or your own ``AlgorithmDef``), a :class:`SplitModel`
of any flax modules, the clients' arrays and a test set; it returns a
:class:`~fslsage_jax.simulate.Result` with the final state, the trained global
model and the summary::

    result = fslsage_jax.train(name, split, (x_clients, y_clients), (x_test, y_test),
                               Config(num_clients=4, batch_size=32), rounds=20)   # name: a key of ALGORITHMS
    logits, _ = apply_part(split.server, result.server,
                           apply_part(split.client, result.client, x_test, False)[0], False)
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.records import write_json_atomic
from fslsage_jax.simulate import Result, RoundEvent, RunOptions, Task, run
from fslsage_jax.split import SplitModel, init_split

PROVENANCE = "user_objects"


def client_arrays(clients: Any) -> ClientArrays:
    """Client data as padded arrays.

    Args:
      clients: ``(x [m, n, ...], y [m, n, ...])`` (every client holds n samples),
        ``(x, y, counts [m])`` or a ``ClientArrays`` (padded: client i's first
        ``counts[i]`` rows are real), or a list of per-client ``(x_i, y_i)`` pairs of
        any lengths (padded here with zeros).
    Raises:
      ValueError: arrays whose client or sample axes disagree.
    """
    if isinstance(clients, list):
        if not clients:
            raise ValueError("clients: an empty list")
        counts = np.array([len(x) for x, _ in clients], np.int32)
        if any(len(x) != len(y) for x, y in clients):
            raise ValueError("clients: every client's x and y must have the same length")
        n_max = int(counts.max())
        pad = lambda a: np.concatenate([a, np.zeros((n_max - len(a), *a.shape[1:]), a.dtype)])
        x = np.stack([pad(np.asarray(x)) for x, _ in clients])
        y = np.stack([pad(np.asarray(y)) for _, y in clients])
        return ClientArrays(x, y, counts)
    if isinstance(clients, tuple) and len(clients) == 2:
        x, y = (np.asarray(a) for a in clients)
        counts = np.full(x.shape[0], x.shape[1] if x.ndim > 1 else 0, np.int32)
    else:
        x, y, counts = (np.asarray(a) for a in clients)
    if x.ndim < 2 or y.shape[:2] != x.shape[:2] or counts.shape != x.shape[:1]:
        raise ValueError(f"clients: x {x.shape}, y {y.shape} and counts {counts.shape} must be "
                         f"[clients, samples, ...], [clients, samples, ...] and [clients]")
    if counts.min() < 0 or counts.max() > x.shape[1]:
        raise ValueError(f"clients: counts must lie in [0, {x.shape[1]}] (the padded length)")
    return ClientArrays(x, y, counts.astype(np.int32))


def check_split(split: SplitModel) -> None:
    """Initialise ``split`` abstractly and raise a one-line error if a part cannot be
    called as the library calls it (``module(x, train=...)`` or ``module(x)``)."""
    try:
        jax.eval_shape(lambda k: init_split(split, k), jax.random.key(0))
    except TypeError as e:
        if "train" in str(e):
            raise TypeError(f"a part of split model {split.name!r} does not accept the train= keyword "
                            f"its __call__ signature promises (e.g. nn.Sequential passes it to its first "
                            f"layer): give the part `def __call__(self, x, train: bool = False)` or use "
                            f"a module whose __call__ has no **kwargs ({e})") from None
        raise


def train(algorithm: str | AlgorithmDef, split: SplitModel, clients: Any, test: tuple,
          config: Config | None = None, *, rounds: int = 10, seed: int = 0,
          callbacks: Sequence[Callable[[RoundEvent], bool | None]] = (), **options) -> Result:
    """Train an algorithm on your own split model and arrays.

    Args:
      algorithm: a name of ``ALGORITHMS`` or an ``AlgorithmDef`` (e.g. your own).
      split: a :class:`SplitModel` of any flax modules (parts that take ``train=`` get it).
      clients: the clients' data, see :func:`client_arrays`.
      test: ``(x_test, y_test)``.
      config: hyperparameters (default ``Config(num_clients=<clients in the data>)``);
        ``num_clients`` must equal the number of clients in the data.
      rounds, seed: rounds to run and the seed.
      callbacks: ``callback(event: RoundEvent) -> bool | None`` after each round; True stops.
      **options: any other :class:`~fslsage_jax.simulate.RunOptions` field (``out_dir``,
        ``cohort_size``, ``eval_every``, ``comm_budget_bytes``, ``progress``, ...).
    Returns:
      a :class:`~fslsage_jax.simulate.Result`: ``state``, the global ``client`` and
      ``server`` variables, ``summary``, ``records``, ``algorithm``.
    Raises:
      ValueError: the data's shapes or client count disagree with ``config``.
      TypeError: a part of ``split`` cannot be called as the library calls it.
    """
    data = client_arrays(clients)
    m = int(data.counts.shape[0])
    cfg = config if config is not None else Config(num_clients=m)
    if cfg.num_clients != m and options.get("cohort_size") is None:
        raise ValueError(f"config.num_clients={cfg.num_clients} but clients holds {m} clients: "
                         f"use Config(num_clients={m}, ...)")
    test_x, test_y = (np.asarray(a) for a in test)
    if test_x.shape[1:] != data.x.shape[2:]:
        raise ValueError(f"test inputs have sample shape {test_x.shape[1:]}, the clients' have "
                         f"{data.x.shape[2:]}")
    check_split(split)
    opts = RunOptions(rounds=rounds, seed=seed, **{"progress": False, **options})
    if opts.out_dir and not opts.resume and jax.process_index() == 0:
        os.makedirs(opts.out_dir, exist_ok=True)
        name = algorithm if isinstance(algorithm, str) else algorithm.name
        write_json_atomic(os.path.join(opts.out_dir, "config.json"),
                          {"provenance": PROVENANCE, "algo": name, "model": split.name,
                           "config": dataclasses.asdict(cfg), "rounds": rounds, "seed": seed})
    return run(algorithm, Task(split, cfg, data, test_x, test_y), opts, callbacks)
