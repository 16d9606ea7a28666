"""Data sources and partitions."""
import numpy as np
import pytest

from fslsage_jax.data import (class_histogram, load_dataset, load_digits, make_synthetic, partition,
                              to_client_arrays)


def test_digits_split_is_stratified_and_seeded():
    d = load_digits(seed=0)
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    tr = np.bincount(d.y_train, minlength=10) / len(d.y_train)
    te = np.bincount(d.y_test, minlength=10) / len(d.y_test)
    assert np.abs(tr - te).max() < 0.01
    again, other = load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(d.x_train, again.x_train)
    assert not np.array_equal(d.y_train, other.y_train)


def test_synthetic_shapes_and_learnable_labels():
    d = make_synthetic(seed=0, n_train=600, n_test=100, shape=(4, 4, 2), num_classes=3)
    assert d.x_train.shape == (600, 4, 4, 2) and d.y_test.shape == (100,)
    means = np.stack([d.x_train[d.y_train == c].mean(0) for c in range(3)])
    assert np.abs(means[0] - means[1]).mean() > 0.2          # class patterns differ
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


def test_iid_equal_disjoint_reproducible():
    y = np.arange(103) % 7
    parts = partition(y, 10, "iid", seed=3)
    assert [len(p) for p in parts] == [10] * 10
    flat = np.concatenate(parts)
    assert len(set(flat.tolist())) == 100
    np.testing.assert_array_equal(np.concatenate(partition(y, 10, "iid", seed=3)), flat)
    assert not np.array_equal(np.concatenate(partition(y, 10, "iid", seed=4)), flat)


def _shares(y, parts, c):
    h = np.stack([np.bincount(y[p], minlength=c) for p in parts])
    return h / h.sum(1, keepdims=True)


def test_dirichlet_sizes_disjoint_reproducible_and_skew():
    y = np.repeat(np.arange(10), 500)
    n, m = len(y), 20
    small = partition(y, m, "dirichlet", alpha=0.05, num_classes=10, seed=0)
    assert [len(p) for p in small] == [n // m] * m
    flat = np.concatenate(small)
    assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < n
    again = partition(y, m, "dirichlet", alpha=0.05, num_classes=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(small, again))
    assert np.mean(_shares(y, small, 10).max(1)) > 0.6               # heterogeneous
    large = partition(y, m, "dirichlet", alpha=1e4, num_classes=10, seed=0)
    assert np.max(_shares(y, large, 10).max(1)) < 0.2                # near uniform (1/10)


def test_dirichlet_renormalises_when_a_class_runs_out():
    y = np.array([0] * 4 + [1] * 40)                 # class 0 runs out quickly
    parts = partition(y, 4, "dirichlet", alpha=0.01, num_classes=2, seed=1)
    assert [len(p) for p in parts] == [11] * 4
    assert len(np.unique(np.concatenate(parts))) == 44


def test_client_arrays_pad_uneven_shards():
    x = np.arange(10, dtype=np.float32)[:, None] * 10
    y = np.arange(10, dtype=np.int32)
    cd = to_client_arrays(x, y, [np.array([3, 1, 4]), np.array([9]), np.array([0, 2])])
    assert cd.x.shape == (3, 3, 1) and cd.counts.tolist() == [3, 1, 2]
    assert cd.y.tolist() == [[3, 1, 4], [9, 0, 0], [0, 2, 0]]
    assert cd.x[0, :, 0].tolist() == [30, 10, 40]
    assert cd.mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert class_histogram(cd, 10)[1].tolist() == [0] * 9 + [1]


@pytest.mark.parametrize("kw, msg", [(dict(num_clients=0), "num_clients"),
                                     (dict(num_clients=11), "num_clients"),
                                     (dict(distribution="dirichlet", alpha=0.0), "alpha"),
                                     (dict(distribution="shards"), "unknown distribution")])
def test_bad_partition_inputs(kw, msg):
    args = dict(num_clients=2, distribution="iid", alpha=1.0, num_classes=2, seed=0)
    with pytest.raises(ValueError, match=msg):
        partition(np.arange(10) % 2, **{**args, **kw})
