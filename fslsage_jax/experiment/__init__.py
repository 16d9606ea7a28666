"""The experiment that ``experiments/run.py`` runs, built and run from Python.

    from fslsage_jax.experiment import ExperimentConfig, build, run, validate
    cfg = ExperimentConfig(rounds=3, no_progress=True)        # FSL-SAGE on digits
    validate(cfg)
    summaries = run(build(cfg))          # one summary dict per algorithm

:class:`ExperimentConfig` holds every setting of the CLI (field names are its argparse
``dest`` names; the defaults here are the CLI's). :func:`validate` checks it before any data
is loaded, :func:`build` loads the task (dataset, split model, frozen weights), partitions it
over the clients and builds the algorithms' :class:`~fslsage_jax.algorithms.config.Config`;
:func:`run` trains one algorithm or all of them on the same partition and seed, writing the
run files into ``out`` when it is set. :func:`resume_config` continues a run from its
directory. Every problem with the settings or the inputs raises :class:`ConfigError`, one line
naming the setting (``err.field``; ``err.render(name)`` names settings your own way). Nothing
here prints or handles signals: pass ``log`` / ``echo`` / ``stop_requested`` callables.

Modules: ``config`` (the settings, presets, allowed values), ``validate`` (the checks),
``tasks`` (the built-in datasets and models; ``language``: GPT-2 and E2E), ``rundir`` (output
directory, config.json and its provenance, resume), ``build`` (build, run, memory plan),
``errors`` (:class:`ConfigError`).
"""
from fslsage_jax.experiment.build import (Experiment, build, partition_clients, plan_memory, run,
                                          start_distributed, write_memory_plan)
from fslsage_jax.experiment.config import (RESUME_MAY_DIFFER, TASK_FIELDS, ExperimentConfig, algorithm_config,
                                           choices, preset_config, run_devices)
from fslsage_jax.experiment.errors import ConfigError
from fslsage_jax.experiment.rundir import (EXPERIMENT_CONFIG, PROVENANCES, USER_OBJECTS, check_out, prepare_out,
                                           resume_config, resume_plan, write_run_config)
from fslsage_jax.experiment.tasks import (BUILTIN_DATASETS, BUILTIN_MODELS, GPT2_SIZES, DatasetEntry, ModelEntry,
                                          describe_model, load_task, make_split, synthetic_shape)
from fslsage_jax.experiment.validate import check_effective, validate

__all__ = ["BUILTIN_DATASETS", "BUILTIN_MODELS", "EXPERIMENT_CONFIG", "GPT2_SIZES", "PROVENANCES",
           "RESUME_MAY_DIFFER", "TASK_FIELDS", "USER_OBJECTS", "ConfigError", "DatasetEntry", "Experiment",
           "ExperimentConfig", "ModelEntry", "algorithm_config", "build", "check_effective", "check_out",
           "choices", "describe_model", "load_task", "make_split", "partition_clients", "plan_memory",
           "prepare_out", "preset_config", "resume_config", "resume_plan", "run", "run_devices",
           "start_distributed", "synthetic_shape", "validate", "write_memory_plan", "write_run_config"]
