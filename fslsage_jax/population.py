"""Population-scale simulation: a cohort of K clients out of a population of N per round,
with each client's persistent state kept on the host between its rounds.

``num_clients`` N is the population; with ``cohort_size`` K < N the compiled round
is built for K clients (``Config.num_clients = K``: one program, no recompilation
when the cohort changes) and every round

1. draws K distinct clients (:func:`sample_cohort`: seeded by the run seed and the
   round index, so a resumed run draws the same cohorts; optionally weighted by
   shard size), in increasing id order (the shared server consumes uploads in
   client order);
2. gathers their persistent state (``state.clients.own`` of
   :class:`~fslsage_jax.algorithms.base.State`: client optimizer state; FSL-SAGE's
   auxiliary model, its optimizer state and alignment buffer; CSE-FSL's auxiliary
   optimizer state; SplitFed-MS's server-copy optimizer states) from a
   :class:`ClientStore` and their padded shards from the population data, and runs
   the round on them. ``state.clients.shared`` (what the round's aggregation
   averages) is identical for every client after a round, so the K rows the
   previous round left on the device are the global copy and stay there;
3. writes the cohort's persistent state back to the store.

Aggregation weights are n_i / sum over the cohort (the round's ``end`` uses the
counts it is given); the server and FSL-SAGE's alignment only see the cohort; the
ledger counts what the round returns (``models`` = K, ``aux_down`` = the cohort's
aligned clients).

A client away for several rounds keeps its persistent state as it left it,
including its optimizer moments and step count (the authors' code keeps each
client's optimizer object across rounds; nothing decays while a client is away).
A client never drawn holds the initial state and costs no memory: the store
allocates rows only for clients that have taken part. The store
(:class:`~fslsage_jax.client_store.ClientStore`) keeps its rows in RAM up to a
limit and in memory-mapped block files on disk beyond it (``store``: ``auto``, the
default, puts what exceeds :data:`~fslsage_jax.client_store.RAM_LIMIT_BYTES` on disk;
``ram``; ``disk``), in ``RUN_DIR/population_store/`` (a temporary directory without a
run directory, or in processes other than 0); the directory is scratch, removed by
``close()``: a checkpoint holds its own copy of the rows (``population.npz``).

With full participation (K = N, the default) none of this runs: the state stays
on the device (:class:`AllClients`). The simulation loop drives both through the
same interface: ``start(state)``, ``inputs(state, t) -> (state, data)``,
``write_back(state)``, ``save(dir)``, ``load(dir)``, ``summary()``, ``close()``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from fslsage_jax import sharding
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.client_store import RAM_LIMIT_BYTES, STORES, ClientStore, check_store, ram_limit

__all__ = ["STORE_DIR", "STORE_FILE", "AllClients", "ClientStore", "Cohort", "RAM_LIMIT_BYTES", "STORES",
           "bytes_per_client", "check_cohort", "fetch", "participation", "sample_cohort", "store_dir"]

STORE_FILE = "population.npz"
STORE_DIR = "population_store"
_TAG = 0x636F686F          # "coho": keeps cohort draws apart from other uses of the seed


def check_cohort(cohort_size: int, population: int) -> None:
    """Raise ``ValueError`` unless ``1 <= cohort_size <= population``."""
    if int(cohort_size) != cohort_size or not 1 <= cohort_size <= population:
        raise ValueError(f"cohort size {cohort_size} must be an integer between 1 and the "
                         f"{population} clients of the population")


def sample_cohort(seed: int, t: int, population: int, k: int,
                  sizes: np.ndarray | None = None) -> np.ndarray:
    """The clients of round ``t``: ``k`` distinct ids of ``range(population)``, sorted.

    Args:
      seed: the run seed; with ``t`` the only randomness (a resume redraws the same cohort).
      t: the round index.
      population: N.
      k: cohort size K, ``1 <= K <= N``.
      sizes: shard sizes ``[N]`` to draw with probability proportional to (successive
        sampling without replacement; clients with no samples are never drawn), or None
        for uniform.
    Returns:
      int64 ``[k]`` in increasing order.
    """
    check_cohort(k, population)
    if k == population:
        return np.arange(population, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(t), _TAG])
    if sizes is None:
        ids = rng.choice(population, size=k, replace=False)
    else:
        p = np.asarray(sizes, np.float64)
        if np.count_nonzero(p) < k:
            raise ValueError(f"weighted cohort of {k}: only {np.count_nonzero(p)} clients hold data")
        ids = rng.choice(population, size=k, replace=False, p=p / p.sum())
    return np.sort(ids.astype(np.int64))


def fetch(tree: Any) -> Any:
    """Device arrays to host numpy; across processes, every process gets the global value."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class AllClients:
    """Full participation: every client takes part in every round, the whole state and
    the clients' data stay on the device.

    Args:
      data: padded client data (``x [N, n_max, ...]``, ``y``, ``counts [N]``).
      place_data: put ``ClientArrays`` on the devices (default ``jax.device_put``).
    """

    def __init__(self, data: Any, place_data: Callable | None = None):
        self.population = int(np.shape(data.counts)[0])
        self.k = self.population
        arrays = ClientArrays(np.asarray(data.x), np.asarray(data.y), np.asarray(data.counts, np.int32))
        self.data = (place_data or jax.device_put)(arrays)

    def start(self, state: Any) -> None:
        """Nothing to keep off the device."""

    def inputs(self, state: Any, t: int) -> tuple[Any, ClientArrays]:
        """Round ``t``'s state and data: the state as it is, all clients' data."""
        return state, self.data

    def write_back(self, state: Any) -> None:
        """Nothing to write back: the state stays on the device."""

    def save(self, directory: str) -> None:
        """Nothing beyond the state to save."""

    def load(self, directory: str) -> None:
        """Nothing beyond the state to load."""

    def summary(self) -> dict:
        """No entries for the summary."""
        return {}

    def close(self) -> None:
        """Nothing to release."""


