"""bench.py writes valid results; the engine donates the state in both step loops."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "experiments", "bench.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_bench_tiny_writes_valid_json_and_consistent_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_models", lambda: {"toy": lambda shape, k: make_toy(k)})
    argv = ["--tiny", "--models", "toy:4", "--algos", "fed_avg", "--clients", "4",
            "--strategies", "chunked", "--chunk-size", "3", "--step-loops", "host", "scan",
            "--loop-clients", "2", "--limit-steps", "3", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "bench.json").read_text())
    assert out["environment"]["jax"] == jax.__version__ and out["environment"]["backend"] == "cpu"
    rows = out["rows"]
    assert [(r["algo"], r["strategy"], r["step_loop"]) for r in rows] == [
        ("fed_avg", "chunked", "host"), ("fed_avg", "chunked", "scan")]
    for r in rows:
        assert r["samples_per_round"] == 4 * 16                  # m * n * E (tiny: n=16, B=8)
        assert r["samples_per_s"] == pytest.approx(64 / r["round_s"])
        assert r["loop_clients_measured"] == 2 and r["limit_steps"] == 64 // 8
        assert r["limit_steps_measured"] == 3
        assert r["loop_over_ours"] == pytest.approx(r["loop_round_s"] / r["round_s"])
        assert r["ours_over_limit"] == pytest.approx(r["round_s"] / r["limit_round_s"])
        assert r["compile_s"] >= 0 and r["first_round_s"] >= r["round_s"] > 0
        assert np.isfinite(r["train_loss"]) and r["peak_memory_bytes"] > 0
        assert r["chunk_size"] == 3
        # fed_avg per client: client Dense(4->6) + server Dense(6->5), Dense(5->10) (bench uses 10
        # classes): params, Adam mu and nu (float32) and Adam's int32 step count
        n_params = (4 * 6 + 6) + (6 * 5 + 5) + (5 * 10 + 10)
        assert r["state_bytes_per_client"] == 3 * 4 * n_params + 4 and r["state_bytes_shared"] == 4
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| toy | 4 |") == 2 and "loop/ours" in md


def test_presets_and_explicit_flags():
    args = bench.parse(["--quick", "--clients", "7", "--batch-size", "8"])
    assert args.clients == [7] and args.batch_size == 8 and args.algos == ["fsl_sage"]
    assert bench.parse_model("cnn:8x8x1") == ("cnn", (8, 8, 1))
    assert bench.parse_model("cnn") == ("cnn", (32, 32, 3))
    assert bench.parse_model("gpt2tiny") == ("gpt2tiny", (64,))         # a sequence length
    with pytest.raises(ValueError):
        bench.parse_model("cnn:8x8")
    with pytest.raises(SystemExit):
        bench.parse(["--samples-per-client", "33", "--batch-size", "32"])
    for bad in ("cnn:8xAx1", "nosuchmodel"):                           # refused before any work
        with pytest.raises(SystemExit) as e:
            bench.parse(["--tiny", "--models", bad])
        assert e.value.code == 2


def test_synthetic_clients_are_the_library_synthetic_data():
    from fslsage_jax.data import make_synthetic
    from fslsage_jax.models import make_cnn
    data = bench.synthetic(make_cnn((8, 8, 1), 10), 3, 4, seed=5)
    assert data.x.shape == (3, 4, 8, 8, 1) and data.y.shape == (3, 4) and list(data.counts) == [4, 4, 4]
    ds = make_synthetic(5, n_train=12, n_test=0, shape=(8, 8, 1))
    # every client sample is one of the 12 library samples, each used once, with its label
    rows = {tuple(np.asarray(x).ravel()): int(y) for x, y in zip(ds.x_train, ds.y_train)}
    got = [(tuple(np.asarray(x).ravel()), int(y)) for x, y in zip(data.x.reshape(12, -1), data.y.ravel())]
    assert sorted(rows.items()) == sorted(got)


def test_help_runs():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench.py"), "--help"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and "--loop-clients" in p.stdout and "--devices" in p.stdout


@pytest.mark.parametrize("step_loop", ["host", "scan"])
def test_state_is_donated(toy, step_loop):
    rng = np.random.default_rng(0)
    data = ClientArrays(jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32),
                        jnp.asarray(rng.integers(0, 3, (3, 4)), jnp.int32), jnp.full((3,), 4, jnp.int32))
    algo = ALGORITHMS["sl_single_server"](toy, Config(num_clients=3, batch_size=2, step_loop=step_loop), 4)
    state = algo.init(jax.random.key(0))
    new, _ = algo.run_round(state, data, jax.random.key(1))
    old_leaves = jax.tree_util.tree_leaves(state.clients)
    assert all(leaf.is_deleted() for leaf in old_leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(new))


def test_auto_strategy_falls_back_to_vmap_for_many_clients():
    from fslsage_jax.algorithms.lifting import UNROLL_MAX_CLIENTS, auto_strategy
    assert auto_strategy("cpu", (32, 32, 3), UNROLL_MAX_CLIENTS) == "unroll"
    assert auto_strategy("cpu", (32, 32, 3), UNROLL_MAX_CLIENTS + 1) == "vmap"
    assert auto_strategy("cpu", (8, 8, 1), 4) == "vmap"
    assert auto_strategy("cpu", (8, 8, 1), 16) == "chunked"
    assert auto_strategy("gpu", (32, 32, 3), 4) == "vmap"
