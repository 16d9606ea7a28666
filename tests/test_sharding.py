"""The client axis sharded over 8 forced host devices equals the single-device run.

XLA_FLAGS must be set before jax is imported, so the comparison runs in a
subprocess (this test process keeps its single CPU device).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fslsage_jax import sharding
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import make_toy
    from fslsage_jax.algorithms import ALGORITHMS
    from fslsage_jax.algorithms.config import Config
    from fslsage_jax.algorithms.engine import ClientArrays
    from fslsage_jax import sharding

    assert jax.device_count() == 8, jax.devices()
    M, N = 8, 7
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M, N, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(M, N)).astype(np.int32)
    counts = np.array([7, 5, 4, 7, 6, 3, 7, 2], np.int32)
    base = dict(num_clients=M, batch_size=3, local_epochs=2, server_update_interval=2,
                align_interval=1, align_epochs=2, align_batch_size=4, align_buffer_size=6)
    out = {}
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    for algo_name, strategy, loop in [("fsl_sage", "vmap", "host"), ("sl_multi_server", "vmap", "scan"),
                                      ("cse_fsl", "chunked", "host")]:
        cfg = Config(**base, strategy=strategy, chunk_size=2, step_loop=loop)
        res = []
        for devices in (1, 8):
            mesh = sharding.client_mesh(devices) if devices > 1 else None
            algo = ALGORITHMS[algo_name](make_toy(), cfg, N, mesh and sharding.state_sharding(mesh))
            data = ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts))
            state = algo.init(jax.random.key(0))
            if devices > 1:
                state, data = sharding.shard_state(state, mesh), sharding.shard_data(data, mesh)
            mets, n_after_first = [], None
            for r in range(2):
                state, m = algo.run_round(state, data, jax.random.key(10 + r))
                mets.append({k: float(v) for k, v in m.items()})
                if r == 0:
                    n_after_first = len(compiles)
            leaf = jax.tree_util.tree_leaves(state.clients)[0]
            copies = state.server is None          # per-client server copies live in clients.shared
            srv = jax.tree_util.tree_leaves(state.clients.shared[1] if copies else state.server)[0]
            res.append({"metrics": mets,
                        "leaves": [np.asarray(l).tolist() for l in jax.tree_util.tree_leaves(state)],
                        "recompiles": len(compiles) - n_after_first,
                        "client_devices": len(leaf.sharding.device_set),
                        "client_shard_rows": leaf.addressable_shards[0].data.shape[0],
                        "server_copies": copies,
                        "server_replicated": bool(srv.sharding.is_fully_replicated)})
        out[algo_name] = res
    try:
        algo = ALGORITHMS["fed_avg"](make_toy(), Config(**{**base, "num_clients": 6}), N)
        sharding.shard_state(algo.init(jax.random.key(0)), sharding.client_mesh(4))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", WORKER, HERE], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


ALGOS = ["fsl_sage", "sl_multi_server", "cse_fsl"]   # shared server, per-client server, both loops


@pytest.mark.parametrize("algo", ALGOS)
def test_eight_devices_equal_one(sharded_results, algo):
    one, eight = sharded_results[algo]
    assert len(one["leaves"]) == len(eight["leaves"]) > 0
    for a, b in zip(one["leaves"], eight["leaves"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    for ma, mb in zip(one["metrics"], eight["metrics"]):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert abs(ma[k] - mb[k]) <= 1e-5 * max(1.0, abs(ma[k])), (k, ma[k], mb[k])
    assert one["metrics"][0]["loss_n"] > 0


@pytest.mark.parametrize("algo", ALGOS)
def test_layout_and_no_recompilation(sharded_results, algo):
    one, eight = sharded_results[algo]
    assert eight["client_devices"] == 8 and eight["client_shard_rows"] == 1
    assert one["client_devices"] == 1 and one["client_shard_rows"] == 8
    if eight["server_copies"]:
        assert not eight["server_replicated"]
    else:
        assert eight["server_replicated"]
    assert one["recompiles"] == 0 and eight["recompiles"] == 0


def test_indivisible_clients_is_a_clear_error(sharded_results):
    assert "6 clients cannot be split evenly over 4 devices" in sharded_results["error"]


def test_parse_and_resolve_devices():
    assert sharding.parse_devices("auto") == "auto" and sharding.parse_devices("0") == "auto"
    assert sharding.parse_devices("2") == 2
    with pytest.raises(Exception, match="positive device count"):
        sharding.parse_devices("-1")
    assert sharding.resolve_devices("auto") == jax.devices()
    assert len(sharding.resolve_devices(1)) == 1
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"devices={n}: {n - 1} {jax.default_backend()} device") as e:
        sharding.resolve_devices(n)
    if jax.default_backend() == "cpu":                                   # the hint for CPU users
        assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in str(e.value)


def test_server_copies_are_client_state_and_a_shared_server_is_not():
    from conftest import make_toy
    shape = lambda name: jax.eval_shape(ALGORITHMS[name](make_toy(), Config(num_clients=4), 6).init,
                                        jax.random.key(0))
    for name in ("sl_multi_server", "fed_avg"):        # server copies: in clients.shared, split over devices
        st = shape(name)
        assert st.server is None and jax.tree_util.tree_leaves(st.clients.shared[1])[0].shape[0] == 4
    st = shape("fsl_sage")                              # one server: replicated
    assert st.server is not None and all(l.shape[:1] != (4,) or l.ndim == 0
                                         for l in jax.tree_util.tree_leaves(st.server.vars.params))
