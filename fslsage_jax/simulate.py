"""The host loop of a simulation: rounds, evaluation, the communication ledger,
the budget stop, metrics files and progress.

``run_simulation(algo_name, task, options)`` drives any algorithm from
:data:`fslsage_jax.algorithms.ALGORITHMS` on a built :class:`Task` (split model,
config, client data, test set) and writes, into ``options.out_dir``: ``config.json`` (written by the caller),
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

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax import checkpoint
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate, resolve_config
from fslsage_jax.comm import KINDS, Ledger, round_bytes, sizes_of
from fslsage_jax.results import gib_to_target, read_metrics
from fslsage_jax.split import SplitModel, describe


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """One compiled reduction: True iff every float leaf of ``tree`` is finite."""
    oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def _build(algo_name: str, split: SplitModel, cfg: Config, n_max: int):
    return (ALGORITHMS[algo_name](split, cfg, n_max),
            make_evaluate(split, resolve_config(cfg, split).eval_batch_size))


_build_cached = functools.lru_cache(maxsize=8)(_build)


def build(algo_name: str, split: SplitModel, cfg: Config, n_max: int):
    """``(Algorithm, evaluate)`` for one setting, built once per process (when the split
    model is hashable) so that repeated runs (a resume, a sweep, tests) reuse the compiled
    functions instead of compiling them again."""
    try:
        return _build_cached(algo_name, split, cfg, n_max)
    except TypeError:           # an unhashable split model: build afresh
        return _build(algo_name, split, cfg, n_max)


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


class Task(NamedTuple):
    """What a simulation trains: the built experiment.

    Attributes:
      split, cfg: the split model and the algorithms' configuration.
      clients: padded client data with ``x [m, n_max, ...]``, ``y``, ``counts [m]`` (numpy
        or :class:`ClientArrays`).
      test_x, test_y: the whole evaluation set.
      frozen: frozen shared weights ``(client, server, aux)`` to use instead of the
        initial ones (e.g. pretrained GPT-2 weights); never checkpointed.
      on_finish: ``on_finish(algo, state) -> dict`` called once at the end (not on
        divergence); its dict is added to the summary (e.g. generation BLEU).
    """
    split: SplitModel
    cfg: Config
    clients: Any
    test_x: Any
    test_y: Any
    frozen: Any = None
    on_finish: Callable[[Any, Any], dict] | None = None


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a simulation runs and where it writes.

    Attributes:
      rounds: maximum number of rounds R.
      seed: the run's seed (initial models, shuffles, alignment).
      comm_budget_bytes: stop once the paper-comparable total reaches it (None: no budget).
      out_dir: where ``metrics.jsonl``, ``summary.json`` and checkpoints go (None: nowhere).
      target_accuracy: accuracy whose first crossing is reported in GiB.
      progress: show a progress bar over rounds.
      log: where to report resumes and checkpoints (None: silent).
      checkpoint_every: save a checkpoint every this many rounds and when the run stops
        (not on divergence); None: never (needs ``out_dir``).
      keep_checkpoints: how many of the newest checkpoints to keep.
      resume: continue from the newest checkpoint in ``out_dir`` (from round 0 if there is
        none), keeping ``metrics.jsonl``'s records of its rounds.
      stop_requested: polled after every round; True stops the run with a checkpoint and
        stop reason ``interrupted``.
      devices: shard the client axis over this many devices (1: no sharding;
        0 / None / "auto": all, of every process); see :mod:`fslsage_jax.sharding`.
      cohort_size: K clients drawn per round out of the population of
        ``task.clients`` (None or N: all take part, the state stays on the device); the
        round is compiled for K clients and persistent per-client state lives on the
        host, see :mod:`fslsage_jax.population`.
      cohort_weighted: draw the cohort with probability proportional to shard size.

    Across processes (``jax.distributed``) every process runs the same loop; only
    process 0 writes ``metrics.jsonl``, ``summary.json`` and checkpoints.
    """
    rounds: int = 50
    seed: int = 0
    comm_budget_bytes: int | None = None
    out_dir: str | None = None
    target_accuracy: float = 0.9
    progress: bool = True
    log: Callable[[str], None] | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    stop_requested: Callable[[], bool] | None = None
    devices: int | str | None = 1
    cohort_size: int | None = None
    cohort_weighted: bool = False


