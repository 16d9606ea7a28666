"""The settings of an experiment: :class:`ExperimentConfig`, presets, allowed values.

One field per ``experiments/run.py`` flag (the field names are its argparse ``dest``), with
the CLI's defaults. Each field's ``metadata`` says what the rest of the package needs to know
about it, so no list of names is kept by hand:

- ``"resume"``: ``"may_differ"`` when a resumed run may change it (results do not depend on
  it, or it only extends the run), else ``"must_match"`` (the default; every setting added
  later must match unless it says otherwise);
- ``"task"``: True when it describes how the task (data, model) is built; a run built from
  the user's own objects records these as None.
"""
from __future__ import annotations

import dataclasses

from fslsage_jax.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from fslsage_jax.algorithms.config import (ALIGN_TARGET_SCALES, FEDAVG_SERVERS, OPTIMIZERS, STEP_LOOPS,
                                           STRATEGIES, Config)
from fslsage_jax.client_store import STORES
from fslsage_jax.data import DISTRIBUTIONS
from fslsage_jax.experiment.tasks import BUILTIN_DATASETS, BUILTIN_MODELS, GPT2_SIZES
from fslsage_jax.presets import PRESETS, preset_defaults

_ALG = Config()


def _may_differ(default, task: bool = False):
    return dataclasses.field(default=default, metadata={"resume": "may_differ", "task": task})


def _task(default):
    return dataclasses.field(default=default, metadata={"task": True})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of an experiment: one field per ``experiments/run.py`` flag (its argparse
    ``dest``), with the CLI's defaults. ``--help`` describes each; ``out=None``: write nothing."""
    preset: str | None = _task(None)
    algo: str = DEFAULT_ALGORITHM
    dataset: str = _task("digits")
    model: str = _task("cnn")
    num_clients: int = _ALG.num_clients
    rounds: int = _may_differ(50)
    local_epochs: int = _ALG.local_epochs
    batch_size: int = _ALG.batch_size
    lr: float = _ALG.lr
    weight_decay: float = _ALG.weight_decay
    optimizer: str = _ALG.optimizer
    adam_eps: float = _ALG.adam_eps
    warmup_steps: int = _ALG.warmup_steps
    train_subset: int = _task(0)
    eval_subset: int = _task(0)
    seed: int = 0
    server_update_interval: int = _ALG.server_update_interval
    align_interval: int = _ALG.align_interval
    align_epochs: int = _ALG.align_epochs
    align_batch_size: int = _ALG.align_batch_size
    align_buffer_size: int = _ALG.align_buffer_size
    align_target_scale: str = _ALG.align_target_scale
    align_client_chunk: int = _may_differ(_ALG.align_client_chunk)
    aux_lr: float = _ALG.aux_lr
    aux_weight_decay: float = _ALG.aux_weight_decay
    warm_start: int = _ALG.warm_start
    fedavg_server: str = _ALG.fedavg_server
    algo_params: tuple = ()       # (name, value) of hyperparameters algorithms declare (AlgorithmDef.hyperparams)
    eval_batch_size: int = _may_differ(_ALG.eval_batch_size)
    distribution: str = _task("iid")
    alpha: float = _task(1.0)
    comm_budget_gib: float = _may_differ(200.0)
    target_accuracy: float = _may_differ(0.9)
    data_dir: str | None = _may_differ(None, task=True)
    gpt2_size: str = _task("medium")
    pretrained: str | None = _task(None)
    tokenizer: str | None = _task(None)
    seq_len: int = _task(512)
    e2e_splits: str = _task("train,dev")
    generate: int = _may_differ(0, task=True)
    max_new_tokens: int = _may_differ(64, task=True)
    out: str | None = _may_differ(None)
    overwrite: bool = _may_differ(False)
    resume: str | None = _may_differ(None)
    checkpoint_every: int = _may_differ(10)
    strategy: str = _may_differ("auto")
    chunk_size: int = _may_differ(_ALG.chunk_size)
    step_loop: str = _may_differ(_ALG.step_loop)
    devices: int | str = _may_differ(1)
    describe: bool = _may_differ(False)
    memory_plan: bool = _may_differ(False)
    device_memory_gib: float = _may_differ(0.0)
    compilation_cache: bool = _may_differ(True)
    no_progress: bool = _may_differ(False)
    cohort_size: int | None = None
    cohort_weighted: bool = False
    population_store: str = _may_differ("auto")
    synthetic_shape: str = _task("32x32x3")
    synthetic_samples_per_client: int = _task(0)
    coordinator: str | None = _may_differ(None)
    num_processes: int = _may_differ(1)
    process_id: int = _may_differ(0)
    distributed_timeout: float = _may_differ(60.0)

    @property
    def cohort(self) -> int:
        """Clients per round: ``cohort_size``, or all ``num_clients`` when it is None."""
        return self.num_clients if self.cohort_size is None else self.cohort_size

    @property
    def algos(self) -> tuple[str, ...]:
        """The algorithms this experiment runs, in ``ALGORITHMS`` order."""
        return tuple(ALGORITHMS) if self.algo == "all" else (self.algo,)


