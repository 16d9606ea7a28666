"""An experiment built and run: :func:`build` loads the task and partitions it,
:func:`run` trains one algorithm or all of them and writes the run files,
:func:`write_memory_plan` plans the device memory without loading anything."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from fslsage_jax import memory
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.lifting import auto_settings
from fslsage_jax.data import partition, to_client_arrays
from fslsage_jax.experiment.config import (TASK_FIELDS, ExperimentConfig, algorithm_config, algorithm_params,
                                           run_devices)
from fslsage_jax.experiment.errors import ConfigError
from fslsage_jax.experiment.rundir import EXPERIMENT_CONFIG, USER_OBJECTS, prepare_out, resume_plan, write_run_config
from fslsage_jax.experiment.tasks import BUILTIN_DATASETS, dataset_sizes, load_task, make_split
from fslsage_jax.results import format_table
from fslsage_jax.sharding import check_divisible, client_mesh, init_distributed
from fslsage_jax.simulate import RunOptions, Task, run_simulation, write_json_atomic

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A built experiment: the settings (``strategy`` resolved), the task, the client partition
    and the algorithms' config, ready for :func:`run`.

    ``provenance``: what config.json says the run was built from. :func:`build` sets
    ``"experiment_config"``; an Experiment constructed directly holds the caller's own objects
    (``"user_objects"``, the default): its config.json then records the settings that
    describe the task (``TASK_FIELDS``: dataset, model, ...) as None, and ``--resume`` refuses it.
    """
    config: ExperimentConfig
    dataset: Any
    split: Any
    clients: Any
    algo_config: Config
    frozen: Any = None
    on_finish: Callable | None = None
    provenance: str = USER_OBJECTS

    def run_config(self) -> dict:
        """What ``config.json`` records (besides ``provenance``): every setting, the algorithms'
        config, data facts."""
        ds = self.dataset
        settings = dataclasses.asdict(self.config)
        if self.provenance != EXPERIMENT_CONFIG:
            settings = {k: None if k in TASK_FIELDS else v for k, v in settings.items()}
        return {**settings, "config": dataclasses.asdict(self.algo_config),
                "n_train": len(ds.y_train), "n_test": len(ds.y_test), "num_classes": ds.num_classes,
                "input_shape": list(ds.x_train.shape[1:]),
                "client_sample_counts": [int(c) for c in self.clients.counts],
                "jax_version": jax.__version__, "backend": jax.default_backend()}


def partition_clients(cfg: ExperimentConfig, ds):
    """The training set split over ``num_clients`` clients as padded arrays + counts."""
    n_train = len(ds.y_train)
    if cfg.num_clients > n_train:
        raise ConfigError("{num_clients} {}: more clients than the {} training samples", cfg.num_clients, n_train)
    try:
        parts = partition(ds.y_train, cfg.num_clients, cfg.distribution, cfg.alpha, ds.num_classes, cfg.seed)
        return to_client_arrays(ds.x_train, ds.y_train, parts)
    except ValueError as e:
        raise ConfigError("{num_clients} {} {distribution} {} {alpha} {}: {}", cfg.num_clients, cfg.distribution,
                          cfg.alpha, e) from None


def build(cfg: ExperimentConfig, log: Log | None = None, echo: Log | None = None) -> Experiment:
    """Load the task, partition it, resolve ``strategy="auto"`` and build the algorithms' config.

    Args:
      cfg: the settings (validated: :func:`validate`).
      log: notices while loading (e.g. random initial weights); None: silent.
      echo: what the task reports at the end of each algorithm's run (GPT-2: generated
        samples and BLEU); None: silent.
    Raises:
      ConfigError: data, weights or partition that cannot be used with these settings.
    """
    ds, split, frozen, on_finish = load_task(cfg, log, echo)
    clients = partition_clients(cfg, ds)
    if run_devices(cfg) != 1:
        try:
            check_divisible(cfg.cohort, client_mesh(run_devices(cfg)))
        except ValueError as e:
            raise ConfigError("{devices} {}: {}", cfg.devices, e) from None
    if cfg.strategy == "auto":
        cfg = dataclasses.replace(cfg, **auto_settings(
            jax.default_backend(), tuple(ds.x_train.shape[1:]), cfg.cohort))
    return Experiment(cfg, ds, split, clients, algorithm_config(cfg), frozen, on_finish, EXPERIMENT_CONFIG)


def start_distributed(cfg: ExperimentConfig) -> None:
    """Join the multi-process run of ``coordinator`` (nothing for one process); call it
    before any other JAX work.

    Raises:
      ConfigError: the coordinator did not answer within ``distributed_timeout`` seconds.
    """
    if cfg.num_processes == 1 and not cfg.coordinator:
        return
    try:
        init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.distributed_timeout)
    except (ValueError, TimeoutError) as e:
        raise ConfigError("{}", e, field="coordinator") from None


