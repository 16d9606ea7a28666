"""A batch larger than every shard is clamped to the largest shard (issue: 40 GB padded
batches), and a device out-of-memory error is one line and exit code 4 at the CLI."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax import simulate
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.comm import sizes_of
from fslsage_jax.memory import DeviceMemoryError
from fslsage_jax.simulate import RunOptions, Task, run_simulation
from conftest import make_toy, toy_client_data, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("algo", ["sl_single_server", "fsl_sage"])
def test_a_huge_batch_is_one_step_of_each_whole_shard(algo):
    """Batch 10^8 on shards of 6, 5, 4: unclamped, one padded batch would be 10^8 x 4 floats
    per client (GBs); clamped, it is the run with batch = the largest shard, exactly."""
    d = toy_client_data()
    data = ClientArrays(jnp.asarray(d.x), jnp.asarray(d.y), jnp.asarray(d.counts))
    out = {}
    for b in (6, 10 ** 8):
        a = ALGORITHMS[algo](make_toy(), toy_config(batch_size=b, server_update_interval=1), 6)
        state, acc = a.run_round(a.init(jax.random.key(0)), data, jax.random.key(1))
        out[b] = (jax.tree_util.tree_leaves(a.global_model(state)), jax.device_get(acc))
    for x, y in zip(out[6][0], out[10 ** 8][0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert out[6][1] == out[10 ** 8][1]
    assert int(out[10 ** 8][1]["z_up"]) == 6 + 5 + 4             # one step: every sample goes up once


def _oom_after(rounds_ok):
    """Wrap simulate.build so that the round after ``rounds_ok`` rounds fails as XLA:CPU does."""
    real = simulate.build

    def build(*a, **k):
        algo, evaluate = real(*a, **k)
        calls = {"n": 0}

        def run_round(state, data, key):
            calls["n"] += 1
            if calls["n"] > rounds_ok:
                raise jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Out of memory "
                                                 "allocating 40381348376 bytes")
            return algo.run_round(state, data, key)
        return algo._replace(run_round=run_round), evaluate
    return build


def test_library_raises_a_device_memory_error_naming_the_program(monkeypatch, tmp_path):
    monkeypatch.setattr(simulate, "build", _oom_after(1))
    d = toy_client_data()
    task = Task(make_toy(), toy_config(), d, d.x[0], d.y[0])
    with pytest.raises(DeviceMemoryError) as e:
        run_simulation("cse_fsl", task, RunOptions(rounds=3, out_dir=str(tmp_path), checkpoint_every=1,
                                                   progress=False))
    assert e.value.nbytes == 40381348376 and e.value.program.startswith("round")
    assert os.path.isdir(tmp_path / "checkpoints" / "round_000001")      # the last checkpoint stays


def test_cli_out_of_memory_is_one_line_and_exit_4(monkeypatch, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cli_run", os.path.join(ROOT, "experiments", "run.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(simulate, "build", _oom_after(1))
    code = cli.main(["--algo", "sl_single_server", "--rounds", "3", "--train-subset", "120", "--num-clients",
                     "2", "--batch-size", "32", "--checkpoint-every", "1", "--no-progress",
                     "--no-compilation-cache", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4
    assert err[-1].startswith("error: the round") and "40,381,348,376 bytes" in err[-1]
    assert "--memory-plan" in err[-1] and "--batch-size" in err[-1]
    assert not any("Traceback" in l for l in err)
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "round_000001")
