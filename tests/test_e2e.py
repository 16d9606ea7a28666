"""End to end on real data (digits) through the CLI: every algorithm learns, and
``--algo all`` writes every output file and one comparison table.

Measured on a 2-core CPU (jax 0.10.2), 3 iid clients, batch 32, 10 rounds,
otherwise the paper's defaults (Q = 5, l = 10): final (best) test accuracy
FedAvg and SplitFed-MS 0.953 (0.953; the two are the same computation here),
SplitFed-SS 0.972 (0.972), CSE-FSL 0.953 (0.953), FSL-SAGE 0.867 (0.919: its
auxiliary model, aligned at round 0 only, drifts from the server until the
next alignment at round 10), at -O1 (see ``_o1``; at -O0 CSE-FSL 0.956 and
FSL-SAGE 0.856 (0.939)). FSL-SAGE's best with seeds 1-3: 0.919-0.928 at -O0 and
-O1 alike. Bounds leave 3 points of margin or more for other CPUs and XLA versions.
"""
import json
import os
import re
import subprocess
import sys

from fslsage_jax.algorithms import ALGORITHMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BOUNDS = {"fed_avg": (0.9, 0.9), "sl_multi_server": (0.9, 0.9), "sl_single_server": (0.9, 0.9),
          "cse_fsl": (0.9, 0.88), "fsl_sage": (0.89, 0.78)}     # (best, final)


def _o1(env):
    """This test runs 45 rounds, so unlike the compile-bound rest of the suite it is run-time
    bound: LLVM -O1 runs a round 3x faster than the tests' -O0 for a little more compile
    (on one core 78 s -> 60 s); a subprocess, as the level is fixed when a backend starts."""
    flags = re.sub(r"--xla_backend_optimization_level=\S*", "", env.get("XLA_FLAGS", ""))
    return {**env, "XLA_FLAGS": (flags + " --xla_backend_optimization_level=1").strip()}


def test_all_algorithms_learn_digits_and_write_outputs(tmp_path, env):
    out = tmp_path / "all"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algo", "all",
                        "--rounds", "10", "--batch-size", "32", "--out", str(out), "--no-progress"],
                       env=_o1(env), capture_output=True, text=True, timeout=1800, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = p.stdout
    for algo in ALGORITHMS:
        d = out / algo
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["algo"] == algo and cfg["config"]["batch_size"] == 32
        assert cfg["strategy"] == "vmap" and cfg["config"]["strategy"] == "vmap"   # auto, 3 digits clients
        recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in recs] == list(range(10))
        for key in ["test_accuracy", "test_loss", "train_loss", "comm_bytes", "comm", "round_time_s"]:
            assert key in recs[0]
        assert ("grad_cosine" in recs[0]) == (algo == "fsl_sage")
        s = json.loads((d / "summary.json").read_text())
        assert s["rounds_run"] == 10 and s["total_bytes"] == recs[-1]["comm_bytes"]
        assert s["stop_reason"] == "rounds"
        assert set(s["model_bytes"]) == {"client", "server", "aux", "full"}
        assert s["client_sample_counts"] == [479, 479, 479]
        if algo == "fsl_sage":
            # round 0 aligned the auxiliary models (l = 10): the estimate points along the
            # server's gradient (measured 0.61; 0.02 with alignment disabled) and the
            # gradient-matching loss fell over the 100 alignment epochs (measured 0.019 -> 0.0007)
            assert recs[0]["grad_cosine"] > 0.4, recs[0]["grad_cosine"]
            first, last = recs[0]["align_loss_first_epoch"], recs[0]["align_loss_last_epoch"]
            assert first > 0 and last < 0.2 * first, (first, last)
        best_min, final_min = BOUNDS[algo]
        assert s["best_accuracy"] >= best_min and s["final_accuracy"] >= final_min, (algo, s)
        assert f"| {algo} |" in printed
    table = json.loads((out / "comparison.json").read_text())
    assert [s["algo"] for s in table] == list(ALGORITHMS)
