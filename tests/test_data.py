"""Data sources, partitions and padded client arrays."""
import os

import numpy as np
import pytest

from fslsage_jax.data import (ClientData, class_histogram, load_dataset, load_digits,
                              make_synthetic, partition, partition_dirichlet, partition_iid,
                              to_client_arrays)


def _rows(x, y):
    """(label, pixels) rows of a dataset, sorted, to compare as multisets."""
    flat = np.concatenate([y[:, None].astype(np.float64), x.reshape(len(x), -1)], axis=1)
    return flat[np.lexsort(flat.T[::-1])]


def _shares(y, parts, num_classes):
    h = np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])
    return h / h.sum(1, keepdims=True)


def _check_disjoint_exact(parts, n, per):
    assert [len(p) for p in parts] == [per] * len(parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < n


# --- sources -----------------------------------------------------------------

def test_digits_shapes_range_and_pairs():
    from sklearn.datasets import load_digits as sklearn_digits
    d = load_digits(seed=0)
    assert d.name == "digits" and d.num_classes == 10
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.y_train.shape == (1437,) and d.y_test.shape == (360,)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.y_test.dtype == np.int32
    x = np.concatenate([d.x_train, d.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x * 16, np.round(x * 16))      # 0..16 scaled by 1/16
    raw = sklearn_digits()                                          # split keeps image/label pairs
    np.testing.assert_array_equal(
        _rows(x * 16, np.concatenate([d.y_train, d.y_test])), _rows(raw.images, raw.target))


def test_digits_split_is_stratified_and_seeded():
    d = load_digits(seed=0)
    total = np.bincount(np.concatenate([d.y_train, d.y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(d.y_test, minlength=10) - 0.2 * total) <= 1)
    again, other = load_digits(seed=0), load_digits(seed=1)
    for a, b in zip(d[1:5], again[1:5], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(d.x_train, other.x_train)
    assert len(load_digits(seed=0, test_fraction=0.5).y_test) in (898, 899)


def test_synthetic_shapes_seeded_and_learnable():
    d = make_synthetic(seed=0, n_train=600, n_test=100, shape=(4, 4, 2), num_classes=3)
    assert d.x_train.shape == (600, 4, 4, 2) and d.x_test.shape == (100, 4, 4, 2)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert set(np.unique(d.y_train)) == {0, 1, 2} and d.num_classes == 3
    np.testing.assert_array_equal(d.x_train, make_synthetic(0, 600, 100, (4, 4, 2), 3).x_train)
    assert not np.array_equal(d.x_train, make_synthetic(1, 600, 100, (4, 4, 2), 3).x_train)
    # Class means differ, and the train means classify the test set (nearest mean).
    means = np.stack([d.x_train[d.y_train == c].mean(0) for c in range(3)])
    assert np.abs(means[0] - means[1]).mean() > 0.2
    dist = ((d.x_test[:, None] - means[None]) ** 2).reshape(100, 3, -1).sum(-1)
    assert np.mean(dist.argmin(1) == d.y_test) > 0.6


def test_load_dataset_dispatches_and_rejects_unknown():
    np.testing.assert_array_equal(load_dataset("digits", seed=2).y_test, load_digits(2).y_test)
    s = load_dataset("synthetic", seed=0, data_dir="/nonexistent", n_train=10, n_test=5,
                     shape=(2, 2, 1), num_classes=4)
    assert s.x_train.shape == (10, 2, 2, 1) and s.num_classes == 4
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*synthetic"):
        load_dataset("mnist")


# --- iid ---------------------------------------------------------------------

def test_iid_equal_disjoint_reproducible():
    y = np.arange(103) % 7
    parts = partition(y, 10, "iid", seed=3)
    _check_disjoint_exact(parts, 103, 10)                           # 3 samples dropped
    np.testing.assert_array_equal(np.concatenate(partition_iid(y, 10, 3)), np.concatenate(parts))
    assert not np.array_equal(np.concatenate(partition(y, 10, "iid", seed=4)),
                              np.concatenate(parts))
    assert not all(np.all(np.diff(p) > 0) for p in parts)          # documented: shuffled order


# --- dirichlet ---------------------------------------------------------------

def test_dirichlet_sizes_disjoint_reproducible():
    y = np.repeat(np.arange(10), 103)
    parts = partition(y, 7, "dirichlet", alpha=0.5, num_classes=10, seed=0)
    _check_disjoint_exact(parts, len(y), len(y) // 7)
    again = partition_dirichlet(y, 7, 0.5, 10, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(y, 7, "dirichlet", alpha=0.5, num_classes=10, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_alpha_controls_skew():
    y = np.repeat(np.arange(10), 1000)
    m = 20
    small = partition(y, m, "dirichlet", alpha=0.05, num_classes=10, seed=0)
    large = partition(y, m, "dirichlet", alpha=1e4, num_classes=10, seed=0)
    _check_disjoint_exact(small, len(y), len(y) // m)
    _check_disjoint_exact(large, len(y), len(y) // m)
    assert np.mean(_shares(y, small, 10).max(1)) > 0.6              # mostly one class each
    # Near uniform; the last clients get whatever is left, so look at the median.
    assert np.median(_shares(y, large, 10).max(1)) < 0.2


def test_dirichlet_exhaustion_still_gives_exact_sizes():
    y = np.array([0] * 4 + [1] * 40)                                # class 0 runs out early
    for seed in range(5):
        parts = partition(y, 4, "dirichlet", alpha=0.01, num_classes=2, seed=seed)
        _check_disjoint_exact(parts, 44, 11)                        # every sample is used
    # alpha = 1e-3 makes most p_i exactly one-hot: once that class is gone the
    # client falls back to the classes left; sizes stay exact.
    y = np.repeat(np.arange(10), [1, 2, 3, 5, 8, 13, 21, 34, 55, 89])
    for seed in range(5):
        parts = partition(y, 9, "dirichlet", alpha=1e-3, num_classes=10, seed=seed)
        _check_disjoint_exact(parts, len(y), len(y) // 9)


def _sequential_class1_law(sizes, draws):
    """Exact law of the class-1 count after ``draws`` uniform draws, each over the
    classes not yet exhausted (the sequential scheme with p = uniform)."""
    law = {(0,) * len(sizes): 1.0}
    for _ in range(draws):
        nxt = {}
        for h, pr in law.items():
            alive = [c for c in range(len(sizes)) if h[c] < sizes[c]]
            for c in alive:
                g = h[:c] + (h[c] + 1,) + h[c + 1:]
                nxt[g] = nxt.get(g, 0.0) + pr / len(alive)
        law = nxt
    out = np.zeros(sizes[1] + 1)
    for h, pr in law.items():
        out[h[1]] += pr
    return out


def test_dirichlet_matches_the_sequential_scheme_in_law():
    # alpha = 1e6 makes p_i uniform; client 0 takes 21 of [4, 8, 30] samples, so
    # classes 0 and 1 run out during its draws. Renormalising p over the classes
    # left gives the exact law below; e.g. drawing by the remaining counts would not.
    sizes = (4, 8, 30)
    y = np.repeat(np.arange(3), sizes)
    law = _sequential_class1_law(sizes, 21)
    got = np.array([np.sum(y[partition_dirichlet(y, 2, 1e6, 3, seed)[0]] == 1)
                    for seed in range(1000)])
    freq = np.bincount(got, minlength=len(law)) / len(got)
    assert 0.5 * np.abs(freq - law).sum() < 0.06                    # total variation
    assert abs(got.mean() - law @ np.arange(len(law))) < 0.15       # mean 7.42, sd ~1


def test_dirichlet_is_fast_at_cifar_scale():
    import time
    y = np.random.default_rng(0).integers(0, 10, 50_000)
    t = time.perf_counter()
    parts = partition(y, 100, "dirichlet", alpha=0.1, num_classes=10, seed=0)
    assert time.perf_counter() - t < 5.0
    _check_disjoint_exact(parts, 50_000, 500)


# --- client arrays -----------------------------------------------------------

def test_client_arrays_pad_uneven_shards():
    x = np.arange(10, dtype=np.float32)[:, None, None] * np.array([1, -1], np.float32)
    y = (np.arange(10) % 4).astype(np.int64)
    cd = to_client_arrays(x, y, [np.array([3, 1, 4]), np.array([9]), np.array([], np.int64),
                                 [0, 2]])
    assert isinstance(cd, ClientData)
    assert cd.x.shape == (4, 3, 1, 2) and cd.y.shape == (4, 3)
    assert cd.y.dtype == np.int32 and cd.counts.dtype == np.int32
    assert cd.counts.tolist() == [3, 1, 0, 2]
    assert cd.x[0, :, 0, 0].tolist() == [3, 1, 4] and cd.x[0, :, 0, 1].tolist() == [-3, -1, -4]
    assert cd.x[1, 0, 0].tolist() == [9, -9] and cd.x[3, :2, 0, 0].tolist() == [0, 2]
    assert cd.y.tolist() == [[3, 1, 0], [1, 0, 0], [0, 0, 0], [0, 2, 0]]
    assert cd.mask.tolist() == [[True] * 3, [True, False, False], [False] * 3,
                                [True, True, False]]
    assert not cd.x[~cd.mask].any()                                # padding is zeros
    np.testing.assert_array_equal(class_histogram(cd, 4),
                                  [[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])


def test_class_histogram_counts_real_rows_of_a_partition():
    y = np.repeat(np.arange(5), 40)
    x = np.zeros((200, 1), np.float32)
    parts = partition(y, 6, "dirichlet", alpha=0.3, num_classes=5, seed=0)
    h = class_histogram(to_client_arrays(x, y, parts), 5)
    np.testing.assert_array_equal(h, np.stack([np.bincount(y[p], minlength=5) for p in parts]))
    assert h.sum(1).tolist() == [33] * 6


# --- bad inputs --------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [(dict(num_clients=0), "num_clients"),
                                     (dict(num_clients=11), "num_clients"),
                                     (dict(num_clients=2.5), "num_clients"),
                                     (dict(distribution="dirichlet", alpha=0.0), "alpha"),
                                     (dict(distribution="dirichlet", alpha=-1.0), "alpha"),
                                     (dict(distribution="dirichlet", alpha=float("nan")), "alpha"),
                                     (dict(distribution="dirichlet", num_classes=1), "labels"),
                                     (dict(distribution="shards"), "unknown distribution")])
def test_bad_partition_inputs(kw, msg):
    args = dict(num_clients=2, distribution="iid", alpha=1.0, num_classes=2, seed=0)
    with pytest.raises(ValueError, match=msg):
        partition(np.arange(10) % 2, **{**args, **kw})


def test_bad_direct_and_array_inputs():
    with pytest.raises(ValueError, match="num_clients"):
        partition_iid(np.zeros(5), 0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        partition_dirichlet(np.array([0.0, 1.0, 1.0]), 1, 1.0, 2, 0)
    with pytest.raises(ValueError, match="labels"):
        partition_dirichlet(np.array([0, -1, 1]), 1, 1.0, 2, 0)
    with pytest.raises(ValueError, match="parts"):
        to_client_arrays(np.zeros((3, 1)), np.zeros(3), [])
    with pytest.raises(ValueError, match="samples"):
        to_client_arrays(np.zeros((3, 1)), np.zeros(2), [np.array([0])])
    with pytest.raises(ValueError, match="test_size"):
        load_digits(test_fraction=1.5)


def test_digits_split_is_cached_and_read_back(tmp_path, monkeypatch):
    """The first call writes the split to the cache; later calls return the file's arrays;
    an unreadable file is computed again and rewritten."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    from fslsage_jax.data.sources import digits_cache_path
    monkeypatch.setenv("FSLSAGE_JAX_DATA_CACHE", str(tmp_path))
    d = load_digits(seed=5)
    path = digits_cache_path(seed=5)
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    raw = sklearn_digits()
    ref = train_test_split((raw.images / 16.0).astype(np.float32)[..., None], raw.target, test_size=0.2,
                           stratify=raw.target, random_state=5)
    for got, want in zip((d.x_train, d.x_test, d.y_train, d.y_test), ref):
        np.testing.assert_array_equal(got, want)
    np.savez(path, x_train=d.x_train + 7, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    np.testing.assert_array_equal(load_digits(seed=5).x_train, d.x_train + 7)     # read from the file
    assert not os.path.exists(digits_cache_path(seed=6))
    with open(path, "wb") as f:
        f.write(b"not an npz")
    again = load_digits(seed=5)
    np.testing.assert_array_equal(again.x_train, d.x_train)
    with np.load(path) as f:
        np.testing.assert_array_equal(f["y_test"], d.y_test)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(path)]   # no temporary left
