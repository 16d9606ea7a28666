"""A real 2-process run (jax.distributed on CPU, gloo collectives, coordinator on
127.0.0.1) equals the single-process run with the same seed, and only process 0
writes files.

Each process has one CPU device; the client axis is sharded over both
processes' devices (``devices="auto"``). Checked for full participation and for
a cohort run (population 7, cohort 4), whose host-side population store is
kept identical in every process. A 2-process cohort run of 3 rounds resumed by 2
processes for 2 more (its store on disk) equals the uninterrupted 5-round 2-process run.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fslsage_jax import sharding
from fslsage_jax.simulate import RunOptions, Task, run_simulation

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETUP = textwrap.dedent("""
    import types
    import numpy as np
    from conftest import make_toy, toy_config
    from fslsage_jax.simulate import RunOptions, Task, run_simulation

    TOY = make_toy()   # one instance: the compiled algorithm is reused across runs

    def task(m):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(m, 6, 4)).astype(np.float32)
        y = ((x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0.5)).astype(np.int32)
        counts = np.array([6, 5, 4, 6, 3, 5, 2][:m], np.int32)
        tx = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4)
        ty = np.array([0, 1, 2, 1, 0], np.int32)
        return Task(TOY, toy_config(num_clients=m), types.SimpleNamespace(x=x, y=y, counts=counts), tx, ty)

    RUNS = {"full": (4, None), "cohort": (7, 4)}

    def run(name, out, devices, rounds=3, **kw):
        m, k = RUNS[name]
        return run_simulation("fsl_sage", task(m), RunOptions(
            rounds=rounds, seed=1, progress=False, checkpoint_every=3, out_dir=out, devices=devices,
            cohort_size=k, **kw))
""")

WORKER = SETUP + textwrap.dedent("""
    import sys
    pid, port, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from fslsage_jax import sharding
    sharding.init_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=30)
    import jax
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    mesh = sharding.client_mesh("auto")
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}
    for name in RUNS:
        run(name, f"{out}/{name}-p{pid}", "auto")
    # both processes resume a copy of the 3-round cohort run (every process reads the checkpoint)
    import shutil
    from jax.experimental import multihost_utils
    if pid == 0:
        shutil.copytree(f"{out}/cohort-p0", f"{out}/cohort-resumed")
    multihost_utils.sync_global_devices("copied")
    run("cohort", f"{out}/cohort-resumed", "auto", rounds=5, resume=True, population_store="disk")
    run("cohort", f"{out}/cohort5-p{pid}", "auto", rounds=5)
    print("DONE", pid, flush=True)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path):
    return [json.loads(l) for l in open(path).read().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + HERE}
    if "device_count" in env.get("XLA_FLAGS", ""):     # one CPU device per process
        env.pop("XLA_FLAGS")
    port = _free_port()
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, HERE, str(i), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    # the single-process reference runs here meanwhile
    ns = {}
    exec(SETUP, ns)
    for name in ns["RUNS"]:
        ns["run"](name, str(out / f"{name}-single"), 1)
    results = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e[-3000:]
    return out, time.time() - t0, ns


METRICS = ("test_accuracy", "test_loss", "train_loss", "grad_cosine", "align_loss_first_epoch",
           "align_loss_last_epoch")


@pytest.mark.parametrize("name", ["full", "cohort"])
def test_two_processes_equal_one(runs, name):
    out, _, _ = runs
    ref, got = _lines(out / f"{name}-single" / "metrics.jsonl"), _lines(out / f"{name}-p0" / "metrics.jsonl")
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert a["comm"] == b["comm"] and a["comm_bytes"] == b["comm_bytes"]
        for k in METRICS:
            if a.get(k) is None:
                assert b.get(k) is None, k
            else:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    s_ref, s = (json.loads((out / d / "summary.json").read_text()) for d in (f"{name}-single", f"{name}-p0"))
    assert s["total_bytes"] == s_ref["total_bytes"] and s["rounds_run"] == 3
    if name == "cohort":
        assert s["clients_taken_part"] == s_ref["clients_taken_part"]


def test_only_process_zero_writes(runs):
    out, _, _ = runs
    for name in ("full", "cohort"):
        p0 = out / f"{name}-p0"
        assert (p0 / "metrics.jsonl").is_file() and (p0 / "summary.json").is_file()
        assert [c.name for c in (p0 / "checkpoints").iterdir()] == ["round_000003"]
        assert not (out / f"{name}-p1").exists()
    assert (out / "cohort-p0" / "checkpoints" / "round_000003" / "population.npz").is_file()


def test_two_processes_resume_a_two_process_cohort_run(runs):
    out, _, _ = runs
    drop = ("round_time_s", "eval_time_s")
    got, ref = ([{k: v for k, v in r.items() if k not in drop} for r in _lines(out / d / "metrics.jsonl")]
                for d in ("cohort-resumed", "cohort5-p0"))
    assert len(got) == 5 and got == ref
    s, s_ref = (json.loads((out / d / "summary.json").read_text()) for d in ("cohort-resumed", "cohort5-p0"))
    assert s["rounds_run"] == 5 and s["comm"] == s_ref["comm"]
    assert s["clients_taken_part"] == s_ref["clients_taken_part"]
    assert s["population_store_disk_bytes"] > 0 == s_ref["population_store_disk_bytes"]
    assert [c.name for c in (out / "cohort-resumed" / "checkpoints").iterdir()] == ["round_000003", "round_000005"]
    assert not (out / "cohort-resumed" / "population_store").exists() and not (out / "cohort5-p1").exists()


def test_a_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
    """The checkpoint holds the gathered global arrays (and the population store): one
    process continues the 2-process run for 2 more rounds like the single-process run."""
    import shutil
    out, _, ns = runs
    for name in ("cohort",):
        m, k = ns["RUNS"][name]
        for src in ("single", "p0"):
            run_dir = tmp_path / f"{name}-{src}"
            shutil.copytree(out / f"{name}-{src}", run_dir)
            run_simulation("fsl_sage", ns["task"](m), RunOptions(
                rounds=5, seed=1, progress=False, checkpoint_every=5, out_dir=str(run_dir), cohort_size=k,
                resume=True))
        ref, got = (_lines(tmp_path / f"{name}-{src}" / "metrics.jsonl") for src in ("single", "p0"))
        assert len(got) == 5 and [r["comm"] for r in ref] == [r["comm"] for r in got]
        np.testing.assert_allclose([r["test_loss"] for r in got], [r["test_loss"] for r in ref], rtol=1e-5)


def test_bad_distributed_arguments_fail_fast():
    with pytest.raises(ValueError, match="--process-id 2: must lie in 0..1"):
        sharding.init_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        sharding.init_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="--num-processes 0"):
        sharding.init_distributed("127.0.0.1:1234", 0, 0)
    t0 = time.time()
    with pytest.raises(TimeoutError, match="no answer within 1 s"):
        sharding.init_distributed(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1)
    assert time.time() - t0 < 5


def test_importing_the_library_leaves_the_backend_uninitialised():
    """jax.distributed.initialize must come before any backend use; the CLI imports the
    library first (a module-level jax.random.key once broke every multi-process run)."""
    code = ("import jax._src.xla_bridge as xb, fslsage_jax, fslsage_jax.experiment, fslsage_jax.simulate, "
            "fslsage_jax.population, fslsage_jax.memory; print(xb.backends_are_initialized())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-2000:]
