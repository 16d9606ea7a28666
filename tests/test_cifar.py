"""CIFAR loaders: tiny releases in the original pickle format (folder and .tar.gz), errors, tfds, offline."""
import os
import pickle
import sys
import tarfile
import time

import numpy as np
import pytest

from fslsage_jax.data import (
    DATASETS,
    DataUnavailable,
    load_cifar10,
    load_cifar100,
    load_dataset,
    normalize,
)
from fslsage_jax.data import cifar as cifar_mod
from fslsage_jax.data.augment import CIFAR_MEAN, CIFAR_STD


def _batch(rng, n, classes, label_key):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, n)]
    d = {b"batch_label": b"tiny", b"data": data, label_key: labels, b"filenames": [b"x.png"] * n}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [v // 5 for v in labels]
    return d


def make_release(root, which, seed=0):
    """Write a tiny release (20 train images per file, 10 test) as ``root/<folder>`` and as
    ``root/<archive>``; returns (folder, archive, train data, train labels, test data, test labels)."""
    fmt = cifar_mod.CIFAR10 if which == 10 else cifar_mod.CIFAR100
    rng = np.random.default_rng(seed)
    files = {f: _batch(rng, 20, which, fmt.label_key) for f in fmt.train}
    files[fmt.test] = _batch(rng, 10, which, fmt.label_key)
    folder = os.path.join(root, fmt.folder)
    os.makedirs(folder)
    for name, d in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
    archive = os.path.join(root, fmt.archive)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=fmt.folder)
    train = [files[f] for f in fmt.train]
    return (folder, archive, np.concatenate([d[b"data"] for d in train]),
            np.concatenate([d[fmt.label_key] for d in train]), files[fmt.test][b"data"],
            np.asarray(files[fmt.test][fmt.label_key]))


def _check(ds, name, classes, data, labels, tdata, tlabels):
    assert ds.name == name and ds.num_classes == classes
    assert ds.x_train.shape == (len(data), 32, 32, 3) and ds.x_test.shape == (len(tdata), 32, 32, 3)
    assert ds.x_train.dtype == ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, labels)
    np.testing.assert_array_equal(ds.y_test, tlabels)
    # HWC from CHW rows: pixel (r, c) of channel k is row entry k*1024 + r*32 + c
    for i, r, c, k in [(0, 0, 0, 0), (3, 1, 2, 1), (len(data) - 1, 31, 5, 2), (7, 17, 30, 2)]:
        assert ds.x_train[i, r, c, k] == data[i, k * 1024 + r * 32 + c]
    np.testing.assert_array_equal(ds.x_train.transpose(0, 3, 1, 2).reshape(len(data), -1), data)
    np.testing.assert_array_equal(ds.x_test.transpose(0, 3, 1, 2).reshape(len(tdata), -1), tdata)
    ev = ds.transform(ds.x_test[:2], None, False)
    np.testing.assert_array_equal(ev, normalize(ds.x_test[:2], CIFAR_MEAN, CIFAR_STD))


@pytest.mark.parametrize("which", [10, 100])
def test_archive_and_folder_layouts(tmp_path, which):
    folder, archive, *arrays = make_release(str(tmp_path / "data"), which)
    name, load = ("cifar10", load_cifar10) if which == 10 else ("cifar100", load_cifar100)
    only_archive = tmp_path / "only_archive"
    only_archive.mkdir()
    os.link(archive, only_archive / os.path.basename(archive))
    for where in (folder, os.path.dirname(folder), archive, str(only_archive)):
        _check(load(data_dir=where), name, which, *arrays)
    _check(load_dataset(name, data_dir=archive), name, which, *arrays)
    assert name in DATASETS


def test_errors_are_clear(tmp_path):
    folder, archive, *_ = make_release(str(tmp_path / "ok"), 10)
    with pytest.raises(DataUnavailable, match="found neither cifar-10-batches-py/ nor cifar-10-python.tar.gz"):
        load_cifar10(data_dir=str(tmp_path))
    bad = tmp_path / "bad" / "cifar-10-python.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a gzip file" * 10)
    with pytest.raises(ValueError, match=f"{bad}: not a readable cifar-10-python.tar.gz"):
        load_cifar10(data_dir=str(bad.parent))
    truncated = tmp_path / "trunc.tar.gz"
    with open(archive, "rb") as f:
        truncated.write_bytes(f.read()[:50_000])
    with pytest.raises(ValueError, match="trunc.tar.gz"):
        load_cifar10(data_dir=str(truncated))
    with pytest.raises(ValueError, match="archive has no cifar-100-python/train"):   # wrong release
        load_cifar100(data_dir=archive)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(DataUnavailable, match="data_batch_3 is missing"):
        load_cifar10(data_dir=folder)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR pickle"):
        load_cifar10(data_dir=folder)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:   # only numpy arrays may be unpickled
        pickle.dump({b"data": os.system, b"labels": []}, f)
    with pytest.raises(ValueError, match="unexpected object"):
        load_cifar10(data_dir=folder)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"expected uint8 data \[N, 3072\]"):
        load_cifar10(data_dir=folder)


def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(cifar_mod, "network_reachable", lambda *a, **k: False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


def _assert_both_ways(msg):
    assert "\n" not in msg
    assert "--data-dir" in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "pip install -e .[tfds]" in msg


def test_offline_without_tfds_fails_fast(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)        # not installed
    t = time.time()
    with pytest.raises(DataUnavailable) as e:
        load_cifar10()
    assert time.time() - t < 10
    _assert_both_ways(str(e.value))
    assert isinstance(e.value, OSError)


def test_offline_with_tfds_and_no_prepared_data_fails_fast(monkeypatch, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _offline(monkeypatch, tmp_path)
    t = time.time()
    with pytest.raises(DataUnavailable) as e:
        load_cifar10()
    assert time.time() - t < 10
    _assert_both_ways(str(e.value))
    assert "unreachable" in str(e.value)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_prepared_data_through_mock(monkeypatch, tmp_path, name, classes):
    """tfds.testing.mock_data stands for a prepared dataset; without TensorFlow the loader reads it
    through tfds.data_source, with TensorFlow through tfds.load(batch_size=-1)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(cifar_mod, "network_reachable", lambda *a, **k: pytest.fail("network touched"))
    with tfds.testing.mock_data(num_examples=7):
        ds = load_dataset(name)
    assert ds.name == name and ds.num_classes == classes
    assert ds.x_train.shape == (7, 32, 32, 3) and ds.x_test.shape == (7, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.y_train.min() >= 0 and ds.y_train.max() < classes
    assert ds.x_train.std() > 10                                   # random pixels, not zeros
    assert ds.transform is not None


def test_network_check_is_bounded():
    t = time.time()
    assert cifar_mod.network_reachable("127.0.0.1", 9, timeout=1.0) in (False, True)   # port 9: discard
    assert time.time() - t < 2


def test_pickle_bytes_roundtrip_equals_folder(tmp_path):
    """The archive reader and the folder reader give identical arrays."""
    folder, archive, *_ = make_release(str(tmp_path), 100, seed=3)
    a, b = load_cifar100(data_dir=folder), load_cifar100(data_dir=archive)
    for u, v in zip(a[1:5], b[1:5]):
        np.testing.assert_array_equal(u, v)