class _Progress(NamedTuple):
    """Where a run starts: its state, ledger, records so far and the wall time before."""
    state: Any
    ledger: Ledger
    records: list
    first: int
    wall_before: float


def _start(algo_name: str, algo, task: Task, opts: RunOptions, metrics_path: str | None,
           pop=None) -> _Progress:
    """The initial state, or the newest checkpoint's when resuming (``metrics.jsonl``
    truncated to its rounds; a cohort run's population store restored into ``pop``)."""
    key = jax.random.key(opts.seed)
    state = jax.jit(algo.init)(jax.random.fold_in(key, 0))
    if task.frozen is not None:
        state = state._replace(frozen=task.frozen)
    if pop is not None:
        pop.attach(state)
    progress = _Progress(state, Ledger.empty(), [], 0, 0.0)
    if opts.resume:
        if not opts.out_dir:
            raise ValueError("resume needs out_dir")
        ckpt = checkpoint.latest(opts.out_dir)
        if ckpt is not None:
            state = checkpoint.restore(ckpt, state)
            if pop is not None:
                pop.load(ckpt.path)
            if int(jax.device_get(state.round)) != ckpt.rounds:
                raise ValueError(f"checkpoint {ckpt.path}: state round {int(state.round)} != {ckpt.rounds}")
            progress = _Progress(state, Ledger({k: int(ckpt.meta["ledger"].get(k, 0)) for k in KINDS}),
                                 read_metrics(metrics_path, ckpt.rounds) if ckpt.rounds else [],
                                 ckpt.rounds, float(ckpt.meta.get("wall_time_s", 0.0)))
        if opts.log:
            opts.log(f"{algo_name}: resuming after round {progress.first} from "
                     f"{ckpt.path if ckpt else 'the start (no checkpoint yet)'}")
    if metrics_path and _writer():
        truncate_metrics(metrics_path, progress.records)
    return progress


