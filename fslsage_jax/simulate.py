"""The host loop of a simulation: rounds, evaluation, the communication ledger,
the budget stop, metrics files and progress.

``run_simulation`` drives any algorithm from :data:`fslsage_jax.algorithms.ALGORITHMS`
and writes, into ``out_dir``: ``config.json`` (written by the caller),
``metrics.jsonl`` (one JSON object per round, flushed and synced when the round
ends), ``summary.json`` (at the end, written atomically) and checkpoints
(:mod:`fslsage_jax.checkpoint`) every ``checkpoint_every`` rounds and whenever
the run stops, except on divergence.

Stop reasons: ``rounds`` (R rounds done), ``comm_budget``, ``diverged`` (a
non-finite training loss, test loss or state leaf; the diverged round's record
is written with its non-finite numbers as ``null`` and is never checkpointed),
``interrupted`` (``stop_requested()`` became true; checked after each round).

Resuming (``resume=True``) restores the newest checkpoint of ``out_dir``,
truncates ``metrics.jsonl`` to its rounds and continues; round keys are
``fold_in(round_key, t)``, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax import checkpoint
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.common import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.comm import GIB, KINDS, Ledger, round_bytes, sizes_of
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


@jax.jit
@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """One compiled reduction: True iff every float leaf of ``tree`` is finite."""
    oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


@functools.lru_cache(maxsize=8)
def _build_cached(algo_name: str, split: SplitModel, cfg: Config, n_max: int):
    return ALGORITHMS[algo_name](split, cfg, n_max), make_evaluate(split)


def build(algo_name: str, split: SplitModel, cfg: Config, n_max: int):
    """``(Algorithm, evaluate)`` for one setting, built once per process (when the split
    model is hashable) so that repeated runs (a resume, a sweep, tests) reuse the compiled
    functions instead of compiling them again."""
    try:
        return _build_cached(algo_name, split, cfg, n_max)
    except TypeError:           # an unhashable split model: build afresh
        return ALGORITHMS[algo_name](split, cfg, n_max), make_evaluate(split)


def read_metrics(path: str, rounds: int) -> list[dict]:
    """The first ``rounds`` records of a ``metrics.jsonl`` (rounds 0..rounds-1, in order).

    Raises:
      ValueError: the file holds fewer complete, consecutive records.
    """
    records = []
    if rounds > 0:
        with open(path) as f:
            for line in f:
                if len(records) == rounds or not line.endswith("\n"):
                    break
                rec = json.loads(line)
                if rec.get("round") != len(records):
                    break
                records.append(rec)
    if len(records) < rounds:
        raise ValueError(f"{path} holds {len(records)} complete rounds but the checkpoint has "
                         f"{rounds}")
    return records


def truncate_metrics(path: str, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with exactly ``records`` (drops redone rounds)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(rec: dict) -> dict:
    """Non-finite floats as None (strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def run_simulation(algo_name: str, split: SplitModel, cfg: Config, client_data, test_x, test_y, *,
                   rounds: int, seed: int = 0, comm_budget_bytes: int | None = None,
                   out_dir: str | None = None, target_accuracy: float = 0.9,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   checkpoint_every: int | None = None, keep_checkpoints: int = 3,
                   resume: bool = False, stop_requested: Callable[[], bool] | None = None,
                   frozen: Any = None, on_finish: Callable[[Any, Any], dict] | None = None,
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
      out_dir: where ``metrics.jsonl``, ``summary.json`` and checkpoints go (None: nowhere).
      target_accuracy: accuracy whose first crossing is reported in GiB.
      progress: show a progress bar over rounds.
      log: where to report resumes and checkpoints (None: silent).
      checkpoint_every: save a checkpoint every this many rounds and when the run
        stops (not on divergence); None: never (needs ``out_dir``).
      keep_checkpoints: how many of the newest checkpoints to keep.
      resume: continue from the newest checkpoint in ``out_dir`` (from round 0 if
        there is none), keeping ``metrics.jsonl``'s records of its rounds.
      stop_requested: polled after every round; True stops the run with a
        checkpoint and stop reason ``interrupted``.
      frozen: frozen shared weights ``(client, server, aux)`` to use instead of the
        initial ones (e.g. pretrained GPT-2 weights); never checkpointed.
      on_finish: ``on_finish(algo, state) -> dict`` called once at the end (not on
        divergence); its dict is added to the summary (e.g. generation BLEU).
      devices: shard the client axis over this many local devices (1: no
        sharding; 0 / None / "auto": all); see :mod:`fslsage_jax.sharding`.
    Returns:
      the summary dict (also written to ``summary.json``).
    """
    t_start = time.time()
    say = log or (lambda msg: None)
    n_max = client_data.x.shape[1]
    algo, evaluate = build(algo_name, split, cfg, n_max)
    sizes = sizes_of(split)
    data = ClientArrays(jnp.asarray(client_data.x), jnp.asarray(client_data.y),
                        jnp.asarray(client_data.counts, jnp.int32))
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    key = jax.random.key(seed)
    state = jax.jit(algo.init)(jax.random.fold_in(key, 0))   # one program, not op by op
    if frozen is not None:
        state = state._replace(frozen=frozen)
    round_key = jax.random.fold_in(key, 1)

    ledger, records, stop_reason, diverged_round = Ledger.empty(), [], "rounds", None
    first, wall_before = 0, 0.0
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        if not out_dir:
            raise ValueError("resume needs out_dir")
        ckpt = checkpoint.latest(out_dir)
        if ckpt is not None:
            state = checkpoint.restore(ckpt, state)
            first = ckpt.rounds
            ledger = Ledger({k: int(ckpt.meta["ledger"].get(k, 0)) for k in KINDS})
            wall_before = float(ckpt.meta.get("wall_time_s", 0.0))
            if int(jax.device_get(state.round)) != first:
                raise ValueError(f"checkpoint {ckpt.path}: state round {int(state.round)} != {first}")
        records = read_metrics(metrics_path, first) if first else []
        say(f"{algo_name}: resuming after round {first} from "
            f"{ckpt.path if ckpt else 'the start (no checkpoint yet)'}")
    if metrics_path:
        truncate_metrics(metrics_path, records)
    if devices != 1:
        from fslsage_jax import sharding
        state, data, algo = sharding.shard_all(algo_name, algo, state, data, devices)

    def save_checkpoint(done: int) -> None:
        if not (out_dir and checkpoint_every):
            return
        checkpoint.save(out_dir, state, done, {"algo": algo_name, "ledger": dict(ledger.counts),
                                               "wall_time_s": wall_before + time.time() - t_start},
                        keep=keep_checkpoints)

    metrics_file = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 (closed below)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds, initial=min(first, rounds), desc=algo_name, unit="round", leave=False)
    try:
        if comm_budget_bytes is not None and ledger.total >= comm_budget_bytes:
            stop_reason = "comm_budget"
        for t in range(first, rounds if stop_reason == "rounds" else first):
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
            if split.eval_weight is not None:     # token-weighted loss: log perplexity
                rec["perplexity"] = math.exp(min(test_loss, 700.0))
            if algo_name == "fsl_sage":
                rec["grad_cosine"] = (float(acc["cos_sum"] / acc["cos_n"]) if acc["cos_n"] > 0
                                      else None)
                if aligned:
                    rec["align_loss_first_epoch"] = float(acc["align_loss_first"])
                    rec["align_loss_last_epoch"] = float(acc["align_loss_last"])
            finite = (math.isfinite(rec["train_loss"]) and math.isfinite(test_loss)
                      and bool(tree_all_finite(checkpoint.strip_frozen(state))))
            rec = _json_safe(rec)
            records.append(rec)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                os.fsync(metrics_file.fileno())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{test_acc:.4f}", GiB=f"{ledger.total_gib:.4f}")
            if not finite:
                stop_reason, diverged_round = "diverged", t
                break
            if comm_budget_bytes is not None and ledger.total >= comm_budget_bytes:
                stop_reason = "comm_budget"
            elif t + 1 < rounds and stop_requested is not None and stop_requested():
                stop_reason = "interrupted"
            if stop_reason != "rounds" or t + 1 == rounds or (t + 1) % (checkpoint_every or 1) == 0:
                save_checkpoint(t + 1)
            if stop_reason != "rounds":
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
        "diverged_round": diverged_round,
        "first_round_time_s": records[0]["round_time_s"] if records else None,
        "mean_round_time_s": (float(np.mean([r["round_time_s"] for r in records[1:]]))
                              if len(records) > 1 else None),
        "wall_time_s": wall_before + time.time() - t_start,
        "param_counts": d["param_counts"], "state_counts": d["state_counts"],
        "model_bytes": d["model_bytes"], "cut_shape": d["cut_shape"],
        "client_sample_counts": [int(c) for c in client_data.counts],
    }
    if split.eval_weight is not None and records:
        summary["final_perplexity"] = records[-1].get("perplexity")
    if on_finish is not None and stop_reason != "diverged":
        summary.update(on_finish(algo, state))
    if out_dir:
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
