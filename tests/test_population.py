"""Cohort sampling with persistent per-client state (:mod:`fslsage_jax.population`).

The cohort round is checked against a reference written independently here: a
Python dict per client holds its persistent state, the K-client state is built
by hand for each round's cohort and ``run_round`` runs on it directly.
"""
import os
import tempfile

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fslsage_jax import checkpoint, population
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.engine import ClientArrays
from fslsage_jax.population import ClientStore, Cohort, sample_cohort
from fslsage_jax.simulate import RunOptions, Task, run_simulation
from conftest import make_toy, toy_config

N, K, N_MAX = 7, 3, 6
TOY = make_toy()     # one instance: simulate.build caches the compiled algorithm per split


def _algo(name, m):
    from fslsage_jax.simulate import build
    return build(name, TOY, toy_config(num_clients=m), N_MAX)[0]


def _pop_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, N_MAX, 4)).astype(np.float32)
    y = ((x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0.5)).astype(np.int32)
    counts = np.array([6, 5, 4, 6, 3, 5, 2], np.int32)
    return ClientArrays(x, y, counts)


def _rows(tree, i):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[i], tree)


def _stack(rows):
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *rows)


def _reference(algo_name, rounds, seed=3):
    """Cohort rounds built by hand: dict client -> its ``clients.own`` rows, run_round on the cohort."""
    algo = _algo(algo_name, K)
    state = algo.init(jax.random.key(0))
    init_rows = _rows(state.clients.own, 0)
    kept, data, mets = {}, _pop_data(), []
    for t in range(rounds):
        ids = sample_cohort(seed, t, N, K)
        own = jax.tree_util.tree_map(jnp.asarray, _stack([kept.get(int(i), init_rows) for i in ids]))
        state = state._replace(clients=state.clients._replace(own=own))
        cohort = ClientArrays(*(jnp.asarray(np.asarray(a)[ids]) for a in data))
        state, acc = algo.run_round(state, cohort, jax.random.key(100 + t))
        for j, i in enumerate(ids):
            kept[int(i)] = _rows(state.clients.own, j)
        mets.append(jax.device_get(acc))
    return state, kept, mets


@pytest.mark.parametrize("algo_name", sorted(ALGORITHMS))
def test_cohort_rounds_equal_hand_built_reference(algo_name):
    ref_state, ref_kept, ref_mets = _reference(algo_name, 3)
    algo = _algo(algo_name, K)
    state = algo.init(jax.random.key(0))
    pop = Cohort(_pop_data(), K, seed=3)
    pop.start(state)
    for t in range(3):
        state, data = pop.inputs(state, t)
        state, acc = algo.run_round(state, data, jax.random.key(100 + t))
        pop.write_back(state)
        acc = jax.device_get(acc)
        assert acc == ref_mets[t]
        assert acc["models"] == K
        # clients.shared is identical for every client after the round
        for leaf in jax.tree_util.tree_leaves(state.clients.shared):
            np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[0], leaf.shape))
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(ref_kept) == sorted(pop.store.stored_ids().tolist())
    for i, rows in ref_kept.items():
        got = pop.store.gather(np.array([i]))
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(rows)):
            np.testing.assert_array_equal(a[0], b)


def test_every_client_keeps_its_optimizer_state_in_clients_own():
    for defn in ALGORITHMS.values():
        for cfg in (toy_config(), toy_config(fedavg_server="shared")):
            st = jax.eval_shape(defn(TOY, cfg, N_MAX).init, jax.random.key(0))
            counts = [l for p, l in jax.tree_util.tree_leaves_with_path(st.clients.own)
                      if "count" in jax.tree_util.keystr(p)]
            assert counts and all(c.shape == (cfg.num_clients,) for c in counts)   # Adam step counts
            assert population.bytes_per_client(st) > 0
    shared = jax.eval_shape(ALGORITHMS["fed_avg"](TOY, toy_config(fedavg_server="shared"), N_MAX).init,
                            jax.random.key(0))
    assert len(shared.clients.own) == 2 and shared.server.opt is None   # (client opt, server opt) per client