_FIELDS = dataclasses.fields(ExperimentConfig)
# settings a resumed run may change (field metadata "resume": "may_differ"); all others must match
RESUME_MAY_DIFFER = frozenset(f.name for f in _FIELDS if f.metadata.get("resume") == "may_differ")
# settings that describe how the task (data, model) is built (field metadata "task")
TASK_FIELDS = frozenset(f.name for f in _FIELDS if f.metadata.get("task"))


def choices() -> dict[str, tuple]:
    """The allowed values of the settings that have a fixed set (the CLI's ``choices``)."""
    return {"preset": tuple(sorted(PRESETS)), "algo": tuple(ALGORITHMS) + ("all",),
            "dataset": tuple(BUILTIN_DATASETS), "model": tuple(BUILTIN_MODELS),
            "optimizer": OPTIMIZERS,
            "distribution": ("iid",) + tuple(d for d in DISTRIBUTIONS if d != "iid"), "gpt2_size": GPT2_SIZES,
            "strategy": ("auto",) + STRATEGIES, "step_loop": STEP_LOOPS,
            "align_target_scale": ALIGN_TARGET_SCALES, "fedavg_server": FEDAVG_SERVERS,
            "population_store": STORES}


def preset_config(name: str, **overrides) -> ExperimentConfig:
    """The settings of preset ``name`` (see :mod:`fslsage_jax.presets`) with ``overrides``."""
    return ExperimentConfig(**{**preset_defaults(name), "preset": name, **overrides})


def set_by_user(cfg: ExperimentConfig) -> set[str]:
    """Library default for "explicit": the settings that differ from the defaults (of the preset)."""
    base = dataclasses.asdict(ExperimentConfig())
    if cfg.preset in PRESETS:
        base.update(PRESETS[cfg.preset])
    return {k for k, v in dataclasses.asdict(cfg).items() if k != "preset" and v != base[k]}


def algorithm_config(cfg: ExperimentConfig) -> Config:
    """The algorithms' :class:`Config` from the settings of the same names (``strategy`` resolved),
    ``params`` from ``algo_params``."""
    return Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if hasattr(cfg, f.name)},
                  params=tuple(cfg.algo_params))


def algorithm_params(params: tuple, algo: str) -> tuple:
    """The ``(name, value)`` pairs of ``params`` that algorithm ``algo`` declares."""
    return tuple((k, v) for k, v in params if k in ALGORITHMS[algo].hyperparams)


def run_devices(cfg: ExperimentConfig):
    """The devices the client axis is sharded over: ``devices``, or every process's devices
    in a multi-process run."""
    return "auto" if cfg.num_processes > 1 and cfg.devices == 1 else cfg.devices
