"""Never lose a run: checkpoints, exact resume, divergence and interrupts.

In-process tests use the toy split model (every algorithm, seconds); the CLI
tests run the real CLI on synthetic 8x8 images, kill it with SIGKILL / SIGTERM in
a subprocess, then resume and compare ``metrics.jsonl`` with an uninterrupted run
(identical except the time fields).
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax import checkpoint
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.simulate import RunOptions, Task, read_metrics, run_simulation, tree_all_finite
from conftest import KILL_IN_SAVE, cli_main, toy_client_data, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = ("round_time_s", "eval_time_s")
TEST_X, TEST_Y = np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4), np.array([0, 1, 2, 1, 0], np.int32)


_data, _cfg = toy_client_data, toy_config


def _lines(path):
    return [json.loads(l) for l in open(path).read().splitlines()]


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in recs]


def _sim(toy, algo, out, **kw):
    kw = {"rounds": 5, "seed": 3, "progress": False, "checkpoint_every": 2, **kw}
    task = Task(toy, kw.pop("cfg", _cfg()), _data(), TEST_X, TEST_Y, kw.pop("frozen", None),
                kw.pop("on_finish", None))
    return run_simulation(algo, task, RunOptions(out_dir=str(out), **kw))


class StopAfter:
    """``stop_requested`` that turns true once ``n`` rounds ran in this process."""
    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.n


_REFS = {}


def _ref(toy, tmp_path_factory, algo):
    """An uninterrupted 5-round run of ``algo`` (computed once per module and worker)."""
    if algo not in _REFS:
        out = tmp_path_factory.mktemp(f"ref-{algo}")
        s = _sim(toy, algo, out)
        _REFS[algo] = (_lines(out / "metrics.jsonl"), s)
    return _REFS[algo]


DROP = ("wall_time_s", "first_round_time_s", "mean_round_time_s")


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_interrupt_then_resume_equals_uninterrupted(toy, tmp_path, tmp_path_factory, algo):
    ref_recs, ref = _ref(toy, tmp_path_factory, algo)
    s1 = _sim(toy, algo, tmp_path, stop_requested=StopAfter(3))   # stops after round index 2
    assert s1["stop_reason"] == "interrupted" and s1["rounds_run"] == 3
    assert [c.rounds for c in checkpoint.list_checkpoints(str(tmp_path))] == [2, 3]
    s2 = _sim(toy, algo, tmp_path, resume=True)
    assert s2["stop_reason"] == "rounds"
    assert _strip(_lines(tmp_path / "metrics.jsonl")) == _strip(ref_recs)
    assert {k: v for k, v in s2.items() if k not in DROP} == {k: v for k, v in ref.items() if k not in DROP}
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_run"] == 5


def test_resume_reuses_the_compiled_programs(toy, tmp_path, caplog):
    """A restored state is placed as a fresh one is: resuming in the same process compiles
    (or loads from the persistent cache) none of the round's programs again. The Config is
    this test's own, so no other test built these programs (in any placement) before."""
    cfg = _cfg(align_batch_size=5)
    _sim(toy, "fsl_sage", tmp_path, cfg=cfg, stop_requested=StopAfter(3))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("DEBUG"):
            assert _sim(toy, "fsl_sage", tmp_path, cfg=cfg, resume=True)["rounds_run"] == 5
            jax.jit(lambda v: v * 3.0)(jnp.arange(5.0))      # a new program: the log is on
    finally:
        jax.config.update("jax_log_compiles", False)
    logged = [r.getMessage() for r in caplog.records]
    assert any("<lambda>" in m for m in logged)
    again = [m for m in logged if re.search(r"jit[(_](one|begin|finish)\b", m)]   # the round's programs
    assert again == [], again


def test_lost_rounds_after_checkpoint_are_redone_once(toy, tmp_path, tmp_path_factory):
    ref_recs, _ = _ref(toy, tmp_path_factory, "fsl_sage")
    _sim(toy, "fsl_sage", tmp_path, stop_requested=StopAfter(4))   # checkpoints after rounds 2 and 4
    # as if killed after round index 3 was written, before its checkpoint: drop the newest
    # checkpoint, leave a half-written line at the end of the file and a save cut short
    shutil.rmtree(checkpoint.latest(str(tmp_path)).path)
    assert checkpoint.latest(str(tmp_path)).rounds == 2
    text = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert len(text) == 4
    (tmp_path / "metrics.jsonl").write_text("".join(text) + text[3][:10])
    os.makedirs(tmp_path / "checkpoints" / ".tmp-round_000004" / "state")
    _sim(toy, "fsl_sage", tmp_path, resume=True)
    assert _strip(_lines(tmp_path / "metrics.jsonl")) == _strip(ref_recs)
    assert not (tmp_path / "checkpoints" / ".tmp-round_000004").exists()


