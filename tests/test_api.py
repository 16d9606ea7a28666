"""fslsage_jax.train's input checks: client arrays, counts, module contract, test shapes."""
import flax.linen as nn
import numpy as np
import pytest

import fslsage_jax as fj
from conftest import make_toy


def test_client_arrays_pads_a_list_of_uneven_clients():
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=(n, 4)).astype(np.float32), np.arange(n, dtype=np.int32)) for n in (5, 2, 3)]
    d = fj.client_arrays(pairs)
    assert d.x.shape == (3, 5, 4) and d.y.shape == (3, 5) and d.counts.tolist() == [5, 2, 3]
    for i, (x, y) in enumerate(pairs):
        np.testing.assert_array_equal(d.x[i, :len(x)], x)
        np.testing.assert_array_equal(d.y[i, :len(y)], y)
        assert not d.x[i, len(x):].any() and not d.y[i, len(y):].any()
    full = fj.client_arrays((np.zeros((2, 7, 4), np.float32), np.zeros((2, 7), np.int32)))
    assert full.counts.tolist() == [7, 7]
    with pytest.raises(ValueError, match="counts"):
        fj.client_arrays((np.zeros((2, 7, 4)), np.zeros((2, 7)), np.array([3, 8])))
    with pytest.raises(ValueError, match="same length"):
        fj.client_arrays([(np.zeros((3, 4)), np.zeros(2))])


def _data(m=5, n=4):
    rng = np.random.default_rng(1)
    return (rng.normal(size=(m, n, 4)).astype(np.float32), rng.integers(0, 3, (m, n)).astype(np.int32))


def test_client_count_must_agree_with_the_config():
    with pytest.raises(ValueError, match=r"config.num_clients=3 but clients holds 5 clients"):
        fj.train("fed_avg", make_toy(), _data(), (np.zeros((2, 4), np.float32), np.zeros(2, np.int32)),
                 fj.Config(num_clients=3))


def test_test_inputs_must_have_the_clients_sample_shape():
    with pytest.raises(ValueError, match="sample shape"):
        fj.train("fed_avg", make_toy(), _data(), (np.zeros((2, 5), np.float32), np.zeros(2, np.int32)))


class Plain(nn.Module):         # no train= keyword: called without it
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(x.reshape(x.shape[0], -1))


class Head(nn.Module):
    @nn.compact
    def __call__(self, z):
        return nn.Dense(3)(z)


def test_plain_modules_without_train_are_accepted():
    split = fj.SplitModel("plain", Plain(), Head(), Head(), (4,), 3)
    x, y = _data()
    r = fj.train("sl_single_server", split, (x, y), (x[0], y[0]), fj.Config(num_clients=5, batch_size=2),
                 rounds=1)
    assert r.summary["rounds_run"] == 1 and r.client.params["Dense_0"]["kernel"].shape == (4, 6)


def test_a_part_that_swallows_train_fails_with_one_clear_line():
    split = fj.SplitModel("seq", nn.Sequential([nn.Dense(6)]), Head(), Head(), (4,), 3)
    x, y = _data()
    with pytest.raises(TypeError, match="does not accept the train= keyword") as e:
        fj.train("fed_avg", split, (x, y), (x[0], y[0]))
    assert "\n" not in str(e.value)