def test_sample_cohort_is_seeded_distinct_sorted_and_weighted():
    a = sample_cohort(0, 5, 100_000, 100)
    assert len(set(a.tolist())) == 100 and (np.diff(a) > 0).all() and a.max() < 100_000
    np.testing.assert_array_equal(a, sample_cohort(0, 5, 100_000, 100))
    assert not np.array_equal(a, sample_cohort(0, 6, 100_000, 100))
    assert not np.array_equal(a, sample_cohort(1, 5, 100_000, 100))
    np.testing.assert_array_equal(sample_cohort(0, 0, 5, 5), np.arange(5))
    sizes = np.array([0, 10, 0, 10, 1, 10])
    for t in range(20):
        assert not {0, 2} & set(sample_cohort(0, t, 6, 3, sizes).tolist())
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match="cohort size"):
            sample_cohort(0, 0, 6, bad)
    with pytest.raises(ValueError, match="hold data"):
        sample_cohort(0, 0, 6, 5, sizes)


def test_store_allocates_only_for_clients_that_took_part(tmp_path):
    init = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int32(7)}
    s = ClientStore(init, 1_000_000, block_bytes=3 * 28)   # 28 bytes a client, 3 rows a block
    assert s.bytes_per_client == 28 and s.num_stored == 0 and len(s.blocks) == 0
    g = s.gather(np.array([5, 999_999]))
    np.testing.assert_array_equal(g["a"], np.stack([init["a"]] * 2))
    ids = np.array([3, 10, 999_999, 42, 7])
    rows = {"a": np.arange(30, dtype=np.float32).reshape(5, 2, 3) + 100, "n": np.arange(5, dtype=np.int32)}
    s.scatter(ids, rows)
    assert s.num_stored == 5 and len(s.blocks) == 2          # two blocks of 3 rows
    s.scatter(np.array([42, 1]), {"a": np.zeros((2, 2, 3), np.float32), "n": np.array([-1, -2], np.int32)})
    assert s.num_stored == 6
    got = s.gather(np.array([999_999, 42, 0, 1]))
    np.testing.assert_array_equal(got["a"][0], rows["a"][2])
    np.testing.assert_array_equal(got["a"][1], 0)
    np.testing.assert_array_equal(got["a"][2], init["a"])
    np.testing.assert_array_equal(got["n"], [2, -1, 7, -2])
    s.save(str(tmp_path / "p.npz"))
    s2 = ClientStore(init, 1_000_000, block_bytes=1 << 20)
    s2.load(str(tmp_path / "p.npz"))
    probe = np.array([0, 1, 3, 7, 10, 42, 999_999, 500])
    for a, b in zip(jax.tree_util.tree_leaves(s.gather(probe)), jax.tree_util.tree_leaves(s2.gather(probe))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        ClientStore({"a": np.zeros(4, np.float32), "n": np.int32(0)}, 10).load(str(tmp_path / "p.npz"))


TEST_X = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
TEST_Y = np.array([0, 1, 2, 1, 0], np.int32)


def _sim(algo, out, population=N, **kw):
    kw = {"rounds": 4, "seed": 3, "progress": False, "checkpoint_every": 1, "cohort_size": K, **kw}
    data = ClientArrays(*(a[:population] for a in _pop_data()))
    task = Task(TOY, toy_config(num_clients=population), data, TEST_X, TEST_Y)
    return run_simulation(algo, task, RunOptions(out_dir=str(out), **kw))


class StopAfter:
    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.n


def _lines(path):
    import json
    return [{k: v for k, v in json.loads(l).items() if k not in ("round_time_s", "eval_time_s")}
            for l in open(path).read().splitlines()]


@pytest.mark.parametrize("algo", ["fsl_sage", "sl_multi_server"])
def test_cohort_simulation_counts_cohort_messages_and_resumes_exactly(tmp_path, algo):
    from fslsage_jax.comm import sizes_of
    ref = _sim(algo, tmp_path / "ref")
    mb = ALGORITHMS[algo].model_bytes(sizes_of(make_toy()))
    assert ref["comm"]["model_up"] == 4 * K * mb
    if algo == "fsl_sage":     # aligned in rounds 0 and 2 (l = 2): K auxiliary models each
        assert ref["comm"]["aux_down"] == 2 * K * sizes_of(make_toy()).aux
    assert ref["cohort_size"] == K and 3 <= ref["clients_taken_part"] <= N
    ck = checkpoint.latest(str(tmp_path / "ref"))
    assert (tmp_path / "ref" / "checkpoints" / f"round_{ck.rounds:06d}" / population.STORE_FILE).is_file()
    s1 = _sim(algo, tmp_path / "run", stop_requested=StopAfter(2))
    assert s1["stop_reason"] == "interrupted" and s1["rounds_run"] == 2
    s2 = _sim(algo, tmp_path / "run", resume=True)
    assert _lines(tmp_path / "run" / "metrics.jsonl") == _lines(tmp_path / "ref" / "metrics.jsonl")
    assert s2["comm"] == ref["comm"] and s2["clients_taken_part"] == ref["clients_taken_part"]


def test_full_participation_takes_the_device_path(tmp_path):
    """A population of K: the K-client programs the cohort tests built."""
    a = _sim("cse_fsl", tmp_path / "a", population=K, cohort_size=None, rounds=2)
    b = _sim("cse_fsl", tmp_path / "b", population=K, cohort_size=K, rounds=2)
    assert "cohort_size" not in a and "cohort_size" not in b
    assert _lines(tmp_path / "a" / "metrics.jsonl") == _lines(tmp_path / "b" / "metrics.jsonl")


def _store_kit():
    """One client's state with leaves of several dtypes and shapes (scalars included)."""
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int32(7),
            "m": np.array([True, False, True]), "d": np.float64(-1.5)}


