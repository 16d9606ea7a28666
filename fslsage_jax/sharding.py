"""The client axis sharded over devices: a 1-D ``Mesh`` with axis ``"clients"``.

Every simulated client is a slice of one pytree with a leading client axis
(see :mod:`fslsage_jax.algorithms.engine`). With several local devices the
client axis of the state and of the client data is split over them with
``NamedSharding(mesh, P("clients"))``; what all clients share (a single server,
frozen weights, the round counter) is replicated with ``P()``. The round's
programs are compiled with that layout declared as the state's output sharding
(``ALGORITHMS[name](split, cfg, n_max, state_sharding=state_sharding(mesh))``), so
the state stays where it is between rounds; XLA (GSPMD) partitions the round from
the input shardings, so
vmapped client steps run where their clients live and the shared server
gathers what it consumes. The result equals the single-device one up to the
order of floating-point reductions over clients.

Multi-host: call ``jax.distributed.initialize()`` in every process before
anything else; ``jax.devices()`` then lists all hosts' devices and
:func:`client_mesh` spans them (see BENCHMARKS.md for a launch example).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fslsage_jax.algorithms.base import ClientState, State

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
        hint = (f" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting)"
                if jax.default_backend() == "cpu" else "")
        raise ValueError(f"devices={n}: {len(all_devices)} {jax.default_backend()} device(s) available{hint}")
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


def state_sharding(mesh: Mesh) -> State:
    """The sharding prefix of every algorithm's :class:`~fslsage_jax.algorithms.base.State`:
    ``clients`` (shared and own) split on axis 0, everything else (round counter, the
    shared server, frozen weights) replicated."""
    split, rep = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    return State(rep, ClientState(split, split), rep, rep)


def data_shardings(data: Any, mesh: Mesh) -> Any:
    """Shardings for client data (``x``, ``y``, ``counts``): every leaf split on axis 0."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P(AXIS)), data)


def shard_state(state: State, mesh: Mesh) -> State:
    """Place ``state`` on the mesh: ``clients`` split, the rest replicated."""
    check_divisible(jax.tree_util.tree_leaves(state.clients)[0].shape[0], mesh)
    return jax.device_put(state, state_sharding(mesh))


def shard_data(data: Any, mesh: Mesh) -> Any:
    """Place client data (``ClientArrays``) on the mesh, split over clients."""
    check_divisible(data.counts.shape[0], mesh)
    return jax.device_put(data, data_shardings(data, mesh))


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


DISTRIBUTED_TIMEOUT_S = 60


def parse_coordinator(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``; ``ValueError`` when it is not of that form."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {text}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Poll a TCP connection to the coordinator until it answers.

    Raises:
      TimeoutError: nothing accepted a connection on ``host:port`` within ``timeout_s``
        seconds (jax itself would abort the process with a stack trace instead).
    """
    import socket
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"--coordinator {host}:{port}: no answer within {timeout_s:g} s "
                                   f"(is process 0 running?)") from None
            time.sleep(0.2)


def init_distributed(coordinator: str, num_processes: int, process_id: int,
                     timeout_s: float = DISTRIBUTED_TIMEOUT_S) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` after checking the arguments.

    Call it before any other JAX work. Every process then sees all processes' devices in
    ``jax.devices()`` and :func:`client_mesh` spans them. On CPU, collectives go through
    gloo. Process 0 hosts the coordinator on ``coordinator``'s port; the others first wait
    (up to ``timeout_s``) until it accepts connections.

    Args:
      coordinator: ``HOST:PORT`` of process 0.
      num_processes: number of processes (>= 1).
      process_id: this process, ``0 <= process_id < num_processes``.
      timeout_s: how long to wait for the coordinator (and jax's own registration).
    Raises:
      ValueError: malformed arguments; TimeoutError: the coordinator never answered.
    """
    host, port = parse_coordinator(coordinator)
    if int(num_processes) != num_processes or num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: must be a positive integer")
    if int(process_id) != process_id or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id}: must lie in 0..{num_processes - 1} "
                         f"for --num-processes {num_processes}")
    if process_id != 0:
        wait_for_coordinator(host, port, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"{host}:{port}", num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=int(max(timeout_s, 1)))
