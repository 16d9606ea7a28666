"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), the image data of FSL-SAGE (Nair et al., ICML 2025).

Images are kept as uint8 ``[N, 32, 32, 3]`` (NHWC) and labels as int32 (CIFAR-100:
the 100 fine labels); the dataset's ``transform`` (crop + flip + normalise for
training, normalise for evaluation, the usual CIFAR mean/std) runs on the device.

Sources, in this order:

1. ``data_dir`` holding the original Python-pickle release: the extracted
   ``cifar-10-batches-py/`` / ``cifar-100-python/`` folder itself, a directory
   containing it, the ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
   archive (read in memory, never extracted), or a directory containing it.
   A ``data_dir`` that holds none of these but a tensorflow-datasets folder
   (``data_dir/cifar10``) is read as a tfds data directory.
2. tensorflow-datasets (optional extra ``pip install -e .[tfds]``): an already
   prepared dataset is read without network; otherwise it is downloaded only
   if the download host answers within a few seconds, so that a machine with
   neither data nor network fails fast (tfds's own retries take minutes).

Every failure to find data raises :class:`DataUnavailable` with a one-line
message naming both ways; a corrupt file raises ``ValueError``.
"""
from __future__ import annotations

import io
import os
import pickle
import socket
import tarfile
import zlib
from typing import NamedTuple

import numpy as np

from fslsage_jax.data.augment import CIFAR_MEAN, CIFAR_STD, make_image_transform
from fslsage_jax.data.dataset import Dataset

DOWNLOAD_HOST = "www.cs.toronto.edu"


class DataUnavailable(FileNotFoundError):
    """No copy of a dataset could be found or fetched (an ``OSError``)."""


class CifarFormat(NamedTuple):
    """Layout of one CIFAR release."""
    name: str            # dataset name, also the tfds name
    folder: str          # folder inside the archive
    archive: str         # archive file name
    train: tuple         # training pickle files
    test: str            # test pickle file
    label_key: bytes     # labels in each pickle dict
    num_classes: int

    @property
    def url(self) -> str:
        return f"https://{DOWNLOAD_HOST}/~kriz/{self.archive}"


CIFAR10 = CifarFormat("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10)
CIFAR100 = CifarFormat("cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
                       ("train",), "test", b"fine_labels", 100)

_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("_codecs", "encode")}   # bytes in protocol-2 pickles written by Python 3


class _Unpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR files need no more)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _ways(fmt: CifarFormat) -> str:
    return (f"pass --data-dir with the original archive {fmt.url} or its extracted {fmt.folder}/ folder, "
            f"or `pip install -e .[tfds]` on a machine with network to let tensorflow-datasets fetch it")


def _decode(raw: bytes, where: str, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N, 32, 32, 3], int32 [N])."""
    try:
        d = _Unpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(d[b"data"]), np.asarray(d[fmt.label_key])
    except Exception as e:  # noqa: BLE001 (pickle raises many types on garbage)
        raise ValueError(f"{where}: not a CIFAR pickle with b'data' and {fmt.label_key!r} "
                         f"({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or labels.shape != data.shape[:1]:
        raise ValueError(f"{where}: expected uint8 data [N, 3072] and N labels, got {data.dtype} "
                         f"{data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise ValueError(f"{where}: labels outside [0, {fmt.num_classes})")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, labels.astype(np.int32)


def _read_files(fmt: CifarFormat, read, where) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from ``read(file_name) -> bytes``."""
    parts = [_decode(read(f), where(f), fmt) for f in fmt.train]
    x_te, y_te = _decode(read(fmt.test), where(fmt.test), fmt)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_te, y_te)


def _read_folder(fmt: CifarFormat, folder: str) -> tuple[np.ndarray, ...]:
    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataUnavailable(f"{path} is missing: expected the {fmt.folder}/ files "
                                  f"{', '.join(fmt.train + (fmt.test,))}")
        with open(path, "rb") as f:
            return f.read()
    return _read_files(fmt, read, lambda name: os.path.join(folder, name))


def _read_archive(fmt: CifarFormat, path: str) -> tuple[np.ndarray, ...]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.rstrip("/").split("/")[-1]: m for m in tar.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise ValueError(f"{path}: archive has no {fmt.folder}/{name} (not the {fmt.name} "
                                     f"Python release {fmt.archive}?)")
                return tar.extractfile(members[name]).read()
            return _read_files(fmt, read, lambda name: f"{path}:{fmt.folder}/{name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if isinstance(e, DataUnavailable):
            raise
        raise ValueError(f"{path}: not a readable {fmt.archive} ({type(e).__name__}: {e})") from None


def _find_local(fmt: CifarFormat, data_dir: str) -> tuple[str, str] | None:
    """``("folder" | "archive", path)`` of the release under ``data_dir``, or None."""
    if os.path.isfile(data_dir):
        return "archive", data_dir
    if os.path.isfile(os.path.join(data_dir, fmt.test)):
        return "folder", data_dir
    if os.path.isdir(os.path.join(data_dir, fmt.folder)):
        return "folder", os.path.join(data_dir, fmt.folder)
    if os.path.isfile(os.path.join(data_dir, fmt.archive)):
        return "archive", os.path.join(data_dir, fmt.archive)
    return None


OFFLINE_ENV = "FSLSAGE_OFFLINE"


def network_reachable(host: str = DOWNLOAD_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (always
    False when the environment variable ``FSLSAGE_OFFLINE`` is set: never download)."""
    if os.environ.get(OFFLINE_ENV):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tfds_arrays(tfds, fmt: CifarFormat, split: str, data_dir: str | None, download: bool):
    """(uint8 images, int32 labels) of one split through tfds.load (with TensorFlow) or
    tfds.data_source (without TensorFlow; reads datasets prepared as array_record)."""
    try:
        import tensorflow  # noqa: F401
        has_tf = True
    except ImportError:
        has_tf = False
    if has_tf:
        x, y = tfds.as_numpy(tfds.load(fmt.name, split=split, batch_size=-1, as_supervised=True,
                                       download=download, data_dir=data_dir))
    else:
        if download:
            raise DataUnavailable(f"preparing {fmt.name} with tensorflow-datasets needs TensorFlow; "
                                  + _ways(fmt))
        src = tfds.data_source(fmt.name, split=split, download=False, data_dir=data_dir)
        rows = [src[i] for i in range(len(src))]
        x = np.stack([np.asarray(r["image"]) for r in rows]) if rows else np.zeros((0, 32, 32, 3))
        y = np.asarray([r["label"] for r in rows])
    return np.asarray(x, np.uint8), np.asarray(y, np.int32)


def _not_read_reason(tfds, fmt: CifarFormat, data_dir: str | None, error: Exception) -> str:
    """One line on why tfds could not read a prepared copy."""
    try:
        builder = tfds.builder(fmt.name, data_dir=data_dir)
        if not builder.is_prepared():
            return f"not prepared for tensorflow-datasets in {builder.data_dir_root}"
    except Exception:  # noqa: BLE001, S110 (only the message depends on it)
        pass
    first = str(error).splitlines()[0] if str(error) else ""
    return f"tensorflow-datasets could not read it ({type(error).__name__}: {first[:160]})"


def _load_tfds(fmt: CifarFormat, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """Through tensorflow-datasets: prepared data first, then a download if the host answers."""
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)      # tfds warns on absent folders: one-line errors
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataUnavailable(f"no {fmt.name} data: tensorflow-datasets is not installed; "
                              + _ways(fmt)) from None
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None

    def read(download):
        tr = _tfds_arrays(tfds, fmt, "train", data_dir, download)
        return (*tr, *_tfds_arrays(tfds, fmt, "test", data_dir, download))
    try:
        return read(False)
    except DataUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 (tfds raises several types for "not prepared")
        reason = _not_read_reason(tfds, fmt, data_dir, e)
    if not network_reachable():
        raise DataUnavailable(f"no {fmt.name} data: {reason} and {DOWNLOAD_HOST} is unreachable; "
                              + _ways(fmt))
    return read(True)


def load_cifar(fmt: CifarFormat, data_dir: str | None = None) -> Dataset:
    """A CIFAR release as a :class:`Dataset` (see the module docstring for the sources).

    Args:
      fmt: :data:`CIFAR10` or :data:`CIFAR100`.
      data_dir: the original archive, its folder, a directory holding either, or a tfds data dir.
    Returns:
      the dataset (uint8 NHWC images, int32 labels, the on-device image transform).
    Raises:
      DataUnavailable: no data found and none could be fetched.
      ValueError: a corrupt or unexpected file.
    """
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        found = _find_local(fmt, data_dir)
        if found is not None:
            kind, path = found
            arrays = _read_folder(fmt, path) if kind == "folder" else _read_archive(fmt, path)
        elif os.path.isdir(os.path.join(data_dir, fmt.name)):
            arrays = _load_tfds(fmt, data_dir)
        else:
            raise DataUnavailable(f"{data_dir}: found neither {fmt.folder}/ nor {fmt.archive} "
                                  f"(nor a tensorflow-datasets {fmt.name}/ folder); " + _ways(fmt))
    else:
        arrays = _load_tfds(fmt, None)
    x_tr, y_tr, x_te, y_te = arrays
    return Dataset(fmt.name, x_tr, y_tr, x_te, y_te, fmt.num_classes,
                   transform=make_image_transform(CIFAR_MEAN, CIFAR_STD))


def load_cifar10(seed: int = 0, data_dir: str | None = None) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test uint8 32x32x3 images, 10 classes.

    Args:
      seed: unused (the split is fixed); accepted like every loader's.
      data_dir: see :func:`load_cifar`.
    Returns:
      the :class:`Dataset`.
    """
    return load_cifar(CIFAR10, data_dir)


def load_cifar100(seed: int = 0, data_dir: str | None = None) -> Dataset:
    """CIFAR-100 with its 100 fine labels: 50,000 train / 10,000 test uint8 32x32x3 images.

    Args:
      seed: unused (the split is fixed).
      data_dir: see :func:`load_cifar`.
    Returns:
      the :class:`Dataset`.
    """
    return load_cifar(CIFAR100, data_dir)
