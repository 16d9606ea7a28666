"""Cheap checks of the settings before any data is loaded: values in range, a model and a
dataset that go together, and settings given explicitly that cannot have an effect."""
from __future__ import annotations

import dataclasses
import math
import os

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.definition import COMMON_FIELDS
from fslsage_jax.experiment.config import ExperimentConfig, choices, set_by_user
from fslsage_jax.experiment.errors import ConfigError, refusal
from fslsage_jax.experiment.tasks import BUILTIN_DATASETS, BUILTIN_MODELS, pairing_error, synthetic_shape
from fslsage_jax.sharding import parse_coordinator

POSITIVE_INTS = ("num_clients", "rounds", "local_epochs", "batch_size", "server_update_interval",
                 "align_interval", "align_epochs", "align_batch_size", "align_buffer_size",
                 "chunk_size", "checkpoint_every")


def _finite(v, low: float, strict: bool) -> bool:
    return math.isfinite(v) and (v > low if strict else v >= low)


def validate(cfg: ExperimentConfig, explicit=None) -> None:
    """Cheap checks before any data is loaded.

    Args:
      cfg: the settings.
      explicit: the settings given explicitly (names; the CLI: flags on the command line).
        Settings that cannot have an effect are refused only when given explicitly (a value a
        preset set is not). None: those that differ from the defaults (of ``cfg.preset``).
    Raises:
      ConfigError: one line naming the setting, its value and what is allowed.
    """
    for dest, allowed in choices().items():
        v = getattr(cfg, dest)
        if v not in allowed and not (dest == "preset" and v is None):
            raise refusal(dest, v, "choose from {}", ", ".join(allowed))
    for dest in POSITIVE_INTS:
        if getattr(cfg, dest) <= 0:
            raise refusal(dest, getattr(cfg, dest), "must be a positive integer")
    for dest in ("lr", "alpha", "comm_budget_gib"):
        if not _finite(getattr(cfg, dest), 0, strict=True):
            raise refusal(dest, getattr(cfg, dest), "must be a finite number > 0")
    if not _finite(cfg.weight_decay, 0, strict=False):
        raise refusal("weight_decay", cfg.weight_decay, "must be a finite number >= 0")
    if not 0.0 <= cfg.target_accuracy <= 1.0:
        raise refusal("target_accuracy", cfg.target_accuracy, "must lie in [0, 1]")
    if cfg.data_dir is not None and not os.path.exists(cfg.data_dir):
        raise refusal("data_dir", cfg.data_dir, "no such file or directory")
    if not _finite(cfg.adam_eps, 0, strict=True):
        raise refusal("adam_eps", cfg.adam_eps, "must be a finite number > 0")
    for dest in ("aux_lr", "aux_weight_decay", "device_memory_gib"):
        if not _finite(getattr(cfg, dest), 0, strict=False):
            raise refusal(dest, getattr(cfg, dest), "must be a finite number >= 0")
    for dest in ("warmup_steps", "train_subset", "eval_subset", "generate", "warm_start",
                 "eval_batch_size", "align_client_chunk"):
        if getattr(cfg, dest) < 0:
            raise refusal(dest, getattr(cfg, dest), "must be >= 0")
    for dest in ("seq_len", "max_new_tokens"):
        if getattr(cfg, dest) <= 0:
            raise refusal(dest, getattr(cfg, dest), "must be a positive integer")
    mismatch = pairing_error(cfg.model, cfg.dataset)
    if mismatch:
        raise mismatch
    if not BUILTIN_DATASETS[cfg.dataset].labelled and cfg.distribution != "iid":
        raise refusal("distribution", cfg.distribution, "{dataset} {} has no class labels to skew; use iid",
                      cfg.dataset)
    splits = cfg.e2e_splits.split(",")
    if len(splits) != 2 or not set(splits) <= {"train", "dev", "test"}:
        raise refusal("e2e_splits", cfg.e2e_splits, "must be TRAIN,EVAL with each of train, dev, test")
    if cfg.cohort_size is not None and not 1 <= cfg.cohort_size <= cfg.num_clients:
        raise refusal("cohort_size", cfg.cohort_size, "must lie in 1..{} (the population, {num_clients})",
                      cfg.num_clients)
    synthetic_shape(cfg.synthetic_shape)
    if cfg.synthetic_samples_per_client < 0:
        raise refusal("synthetic_samples_per_client", cfg.synthetic_samples_per_client, "must be >= 0")
    _check_processes(cfg)
    check_effective(cfg, set_by_user(cfg) if explicit is None else set(explicit))
    if cfg.generate and cfg.max_new_tokens >= cfg.seq_len:
        raise refusal("max_new_tokens", cfg.max_new_tokens, "must be smaller than {seq_len} {} (the prompt "
                      "needs room)", cfg.seq_len)


