"""The host loop of a simulation: rounds, evaluation, the communication ledger,
callbacks, the budget stop, metrics files and checkpoints.

``run(algorithm, task, options, callbacks)`` drives any :class:`AlgorithmDef` on a
built :class:`Task` (split model, config, client data, test set) and returns a
:class:`Result` (final state, global model, summary). ``run_simulation(algo_name,
task, options)`` is the same by name, returning the summary. Into
``options.out_dir`` go ``metrics.jsonl`` (one JSON object per round, flushed and
synced), ``summary.json`` (at the end, atomically) and checkpoints
(:mod:`fslsage_jax.checkpoint`) every ``checkpoint_every`` rounds and whenever
the run stops, except on divergence.

Who takes part is one interface (:class:`~fslsage_jax.population.AllClients` or
:class:`~fslsage_jax.population.Cohort`); the loop calls it the same way either way.

Stop reasons: ``rounds`` (R rounds done), ``comm_budget``, ``diverged`` (a
non-finite training or test loss, or a non-finite state leaf in a round after
which the run may save a checkpoint or end: every leaf is checked there, so no
checkpoint holds one; the diverged round's record is written with its non-finite
numbers as ``null`` and is never checkpointed),
``interrupted`` (``stop_requested()`` became true), ``callback`` (a callback
returned True).

Host syncs: a round's metrics stay on the device until something needs them (an
evaluation, a callback, the budget, a checkpoint, a stop request or the end);
with ``eval_every > 1`` and no callbacks or budget, rounds run back to back and
their records are written at the next evaluation (divergence is detected there).

Resuming (``resume=True``) restores the newest checkpoint of ``out_dir``,
truncates ``metrics.jsonl`` to its rounds and continues; round keys are
``fold_in(round_key, t)``, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax import checkpoint
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import make_evaluate, resolve_config
from fslsage_jax.comm import KINDS, Ledger, round_bytes, sizes_of
from fslsage_jax.memory import memory_errors_named
from fslsage_jax.population import Cohort, fetch, participation, store_dir
from fslsage_jax.records import (json_safe, round_record, summarize_run, truncate_metrics,
                                 write_json_atomic)
from fslsage_jax.results import read_metrics
from fslsage_jax.split import SplitModel

__all__ = ["Result", "RoundEvent", "RunOptions", "Task", "build", "read_metrics", "run", "run_simulation",
           "tree_all_finite", "write_json_atomic"]


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """One compiled reduction: True iff every float leaf of ``tree`` is finite."""
    oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def _build(defn: AlgorithmDef, split: SplitModel, cfg: Config, n_max: int, state_sharding):
    return (defn(split, cfg, n_max, state_sharding),
            make_evaluate(split, resolve_config(cfg, split).eval_batch_size))


_build_cached = functools.lru_cache(maxsize=8)(_build)


def build(algorithm: str | AlgorithmDef, split: SplitModel, cfg: Config, n_max: int,
          state_sharding: Any = None):
    """``(Algorithm, evaluate)`` for one setting, built once per process (when the split
    model is hashable) so that repeated runs (a resume, a sweep, tests) reuse the compiled
    functions instead of compiling them again."""
    defn = ALGORITHMS[algorithm] if isinstance(algorithm, str) else algorithm
    try:
        return _build_cached(defn, split, cfg, n_max, state_sharding)
    except TypeError:           # an unhashable split model: build afresh
        return _build(defn, split, cfg, n_max, state_sharding)


class Task(NamedTuple):
    """What a simulation trains: the built experiment.

    Attributes:
      split, cfg: the split model and the algorithms' configuration.
      clients: padded client data with ``x [m, n_max, ...]``, ``y``, ``counts [m]`` (numpy
        or :class:`~fslsage_jax.algorithms.engine.ClientArrays`).
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
        round is compiled for K clients and ``clients.own`` lives on the host, see
        :mod:`fslsage_jax.population`.
      cohort_weighted: draw the cohort with probability proportional to shard size.
      population_store: where a cohort run keeps ``clients.own``: ``auto`` (RAM up to
        ``population.RAM_LIMIT_BYTES``, memory-mapped files in ``out_dir/population_store``
        or a temporary directory beyond), ``ram`` or ``disk``; results are the same.
      eval_every: evaluate the global model every this many rounds and after the last
        (0: only after the last).

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
    eval_every: int = 1
    population_store: str = "auto"


class RoundEvent(NamedTuple):
    """What a callback sees after a round.

    Attributes:
      round: the round index t (0-based).
      metrics: the round's record (the line of ``metrics.jsonl``; ``test_accuracy`` is
        None in a round that was not evaluated).
      state: the newest state (device arrays: reading them syncs, nothing else does).
      algorithm: the built ``Algorithm`` (``algorithm.global_model(state)`` gives the
        global (client, server) variables).
    """
    round: int
    metrics: dict
    state: Any
    algorithm: Any