def _writer() -> bool:
    """Whether this process writes files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def _record(t: int, defn, split: SplitModel, acc: dict, ledger: Ledger, test_loss: float,
            test_acc: float, round_time: float, eval_time: float) -> dict:
    """One line of ``metrics.jsonl``."""
    rec = {"round": t, "test_accuracy": test_acc, "test_loss": test_loss,
           "train_loss": float(acc["loss_sum"] / max(acc["loss_n"], 1.0)),
           "comm_bytes": ledger.total, "comm_gib": ledger.total_gib,
           "comm": dict(ledger.counts), "round_time_s": round_time, "eval_time_s": eval_time}
    if split.eval_weight is not None:     # token-weighted loss: log perplexity
        rec["perplexity"] = math.exp(min(test_loss, 700.0))
    rec.update(defn.round_metrics(acc))
    return rec


def _summary(algo_name: str, task: Task, opts: RunOptions, records: list, ledger: Ledger,
             stop_reason: str, diverged_round: int | None, wall_time: float) -> dict:
    d = describe(task.split)
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
        "target_accuracy": opts.target_accuracy,
        "gib_to_target": gib_to_target(records, opts.target_accuracy),
        "rounds_run": len(records),
        "stop_reason": stop_reason,
        "diverged_round": diverged_round,
        "first_round_time_s": records[0]["round_time_s"] if records else None,
        "mean_round_time_s": (float(np.mean([r["round_time_s"] for r in records[1:]]))
                              if len(records) > 1 else None),
        "wall_time_s": wall_time,
        "param_counts": d["param_counts"], "state_counts": d["state_counts"],
        "model_bytes": d["model_bytes"], "cut_shape": d["cut_shape"],
        "client_sample_counts": [int(c) for c in np.asarray(task.clients.counts)],
    }
    if task.split.eval_weight is not None and records:
        summary["final_perplexity"] = records[-1].get("perplexity")
    return summary


def run_simulation(algo_name: str, task: Task, opts: RunOptions = RunOptions()) -> dict:
    """Train ``algo_name`` on ``task`` for up to ``opts.rounds`` rounds or until the budget
    is spent, writing metrics, checkpoints and the summary into ``opts.out_dir``.

    Args:
      algo_name: a key of ``ALGORITHMS``.
      task: the built experiment (:class:`Task`).
      opts: rounds, seed, budget, outputs, checkpoints, resume, devices (:class:`RunOptions`).
    Returns:
      the summary dict (also written to ``summary.json``).
    """
    t_start = time.time()
    defn = ALGORITHMS[algo_name]
    split, cfg, out_dir = task.split, task.cfg, opts.out_dir
    n_max = task.clients.x.shape[1]
    population = int(np.shape(task.clients.counts)[0])
    pop = None
    if opts.cohort_size not in (None, population):
        from fslsage_jax.population import Population
        pop = Population(defn, cfg, task.clients, opts.cohort_size, opts.seed, opts.cohort_weighted)
        cfg = dataclasses.replace(cfg, num_clients=pop.k)
    algo, evaluate = build(algo_name, split, cfg, n_max)
    sizes, model_bytes = sizes_of(split), defn.model_bytes(sizes_of(split))
    data = None if pop else ClientArrays(jnp.asarray(task.clients.x), jnp.asarray(task.clients.y),
                                         jnp.asarray(task.clients.counts, jnp.int32))
    test_x, test_y = jnp.asarray(task.test_x), jnp.asarray(task.test_y)
    round_key = jax.random.fold_in(jax.random.key(opts.seed), 1)
    writer = _writer()
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir and writer:
        os.makedirs(out_dir, exist_ok=True)
    state, ledger, records, first, wall_before = _start(algo_name, algo, task, opts, metrics_path, pop)
    if opts.devices != 1:
        from fslsage_jax import sharding
        fields = defn.fields(cfg)
        if pop is None:
            state, data, algo = sharding.shard_all(fields, algo, state, data, opts.devices)
        else:
            mesh = sharding.client_mesh(opts.devices)
            state = sharding.shard_state(state, fields, mesh)
            pop.place_state = lambda s: jax.device_put(s, sharding.state_shardings(s, fields, mesh))
            pop.place_data = lambda d: jax.device_put(d, sharding.data_shardings(d, mesh))
            algo = algo._replace(run_round=sharding.sharded_round(algo.run_round, fields, mesh))
    if pop is not None:
        algo = algo._replace(run_round=pop.wrap(algo.run_round))
    stop_reason, diverged_round, budget = "rounds", None, opts.comm_budget_bytes

    def save_checkpoint(done: int) -> None:
        if out_dir and opts.checkpoint_every:
            st = state
            if jax.process_count() > 1:      # every process takes part in the gather
                from fslsage_jax.population import fetch
                st = fetch(checkpoint.strip_frozen(state))
            if writer:
                checkpoint.save(out_dir, st, done,
                                {"algo": algo_name, "ledger": dict(ledger.counts),
                                 "wall_time_s": wall_before + time.time() - t_start},
                                keep=opts.keep_checkpoints, extra=pop.save if pop else None)

    metrics_file = open(metrics_path, "a") if metrics_path and writer else None  # noqa: SIM115
    bar = None
    if opts.progress and writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.rounds, initial=min(first, opts.rounds), desc=algo_name, unit="round",
                   leave=False)
    try:
        if budget is not None and ledger.total >= budget:
            stop_reason = "comm_budget"
        for t in range(first, opts.rounds if stop_reason == "rounds" else first):
            t0 = time.time()
            state, acc = algo.run_round(state, data, jax.random.fold_in(round_key, t))
            round_time = time.time() - t0
            ledger = ledger.add(round_bytes(model_bytes, sizes, acc))
            t1 = time.time()
            test_loss, test_acc = evaluate(*algo.global_model(state), test_x, test_y)
            rec = _record(t, defn, split, acc, ledger, test_loss, test_acc, round_time, time.time() - t1)
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
            if budget is not None and ledger.total >= budget:
                stop_reason = "comm_budget"
            elif t + 1 < opts.rounds and opts.stop_requested is not None and opts.stop_requested():
                stop_reason = "interrupted"
            if (stop_reason != "rounds" or t + 1 == opts.rounds
                    or (t + 1) % (opts.checkpoint_every or 1) == 0):
                save_checkpoint(t + 1)
            if stop_reason != "rounds":
                break
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()

    summary = _summary(algo_name, task, opts, records, ledger, stop_reason, diverged_round,
                       wall_before + time.time() - t_start)
    if task.on_finish is not None and stop_reason != "diverged":
        summary.update(task.on_finish(algo, state))
    if pop is not None:
        summary.update(cohort_size=pop.k, cohort_weighted=pop.weighted,
                       clients_taken_part=pop.store.num_stored,
                       population_store_bytes=pop.store.nbytes)
    if out_dir and writer:
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
