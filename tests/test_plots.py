"""experiments/plot.py and experiments/sweep.py: labels and figures from fake run directories,
and one tiny real sweep through run.py on digits (the reading of runs: tests/test_results.py)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import plot
import sweep

from fslsage_jax.results import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(path, algo, accs, gibs, alpha=1.0, target=0.8, truncate=False, summary=True):
    """A run directory like run.py writes, with hand-chosen accuracy and GiB per round."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"algo": algo, "alpha": alpha, "dataset": "digits", "out": path,
                   "target_accuracy": target, "jax_version": "x"}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"round": t, "test_accuracy": a, "comm_gib": g, "test_loss": 1.0,
                                 "comm_bytes": int(g * 2 ** 30)}) + "\n"
                     for t, (a, g) in enumerate(zip(accs, gibs)))
        if truncate:
            f.write('{"round": 99, "test_accu')
    if summary:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"algo": algo, "target_accuracy": target, "stop_reason": "rounds"}, f)
    return path


def is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 5000


def test_labels_add_differing_config_only(tmp_path):
    a = load_run(fake_run(str(tmp_path / "a"), "fsl_sage", [0.5], [0.1], alpha=1.0))
    b = load_run(fake_run(str(tmp_path / "b"), "cse_fsl", [0.5], [0.1], alpha=1.0))
    c = load_run(fake_run(str(tmp_path / "c"), "fsl_sage", [0.5], [0.1], alpha=100.0))
    assert plot.run_labels([a, b]) == ["FSL-SAGE", "CSE-FSL"]          # "out" differs but is ignored
    assert plot.run_labels([a, c]) == ["FSL-SAGE (alpha=1)", "FSL-SAGE (alpha=100)"]


def test_plot_all_dir_png_and_table(tmp_path, capsys):
    parent = tmp_path / "all"
    fake_run(str(parent / "fsl_sage"), "fsl_sage", [0.3, 0.7, 0.85, 0.9], [0.01, 0.02, 0.03, 0.04])
    fake_run(str(parent / "fed_avg"), "fed_avg", [0.4, 0.6, 0.75, 0.82], [0.05, 0.1, 0.15, 0.2],
             truncate=True)
    (parent / "comparison.md").write_text("x")
    out = str(tmp_path / "fig" / "f.png")
    assert plot.main([str(parent), "--out", out, "--title", "t"]) == 0
    assert is_png(out)
    table = capsys.readouterr().out
    # expanded in algorithm order; target 0.8 from summary.json; GiB to target = 0.03 and 0.2
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| run | final acc | best acc | total GiB | GiB to 0.8 |")
    assert lines[1] == "| FedAvg | 0.8200 | 0.8200 | 0.2000 | 0.2000 | 4 |"
    assert lines[2] == "| FSL-SAGE | 0.9000 | 0.9000 | 0.0400 | 0.0300 | 4 |"
    # --target overrides the recorded one: nobody reaches 0.95
    assert plot.main([str(parent / "fed_avg"), "--out", out, "--target", "0.95", "--logx"]) == 0
    assert "| FedAvg | 0.8200 | 0.8200 | 0.2000 | - | 4 |" in capsys.readouterr().out


def test_plot_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"round": 0, "test_acc')
    assert plot.main([str(d)]) == 2
    err = capsys.readouterr().err
    assert "no complete round" in err and len(err.strip().splitlines()) == 1


