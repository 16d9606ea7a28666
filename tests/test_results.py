"""fslsage_jax.results: reading run directories, GiB to a target, accuracy at a budget and the
comparison table, on hand-written numbers."""
import json
import os

import pytest

from fslsage_jax import results
from fslsage_jax.results import (ResultsError, accuracy_at_gib, find_runs, format_table, gib_to_target,
                                 load_run, read_metrics, series, summarize)


def _recs(gibs, accs):
    return [{"round": t, "test_accuracy": a, "comm_gib": g} for t, (g, a) in enumerate(zip(gibs, accs))]


def write_run(path, gibs, accs, config=None, summary=None, tail=""):
    """A run directory: metrics.jsonl of hand-chosen rounds, optional config/summary.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _recs(gibs, accs))
        f.write(tail)
    for name, d in (("config.json", config), ("summary.json", summary)):
        if d is not None:
            with open(os.path.join(path, name), "w") as f:
                json.dump(d, f)
    return str(path)


def test_gib_to_target_hand_numbers():
    gibs, accs = [0.1, 0.2, 0.3, 0.4], [0.5, 0.79, 0.81, 0.9]
    assert gib_to_target(_recs(gibs, accs), 0.8) == 0.3
    assert gib_to_target(_recs(gibs, accs), 0.79) == 0.2   # reaching counts (>=)
    assert gib_to_target(_recs(gibs, accs), 0.5) == 0.1
    assert gib_to_target(_recs(gibs, accs), 0.95) is None
    # the first crossing, not the last, when accuracy dips again
    assert gib_to_target(_recs([1, 2, 3], [0.9, 0.7, 0.95]), 0.85) == 1.0
    # comm_bytes when there is no comm_gib
    assert gib_to_target([{"test_accuracy": 0.9, "comm_bytes": 3 * 2 ** 29}], 0.5) == 1.5


def test_accuracy_at_gib_hand_numbers():
    gibs, accs = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.55, 0.9]
    assert accuracy_at_gib(gibs, accs, 0.25) == 0.6   # last round with GiB <= 0.25, not the best
    assert accuracy_at_gib(gibs, accs, 0.3) == 0.55   # boundary is inclusive
    assert accuracy_at_gib(gibs, accs, 10.0) == 0.9
    assert accuracy_at_gib(gibs, accs, 0.05) is None


def test_read_metrics_skips_truncated_last_line_only(tmp_path):
    d = write_run(tmp_path / "r", [0.1, 0.2], [0.5, 0.6], tail='{"round": 99, "test_accu')
    assert [r["test_accuracy"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))] == [0.5, 0.6]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"round": 0}\n{broken\n{"round": 2}\n')
    with pytest.raises(ResultsError, match="line 2"):
        read_metrics(str(bad))


def test_load_run_and_series(tmp_path):
    d = write_run(tmp_path / "x", [0.1, 0.25], [0.4, 0.7], config={"algo": "cse_fsl"},
                  summary={"target_accuracy": 0.6})
    run = load_run(d)
    assert run.algo == "cse_fsl" and run.summary == {"target_accuracy": 0.6} and len(run.records) == 2
    assert series(run) == ([0, 1], [0.1, 0.25], [0.4, 0.7])
    assert results.default_target([run]) == 0.6
    # no config.json: the algorithm is the directory's name; no target recorded: 0.9
    bare = load_run(write_run(tmp_path / "fed_avg", [0.1], [0.3]))
    assert bare.algo == "fed_avg" and bare.config == {} and results.default_target([bare]) == 0.9
    with pytest.raises(ResultsError, match="no metrics.jsonl"):
        load_run(str(tmp_path))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"round": 0, "test_acc')
    with pytest.raises(ResultsError, match="no complete round"):
        load_run(str(tmp_path / "cut"))


def test_find_runs_expands_parents_in_algorithm_order(tmp_path):
    parent = tmp_path / "all"
    for algo in ("fsl_sage", "fed_avg", "zzz_mine", "cse_fsl"):
        write_run(parent / algo, [0.1], [0.5])
    (parent / "notes").mkdir()                                   # no metrics: not a run
    single = write_run(tmp_path / "one", [0.1], [0.5])
    got = find_runs([str(parent), single])
    assert [os.path.basename(p) for p in got] == ["fed_avg", "cse_fsl", "fsl_sage", "zzz_mine", "one"]
    with pytest.raises(ResultsError, match="not a directory"):
        find_runs([str(tmp_path / "missing")])
    with pytest.raises(ResultsError, match="no metrics.jsonl in it"):
        find_runs([str(parent / "notes")])


def _cells(table, name):
    row = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_format_table_column_is_for_the_given_target():
    # two runs whose own targets differ (0.9 and 0.5); the table asks for 0.6
    recs_a = _recs([0.1, 0.2, 0.3], [0.55, 0.65, 0.95])    # reaches 0.6 at 0.2 GiB, 0.9 at 0.3
    recs_b = _recs([0.4, 0.8], [0.52, 0.58])               # reaches 0.5 at 0.4 GiB, never 0.6
    a = {**summarize(recs_a, 0.9), "algo": "a"}
    b = {**summarize(recs_b, 0.5), "algo": "b"}
    assert (a["gib_to_target"], b["gib_to_target"]) == (0.3, 0.4)   # their own targets' values
    table = format_table([a, b], 0.6, records=[recs_a, recs_b])
    assert table.splitlines()[0] == "| algorithm | final acc | best acc | total GiB | GiB to 0.60 | rounds |"
    assert _cells(table, "a") == ["a", "0.9500", "0.9500", "0.3000", "0.2000", "3"]
    assert _cells(table, "b") == ["b", "0.5800", "0.5800", "0.8000", "-", "2"]
    # without records: a summary's own value only where its target is the table's
    table = format_table([a, b], 0.5)
    assert _cells(table, "a")[4] == "n/a" and _cells(table, "b")[4] == "0.4000"
    assert _cells(format_table([a, b], 0.9), "a")[4] == "0.3000"
    with pytest.raises(ValueError, match="1 record lists for 2 summaries"):
        format_table([a, b], 0.6, records=[recs_a])
