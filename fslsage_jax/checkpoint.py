"""Checkpoints of a simulation run, written so that a kill at any moment loses nothing.

A checkpoint is a directory ``RUN_DIR/checkpoints/round_000010/`` holding the
algorithm's state pytree (every array leaf:
client, server and auxiliary parameters, optimizer states, BatchNorm
statistics, alignment buffers, the round counter) saved with orbax, and
``meta.json`` (completed rounds, the communication ledger, accumulated wall
time). RNG keys are not saved: every round's key is ``fold_in(round_key, t)``
of the seed and the round index, so the round counter is enough.

Frozen base weights shared by all clients (``State.frozen``, if the state has
that field) are never saved: they are deterministic from the seed and the
pretrained files, and a restore takes them from a fresh ``algo.init``.

Atomicity: the state and ``meta.json`` are written into a hidden
``.tmp-round_N`` directory, orbax's write is awaited, the files are synced,
and only then is the directory renamed to ``round_N`` (a rename is atomic).
A directory without ``meta.json`` or with a ``.tmp-`` name is never read, so a
kill during a save leaves the previous checkpoint the latest valid one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CKPT_DIR = "checkpoints"
META = "meta.json"
_NAME = re.compile(r"^round_(\d+)$")


class Checkpoint(NamedTuple):
    """A valid checkpoint on disk: its directory, completed rounds and metadata."""
    path: str
    rounds: int
    meta: dict


def strip_frozen(state: Any) -> Any:
    """``state`` without its shared frozen weights (unchanged if it has none)."""
    if getattr(state, "frozen", None) is None:
        return state
    return state._replace(frozen=None)


def _leaf_dict(state: Any) -> dict:
    leaves = jax.tree_util.tree_leaves(strip_frozen(state))
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str) -> list[Checkpoint]:
    """Valid checkpoints of ``run_dir`` (complete, with ``meta.json``), oldest first."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isfile(os.path.join(path, META)):
            continue
        try:
            with open(os.path.join(path, META)) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        found.append(Checkpoint(path, int(m.group(1)), meta))
    return sorted(found, key=lambda c: c.rounds)


def latest(run_dir: str) -> Checkpoint | None:
    """The newest valid checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: str, state: Any, rounds: int, meta: dict, keep: int = 3,
         extra: Callable[[str], None] | None = None) -> Checkpoint:
    """Save ``state`` after ``rounds`` completed rounds, atomically, and prune old checkpoints.

    Args:
      run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
      state: the simulation state (its ``frozen`` field, if any, is not saved).
      rounds: number of completed rounds (the checkpoint's name).
      meta: JSON-serialisable extras (ledger counts, wall time, ...).
      keep: how many of the newest checkpoints to keep (>= 1).
      extra: ``extra(directory)`` writes more files into the checkpoint before it is
        published (a cohort run's population store), synced by the caller.
    Returns:
      the new :class:`Checkpoint` (on disk and synced when this returns).
    """
    import orbax.checkpoint as ocp

    root = os.path.join(os.path.abspath(run_dir), CKPT_DIR)     # orbax needs absolute paths
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"round_{rounds:06d}")
    tmp = os.path.join(root, f".tmp-round_{rounds:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    leaves = _leaf_dict(state)
    ckptr = _checkpointer(ocp)
    try:
        ckptr.save(os.path.join(tmp, "state"), leaves)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    if extra is not None:
        extra(tmp)
    meta = {**meta, "rounds": rounds, "num_leaves": len(leaves),
            "shapes": [list(v.shape) for v in leaves.values()],
            "dtypes": [str(v.dtype) for v in leaves.values()]}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):           # a redone round after a resume: same content
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(run_dir, keep)
    return Checkpoint(final, rounds, meta)


def _checkpointer(ocp):
    """orbax's checkpointer; in a multi-process run this process saves and restores on its
    own (process 0 writes host arrays gathered from all processes; no cross-process barriers)."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def prune(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints and any leftover partial saves."""
    root = os.path.join(run_dir, CKPT_DIR)
    for c in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(c.path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def restore(ckpt: Checkpoint, template: Any) -> Any:
    """Load a checkpoint into the structure of ``template``.

    Args:
      ckpt: from :func:`latest`.
      template: a state of the same algorithm, model and config, e.g. a fresh
        ``algo.init(key)``; its ``frozen`` field (if any) is kept as it is.
    Returns:
      the restored state, on the template's devices.
    Raises:
      ValueError: the checkpoint does not match the template (other model or config).
    """
    import orbax.checkpoint as ocp

    bare = strip_frozen(template)
    leaves, treedef = jax.tree_util.tree_flatten(bare)
    shapes = [list(x.shape) for x in leaves]
    dtypes = [str(x.dtype) for x in leaves]
    if ckpt.meta.get("shapes") != shapes or ckpt.meta.get("dtypes") != dtypes:
        raise ValueError(f"checkpoint {ckpt.path} does not match this algorithm, model and "
                         f"configuration ({ckpt.meta.get('num_leaves')} saved arrays, "
                         f"{len(leaves)} expected, or other shapes)")
    abstract = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                for i, x in enumerate(leaves)}
    ckptr = _checkpointer(ocp)
    try:
        loaded = ckptr.restore(os.path.join(os.path.abspath(ckpt.path), "state"), abstract)
    finally:
        ckptr.close()
    # orbax hands back arrays committed to a device; an uncommitted template leaf (a fresh
    # jit(init) state) stays uncommitted, else jit compiles every program a second time
    restored = [loaded[f"leaf_{i:05d}"] for i in range(len(leaves))]
    restored = [r if getattr(x, "committed", True) else jnp.asarray(np.asarray(r))
                for x, r in zip(leaves, restored)]
    state = jax.tree_util.tree_unflatten(treedef, restored)
    frozen = getattr(template, "frozen", None)
    return state if frozen is None else state._replace(frozen=frozen)