def _simulate(exp: Experiment, name: str, run_dir: str | None, resume: bool, stop_requested, log) -> dict:
    """One algorithm's run: the one call into the host loop."""
    cfg = exp.config
    algo_cfg = dataclasses.replace(exp.algo_config, params=algorithm_params(exp.algo_config.params, name))
    task = Task(exp.split, algo_cfg, exp.clients, exp.dataset.x_test, exp.dataset.y_test,
                exp.frozen, exp.on_finish)
    return run_simulation(name, task, RunOptions(
        rounds=cfg.rounds, seed=cfg.seed, comm_budget_bytes=int(cfg.comm_budget_gib * 2 ** 30),
        out_dir=run_dir, target_accuracy=cfg.target_accuracy, progress=not cfg.no_progress,
        checkpoint_every=cfg.checkpoint_every, resume=resume, stop_requested=stop_requested, log=log,
        devices=run_devices(cfg), cohort_size=cfg.cohort_size, cohort_weighted=cfg.cohort_weighted,
        population_store=cfg.population_store))


def run(exp: Experiment, *, stop_requested: Callable[[], bool] | None = None, log: Log | None = None,
        echo: Log | None = None, on_summary: Callable[[dict, str | None], None] | None = None) -> list[dict]:
    """Train the experiment's algorithm(s) on the same partition and seed.

    With ``config.out`` set, writes there (one algorithm) or into ``out/<algo>/`` (``all``)
    config.json, metrics.jsonl, summary.json and checkpoints, and for ``all`` also
    ``out/config.json``, ``comparison.md`` and ``comparison.json``. With ``config.resume``
    it continues the run in ``out`` (finished algorithms of an ``all`` run are skipped).

    Args:
      exp: the built experiment (:func:`build`).
      stop_requested: polled after every round; True stops with a checkpoint (``interrupted``).
      log: progress notes of the host loop (resumes, checkpoints); None: silent.
      echo: one line per finished or skipped algorithm; None: silent.
      on_summary: ``on_summary(summary, run_dir)`` after each algorithm.
    Returns:
      the summaries (as in summary.json), in run order; an interrupted run ends the list.
    """
    cfg, say = exp.config, echo or (lambda msg: None)
    algos, resuming = cfg.algos, bool(cfg.resume)
    writer = jax.process_index() == 0          # a multi-process run: process 0 writes
    out = (prepare_out(cfg.out, cfg.overwrite or resuming) if writer else cfg.out) if cfg.out else None
    run_config = exp.run_config()
    if out and writer and len(algos) > 1:
        write_run_config(out, run_config, exp.provenance)
    summaries = []
    for name in algos:
        run_dir = (os.path.join(out, name) if len(algos) > 1 else out) if out else None
        plan = "resume" if resuming else "fresh"
        if resuming and len(algos) > 1:
            plan, s = resume_plan(run_dir, cfg.rounds)
            if plan == "skip":
                summaries.append(s)
                say(f"{name}: finished before ({s['stop_reason']}), skipped")
                continue
        if run_dir and writer:
            if len(algos) > 1:
                prepare_out(run_dir, cfg.overwrite or resuming)
            write_run_config(run_dir, {**run_config, "algo": name}, exp.provenance)
        s = _simulate(exp, name, run_dir, plan == "resume", stop_requested, log)
        summaries.append(s)
        say(f"{name}: accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}), "
            f"{s['total_gib']:.4f} GiB, {s['rounds_run']} rounds, stop: {s['stop_reason']}, "
            f"{s['wall_time_s']:.1f} s -> {run_dir}")
        if on_summary is not None:
            on_summary(s, run_dir)
        if s["stop_reason"] == "interrupted":
            break
    if (out and writer and len(algos) > 1 and len(summaries) == len(algos)
            and all(s["rounds_run"] > 0 for s in summaries)):
        with open(os.path.join(out, "comparison.md"), "w") as f:
            f.write(format_table(summaries, cfg.target_accuracy) + "\n")
        write_json_atomic(os.path.join(out, "comparison.json"), summaries)
    return summaries


# ----------------------------------------------------------------------------- memory plan
def plan_memory(cfg: ExperimentConfig) -> list[dict]:
    """The memory plan of every algorithm the experiment runs (:func:`fslsage_jax.memory.plan`),
    for the run's true shapes (subsets and partition sizes included), without loading data or
    weights."""
    split = make_split(cfg, *BUILTIN_DATASETS[cfg.dataset].shape(cfg))
    n_train, n_test = dataset_sizes(cfg)
    if cfg.distribution == "iid":
        n_max = n_train // cfg.num_clients
    else:   # Dirichlet shards: floor(n/m) each as well, the largest bounds the padding
        n_max = -(-n_train // cfg.num_clients)
    algo_cfg = dataclasses.replace(algorithm_config(cfg), num_clients=cfg.cohort)
    return [memory.plan(name, split, algo_cfg, n_max, n_test) for name in cfg.algos]


def write_memory_plan(cfg: ExperimentConfig) -> tuple[str, bool, int | None]:
    """:func:`plan_memory`, written to ``memory_plan.json`` in ``cfg.out``.

    Returns:
      ``(table, fits, limit)``: the plans as a table, whether every plan fits ``limit`` (True
      when it is None), and the limit in bytes: ``device_memory_gib``, else the device's own
      memory, else None (the device reports none).
    """
    limit = int(cfg.device_memory_gib * memory.GIB) if cfg.device_memory_gib else memory.device_memory_bytes()
    plans = plan_memory(cfg)
    prepare_out(cfg.out, True)
    write_json_atomic(os.path.join(cfg.out, "memory_plan.json"),
                      {"limit_bytes": limit, "plans": plans, "config": dataclasses.asdict(cfg)})
    return memory.table(plans, limit), limit is None or all(p["peak_bytes"] <= limit for p in plans), limit