def _check_processes(cfg: ExperimentConfig) -> None:
    if cfg.num_processes < 1:
        raise refusal("num_processes", cfg.num_processes, "must be a positive integer")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise refusal("process_id", cfg.process_id, "must lie in 0..{} for {num_processes} {}",
                      cfg.num_processes - 1, cfg.num_processes)
    if cfg.num_processes > 1 and not cfg.coordinator:
        raise refusal("num_processes", cfg.num_processes, "needs {coordinator} HOST:PORT")
    if cfg.coordinator:
        try:
            parse_coordinator(cfg.coordinator)
        except ValueError as e:
            raise ConfigError("{}", e, field="coordinator") from None
    if not _finite(cfg.distributed_timeout, 0, strict=True):
        raise refusal("distributed_timeout", cfg.distributed_timeout, "must be a finite number > 0")


def check_effective(cfg: ExperimentConfig, explicit: set[str]) -> None:
    """Refuse explicitly given settings that cannot have an effect with the others.

    Raises:
      ConfigError: one line naming the setting and why it would do nothing.
    """
    def refuse(dest, why, *values):
        raise refusal(dest, getattr(cfg, dest), why, *values)

    def only_for(kind: str, registry: dict, field: str):
        owners = [n for n, e in registry.items() if field in e.fields]
        return "only for {" + kind + "} " + ", ".join(owners)

    for entry in BUILTIN_MODELS.values():       # switched on for a model that has no such thing
        for dest in entry.switches:
            if getattr(cfg, dest) and dest not in BUILTIN_MODELS[cfg.model].fields:
                refuse(dest, only_for("model", BUILTIN_MODELS, dest))
    for entry in BUILTIN_MODELS.values():
        for dest in entry.fields:
            if dest in explicit and dest not in BUILTIN_MODELS[cfg.model].fields:
                refuse(dest, only_for("model", BUILTIN_MODELS, dest))
    if "alpha" in explicit and cfg.distribution == "iid":
        refuse("alpha", "only for {distribution} dirichlet (an iid split has no concentration)")
    if "data_dir" in explicit and not BUILTIN_DATASETS[cfg.dataset].reads_data_dir:
        readers = sorted(n for n, e in BUILTIN_DATASETS.items() if e.reads_data_dir)
        refuse("data_dir", "{dataset} {} reads no files (only {} do)", cfg.dataset, ", ".join(readers))
    for entry in BUILTIN_DATASETS.values():
        for dest in entry.fields:
            if dest in explicit and dest not in BUILTIN_DATASETS[cfg.dataset].fields:
                refuse(dest, only_for("dataset", BUILTIN_DATASETS, dest))
    if "cohort_weighted" in explicit and cfg.cohort == cfg.num_clients:
        refuse("cohort_weighted", "only with {cohort_size} smaller than {num_clients}")
    if "population_store" in explicit and cfg.cohort == cfg.num_clients:
        refuse("population_store", "only with {cohort_size} smaller than {num_clients}")
    if "chunk_size" in explicit and cfg.strategy != "chunked":
        refuse("chunk_size", "only for {strategy} chunked (not {})", cfg.strategy)
    model = BUILTIN_MODELS[cfg.model]
    if model.check_effective is not None:
        model.check_effective(cfg, explicit)
    if cfg.algo in ALGORITHMS:
        algo_only = {f.name for f in dataclasses.fields(Config)} - COMMON_FIELDS
        for dest in sorted(explicit & algo_only):
            if dest not in ALGORITHMS[cfg.algo].uses:
                users = [n for n, a in ALGORITHMS.items() if dest in a.uses]
                refuse(dest, "not used by {algo} {} (only by {})", cfg.algo, ", ".join(users))
    for name, value in cfg.algo_params:         # hyperparameters algorithms declare themselves
        owners = [n for n, a in ALGORITHMS.items() if name in a.hyperparams]
        if not owners:
            raise ConfigError("{} {}: no algorithm declares it", name, value, field=name)
        if cfg.algo in ALGORITHMS and cfg.algo not in owners:
            raise ConfigError("{} {}: not used by {algo} {} (only by {})", name, value, cfg.algo,
                              ", ".join(owners), field=name)