def _random_rows(rng, n):
    return {"w": rng.normal(size=(n, 2, 3)).astype(np.float32), "n": rng.integers(-9, 9, n).astype(np.int32),
            "m": rng.random((n, 3)) > 0.5, "d": rng.normal(size=n)}


def test_disk_and_mixed_stores_equal_a_dict_of_rows(tmp_path):
    """RAM, disk (own folder or a temporary one) and RAM-then-disk stores give what a plain
    dict of rows gives, across blocks; checkpoints move between them; close removes the files."""
    init, pop, bpc = _store_kit(), 500, 24 + 4 + 3 + 8
    stores = {"ram": ClientStore(init, pop, block_bytes=4 * bpc),
              "disk": ClientStore(init, pop, block_bytes=4 * bpc, ram_bytes=0, directory=str(tmp_path / "d")),
              "tmp": ClientStore(init, pop, block_bytes=4 * bpc, ram_bytes=0),
              "mixed": ClientStore(init, pop, block_bytes=4 * bpc, ram_bytes=2 * 4 * bpc)}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "block_00003.npy").write_bytes(b"left by a killed run")
    rng, ref = np.random.default_rng(0), {}
    for _ in range(12):
        ids = rng.choice(pop, size=rng.integers(1, 9), replace=False)
        rows = _random_rows(rng, len(ids))
        for j, i in enumerate(ids):
            ref[int(i)] = {k: v[j] for k, v in rows.items()}
        probe = rng.choice(pop, size=10, replace=False)
        for s in stores.values():
            s.scatter(ids, rows)
            got = s.gather(probe)
            for j, i in enumerate(probe):
                for k, v in ref.get(int(i), init).items():
                    np.testing.assert_array_equal(got[k][j], v)
                    assert got[k].dtype == np.asarray(v).dtype
    ram, disk, tmp, mixed = stores.values()
    assert ram.num_stored == disk.num_stored == len(ref) and len(ram.blocks) >= 5
    assert ram.disk_nbytes == 0 and disk.ram_nbytes == disk.slot.nbytes and 0 < mixed.disk_nbytes < mixed.nbytes
    assert sorted(os.listdir(tmp_path / "d")) == [f"block_{b:05d}.npy" for b in range(len(disk.blocks))]
    # the checkpoint file is a plain .npz: rows in row order of stored_ids
    disk.save(str(tmp_path / "disk.npz"))
    with np.load(tmp_path / "disk.npz") as z:
        ids = z["ids"]
        assert sorted(ids.tolist()) == sorted(ref)
        for leaf, key in zip(sorted(z.files)[1:], ("d", "m", "n", "w")):   # tree_flatten's key order
            np.testing.assert_array_equal(z[leaf], np.stack([ref[int(i)][key] for i in ids]))
    for dst in (ClientStore(init, pop, block_bytes=3 * bpc), mixed, tmp):
        dst.load(str(tmp_path / "disk.npz"))
        for a, b in zip(jax.tree_util.tree_leaves(dst.gather(np.arange(pop))),
                        jax.tree_util.tree_leaves(ram.gather(np.arange(pop)))):
            np.testing.assert_array_equal(a, b)
    tmp_dir = tmp._dir
    assert tmp_dir and os.listdir(tmp_dir)
    for s in stores.values():
        s.close()
    assert not (tmp_path / "d").exists() and not os.path.exists(tmp_dir)