def test_rounds_can_be_raised_on_resume(toy, tmp_path, tmp_path_factory):
    ref_recs, ref = _ref(toy, tmp_path_factory, "cse_fsl")
    assert _sim(toy, "cse_fsl", tmp_path, rounds=3)["rounds_run"] == 3
    assert checkpoint.latest(str(tmp_path)).rounds == 3                # always saved at the end
    s = _sim(toy, "cse_fsl", tmp_path, rounds=5, resume=True)
    assert {k: v for k, v in s.items() if k not in DROP} == {k: v for k, v in ref.items() if k not in DROP}
    assert _strip(_lines(tmp_path / "metrics.jsonl")) == _strip(ref_recs)


def test_checkpoints_are_pruned_and_skip_frozen(toy, tmp_path):
    _sim(toy, "sl_multi_server", tmp_path, rounds=4, checkpoint_every=1, keep_checkpoints=2)
    assert [c.rounds for c in checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["round_000003", "round_000004"]
    meta = checkpoint.latest(str(tmp_path)).meta
    assert meta["rounds"] == 4 and meta["algo"] == "sl_multi_server"
    assert sum(meta["ledger"].values()) > 0


def test_frozen_weights_are_not_saved_and_come_from_the_template(tmp_path):
    from typing import NamedTuple

    class S(NamedTuple):
        round: jax.Array
        params: jax.Array
        frozen: object = None

    s = S(jnp.int32(4), jnp.arange(3.0), {"w": jnp.ones((1000,))})
    c = checkpoint.save(str(tmp_path), s, 4, {"ledger": {}})
    assert c.meta["num_leaves"] == 2                                  # frozen left out
    template = S(jnp.int32(0), jnp.zeros(3), {"w": jnp.full((1000,), 2.0)})
    r = checkpoint.restore(checkpoint.latest(str(tmp_path)), template)
    assert int(r.round) == 4 and r.params.tolist() == [0.0, 1.0, 2.0]
    assert r.frozen is template.frozen
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.restore(c, S(jnp.int32(0), jnp.zeros(4)))


def test_read_metrics_refuses_missing_rounds(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 0}\n{"round": 1}\n')
    assert read_metrics(str(p), 2) == [{"round": 0}, {"round": 1}]
    with pytest.raises(ValueError, match="2 complete rounds"):
        read_metrics(str(p), 3)


def test_tree_all_finite_checks_every_float_leaf():
    t = {"a": jnp.ones(3), "b": (jnp.int32(1), jnp.array([1.0, 2.0]))}
    assert bool(tree_all_finite(t))
    assert not bool(tree_all_finite({**t, "b": (jnp.int32(1), jnp.array([1.0, jnp.inf]))}))
    assert not bool(tree_all_finite({**t, "a": jnp.array([jnp.nan, 0, 0])}))


def test_divergence_stops_keeps_rounds_and_last_good_checkpoint(toy, tmp_path):
    _sim(toy, "fed_avg", tmp_path, rounds=2)                          # two good rounds, checkpointed
    good = _lines(tmp_path / "metrics.jsonl")
    # continue the same state with a learning rate that overflows at once
    s = _sim(toy, "fed_avg", tmp_path, cfg=_cfg(lr=1e30), rounds=6, checkpoint_every=1, resume=True)
    assert s["stop_reason"] == "diverged" and s["diverged_round"] == 2 and s["rounds_run"] == 3
    recs = _lines(tmp_path / "metrics.jsonl")
    assert recs[:2] == good and recs[2]["round"] == 2
    assert recs[2]["train_loss"] is None or recs[2]["test_loss"] is None   # non-finite -> null
    assert [c.rounds for c in checkpoint.list_checkpoints(str(tmp_path))] == [2]   # not saved
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"] == "diverged"


def _nan_outside_the_model():
    """FedAvg with one more client leaf that turns NaN at the first step and never reaches
    the model (a stand-in for a non-finite optimizer state or buffer)."""
    inner = ALGORITHMS["fed_avg"]

    def build(ctx):
        parts = inner.build(ctx)

        def step(state, *a):
            own, probe = state.clients.own
            st, acc = parts.step(state._replace(clients=state.clients._replace(own=own)), *a)
            return st._replace(clients=st.clients._replace(own=(st.clients.own, probe * jnp.nan))), acc

        def init(cv, sv, av):
            shared, own, server = parts.init(cv, sv, av)
            return shared, (own, jnp.float32(1.0)), server
        return parts._replace(init=init, step=step)
    return dataclasses.replace(inner, name="fed_avg_nan_probe", build=build)


def test_a_non_finite_leaf_outside_the_model_never_reaches_a_checkpoint(toy, tmp_path):
    """Rounds that may be followed by a checkpoint (or end the run) check every state leaf;
    the others rely on the losses."""
    algo = _nan_outside_the_model()
    s = _sim(toy, algo, tmp_path / "ck", rounds=5, checkpoint_every=2)
    assert s["stop_reason"] == "diverged" and s["diverged_round"] == 1    # round 0: not a checkpoint round
    assert checkpoint.list_checkpoints(str(tmp_path / "ck")) == []
    s = _sim(toy, algo, tmp_path / "none", rounds=3, checkpoint_every=None)
    assert s["stop_reason"] == "diverged" and s["diverged_round"] == 2    # the last round


def test_same_result_across_strategies(toy, tmp_path, tmp_path_factory):
    ref_recs, _ = _ref(toy, tmp_path_factory, "fsl_sage")
    _sim(toy, "fsl_sage", tmp_path, rounds=2, cfg=_cfg(strategy="map"))
    recs = _lines(tmp_path / "metrics.jsonl")
    assert len(recs) == 2
    for x, y in zip(ref_recs, recs):
        assert x["comm"] == y["comm"]
        for k in ("test_loss", "train_loss", "grad_cosine", "test_accuracy"):
            assert x[k] == pytest.approx(y[k], rel=1e-5), (k, x["round"])


# ----------------------------------------------------------------------------- the CLI, killed
# Synthetic 8x8x1 images (digits' CNN), 4 shards of 5, batch 2: a round is 3 steps (the last one
# partial) of milliseconds, so a run costs its start-up (imports, tracing); only the processes that
# get a signal are subprocesses, the reference and the last resumes run in this process (programs
# built once). test_population_cli.py runs the same programs (compilation cache).
CLI = ["--dataset", "synthetic", "--synthetic-shape", "8x8x1", "--synthetic-samples-per-client", "5",
       "--eval-subset", "32", "--num-clients", "4", "--batch-size", "2", "--rounds", "4", "--checkpoint-every", "2",
       "--no-progress"]
SAGE = ["--algo", "fsl_sage", *CLI, "--align-epochs", "1", "--align-interval", "2", "--align-batch-size", "8",
        "--align-buffer-size", "8"]

# Runs the CLI's main() (argv[3:]) holding its stop poll number argv[1] (after that many rounds, before
# the last one's metrics line) until a signal arrives (at most 2 minutes), after creating the file
# argv[2]: the test's signal lands mid-run on a fast machine and a slow one alike.
HOLD = """
import sys, time
sys.path.insert(0, {experiments!r})
import run
at, marker = int(sys.argv[1]), sys.argv[2]
poll, calls = run.StopFlag.__call__, [0]

def held(self):
    calls[0] += 1
    if calls[0] == at:
        open(marker, "w").close()
        t0 = time.time()
        while self.signum is None and time.time() - t0 < 120:
            time.sleep(0.01)
    return poll(self)

run.StopFlag.__call__ = held
sys.exit(run.main(sys.argv[3:]))
"""



def _start(args, env, script=None):
    script = script or os.path.join(ROOT, "experiments", "run.py")
    return subprocess.Popen([sys.executable, script, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _held(tmp_path, env, at, args):
    """A CLI process held at its stop poll ``at`` (see HOLD), once it is there."""
    script, marker = tmp_path / "hold.py", tmp_path / "held"
    script.write_text(HOLD.format(experiments=os.path.join(ROOT, "experiments")))
    p = _start([str(at), str(marker), *args], env, script=str(script))
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None or time.time() - t0 > 300:
            p.kill()
            raise AssertionError(f"never held at poll {at}: {p.communicate()}")
        time.sleep(0.05)
    return p


def _count_lines(path):
    with open(path) as f:
        return f.read().count("\n")


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()                       # no-op once it exited; never left behind by a failure
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli_ref(tmp_path_factory):
    """The uninterrupted CLI run the kill tests compare with (in this process)."""
    ref_dir = tmp_path_factory.mktemp("cli") / "ref"
    assert cli_main([*SAGE, "--out", str(ref_dir)]) == 0
    return ref_dir


def _same_as_ref(run_dir, ref_dir, summaries=True):
    assert _strip(_lines(run_dir / "metrics.jsonl")) == _strip(_lines(ref_dir / "metrics.jsonl"))
    if summaries:
        a, b = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
        assert {k: v for k, v in a.items() if k not in DROP} == {k: v for k, v in b.items() if k not in DROP}


def test_cli_sigterm_then_kill_during_save_then_resume_is_identical(tmp_path, env, cli_ref):
    ref_dir, run_dir = cli_ref, tmp_path / "run"
    p = _held(tmp_path, env, 2, [*SAGE, "--out", str(run_dir)])        # after rounds 0 and 1
    p.send_signal(signal.SIGTERM)
    code, _, err = _finish(p)
    assert code == 143, err
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted" and s["rounds_run"] == 2     # stopped after that round
    assert checkpoint.latest(str(run_dir)).rounds == s["rounds_run"]
    assert "--resume" in err.strip().splitlines()[-1]
    # resume in a new process, and die by SIGKILL in the middle of writing the round-4 checkpoint
    killer = tmp_path / "kill_in_save.py"
    killer.write_text(KILL_IN_SAVE.format(experiments=os.path.join(ROOT, "experiments")))
    code, _, err = _finish(_start(["4", "--resume", str(run_dir)], env, script=str(killer)))
    assert code == -signal.SIGKILL, err
    assert checkpoint.latest(str(run_dir)).rounds == s["rounds_run"]        # the old one stays valid
    assert (run_dir / "checkpoints" / ".tmp-round_000004").is_dir()
    assert len(_lines(run_dir / "metrics.jsonl")) == 4
    _same_as_ref(run_dir, ref_dir, summaries=False)      # the resumed process's rounds 2, 3 already
    assert cli_main(["--resume", str(run_dir)]) == 0
    _same_as_ref(run_dir, ref_dir)


def test_cli_sigkill_after_a_round_then_resume_is_identical(tmp_path, env, cli_ref):
    ref_dir, run_dir = cli_ref, tmp_path / "run"
    p = _held(tmp_path, env, 3, [*SAGE, "--out", str(run_dir)])        # round 2 done, not yet written
    p.kill()
    p.communicate()
    assert checkpoint.latest(str(run_dir)).rounds == 2 and p.returncode == -signal.SIGKILL
    assert cli_main(["--resume", str(run_dir)]) == 0
    _same_as_ref(run_dir, ref_dir)


def test_cli_divergence_exits_3_with_one_line(tmp_path, capsys):
    code = cli_main(["--algo", "fed_avg", *CLI, "--rounds", "2", "--lr", "1e30", "--out", str(tmp_path)])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fed_avg diverged at round 0" in err[0]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reason"] == "diverged" and s["diverged_round"] == 0
    assert checkpoint.latest(str(tmp_path)) is None


def test_signal_sets_the_stop_flag_and_exit_codes():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import run
    before = signal.getsignal(signal.SIGINT)
    stop = run.StopFlag().install()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)              # handled: no KeyboardInterrupt
        time.sleep(0.01)
        assert stop() and stop.signum == signal.SIGINT
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
    assert run.exit_code([{"stop_reason": "rounds"}, {"stop_reason": "interrupted"}], stop) == 130
    stop.signum = signal.SIGTERM
    assert run.exit_code([{"stop_reason": "interrupted"}], stop) == 143
    assert run.exit_code([{"stop_reason": "diverged"}], run.StopFlag()) == 3
    assert run.exit_code([{"stop_reason": "comm_budget"}], run.StopFlag()) == 0


def test_default_relative_out_checkpoints_and_resumes(tmp_path, monkeypatch):
    """The default --out is relative (runs/...): checkpoints and --resume must work with it."""
    monkeypatch.chdir(tmp_path)
    assert cli_main([*SAGE, "--rounds", "2"]) == 0               # the kill tests' programs
    (out,) = os.listdir("runs")
    rel = os.path.join("runs", out)
    assert checkpoint.latest(rel).rounds == 2
    assert cli_main(["--resume", rel, "--rounds", "3", "--no-progress"]) == 0
    assert _count_lines(os.path.join(rel, "metrics.jsonl")) == 3
