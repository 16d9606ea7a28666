"""The host loop of a simulation: rounds, evaluation, the communication ledger,
the budget stop, metrics files and progress.

``run_simulation`` drives any algorithm from :data:`fslsage_jax.algorithms.ALGORITHMS`
and writes, into ``out_dir``: ``config.json`` (written by the caller),
``metrics.jsonl`` (one JSON object per round, flushed when the round ends) and
``summary.json`` (at the end, written atomically).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.common import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.comm import GIB, Ledger, round_bytes, sizes_of
from fslsage_jax.split import SplitModel, describe


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gib_to_target(records: list[dict], target: float) -> float | None:
    """Cumulative GiB at the first round whose test accuracy reaches ``target``."""
    for r in records:
        if r["test_accuracy"] >= target:
            return r["comm_bytes"] / GIB
    return None


def run_simulation(algo_name: str, split: SplitModel, cfg: Config, client_data, test_x, test_y, *,
                   rounds: int, seed: int = 0, comm_budget_bytes: int | None = None,
                   out_dir: str | None = None, target_accuracy: float = 0.9,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   devices: int | str | None = 1) -> dict:
    """Train ``algo_name`` for up to ``rounds`` rounds or until the budget is spent.

    Args:
      algo_name: a key of ``ALGORITHMS``.
      split, cfg: the split model and configuration.
      client_data: an object with padded ``x [m, n_max, ...]``, ``y``, ``counts`` (numpy).
      test_x, test_y: the whole test set.
      rounds: maximum number of rounds R.
      seed: the run's seed (initial models, shuffles, alignment).
      comm_budget_bytes: stop once the paper-comparable total reaches it.
      out_dir: where ``metrics.jsonl`` and ``summary.json`` go (None: nowhere).
      target_accuracy: accuracy whose first crossing is reported in GiB.
      progress: show a progress bar over rounds.
      devices: shard the client axis over this many local devices (1: no
        sharding; 0 / None / "auto": all); see :mod:`fslsage_jax.sharding`.
    Returns:
      the summary dict (also written to ``summary.json``).
    """
    t_start = time.time()
    n_max = client_data.x.shape[1]
    algo = ALGORITHMS[algo_name](split, cfg, n_max)
    evaluate = make_evaluate(split)
    sizes = sizes_of(split)
    data = ClientArrays(jnp.asarray(client_data.x), jnp.asarray(client_data.y),
                        jnp.asarray(client_data.counts, jnp.int32))
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    key = jax.random.key(seed)
    state = algo.init(jax.random.fold_in(key, 0))
    round_key = jax.random.fold_in(key, 1)
    if devices != 1:
        from fslsage_jax import sharding
        state, data, algo = sharding.shard_all(algo_name, algo, state, data, devices)

    ledger, records, stop_reason = Ledger.empty(), [], "rounds"
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "w") if out_dir else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds, desc=algo_name, unit="round", leave=False)
    try:
        for t in range(rounds):
            t0 = time.time()
            state, acc = algo.run_round(state, data, jax.random.fold_in(round_key, t))
            round_time = time.time() - t0
            aligned = algo_name == "fsl_sage" and t % cfg.align_interval == 0
            ledger = ledger.add(round_bytes(algo_name, sizes, cfg.num_clients,
                                            int(acc["z_up"]), int(acc["g_down"]), aligned))
            t1 = time.time()
            test_loss, test_acc = evaluate(*algo.global_model(state), test_x, test_y)
            rec = {"round": t, "test_accuracy": test_acc, "test_loss": test_loss,
                   "train_loss": float(acc["loss_sum"] / max(acc["loss_n"], 1.0)),
                   "comm_bytes": ledger.total, "comm_gib": ledger.total_gib,
                   "comm": dict(ledger.counts), "round_time_s": round_time,
                   "eval_time_s": time.time() - t1}
            if algo_name == "fsl_sage":
                rec["grad_cosine"] = (float(acc["cos_sum"] / acc["cos_n"]) if acc["cos_n"] > 0
                                      else None)
                if aligned:
                    rec["align_loss_first_epoch"] = float(acc["align_loss_first"])
                    rec["align_loss_last_epoch"] = float(acc["align_loss_last"])
            records.append(rec)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{test_acc:.4f}", GiB=f"{ledger.total_gib:.4f}")
            if not math.isfinite(rec["train_loss"]) or not math.isfinite(test_loss):
                stop_reason = "diverged"
                break
            if comm_budget_bytes is not None and ledger.total >= comm_budget_bytes:
                stop_reason = "comm_budget"
                break
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()

    d = describe(split)
    accs = [r["test_accuracy"] for r in records]
    best = int(np.argmax(accs)) if accs else None
    summary = {
        "algo": algo_name,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": accs[best] if accs else None,
        "best_round": best,
        "final_test_loss": records[-1]["test_loss"] if records else None,
        "total_bytes": ledger.total, "total_gib": ledger.total_gib,
        "comm": dict(ledger.counts),
        "target_accuracy": target_accuracy,
        "gib_to_target": gib_to_target(records, target_accuracy),
        "rounds_run": len(records),
        "stop_reason": stop_reason,
        "first_round_time_s": records[0]["round_time_s"] if records else None,
        "mean_round_time_s": (float(np.mean([r["round_time_s"] for r in records[1:]]))
                              if len(records) > 1 else None),
        "wall_time_s": time.time() - t_start,
        "param_counts": d["param_counts"], "state_counts": d["state_counts"],
        "model_bytes": d["model_bytes"], "cut_shape": d["cut_shape"],
        "client_sample_counts": [int(c) for c in client_data.counts],
    }
    if out_dir:
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