class Result(NamedTuple):
    """What a run returns: the final ``state``, the global model's ``client`` and
    ``server`` variables (frozen weights attached), the ``summary`` dict (as in
    ``summary.json``), the per-round ``records`` and the built ``algorithm``."""
    state: Any
    client: Any
    server: Any
    summary: dict
    records: list
    algorithm: Any


def _writer() -> bool:
    """Whether this process writes files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def _init_once(init: Callable) -> Callable:
    """``init`` compiled at XLA -O0: a program run once a run compiles in about half the time
    (4-client digits run, fresh cache: 19.5 -> 18.5 s; initial weights equal to -O2's within
    1 ulp, the same final accuracy)."""
    try:
        return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})
    except TypeError:                       # a jax without per-function compiler options
        return jax.jit(init)


def _start(algo, task: Task, opts: RunOptions, part, metrics_path: str | None, mesh):
    """``(state, ledger, records, first round, wall time before)``: the initial state, or
    the newest checkpoint's when resuming (``metrics.jsonl`` truncated to its rounds; a
    cohort's store restored)."""
    state = _init_once(algo.init)(jax.random.fold_in(jax.random.key(opts.seed), 0))
    if task.frozen is not None:
        state = state._replace(frozen=task.frozen)
    if mesh is not None:
        from fslsage_jax.sharding import shard_state
        state = shard_state(state, mesh)
    part.start(state)
    out = (state, Ledger.empty(), [], 0, 0.0)
    if opts.resume:
        if not opts.out_dir:
            raise ValueError("resume needs out_dir")
        ckpt = checkpoint.latest(opts.out_dir)
        if ckpt is not None:
            state = checkpoint.restore(ckpt, state)
            part.load(ckpt.path)
            if int(jax.device_get(state.round)) != ckpt.rounds:
                raise ValueError(f"checkpoint {ckpt.path}: state round {int(state.round)} != {ckpt.rounds}")
            out = (state, Ledger({k: int(ckpt.meta["ledger"].get(k, 0)) for k in KINDS}),
                   read_metrics(metrics_path, ckpt.rounds) if ckpt.rounds else [],
                   ckpt.rounds, float(ckpt.meta.get("wall_time_s", 0.0)))
        if opts.log:
            opts.log(f"{algo.name}: resuming after round {out[3]} from "
                     f"{ckpt.path if ckpt else 'the start (no checkpoint yet)'}")
    if metrics_path and _writer():
        truncate_metrics(metrics_path, out[2])
    return out


