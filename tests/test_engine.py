"""Engine behaviour: determinism, no recompilation, metrics, jit vs no jit."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.simulate import RunOptions, Task, run_simulation
from fslsage_jax.split import SplitModel, init_split
from conftest import ToyClient, toy_client_data, toy_config


_data, _cfg = toy_client_data, toy_config


TIMES = ("round_time_s", "eval_time_s")


@pytest.mark.parametrize("algo", ["fsl_sage", "sl_single_server"])
def test_same_seed_gives_identical_metrics(toy, tmp_path, algo):
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        run_simulation(algo, Task(toy, _cfg(), _data(), np.ones((5, 4), np.float32), np.zeros(5, np.int32)),
                       RunOptions(rounds=3, seed=7, out_dir=str(out), progress=False))
        lines = [__import__("json").loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append([{k: v for k, v in r.items() if k not in TIMES} for r in lines])
    assert len(runs[0]) == 3 and runs[0] == runs[1]


def test_different_seed_differs(toy):
    a, b = [run_simulation("fsl_sage", Task(toy, _cfg(), _data(), np.ones((5, 4), np.float32),
                                            np.zeros(5, np.int32)), RunOptions(rounds=1, seed=s, progress=False))
            for s in (0, 1)]
    assert a["final_test_loss"] != b["final_test_loss"]


@pytest.mark.parametrize("step_loop", ["host", "scan"])
def test_no_recompilation_after_first_round(toy, step_loop):
    compiles = []     # programs compiled, or loaded from the persistent compilation cache
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(
        lambda name, **k: compiles.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
    try:
        d = _data()
        data = ClientArrays(jax.numpy.asarray(d.x), jax.numpy.asarray(d.y), jax.numpy.asarray(d.counts))
        algo = ALGORITHMS["fsl_sage"](toy, _cfg(step_loop=step_loop), d.x.shape[1])
        state = algo.init(jax.random.key(0))
        state, _ = algo.run_round(state, data, jax.random.key(1))
        n_first = len(compiles)
        for r in range(2, 5):   # rounds 1..3 include an alignment round (round 2)
            state, _ = algo.run_round(state, data, jax.random.key(r))
        assert n_first > 0 and len(compiles) == n_first
    finally:
        jax.monitoring.clear_event_listeners()


def test_scan_and_host_step_loops_agree(toy):
    d = _data()
    data = ClientArrays(*(jax.numpy.asarray(a) for a in (d.x, d.y, d.counts)))
    out = []
    for loop in ("host", "scan"):
        algo = ALGORITHMS["fsl_sage"](toy, _cfg(step_loop=loop), d.x.shape[1])
        state = algo.init(jax.random.key(0))
        for r in range(2):
            state, m = algo.run_round(state, data, jax.random.key(r))
        out.append((state, m))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           out[0][0], out[1][0])
    assert out[0][1]["z_up"] == out[1][1]["z_up"]


def test_metrics_file_and_grad_cosine(toy, tmp_path):
    run_simulation("fsl_sage", Task(toy, _cfg(), _data(), np.ones((5, 4), np.float32), np.zeros(5, np.int32)),
                   RunOptions(rounds=3, out_dir=str(tmp_path), progress=False))
    recs = [__import__("json").loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    for r in recs:
        # the toy's linear auxiliary model, aligned for 2 epochs on 2-6 samples, cannot match
        # the server's gradient (measured -0.13, -0.15, 0.09); cosine == 1 and an aligned
        # estimate are pinned by test_grad_cosine_is_one_when_aux_equals_server and test_fsl_sage.py
        assert r["grad_cosine"] is not None and abs(r["grad_cosine"]) < 0.5
        assert r["comm_bytes"] == sum(v for k, v in r["comm"].items() if k != "labels_up")
    # alignment rounds (0 and 2) report the alignment loss, and it fell (measured round 0
    # 0.7008 -> 0.6967, round 2 0.9053 -> 0.9048); round 1 did not align
    for r in (recs[0], recs[2]):
        assert r["align_loss_first_epoch"] > r["align_loss_last_epoch"] > 0, (
            r["round"], r["align_loss_first_epoch"], r["align_loss_last_epoch"])
    assert "align_loss_first_epoch" not in recs[1] and "align_loss_last_epoch" not in recs[1]
    assert recs[0]["comm"]["aux_down"] == 3 * 84 and recs[1]["comm"]["aux_down"] == 3 * 84
    assert recs[2]["comm"]["aux_down"] == 6 * 84
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_run"] == 3 and summary["stop_reason"] == "rounds"
    assert summary["comm"] == recs[-1]["comm"] and summary["client_sample_counts"] == [6, 5, 4]


class _FixedDense(nn.Module):
    """Dense whose initial kernel does not depend on the rng key (bias 0): two modules
    of this class initialise equal whatever keys they are given."""
    features: int

    @nn.compact
    def __call__(self, x):
        init = lambda key, shape, dtype=jnp.float32: 0.7 * jax.random.normal(
            jax.random.key(sum(shape)), shape, dtype)
        return nn.Dense(self.features, kernel_init=init)(x)


class _FixedServer(nn.Module):
    @nn.compact
    def __call__(self, z, train=False):
        return _FixedDense(3)(nn.relu(_FixedDense(5)(z)))


def test_grad_cosine_is_one_when_aux_equals_server(tmp_path):
    # auxiliary model == server model: the estimate grad_z L(aux(z)) IS the true gradient,
    # so every uploaded batch's cosine is 1. Learning rates of 1e-12 keep the server and the
    # (aligned) auxiliary model where they started, for every upload of both rounds.
    split = SplitModel("same", ToyClient(), _FixedServer(), _FixedServer(), (4,), 3)
    cv, sv, av = init_split(split, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, sv.params, av.params)
    cfg = _cfg(lr=1e-12, aux_lr=1e-12, align_interval=1)
    run_simulation("fsl_sage", Task(split, cfg, _data(), np.ones((5, 4), np.float32), np.zeros(5, np.int32)),
                   RunOptions(rounds=2, out_dir=str(tmp_path), progress=False))
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_cosine"] for r in recs] == [pytest.approx(1.0, abs=1e-5)] * 2
    # nothing to fit: the alignment loss is 0 up to rounding (the server moved by ~1e-12)
    assert all(r["align_loss_first_epoch"] < 1e-10 for r in recs)