class Cohort:
    """K of N clients per round, their ``clients.own`` kept on the host between rounds
    (see the module docstring).

    Args:
      data: the population's padded client data (numpy ``x [N, n_max, ...]``, ``y``,
        ``counts [N]``).
      cohort_size: K.
      seed: the run seed (cohort draws).
      weighted: draw clients with probability proportional to their shard size.
      place_state, place_data: put a (host) state / ``ClientArrays`` on the devices
        (default ``jax.device_put``; sharded runs pass their mesh layout).
      store: where the store keeps its rows: ``auto`` (RAM up to
        :data:`~fslsage_jax.client_store.RAM_LIMIT_BYTES`, disk beyond), ``ram`` or ``disk``.
      store_dir: the directory of its disk blocks, owned by the store (None: a temporary one).
    """

    def __init__(self, data: Any, cohort_size: int, seed: int, weighted: bool = False,
                 place_state: Callable | None = None, place_data: Callable | None = None,
                 store: str = "auto", store_dir: str | None = None):
        check_store(store)
        self.store_kind, self.store_dir = store, store_dir
        self.x, self.y = np.asarray(data.x), np.asarray(data.y)
        self.counts = np.asarray(data.counts, np.int32)
        self.population = int(self.counts.shape[0])
        check_cohort(cohort_size, self.population)
        self.k, self.seed, self.weighted = int(cohort_size), int(seed), bool(weighted)
        self.place_state = place_state or jax.device_put
        self.place_data = place_data or jax.device_put
        self.store: ClientStore | None = None
        self.last_cohort: np.ndarray | None = None

    def cohort(self, t: int) -> np.ndarray:
        """The sorted client ids of round ``t``."""
        return sample_cohort(self.seed, t, self.population, self.k,
                             self.counts if self.weighted else None)

    def start(self, state: Any) -> None:
        """Start the store from a freshly initialised K-client state (its row 0 of
        ``clients.own`` is every client's initial persistent state)."""
        rows = fetch(state.clients.own)
        self.close()
        self.store = ClientStore(jax.tree_util.tree_map(lambda x: np.asarray(x)[0], rows),
                                 self.population, ram_bytes=ram_limit(self.store_kind),
                                 directory=self.store_dir)

    def inputs(self, state: Any, t: int) -> tuple[Any, ClientArrays]:
        """Round ``t``'s cohort: ``state`` with the cohort's own rows gathered from the
        store, and the cohort's padded shards, on the devices."""
        ids = self.cohort(t)
        self.last_cohort = ids
        state = state._replace(clients=state.clients._replace(own=self.store.gather(ids)))
        data = ClientArrays(self.x[ids], self.y[ids], self.counts[ids])
        return self.place_state(state), self.place_data(data)

    def write_back(self, state: Any) -> None:
        """Store the cohort's ``clients.own`` rows after its round."""
        self.store.scatter(self.last_cohort, fetch(state.clients.own))

    def save(self, directory: str) -> None:
        """Write the store into ``directory`` (a checkpoint being written)."""
        self.store.save(os.path.join(directory, STORE_FILE))

    def load(self, directory: str) -> None:
        """Read the store written by :meth:`save` from ``directory``."""
        path = os.path.join(directory, STORE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: no {STORE_FILE} (not a checkpoint of a cohort run)")
        self.store.load(path)

    def summary(self) -> dict:
        """Cohort size, draw, clients that took part and the store's bytes (of them on disk)."""
        return {"cohort_size": self.k, "cohort_weighted": self.weighted,
                "clients_taken_part": self.store.num_stored,
                "population_store_bytes": self.store.nbytes,
                "population_store_disk_bytes": self.store.disk_nbytes}

    def close(self) -> None:
        """Remove the store's disk blocks (the checkpoints keep their own copies)."""
        if self.store is not None:
            self.store.close()


def bytes_per_client(state: Any) -> int:
    """Bytes one client keeps across rounds (``clients.own``), from a state with a client
    axis (shapes only: works on ``jax.eval_shape`` output)."""
    return int(sum(np.prod(x.shape[1:], dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(state.clients.own)))


def store_dir(out_dir: str | None) -> str | None:
    """Where a cohort run's disk store goes: ``out_dir/population_store`` in process 0 of a
    run with an output directory, else None (a temporary directory)."""
    if out_dir and jax.process_index() == 0:
        return os.path.join(out_dir, STORE_DIR)
    return None


def participation(clients: Any, cohort_size: int | None, seed: int, weighted: bool = False,
                  mesh: Any = None, store: str = "auto", directory: str | None = None) -> AllClients | Cohort:
    """:class:`AllClients` (``cohort_size`` None or the population) or :class:`Cohort` for the
    padded ``clients`` data, placed on ``mesh`` (a client mesh of :mod:`fslsage_jax.sharding`)
    or on the default device; a cohort's store is ``store`` with its disk blocks in
    ``directory`` (see :class:`Cohort`)."""
    check_store(store)
    place_data = place_state = None
    if mesh is not None:
        place_data = lambda d: jax.device_put(d, sharding.data_shardings(d, mesh))
        place_state = lambda s: jax.device_put(s, sharding.state_sharding(mesh))
    population = int(np.shape(clients.counts)[0])
    if cohort_size in (None, population):
        if mesh is not None:
            sharding.check_divisible(population, mesh)
        return AllClients(clients, place_data)
    return Cohort(clients, cohort_size, seed, weighted, place_state, place_data, store, directory)
