"""The host store of a cohort run: each client's persistent state (``clients.own``) between
its rounds, in RAM or in memory-mapped block files on disk.

A client's state is one row of ``bytes_per_client`` bytes (its leaves' bytes, one after
the other). Rows are allocated only for clients written at least once, in blocks of about
``block_bytes``; every other client reads the initial row. A block is a numpy array in
RAM while the blocks held in RAM stay within ``ram_bytes``, and a ``.npy`` file
(``block_00000.npy``, ...) in the store's directory after that, opened with
``np.load(mmap_mode="r+")`` for each gather or scatter and unmapped right after: the
pages of a disk block are the kernel's page cache, not the process's memory, so what
the process holds is the RAM blocks plus the cohort being copied.

The working files are scratch: a checkpoint holds its own copy of the rows
(:meth:`ClientStore.save`, streamed block by block into ``population.npz`` inside the
checkpoint directory being written), and :meth:`ClientStore.load` refills the store from
that copy, so a kill at any moment never leaves a checkpoint pointing at half-written
rows.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
from typing import Any

import jax
import numpy as np

STORES = ("auto", "ram", "disk")
RAM_LIMIT_BYTES = 2 << 30      # "auto": blocks beyond this many bytes go to disk
_U8 = np.uint8


def check_store(store: str) -> None:
    """Raise ``ValueError`` unless ``store`` is one of :data:`STORES`."""
    if store not in STORES:
        raise ValueError(f"population store {store!r}: expected one of {', '.join(STORES)}")


def ram_limit(store: str) -> float:
    """Bytes of blocks a store of kind ``store`` keeps in RAM: ``ram`` all, ``disk`` none,
    ``auto`` up to :data:`RAM_LIMIT_BYTES` (read when called)."""
    check_store(store)
    return {"ram": float("inf"), "disk": 0.0, "auto": float(RAM_LIMIT_BYTES)}[store]


def _remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class ClientStore:
    """Per-client persistent state of a population, on the host (see the module docstring).

    Memory is ``rows taken part * bytes_per_client`` (rounded up to a block), never
    ``N * bytes_per_client``; with a ``ram_bytes`` limit, what lies beyond it is on disk.

    Args:
      initial: pytree of one client's initial state (no client axis).
      population: N.
      block_bytes: allocation granularity (bytes of a block).
      ram_bytes: bytes of blocks kept in RAM before further blocks go to disk (default:
        all in RAM; see :func:`ram_limit`).
      directory: where disk blocks go; the store owns it (emptied when the first disk block
        is made, removed by :meth:`close`). None: a temporary directory, also removed by
        :meth:`close` (or when the store is garbage-collected).
    """

    def __init__(self, initial: Any, population: int, block_bytes: int = 64 << 20,
                 ram_bytes: float | None = None, directory: str | None = None):
        leaves, self.treedef = jax.tree_util.tree_flatten(initial)
        self.initial = [np.asarray(x) for x in leaves]
        self.population = int(population)
        self.sizes = [int(x.nbytes) for x in self.initial]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()
        self.bytes_per_client = self.offsets[-1]
        self.row_bytes = max(self.bytes_per_client, 1)
        self.block_rows = max(1, block_bytes // self.row_bytes)
        self.ram_bytes = float("inf") if ram_bytes is None else float(ram_bytes)
        self.directory = directory
        self.slot = np.full(self.population, -1, np.int64)   # client id -> row, -1: initial
        self.blocks: list[np.ndarray | str] = []              # RAM array or .npy path, [block_rows, row]
        self.num_stored = 0
        self._dir: str | None = None
        self._finalizer = None

    # -- layout -------------------------------------------------------------------------
    @property
    def block_nbytes(self) -> int:
        """Bytes of one block."""
        return self.block_rows * self.row_bytes

    @property
    def ram_nbytes(self) -> int:
        """Bytes of the blocks in RAM (plus the id table)."""
        return sum(isinstance(b, np.ndarray) for b in self.blocks) * self.block_nbytes + self.slot.nbytes

    @property
    def disk_nbytes(self) -> int:
        """Bytes of the blocks on disk (their files are sparse until written)."""
        return sum(isinstance(b, str) for b in self.blocks) * self.block_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of all allocated rows, in RAM and on disk (plus the id table)."""
        return self.ram_nbytes + self.disk_nbytes

    def _disk_dir(self) -> str:
        if self._dir is None:
            if self.directory is None:
                self._dir = tempfile.mkdtemp(prefix="fslsage-population-")
            else:
                _remove(self.directory)                 # a killed run's leftovers
                os.makedirs(self.directory)
                self._dir = self.directory
            self._finalizer = weakref.finalize(self, _remove, self._dir)
        return self._dir

    def _grow(self, need: int) -> None:
        while len(self.blocks) * self.block_rows < need:
            if (len(self.blocks) + 1) * self.block_nbytes <= self.ram_bytes:
                self.blocks.append(np.empty((self.block_rows, self.row_bytes), _U8))
                continue
            path = os.path.join(self._disk_dir(), f"block_{len(self.blocks):05d}.npy")
            np.lib.format.open_memmap(path, mode="w+", dtype=_U8, shape=(self.block_rows, self.row_bytes))
            self.blocks.append(path)

    def _open(self, b: int) -> np.ndarray:
        """Block ``b``: the RAM array, or the file mapped until the result is dropped."""
        blk = self.blocks[b]
        return blk if isinstance(blk, np.ndarray) else np.load(blk, mmap_mode="r+")

    def _by_block(self, slots: np.ndarray):
        """``(block, mask over slots, rows in the block)`` for the blocks ``slots`` (>= 0) touch."""
        blocks = np.where(slots >= 0, slots // self.block_rows, -1)
        for b in np.unique(blocks[blocks >= 0]):
            sel = blocks == b
            yield int(b), sel, slots[sel] % self.block_rows

    def _pack(self, leaves: list[np.ndarray], n: int) -> np.ndarray:
        """Rows ``[n, row_bytes]`` of leaves ``[n, ...]``."""
        out = np.zeros((n, self.row_bytes), _U8)
        for x, ini, a, nb in zip(leaves, self.initial, self.offsets, self.sizes):
            x = np.ascontiguousarray(x, ini.dtype).reshape(n, nb // ini.dtype.itemsize)
            out[:, a:a + nb] = x.view(_U8)
        return out

    def _leaf(self, rows: np.ndarray, i: int) -> np.ndarray:
        """Leaf ``i`` of rows ``[n, row_bytes]`` as ``[n, ...]`` (a copy)."""
        x, a = self.initial[i], self.offsets[i]
        part = np.ascontiguousarray(rows[:, a:a + self.sizes[i]])
        return part.view(x.dtype).reshape(len(rows), *x.shape)

    # -- rows ---------------------------------------------------------------------------
    def gather(self, ids: np.ndarray) -> Any:
        """The state of clients ``ids`` stacked on a leading axis (numpy pytree ``[len(ids), ...]``)."""
        ids = np.asarray(ids, np.int64)
        slots = self.slot[ids]
        out = [np.empty((len(ids), *x.shape), x.dtype) for x in self.initial]
        if (slots < 0).any():
            for o, x in zip(out, self.initial):
                o[slots < 0] = x
        for b, sel, rows in self._by_block(slots):
            chunk = self._open(b)[rows]          # a copy; a disk block is unmapped here
            for i, o in enumerate(out):
                o[sel] = self._leaf(chunk, i)
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def scatter(self, ids: np.ndarray, rows: Any) -> None:
        """Store ``rows`` (pytree ``[len(ids), ...]``) as the state of clients ``ids`` (distinct)."""
        ids = np.asarray(ids, np.int64)
        new = ids[self.slot[ids] < 0]
        self._grow(self.num_stored + len(new))
        self.slot[new] = self.num_stored + np.arange(len(new))
        self.num_stored += len(new)
        packed = self._pack([np.asarray(x) for x in jax.tree_util.tree_leaves(rows)], len(ids))
        for b, sel, r in self._by_block(self.slot[ids]):
            blk = self._open(b)
            blk[r] = packed[sel]
            del blk

    def stored_ids(self) -> np.ndarray:
        """Ids of the clients with a stored row, in row order."""
        ids = np.flatnonzero(self.slot >= 0)
        return ids[np.argsort(self.slot[ids])]

    def _reset(self) -> None:
        self.slot[:] = -1
        self.blocks, self.num_stored = [], 0
        if self._dir is not None:
            for name in os.listdir(self._dir):
                os.remove(os.path.join(self._dir, name))

    def close(self) -> None:
        """Remove the disk blocks and their directory; the counts (``num_stored``, ``nbytes``)
        stay for a summary, the rows are not to be read afterwards."""
        if self._finalizer is not None:
            self._finalizer()
        self._dir = self._finalizer = None

    # -- checkpoints --------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the stored rows to ``path`` (``.npz``: ``ids`` and one ``leaf_NNNNN`` array
        ``[rows, ...]`` per leaf), streamed a block at a time and synced; the caller makes it
        atomic (e.g. inside a checkpoint directory published by a rename)."""
        ids, n = self.stored_ids(), self.num_stored
        with open(path, "wb") as raw:
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("ids.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, ids)
                for i, x in enumerate(self.initial):
                    a, nb = self.offsets[i], self.sizes[i]
                    with zf.open(f"leaf_{i:05d}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array_header_1_0(f, {
                            "descr": np.lib.format.dtype_to_descr(x.dtype), "fortran_order": False,
                            "shape": (n, *x.shape)})
                        for b in range(len(self.blocks)):
                            cnt = min(self.block_rows, n - b * self.block_rows)
                            f.write(np.ascontiguousarray(self._open(b)[:cnt, a:a + nb]))
            raw.flush()
            os.fsync(raw.fileno())

    def load(self, path: str) -> None:
        """Replace the stored rows with those saved by :meth:`save` (streamed a block at a time).

        Raises:
          ValueError: the file was saved for other shapes (another algorithm, model or config).
        """
        names = ["ids.npy"] + [f"leaf_{i:05d}.npy" for i in range(len(self.initial))]
        mismatch = ValueError(f"{path}: the population store does not match this algorithm, "
                              f"model and configuration")
        with zipfile.ZipFile(path) as zf:
            if sorted(zf.namelist()) != sorted(names):
                raise mismatch
            with zf.open("ids.npy") as f:
                ids = np.lib.format.read_array(f).astype(np.int64)
            if ids.ndim != 1 or len(np.unique(ids)) != len(ids) or (len(ids) and ids.min() < 0):
                raise mismatch
            files = [zf.open(name) for name in names[1:]]
            try:
                for f, x in zip(files, self.initial):
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(f)
                    if (shape != (len(ids), *x.shape) or fortran or np.lib.format.dtype_to_descr(dtype)
                            != np.lib.format.dtype_to_descr(x.dtype)):
                        raise mismatch
                if len(ids) and ids.max() >= self.population:
                    raise ValueError(f"{path}: client id {ids.max()} outside the population of "
                                     f"{self.population}")
                self._reset()
                self._grow(len(ids))
                self.slot[ids] = np.arange(len(ids))
                self.num_stored = len(ids)
                for b in range(len(self.blocks)):
                    cnt = min(self.block_rows, len(ids) - b * self.block_rows)
                    chunk = np.zeros((cnt, self.row_bytes), _U8)
                    for f, a, nb in zip(files, self.offsets, self.sizes):
                        chunk[:, a:a + nb] = np.frombuffer(f.read(cnt * nb), _U8).reshape(cnt, nb)
                    blk = self._open(b)
                    blk[:cnt] = chunk
                    del blk
            finally:
                for f in files:
                    f.close()
