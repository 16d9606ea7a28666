"""What a run writes per round and at the end: ``metrics.jsonl`` records, the summary,
and the atomic/synced file writes behind them."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from fslsage_jax.comm import Ledger
from fslsage_jax.results import gib_to_target
from fslsage_jax.split import SplitModel, describe


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_metrics(path: str, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with exactly ``records`` (drops redone rounds)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(rec: dict) -> dict:
    """Non-finite floats as None (strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def round_record(t: int, round_metrics, split: SplitModel, acc: dict, ledger: Ledger,
                 test: tuple[float, float] | None, round_time: float, eval_time: float) -> dict:
    """One line of ``metrics.jsonl``.

    Args:
      t: the round index.
      round_metrics: the algorithm's ``round_metrics(acc) -> dict``.
      split: the split model (a language model also gets ``perplexity``).
      acc: the round's host accumulators (``engine.METRIC_KEYS``).
      ledger: the cumulative bytes after the round.
      test: ``(test loss, test accuracy)``, or None for a round that was not evaluated.
      round_time, eval_time: seconds.
    """
    test_loss, test_acc = test if test is not None else (None, None)
    rec = {"round": t, "test_accuracy": test_acc, "test_loss": test_loss,
           "train_loss": float(acc["loss_sum"] / max(acc["loss_n"], 1.0)),
           "comm_bytes": ledger.total, "comm_gib": ledger.total_gib,
           "comm": dict(ledger.counts), "round_time_s": round_time, "eval_time_s": eval_time}
    if split.eval_weight is not None and test_loss is not None:     # token-weighted loss: log perplexity
        rec["perplexity"] = math.exp(min(test_loss, 700.0))
    rec.update(round_metrics(acc))
    return rec


def summarize_run(algo_name: str, split: SplitModel, counts: Any, target_accuracy: float,
                  records: list, ledger: Ledger, stop_reason: str, diverged_round: int | None,
                  wall_time: float) -> dict:
    """``summary.json`` of a run: final/best accuracy, bytes, stop reason, timings, sizes."""
    d = describe(split)
    evaluated = [r for r in records if r["test_accuracy"] is not None]
    best = max(evaluated, key=lambda r: r["test_accuracy"]) if evaluated else None
    summary = {
        "algo": algo_name,
        "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        "best_accuracy": best["test_accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "final_test_loss": evaluated[-1]["test_loss"] if evaluated else None,
        "total_bytes": ledger.total, "total_gib": ledger.total_gib,
        "comm": dict(ledger.counts),
        "target_accuracy": target_accuracy,
        "gib_to_target": gib_to_target(evaluated, target_accuracy),
        "rounds_run": len(records),
        "stop_reason": stop_reason,
        "diverged_round": diverged_round,
        "first_round_time_s": records[0]["round_time_s"] if records else None,
        "mean_round_time_s": (float(np.mean([r["round_time_s"] for r in records[1:]]))
                              if len(records) > 1 else None),
        "wall_time_s": wall_time,
        "param_counts": d["param_counts"], "state_counts": d["state_counts"],
        "model_bytes": d["model_bytes"], "cut_shape": d["cut_shape"],
        "client_sample_counts": [int(c) for c in np.asarray(counts)],
    }
    if split.eval_weight is not None and evaluated:
        summary["final_perplexity"] = evaluated[-1].get("perplexity")
    return summary
