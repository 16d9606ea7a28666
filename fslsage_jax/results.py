"""Reading what runs wrote: per-round records of ``metrics.jsonl``, run directories
(:class:`Run`, :func:`find_runs`, :func:`load_run`), the GiB at which a target accuracy
is first reached, the accuracy at a GiB budget, and the markdown comparison table.

Used by the host loop (:mod:`fslsage_jax.simulate`, to resume), the CLI
(``experiments/run.py``), the figures (``experiments/plot.py``) and the sweeps
(``experiments/sweep.py``).
"""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.comm import GIB

DEFAULT_TARGET = 0.9


class ResultsError(ValueError):
    """A metrics file or run directory that cannot be read as asked (one line naming it)."""


def read_metrics(path: str, rounds: int | None = None) -> list[dict]:
    """Per-round records of a ``metrics.jsonl``, in file order.

    A last line cut short (a run killed while writing it: no newline, or not JSON)
    is skipped.

    Args:
      path: the metrics.jsonl file.
      rounds: if given, exactly the first ``rounds`` records, which must be rounds
        0..rounds-1 in order (what a checkpoint after ``rounds`` rounds needs).
    Raises:
      ResultsError (a ``ValueError``): a line other than the last is not valid JSON, or
        (with ``rounds``) the file holds fewer complete, consecutive records.
    """
    if rounds is not None and rounds <= 0:
        return []
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()] if rounds is None else f.readlines()
    records = []
    for i, ln in enumerate(lines):
        if rounds is not None and (len(records) == rounds or not ln.endswith("\n")):
            break
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(lines) - 1:         # a run killed while writing its last round
                break
            raise ResultsError(f"{path}: line {i + 1} is not valid JSON") from None
        if rounds is not None and rec.get("round") != len(records):
            break
        records.append(rec)
    if rounds is not None and len(records) < rounds:
        raise ResultsError(f"{path} holds {len(records)} complete rounds but the checkpoint has "
                           f"{rounds}")
    return records


def record_gib(rec: dict) -> float:
    """Cumulative communication of a round record in GiB (``comm_gib``, else ``comm_bytes``)."""
    return float(rec["comm_gib"]) if "comm_gib" in rec else rec["comm_bytes"] / GIB


def gib_to_target(records: list[dict], target: float) -> float | None:
    """Cumulative GiB at the first round whose test accuracy reaches ``target`` (>=), or None."""
    for r in records:
        if r["test_accuracy"] >= target:
            return record_gib(r)
    return None


def _gib_to_target_cell(summary: dict, records: list[dict] | None, target: float) -> str:
    """The "GiB to target" cell of one run: from its records if given, else from its summary
    when the summary was computed for that same target, else ``n/a``."""
    if records is not None:
        g = gib_to_target(records, target)
    else:
        own = summary.get("target_accuracy")
        if own is None or not math.isclose(float(own), target, rel_tol=0.0, abs_tol=1e-12):
            return "n/a"
        g = summary["gib_to_target"]
    return "-" if g is None else f"{g:.4f}"