def _run(algo, out, **kw):
    from fslsage_jax.simulate import run
    callbacks = kw.pop("callbacks", ())
    kw = {"rounds": 4, "seed": 3, "progress": False, "checkpoint_every": 4, "cohort_size": K, **kw}
    task = Task(TOY, toy_config(num_clients=N), _pop_data(), TEST_X, TEST_Y)
    return run(algo, task, RunOptions(out_dir=None if out is None else str(out), **kw), callbacks)


def test_cohort_run_on_disk_equals_ram_and_resumes(tmp_path, monkeypatch):
    from fslsage_jax import client_store
    seen = []

    def look(ev):     # the working store during the run: block files in RUN_DIR/population_store
        seen.append(sorted(os.listdir(tmp_path / "disk" / population.STORE_DIR)))

    ram = _run("fsl_sage", tmp_path / "ram", population_store="ram")
    disk = _run("fsl_sage", tmp_path / "disk", population_store="disk", callbacks=[look])
    assert seen and all(s and s[0] == "block_00000.npy" for s in seen)
    assert not (tmp_path / "disk" / population.STORE_DIR).exists()       # removed at the end
    assert ram.summary["population_store_disk_bytes"] == 0 < disk.summary["population_store_disk_bytes"]
    assert _lines(tmp_path / "ram" / "metrics.jsonl") == _lines(tmp_path / "disk" / "metrics.jsonl")
    for a, b in zip(jax.tree_util.tree_leaves(ram.state), jax.tree_util.tree_leaves(disk.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # interrupted on disk with a corrupt working store left behind, resumed on disk
    _run("fsl_sage", tmp_path / "run", population_store="disk", stop_requested=StopAfter(2))
    os.makedirs(tmp_path / "run" / population.STORE_DIR)
    (tmp_path / "run" / population.STORE_DIR / "block_00000.npy").write_bytes(b"\0" * 100)
    _run("fsl_sage", tmp_path / "run", population_store="disk", resume=True)
    assert _lines(tmp_path / "run" / "metrics.jsonl") == _lines(tmp_path / "ram" / "metrics.jsonl")
    # auto: RAM below the limit, disk above it; without out_dir a temporary folder, removed
    monkeypatch.setattr(client_store, "RAM_LIMIT_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    during = []
    auto = _run("fsl_sage", None, rounds=2, callbacks=[lambda ev: during.append(os.listdir(tmp_path / "tmp"))])
    assert auto.summary["population_store_disk_bytes"] > 0 and during[0][0].startswith("fslsage-population-")
    assert os.listdir(tmp_path / "tmp") == []
    assert [r["train_loss"] for r in auto.records] == [r["train_loss"] for r in ram.records[:2]]
    with pytest.raises(ValueError, match="population store 'ssd'"):
        _run("fsl_sage", None, population_store="ssd")
