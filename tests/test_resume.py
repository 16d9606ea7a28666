"""Never lose a run: checkpoints, exact resume, divergence and interrupts.

In-process tests use the toy split model (every algorithm, seconds); the
subprocess tests run the real CLI on digits and kill it with SIGKILL / SIGTERM,
then resume and compare ``metrics.jsonl`` with an uninterrupted run (identical
except the time fields).
"""
import json
import os
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
from conftest import KILL_IN_SAVE, toy_client_data, toy_config

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
CLI = ["--num-clients", "4", "--batch-size", "128", "--rounds", "4", "--checkpoint-every", "2",
       "--no-progress"]
SAGE = ["--align-epochs", "1", "--align-interval", "2", "--align-batch-size", "100", "--align-buffer-size", "100"]

def _start(args, env, script=None):
    script = script or os.path.join(ROOT, "experiments", "run.py")
    return subprocess.Popen([sys.executable, script, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count_lines(path):
    with open(path) as f:
        return f.read().count("\n")


def _wait_for_lines(path, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and _count_lines(path) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {n} rounds in {path} after {timeout} s")


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli_ref(tmp_path_factory, env):
    """The uninterrupted CLI run both kill tests compare with (one CLI start for both)."""
    ref_dir = tmp_path_factory.mktemp("cli") / "ref"
    code, _, err = _finish(_start(["--algo", "fsl_sage", *CLI, *SAGE, "--out", str(ref_dir)], env))
    assert code == 0, err
    return ref_dir


def test_cli_sigterm_then_kill_during_save_then_resume_is_identical(tmp_path, env, cli_ref):
    ref_dir, run_dir = cli_ref, tmp_path / "run"
    p = _start(["--algo", "fsl_sage", *CLI, *SAGE, "--out", str(run_dir)], env)
    _wait_for_lines(run_dir / "metrics.jsonl", 1, p)
    p.send_signal(signal.SIGTERM)
    code, _, err = _finish(p)
    assert code == 143, err
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted" and 1 <= s["rounds_run"] < 4
    assert checkpoint.latest(str(run_dir)).rounds == s["rounds_run"]
    assert "--resume" in err.strip().splitlines()[-1]
    # resume, and die by SIGKILL in the middle of writing the round-4 checkpoint
    killer = tmp_path / "kill_in_save.py"
    killer.write_text(KILL_IN_SAVE.format(experiments=os.path.join(ROOT, "experiments")))
    p = _start(["4", "--resume", str(run_dir)], env, script=str(killer))
    code, _, err = _finish(p)
    assert code == -signal.SIGKILL, err
    assert checkpoint.latest(str(run_dir)).rounds == s["rounds_run"]        # the old one stays valid
    assert (run_dir / "checkpoints" / ".tmp-round_000004").is_dir()
    assert len(_lines(run_dir / "metrics.jsonl")) == 4
    code, _, err = _finish(_start(["--resume", str(run_dir)], env))
    assert code == 0, err
    assert _strip(_lines(run_dir / "metrics.jsonl")) == _strip(_lines(ref_dir / "metrics.jsonl"))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert {k: v for k, v in a.items() if k not in DROP} == {k: v for k, v in b.items() if k not in DROP}


def test_cli_sigkill_after_a_round_then_resume_is_identical(tmp_path, env, cli_ref):
    ref_dir, run_dir = cli_ref, tmp_path / "run"
    p = _start(["--algo", "fsl_sage", *CLI, *SAGE, "--out", str(run_dir)], env)
    t0 = time.time()
    while checkpoint.latest(str(run_dir)) is None:                    # the round-2 checkpoint
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.05)
    p.kill()
    p.communicate()
    assert checkpoint.latest(str(run_dir)).rounds == 2 and p.returncode == -signal.SIGKILL
    code, _, err = _finish(_start(["--resume", str(run_dir)], env))
    assert code == 0, err
    assert _strip(_lines(run_dir / "metrics.jsonl")) == _strip(_lines(ref_dir / "metrics.jsonl"))


def test_cli_divergence_exits_3_with_one_line(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import run
    code = run.main(["--algo", "fed_avg", *CLI, "--rounds", "2", "--lr", "1e30", "--out", str(tmp_path)])
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import run
    monkeypatch.chdir(tmp_path)
    assert run.main(["--algo", "sl_single_server", *CLI, "--rounds", "2"]) == 0
    (out,) = os.listdir("runs")
    rel = os.path.join("runs", out)
    assert checkpoint.latest(rel).rounds == 2
    assert run.main(["--resume", rel, "--rounds", "3", "--no-progress"]) == 0
    assert _count_lines(os.path.join(rel, "metrics.jsonl")) == 3
