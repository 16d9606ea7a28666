"""The run directory: where a run may write, its config.json (with its provenance), and
what resuming it takes.

``config.json`` records every setting and, under ``"provenance"``, what the run was built
from: ``"experiment_config"`` (an :class:`ExperimentConfig`: the task can be rebuilt from the
settings, so ``resume_config`` can continue it) or ``"user_objects"`` (the user's own
dataset, model or partition in Python: the settings cannot rebuild them, so
``resume_config`` refuses it). A config.json without the key (older runs) is
``"experiment_config"``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from fslsage_jax import checkpoint
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.experiment.config import RESUME_MAY_DIFFER, ExperimentConfig, set_by_user
from fslsage_jax.experiment.errors import refusal
from fslsage_jax.simulate import write_json_atomic

EXPERIMENT_CONFIG = "experiment_config"
USER_OBJECTS = "user_objects"
PROVENANCES = (EXPERIMENT_CONFIG, USER_OBJECTS)


# ----------------------------------------------------------------------------- output directory
def check_out(path: str, overwrite: bool, resume: bool) -> None:
    """Refuse an ``out`` that cannot hold a fresh run, without creating anything."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise refusal("out", path, "exists and is not a directory")
        if os.listdir(path) and not (overwrite or resume):
            raise refusal("out", path, "exists and is not empty (pass {overwrite} to reuse it, or {resume} {} "
                          "to continue it)", path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise refusal("out", path, "not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise refusal("out", path, "cannot be created ({} is not a directory)", parent)
    try:                       # os.access says yes to root even where creating fails
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".fslsage-probe-"))
    except OSError as e:
        raise refusal("out", path, "cannot be created in {} ({})", parent, e.strerror) from None


def prepare_out(path: str, overwrite: bool) -> str:
    """Create ``out`` (checked before by :func:`check_out`)."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise refusal("out", path, "exists and is not empty (pass {overwrite} to reuse it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise refusal("out", path, "cannot create ({})", e.strerror) from None
    if not os.access(path, os.W_OK):
        raise refusal("out", path, "not writable")
    return path


# ----------------------------------------------------------------------------- config.json
def write_run_config(out_dir: str, config: dict, provenance: str) -> str:
    """Write ``out_dir/config.json`` (atomically): ``config`` plus ``"provenance"``.

    Args:
      out_dir: the run directory (it exists).
      config: what to record (JSON-serialisable); for ``user_objects`` it must not name a
        built-in dataset or model the run did not use.
      provenance: ``"experiment_config"`` or ``"user_objects"`` (see the module docstring).
    Returns:
      the path written.
    """
    if provenance not in PROVENANCES:
        raise ValueError(f"provenance {provenance!r}: choose from {', '.join(PROVENANCES)}")
    path = os.path.join(out_dir, "config.json")
    write_json_atomic(path, {**config, "provenance": provenance})
    return path


def provenance(config: dict) -> str:
    """What a run's config.json says it was built from (no key: ``experiment_config``)."""
    return config.get("provenance", EXPERIMENT_CONFIG)


# ----------------------------------------------------------------------------- resume
def resume_config(cfg: ExperimentConfig, explicit: dict | None = None) -> ExperimentConfig:
    """The settings of the run in ``cfg.resume`` (its config.json) plus the allowed overrides.

    Args:
      cfg: settings with ``resume`` = the run directory.
      explicit: the settings given explicitly (name -> value; the CLI: its command-line flags).
        None: those of ``cfg`` that differ from the defaults.
    Raises:
      ConfigError: the directory is no run directory, was built from user objects or has no
        checkpoint, or a given setting differs from the run's where results depend on it
        (those in ``RESUME_MAY_DIFFER`` may differ).
    """
    run_dir = cfg.resume
    given = ({k: getattr(cfg, k) for k in set_by_user(cfg)} if explicit is None else dict(explicit))
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise refusal("resume", run_dir, "no such directory")
    if not os.path.isfile(cfg_path):
        raise refusal("resume", run_dir, "not a run directory (no config.json)")
    try:
        with open(cfg_path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise refusal("resume", run_dir, "unreadable config.json ({})", e) from None
    if provenance(stored) != EXPERIMENT_CONFIG:
        raise refusal("resume", run_dir, "its config.json says provenance {}: the run was built from "
                      "objects in Python (its own data or model) that settings cannot rebuild; resume "
                      "it from the code that built it", provenance(stored))
    if given.get("out") is not None and os.path.abspath(given["out"]) != os.path.abspath(run_dir):
        raise refusal("out", given["out"], "cannot be combined with {resume} {} (the run continues in {})",
                      run_dir, run_dir)
    defaults = dataclasses.asdict(ExperimentConfig())
    differ = [(k, v, stored.get(k, defaults.get(k))) for k, v in sorted(given.items())
              if k not in RESUME_MAY_DIFFER and v != stored.get(k, defaults.get(k))]
    if differ:
        listed = ", ".join("{" + k + "} {} (run: {})" for k, _, _ in differ)
        raise refusal("resume", run_dir, "settings differ from the run's config.json: " + listed,
                      *[x for _, v, s in differ for x in (v, s)])
    new = ExperimentConfig(**{**defaults, **{k: v for k, v in stored.items() if k in defaults},
                              **given, "resume": run_dir, "out": run_dir})
    subdirs = [os.path.join(run_dir, a) for a in ALGORITHMS] if new.algo == "all" else [run_dir]
    ckpts = [checkpoint.latest(d) for d in subdirs if os.path.isdir(d)]
    ckpts = [c for c in ckpts if c is not None]
    if not ckpts:
        raise refusal("resume", run_dir, "no checkpoint yet (the run stopped before its first one); start "
                      "it again with {out} {} {overwrite}", run_dir)
    done = max(c.rounds for c in ckpts)
    if new.rounds < done:
        raise refusal("rounds", new.rounds, "the run in {} has already completed {} rounds", run_dir, done)
    return new


def resume_plan(run_dir: str, rounds: int) -> tuple[str, dict | None]:
    """What resuming an ``algo="all"`` run does with one algorithm's sub-directory.

    Returns ``("skip", summary)`` if it finished (diverged, budget spent, or all ``rounds``
    done), ``("resume", None)`` if it has a checkpoint, else ``("fresh", None)``.
    """
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        s = None
    if s and (s["stop_reason"] in ("diverged", "comm_budget")
              or (s["stop_reason"] == "rounds" and s["rounds_run"] >= rounds)):
        return "skip", s
    if checkpoint.latest(run_dir) is not None:
        return "resume", None
    return "fresh", None
