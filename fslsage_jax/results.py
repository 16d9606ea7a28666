"""Reading what a run wrote: per-round records of ``metrics.jsonl``, the GiB at which a
target accuracy is first reached, and the markdown comparison table.

Used by the host loop (:mod:`fslsage_jax.simulate`, to resume), the CLI
(``experiments/run.py``), the figures (``experiments/plot.py``) and the sweeps
(``experiments/sweep.py``).
"""
from __future__ import annotations

import json

from fslsage_jax.comm import GIB


class ResultsError(ValueError):
    """A metrics file that cannot be read as asked (one-line message naming the file)."""


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


def format_table(summaries: list[dict], target: float, *, name_header: str = "algorithm",
                 target_format: str = ".2f") -> str:
    """Markdown comparison table, one row per summary (``summary.json``-like dicts).

    Columns: name (``name``, else ``algo``), final and best accuracy, final perplexity
    (only if a summary has ``final_perplexity``), total GiB, GiB to ``target``, rounds,
    seconds per round (only if a summary has round times).
    """
    lm = any(s.get("final_perplexity") is not None for s in summaries)
    timed = any(s.get("mean_round_time_s") or s.get("first_round_time_s") for s in summaries)
    cols = (["final acc", "best acc"] + (["final ppl"] if lm else [])
            + ["total GiB", f"GiB to {target:{target_format}}", "rounds"] + (["s/round"] if timed else []))
    rows = [f"| {name_header} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in summaries:
        g, ppl = s["gib_to_target"], s.get("final_perplexity")
        cells = [f"{s['final_accuracy']:.4f}", f"{s['best_accuracy']:.4f}"]
        cells += ["-" if ppl is None else f"{ppl:.2f}"] if lm else []
        cells += [f"{s['total_gib']:.4f}", "-" if g is None else f"{g:.4f}", str(s["rounds_run"])]
        if timed:
            rt = s.get("mean_round_time_s") or s.get("first_round_time_s")
            cells.append("-" if rt is None else f"{rt:.3f}")
        rows.append(f"| {s['name'] if 'name' in s else s['algo']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summarize(records: list[dict], target: float) -> dict:
    """The accuracy and communication numbers of a run from its records (as in ``summary.json``)."""
    accs = [r["test_accuracy"] for r in records]
    return {"final_accuracy": accs[-1], "best_accuracy": max(accs),
            "total_gib": record_gib(records[-1]), "gib_to_target": gib_to_target(records, target),
            "rounds_run": len(records)}