def test_sweep_collect_and_plot_only(tmp_path):
    out = tmp_path / "sw"
    fake_run(sweep.alpha_dir(str(out), 1.0, "fsl_sage"), "fsl_sage", [0.5, 0.7, 0.8], [0.1, 0.2, 0.3])
    fake_run(sweep.alpha_dir(str(out), 10.0, "fsl_sage"), "fsl_sage", [0.6, 0.8], [0.1, 0.2], alpha=10.0)
    fake_run(sweep.alpha_dir(str(out), 1.0, "fed_avg"), "fed_avg", [0.4, 0.9], [0.25, 0.5])
    assert sweep.alpha_dir("o", 0.1, "x") == os.path.join("o", "alpha_0.1", "x")
    fake_run(sweep.alpha_dir(str(out), 100.0, "fsl_sage"), "fsl_sage", [0.9], [0.25], alpha=100.0)
    # a run still going (no summary.json) does not set the default budget
    fake_run(sweep.alpha_dir(str(out), 10.0, "fed_avg"), "fed_avg", [0.3], [0.05], alpha=10.0, summary=False)
    s = sweep.collect(sweep.discover(str(out)), None)
    assert s["at_gib"] == 0.2                    # smallest final GiB of the finished runs
    assert s["algos"] == ["fed_avg", "fsl_sage"] and s["alphas"] == [1.0, 10.0, 100.0]
    got = {(r["algo"], r["alpha"]): r["accuracy_at_gib"] for r in s["results"]}
    assert got == {("fsl_sage", 1.0): 0.7, ("fsl_sage", 10.0): 0.8, ("fed_avg", 1.0): None,
                   ("fed_avg", 10.0): 0.3, ("fsl_sage", 100.0): None}
    assert {(r["algo"], r["alpha"]): r["stop_reason"] for r in s["results"]}[("fed_avg", 10.0)] == "incomplete"
    assert sweep.main(["--plot-only", str(out), "--at-gib", "0.3"]) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["at_gib"] == 0.3
    assert {(r["algo"], r["alpha"]): r["accuracy_at_gib"] for r in saved["results"]}[("fed_avg", 1.0)] == 0.4
    md = (out / "sweep.md").read_text()
    assert "| FedAvg | 0.4000 | 0.3000 |  |" in md and "| FSL-SAGE | 0.8000 | 0.8000 | 0.9000 |" in md
    assert is_png(str(out / "sweep.png"))
    assert sweep.main(["--plot-only", str(tmp_path / "nothing")]) == 2
    assert sweep.main(["--out", str(out), "--alpha", "3"]) == 2


def test_tiny_real_sweep_through_run_py(tmp_path):
    out = tmp_path / "sw"
    argv = ["--out", str(out), "--algos", "fed_avg", "--alphas", "10", "1000", "--rounds", "1",
            "--num-clients", "2", "--batch-size", "64", "--train-subset", "256", "--eval-subset", "128",
            "--no-progress"]                    # subsets: 2 local steps, not 11 (only the flow is checked)
    assert sweep.main(argv) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert len(s["results"]) == 2 and s["failed"] == []
    assert all(r["rounds_run"] == 1 and r["stop_reason"] == "rounds" for r in s["results"])
    # default budget: the smallest final GiB, where that run's (only) round counts
    cheapest = min(s["results"], key=lambda r: r["total_gib"])
    assert s["at_gib"] == cheapest["total_gib"]
    assert cheapest["accuracy_at_gib"] == cheapest["final_accuracy"]
    cfg = json.loads((out / "alpha_10" / "fed_avg" / "config.json").read_text())
    assert cfg["distribution"] == "dirichlet" and cfg["alpha"] == 10.0 and cfg["rounds"] == 1
    assert is_png(str(out / "sweep.png"))
    # a restart skips every finished run: metrics files are left untouched
    m = out / "alpha_1000" / "fed_avg" / "metrics.jsonl"
    before = m.stat().st_mtime_ns
    assert sweep.main(argv) == 0
    assert m.stat().st_mtime_ns == before


def test_sweep_reports_failed_runs_and_continues(tmp_path, capsys):
    # run.py rejects the batch size before any training; the sweep records it and goes on
    argv = ["--out", str(tmp_path / "sw"), "--algos", "fed_avg", "cse_fsl", "--alphas", "1",
            "--batch-size", "0", "--no-progress"]
    assert sweep.main(argv) == 2                    # nothing to plot
    err = capsys.readouterr().err
    assert "--batch-size 0" in err
    assert "alpha=1 fed_avg: FAILED" in err and "alpha=1 cse_fsl: FAILED" in err