def run(algorithm: str | AlgorithmDef, task: Task, opts: RunOptions = RunOptions(),
        callbacks: Sequence[Callable[[RoundEvent], bool | None]] = ()) -> Result:
    """Train ``algorithm`` on ``task`` for up to ``opts.rounds`` rounds or until the budget
    is spent (or a callback returns True), writing metrics, checkpoints and the summary
    into ``opts.out_dir``.

    Args:
      algorithm: a key of ``ALGORITHMS`` or an :class:`AlgorithmDef` (e.g. your own).
      task: the built experiment (:class:`Task`).
      opts: rounds, seed, budget, outputs, checkpoints, resume, devices, cohort
        (:class:`RunOptions`).
      callbacks: called on the host after each round with a :class:`RoundEvent`, in
        order; one that returns True stops the run (stop reason ``callback``).
    Returns:
      a :class:`Result`.
    Raises:
      ValueError: ``task.cfg.num_clients`` disagrees with the client data.
      fslsage_jax.memory.DeviceMemoryError: a program did not fit in device memory (the
        checkpoints written so far are kept).
    """
    t_start = time.time()
    defn = ALGORITHMS[algorithm] if isinstance(algorithm, str) else algorithm
    split, cfg, out_dir = task.split, task.cfg, opts.out_dir
    mesh = None
    if opts.devices != 1:
        from fslsage_jax import sharding
        mesh = sharding.client_mesh(opts.devices)
    part = participation(task.clients, opts.cohort_size, opts.seed, opts.cohort_weighted, mesh,
                         opts.population_store, store_dir(out_dir))
    if isinstance(part, Cohort):
        cfg = dataclasses.replace(cfg, num_clients=part.k)
    elif cfg.num_clients != part.population:
        raise ValueError(f"Config.num_clients={cfg.num_clients} but the client data holds "
                         f"{part.population} clients (leading axis of x, y and counts); make them agree")
    state_sharding = None
    if mesh is not None:
        from fslsage_jax.sharding import state_sharding as spec
        state_sharding = spec(mesh)
    algo, evaluate = build(defn, split, cfg, int(np.shape(task.clients.x)[1]), state_sharding)
    sizes = sizes_of(split)
    model_bytes = defn.model_bytes(sizes)
    test_x, test_y = jnp.asarray(task.test_x), jnp.asarray(task.test_y)
    round_key = jax.random.fold_in(jax.random.key(opts.seed), 1)
    writer = _writer()
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir and writer:
        os.makedirs(out_dir, exist_ok=True)
    state, ledger, records, first, wall_before = _start(algo, task, opts, part, metrics_path, mesh)
    stop_reason, diverged_round, budget = "rounds", None, opts.comm_budget_bytes

    def save_checkpoint(done: int) -> None:
        if out_dir and opts.checkpoint_every:
            st = state
            if jax.process_count() > 1:      # every process takes part in the gather
                st = fetch(checkpoint.strip_frozen(state))
            if writer:
                checkpoint.save(out_dir, st, done,
                                {"algo": defn.name, "ledger": dict(ledger.counts),
                                 "wall_time_s": wall_before + time.time() - t_start},
                                keep=opts.keep_checkpoints, extra=part.save)

    metrics_file = open(metrics_path, "a") if metrics_path and writer else None  # noqa: SIM115
    bar = None
    if opts.progress and writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.rounds, initial=min(first, opts.rounds), desc=defn.name, unit="round",
                   leave=False)
    pending, t_sync = [], time.time()
    try:
        if budget is not None and ledger.total >= budget:
            stop_reason = "comm_budget"
        for t in range(first, opts.rounds if stop_reason == "rounds" else first):
            state, data = part.inputs(state, t)
            with memory_errors_named("round (local steps, server, alignment)"):
                state, acc = algo.run_round(state, data, jax.random.fold_in(round_key, t))
            part.write_back(state)
            last = t + 1 == opts.rounds
            evaluate_now = last or (opts.eval_every > 0 and (t + 1) % opts.eval_every == 0)
            stop_asked = not last and opts.stop_requested is not None and opts.stop_requested()
            due = last or (t + 1) % (opts.checkpoint_every or 1) == 0
            # every state leaf where the run may end or save a checkpoint after this round
            # (a pass over the whole state: 155 ms at 256 FSL-SAGE clients); elsewhere the
            # losses alone, which a non-finite parameter reaches by the next round
            full = (last or stop_asked or callbacks or budget is not None
                    or (due and out_dir and opts.checkpoint_every))
            pending.append((t, acc, tree_all_finite(checkpoint.strip_frozen(state)) if full else None))
            if not (evaluate_now or full):
                continue
            # one sync: the pending rounds' counters, finiteness flags and the evaluation
            jax.block_until_ready([acc for _, acc, _ in pending])
            t0 = time.time()
            with memory_errors_named("evaluation"):
                test = evaluate(*algo.global_model(state), test_x, test_y) if evaluate_now else None
            eval_time = time.time() - t0 if evaluate_now else 0.0
            fetched = jax.device_get([(acc, fin) for _, acc, fin in pending])
            round_time = (t0 - t_sync) / len(pending)
            stop = False
            for (tp, _, _), (acc_h, fin) in zip(pending, fetched):
                ledger = ledger.add(round_bytes(model_bytes, sizes, acc_h))
                is_last = tp == t
                rec = round_record(tp, defn.round_metrics, split, acc_h, ledger,
                                   test if is_last else None, round_time, eval_time if is_last else 0.0)
                finite = (fin is None or bool(fin)) and np.isfinite(rec["train_loss"]) and (
                    not is_last or test is None or np.isfinite(test[0]))
                rec = json_safe(rec)
                records.append(rec)
                if metrics_file:
                    metrics_file.write(json.dumps(rec) + "\n")
                if not finite:
                    stop_reason, diverged_round = "diverged", tp
                    break
                for cb in callbacks:
                    stop = bool(cb(RoundEvent(tp, rec, state, algo))) or stop
            if metrics_file:
                metrics_file.flush()
                os.fsync(metrics_file.fileno())
            if bar is not None:
                bar.update(len(pending))
                if test is not None:
                    bar.set_postfix(acc=f"{test[1]:.4f}", GiB=f"{ledger.total_gib:.4f}")
            pending, t_sync = [], time.time()
            if stop_reason == "diverged":
                break
            if budget is not None and ledger.total >= budget:
                stop_reason = "comm_budget"
            elif stop:
                stop_reason = "callback"
            elif stop_asked:
                stop_reason = "interrupted"
            if stop_reason != "rounds" or due:
                save_checkpoint(t + 1)
            if stop_reason != "rounds":
                break
    finally:
        part.close()
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()

    summary = summarize_run(defn.name, split, task.clients.counts, opts.target_accuracy, records, ledger,
                            stop_reason, diverged_round, wall_before + time.time() - t_start)
    if task.on_finish is not None and stop_reason != "diverged":
        summary.update(task.on_finish(algo, state))
    summary.update(part.summary())
    if out_dir and writer:
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    client, server = algo.global_model(state)
    return Result(state, client, server, summary, records, algo)


def run_simulation(algo_name: str | AlgorithmDef, task: Task, opts: RunOptions = RunOptions()) -> dict:
    """:func:`run` without callbacks, returning only the summary dict (also written to
    ``summary.json``)."""
    return run(algo_name, task, opts).summary
