"""The CLI's cohort runs: a population of synthetic 8x8x1 clients, killed with SIGKILL
in the middle of a checkpoint save and resumed, equals the uninterrupted run; bad
cohort and multi-process flags exit 2 with one line and write nothing."""
import json
import os
import signal
import subprocess
import sys

import pytest

from fslsage_jax import checkpoint
from conftest import KILL_IN_SAVE, cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
# A cohort of 4 clients of 5 runs the programs of test_resume.py's CLI runs (the same settings but
# the population and checkpoints): the compilation cache shares them.
POP = ["--algo", "fsl_sage", "--dataset", "synthetic", "--synthetic-shape", "8x8x1",
       "--synthetic-samples-per-client", "5", "--eval-subset", "32", "--num-clients", "40",
       "--cohort-size", "4", "--batch-size", "2", "--rounds", "4", "--checkpoint-every", "1",
       "--align-interval", "2", "--align-epochs", "1", "--align-batch-size", "8", "--align-buffer-size", "8",
       "--no-progress"]
TIMES = ("round_time_s", "eval_time_s")
DROP = ("wall_time_s", "first_round_time_s", "mean_round_time_s")

def _run(args, env, script=RUN):
    p = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                       timeout=900, check=False)
    return p.returncode, p.stdout, p.stderr


def _lines(path):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMES}
            for l in open(path).read().splitlines()]



def test_cohort_run_killed_in_a_save_resumes_exactly(tmp_path, env):
    """The uninterrupted run and the last resume run in this process (one build of the
    programs); the run killed in a save is a CLI process."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli_main([*POP, "--out", str(ref)]) == 0
    s = json.loads((ref / "summary.json").read_text())
    assert s["cohort_size"] == 4 and 4 <= s["clients_taken_part"] <= 16
    assert s["comm"]["model_up"] == 4 * 4 * s["model_bytes"]["client"]
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_SAVE.format(experiments=os.path.join(ROOT, "experiments")))
    code, _, err = _run(["3", *POP, "--out", str(run)], env, script=str(script))
    assert code == -signal.SIGKILL, err
    assert checkpoint.latest(str(run)).rounds == 2
    assert (run / "checkpoints" / ".tmp-round_000003" / "population.npz").is_file()
    assert _lines(run / "metrics.jsonl") == _lines(ref / "metrics.jsonl")[:3]    # the CLI process's rounds
    assert cli_main(["--resume", str(run)]) == 0
    assert _lines(run / "metrics.jsonl") == _lines(ref / "metrics.jsonl")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert {k: v for k, v in a.items() if k not in DROP} == {k: v for k, v in b.items() if k not in DROP}


BASE = POP[:POP.index("--cohort-size")] + POP[POP.index("--cohort-size") + 2:]


@pytest.mark.parametrize("flags,msg", [
    (["--cohort-size", "0"], "--cohort-size 0: must lie in 1..40"),
    (["--cohort-size", "41"], "--cohort-size 41: must lie in 1..40"),
    (["--population-store", "disk"], "--population-store disk: only with --cohort-size smaller than"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:9"],
     "--process-id 2: must lie in 0..1"),
    (["--num-processes", "2", "--process-id", "-1", "--coordinator", "127.0.0.1:9"],
     "--process-id -1: must lie in 0..1"),
    (["--coordinator", "nowhere"], "--coordinator nowhere: expected HOST:PORT"),
    (["--synthetic-shape", "8x8"], "--synthetic-shape 8x8: expected HxWxC"),
])
def test_bad_population_flags_exit_2_and_write_nothing(tmp_path, capfd, flags, msg):
    """In this process (a CLI start each costs seconds); the subprocess test below checks that
    the whole process prints nothing else."""
    with pytest.raises(SystemExit) as e:
        cli_main([*BASE, *flags, "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {msg}"), err
    assert not (tmp_path / "out").exists()


def test_unanswered_coordinator_exits_2_with_one_line_and_writes_nothing(tmp_path, env):
    flags = ["--num-processes", "2", "--process-id", "1", "--coordinator", "127.0.0.1:9",
             "--distributed-timeout", "1"]
    code, out, err = _run([*BASE, *flags, "--out", str(tmp_path / "out")], env)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: --coordinator 127.0.0.1:9: no answer within 1 s"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