def format_table(summaries: list[dict], target: float, *, records: list | None = None,
                 name_header: str = "algorithm", target_format: str = ".2f") -> str:
    """Markdown comparison table, one row per summary (``summary.json``-like dicts).

    Columns: name (``name``, else ``algo``), final and best accuracy, final perplexity
    (only if a summary has ``final_perplexity``), total GiB, GiB to ``target``, rounds,
    seconds per round (only if a summary has round times).

    Args:
      summaries: one dict per run.
      target: the accuracy of the "GiB to" column.
      records: per-run ``metrics.jsonl`` records, in the order of ``summaries``; the
        column is computed from them. Without them a summary's own ``gib_to_target`` is
        used if its ``target_accuracy`` equals ``target``; otherwise the cell says ``n/a``.
    Cells: ``-`` the run never reached ``target``; ``n/a`` not known for this target.
    """
    if records is not None and len(records) != len(summaries):
        raise ValueError(f"{len(records)} record lists for {len(summaries)} summaries")
    recs = records if records is not None else [None] * len(summaries)
    lm = any(s.get("final_perplexity") is not None for s in summaries)
    timed = any(s.get("mean_round_time_s") or s.get("first_round_time_s") for s in summaries)
    cols = (["final acc", "best acc"] + (["final ppl"] if lm else [])
            + ["total GiB", f"GiB to {target:{target_format}}", "rounds"] + (["s/round"] if timed else []))
    rows = [f"| {name_header} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s, r in zip(summaries, recs):
        ppl = s.get("final_perplexity")
        cells = [f"{s['final_accuracy']:.4f}", f"{s['best_accuracy']:.4f}"]
        cells += ["-" if ppl is None else f"{ppl:.2f}"] if lm else []
        cells += [f"{s['total_gib']:.4f}", _gib_to_target_cell(s, r, target), str(s["rounds_run"])]
        if timed:
            rt = s.get("mean_round_time_s") or s.get("first_round_time_s")
            cells.append("-" if rt is None else f"{rt:.3f}")
        rows.append(f"| {s['name'] if 'name' in s else s['algo']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summarize(records: list[dict], target: float) -> dict:
    """The accuracy and communication numbers of a run from its records (as in ``summary.json``)."""
    accs = [r["test_accuracy"] for r in records]
    return {"final_accuracy": accs[-1], "best_accuracy": max(accs),
            "total_gib": record_gib(records[-1]), "target_accuracy": target,
            "gib_to_target": gib_to_target(records, target), "rounds_run": len(records)}


def accuracy_at_gib(gibs, accs, budget: float) -> float | None:
    """Accuracy of the last round whose cumulative GiB is <= ``budget`` (None if the first round
    already exceeds it). Rounds are assumed in order with non-decreasing GiB.

    Args:
      gibs: cumulative communication per round, in GiB.
      accs: test accuracy per round.
      budget: communication budget in GiB.
    """
    best = None
    for g, a in zip(gibs, accs):
        if g > budget * (1 + 1e-12):
            break
        best = float(a)
    return best


# ----------------------------------------------------------------------------- run directories
class Run(NamedTuple):
    """One run directory: its config.json, per-round records and summary.json (empty dicts if absent)."""
    path: str
    algo: str
    config: dict
    records: list
    summary: dict


def algo_rank(algo: str) -> int:
    """Position of ``algo`` in ``ALGORITHMS`` (unknown names last)."""
    return list(ALGORITHMS).index(algo) if algo in ALGORITHMS else len(ALGORITHMS)


def algo_label(algo: str) -> str:
    """The display name of ``algo`` (its own name if unknown)."""
    return ALGORITHMS[algo].label if algo in ALGORITHMS else algo


def algo_color(algo: str, i: int = 0) -> str:
    """The matplotlib colour of ``algo``'s curves (``C<i>`` if it has none)."""
    color = ALGORITHMS[algo].color if algo in ALGORITHMS else None
    return color or f"C{i % 10}"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def find_runs(paths: list[str]) -> list[str]:
    """Run directories named by ``paths``: each is a run (has metrics.jsonl) or a parent of runs
    (an ``--algo all`` or sweep directory: its sub-directories with metrics.jsonl, algorithms in
    ``ALGORITHMS`` order).

    Raises:
      ResultsError: a path is not a directory or holds no metrics.jsonl at all.
    """
    out = []
    for p in paths:
        if not os.path.isdir(p):
            raise ResultsError(f"{p}: not a directory")
        if os.path.isfile(os.path.join(p, "metrics.jsonl")):
            out.append(p)
            continue
        subs = [os.path.join(p, d) for d in sorted(os.listdir(p))
                if os.path.isfile(os.path.join(p, d, "metrics.jsonl"))]
        if not subs:
            raise ResultsError(f"{p}: no metrics.jsonl in it or in its sub-directories")
        out.extend(sorted(subs, key=lambda s: (algo_rank(os.path.basename(s)), s)))
    return out


def load_run(path: str) -> Run:
    """Load one run directory (config.json and summary.json are optional, metrics.jsonl is not).

    Raises:
      ResultsError: no metrics.jsonl, or no complete round in it.
    """
    mpath = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(mpath):
        raise ResultsError(f"{path}: no metrics.jsonl (not a run directory)")
    records = read_metrics(mpath)
    if not records:
        raise ResultsError(f"{mpath}: no complete round recorded")
    config = _read_json(os.path.join(path, "config.json"))
    summary = _read_json(os.path.join(path, "summary.json"))
    algo = config.get("algo") or summary.get("algo") or os.path.basename(os.path.normpath(path))
    return Run(path, algo, config, records, summary)


def series(run: Run) -> tuple[list[int], list[float], list[float]]:
    """(rounds, cumulative GiB, test accuracy) of a run."""
    rounds = [int(r.get("round", i)) for i, r in enumerate(run.records)]
    gibs = [record_gib(r) for r in run.records]
    accs = [float(r["test_accuracy"]) for r in run.records]
    return rounds, gibs, accs


def default_target(runs: list[Run]) -> float:
    """The target accuracy the runs recorded (summary.json, else config.json), else 0.9."""
    for r in runs:
        t = r.summary.get("target_accuracy", r.config.get("target_accuracy"))
        if t is not None:
            return float(t)
    return DEFAULT_TARGET
