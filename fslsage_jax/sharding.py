"""The client axis sharded over devices: a 1-D ``Mesh`` with axis ``"clients"``.

Every simulated client is a slice of one pytree with a leading client axis
(see :mod:`fslsage_jax.algorithms.engine`). With several local devices the
client axis of the state and of the client data is split over them with
``NamedSharding(mesh, P("clients"))``; what all clients share (a single server,
frozen weights, the round counter) is replicated with ``P()``. The compiled
round is unchanged: XLA (GSPMD) partitions it from the input shardings, so
vmapped client steps run where their clients live and the shared server
gathers what it consumes. The result equals the single-device one up to the
order of floating-point reductions over clients.

Multi-host: call ``jax.distributed.initialize()`` in every process before
anything else; ``jax.devices()`` then lists all hosts' devices and
:func:`client_mesh` spans them (see BENCHMARKS.md for a launch example).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "clients"

def resolve_devices(devices: int | str | None) -> list:
    """The devices to shard over.

    Args:
      devices: a count ``N >= 1`` (the first N of ``jax.devices()``), or
        ``0`` / ``None`` / ``"auto"`` for all of them.
    Returns:
      a list of devices.
    """
    all_devices = jax.devices()
    if devices in (None, 0, "0", "auto"):
        return all_devices
    n = int(devices)
    if n < 0 or n > len(all_devices):
        raise ValueError(f"devices={n}: {len(all_devices)} {jax.default_backend()} device(s) available")
    return all_devices[:n]


def client_mesh(devices: int | str | None = None) -> Mesh:
    """A 1-D mesh with axis ``"clients"`` over the devices chosen by :func:`resolve_devices`."""
    return Mesh(np.array(resolve_devices(devices)), (AXIS,))


def check_divisible(num_clients: int, mesh: Mesh) -> None:
    """Raise ``ValueError`` unless ``num_clients`` splits evenly over the mesh."""
    n = mesh.size
    if num_clients % n:
        raise ValueError(f"{num_clients} clients cannot be split evenly over {n} devices; "
                         f"use a number of clients divisible by {n} or --devices that divides it")


def state_shardings(state: Any, client_fields: tuple[str, ...], mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` matching ``state`` (an algorithm's state NamedTuple).

    Fields named in ``client_fields`` (``AlgorithmDef.client_fields``) are split on
    axis 0; every other field (round counter, shared server, frozen weights, fields
    added later) is replicated, which is always correct.
    """
    split, rep = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    sharded = set(client_fields)
    fields = {f: jax.tree_util.tree_map(lambda _, s=(split if f in sharded else rep): s, v)
              for f, v in zip(state._fields, state)}
    return type(state)(**fields)


def data_shardings(data: Any, mesh: Mesh) -> Any:
    """Shardings for client data (``x``, ``y``, ``counts``): every leaf split on axis 0."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P(AXIS)), data)


def shard_state(state: Any, client_fields: tuple[str, ...], mesh: Mesh) -> Any:
    """Place ``state`` on the mesh: client-axis fields split, the rest replicated."""
    check_divisible(jax.tree_util.tree_leaves(state.clients)[0].shape[0], mesh)
    return jax.device_put(state, state_shardings(state, client_fields, mesh))


def shard_data(data: Any, mesh: Mesh) -> Any:
    """Place client data (``ClientArrays``) on the mesh, split over clients."""
    check_divisible(data.counts.shape[0], mesh)
    return jax.device_put(data, data_shardings(data, mesh))


def sharded_round(run_round: Callable, client_fields: tuple[str, ...], mesh: Mesh) -> Callable:
    """Wrap ``run_round`` so the returned state keeps the client sharding.

    XLA chooses the output shardings of a compiled round; putting the state
    back on the mesh layout (a no-op when it already is) keeps the input
    shardings of the next round identical, hence no recompilation.
    """
    def run(state, data, key):
        state, metrics = run_round(state, data, key)
        return jax.device_put(state, state_shardings(state, client_fields, mesh)), metrics
    return run


def shard_all(client_fields: tuple[str, ...], algo: Any, state: Any, data: Any,
              devices: int | str | None = None) -> tuple[Any, Any, Any]:
    """Shard a simulation over ``devices`` (see :func:`resolve_devices`).

    Args:
      client_fields: the state fields with a client axis (``AlgorithmDef.client_fields``).
      algo: the ``Algorithm``; its ``run_round`` is wrapped by :func:`sharded_round`.
      state, data: the initial ``State`` and the ``ClientArrays``.
    Returns:
      ``(state, data, algo)`` placed on a ``"clients"`` mesh.
    Raises:
      ValueError: when the number of clients is not divisible by the device count.
    """
    mesh = client_mesh(devices)
    state, data = shard_state(state, client_fields, mesh), shard_data(data, mesh)
    return state, data, algo._replace(run_round=sharded_round(algo.run_round, client_fields, mesh))


def parse_devices(text: str) -> int | str:
    """Parse a ``--devices`` value: a positive count, or ``0`` / ``auto`` for all devices."""
    if str(text).strip().lower() in ("0", "auto"):
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: a positive device count, or 0/auto for all")
    return n
