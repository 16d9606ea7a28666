"""The experiment that ``experiments/run.py`` runs, built and run from Python.

    from fslsage_jax.experiment import ExperimentConfig, build, run, validate
    cfg = ExperimentConfig(rounds=3, no_progress=True)        # FSL-SAGE on digits
    validate(cfg)
    summaries = run(build(cfg))          # one summary dict per algorithm

:class:`ExperimentConfig` holds every setting of the CLI (field names are its
argparse ``dest`` names; the defaults here are the CLI's). :func:`validate`
checks it before any data is loaded, :func:`build` loads the task (dataset,
split model, frozen weights), partitions it over the clients and builds the
algorithms' :class:`~fslsage_jax.algorithms.config.Config`; :func:`run` trains
one algorithm or all of them on the same partition and seed, writing the run
files into ``out`` when it is set. :func:`resume_config` continues a run from
its directory. Every problem with the settings or the inputs raises
:class:`ConfigError` with a one-line message naming the flag.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from fslsage_jax.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from fslsage_jax.algorithms.config import (ALIGN_TARGET_SCALES, FEDAVG_SERVERS, OPTIMIZERS, STEP_LOOPS,
                                           STRATEGIES, Config)
from fslsage_jax.algorithms.lifting import auto_strategy
from fslsage_jax.algorithms.definition import COMMON_FIELDS
from fslsage_jax.results import format_table

_ALG = Config()
LM_DATASETS = ("e2e",)
LM_MODELS = ("gpt2",)
GPT2_SIZES = ("tiny", "medium")
# flags that only a language model (--model gpt2) reads
LM_FLAGS = ("gpt2_size", "pretrained", "tokenizer", "seq_len", "e2e_splits", "generate", "max_new_tokens")


class ConfigError(ValueError):
    """A setting or input that cannot be used; the message is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of an experiment: one field per ``experiments/run.py`` flag (its argparse
    ``dest``), with the CLI's defaults. ``--help`` describes each; ``out=None``: write nothing."""
    preset: str | None = None
    algo: str = DEFAULT_ALGORITHM
    dataset: str = "digits"
    model: str = "cnn"
    num_clients: int = _ALG.num_clients
    rounds: int = 50
    local_epochs: int = _ALG.local_epochs
    batch_size: int = _ALG.batch_size
    lr: float = _ALG.lr
    weight_decay: float = _ALG.weight_decay
    optimizer: str = _ALG.optimizer
    adam_eps: float = _ALG.adam_eps
    warmup_steps: int = _ALG.warmup_steps
    train_subset: int = 0
    eval_subset: int = 0
    seed: int = 0
    server_update_interval: int = _ALG.server_update_interval
    align_interval: int = _ALG.align_interval
    align_epochs: int = _ALG.align_epochs
    align_batch_size: int = _ALG.align_batch_size
    align_buffer_size: int = _ALG.align_buffer_size
    align_target_scale: str = _ALG.align_target_scale
    align_client_chunk: int = _ALG.align_client_chunk
    aux_lr: float = _ALG.aux_lr
    aux_weight_decay: float = _ALG.aux_weight_decay
    warm_start: int = _ALG.warm_start
    fedavg_server: str = _ALG.fedavg_server
    eval_batch_size: int = _ALG.eval_batch_size
    distribution: str = "iid"
    alpha: float = 1.0
    comm_budget_gib: float = 200.0
    target_accuracy: float = 0.9
    data_dir: str | None = None
    gpt2_size: str = "medium"
    pretrained: str | None = None
    tokenizer: str | None = None
    seq_len: int = 512
    e2e_splits: str = "train,dev"
    generate: int = 0
    max_new_tokens: int = 64
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None
    checkpoint_every: int = 10
    strategy: str = "auto"
    chunk_size: int = _ALG.chunk_size
    step_loop: str = _ALG.step_loop
    devices: int | str = 1
    describe: bool = False
    memory_plan: bool = False
    device_memory_gib: float = 0.0
    compilation_cache: bool = True
    no_progress: bool = False
    cohort_size: int | None = None
    cohort_weighted: bool = False
    synthetic_shape: str = "32x32x3"
    synthetic_samples_per_client: int = 0
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    distributed_timeout: float = 60.0

    @property
    def cohort(self) -> int:
        """Clients per round: ``cohort_size``, or all ``num_clients`` when it is None."""
        return self.num_clients if self.cohort_size is None else self.cohort_size

    @property
    def algos(self) -> tuple[str, ...]:
        """The algorithms this experiment runs, in ``ALGORITHMS`` order."""
        return tuple(ALGORITHMS) if self.algo == "all" else (self.algo,)


def choices() -> dict[str, tuple]:
    """The allowed values of the settings that have a fixed set (the CLI's ``choices``)."""
    from fslsage_jax.data import DATASETS, DISTRIBUTIONS
    from fslsage_jax.models import MODELS
    from fslsage_jax.presets import PRESETS
    return {"preset": tuple(sorted(PRESETS)), "algo": tuple(ALGORITHMS) + ("all",),
            "dataset": tuple(sorted(DATASETS)) + LM_DATASETS, "model": tuple(sorted(MODELS)) + LM_MODELS,
            "optimizer": OPTIMIZERS,
            "distribution": ("iid",) + tuple(d for d in DISTRIBUTIONS if d != "iid"), "gpt2_size": GPT2_SIZES,
            "strategy": ("auto",) + STRATEGIES, "step_loop": STEP_LOOPS,
            "align_target_scale": ALIGN_TARGET_SCALES, "fedavg_server": FEDAVG_SERVERS}


def flag(dest: str) -> str:
    """The CLI flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def preset_config(name: str, **overrides) -> ExperimentConfig:
    """The settings of preset ``name`` (see :mod:`fslsage_jax.presets`) with ``overrides``."""
    from fslsage_jax.presets import preset_defaults
    return ExperimentConfig(**{**preset_defaults(name), "preset": name, **overrides})


def _set_by_user(cfg: ExperimentConfig) -> set[str]:
    """Library default for "explicit": the settings that differ from the defaults (of the preset)."""
    from fslsage_jax.presets import PRESETS
    base = dataclasses.asdict(ExperimentConfig())
    if cfg.preset in PRESETS:
        base.update(PRESETS[cfg.preset])
    return {k for k, v in dataclasses.asdict(cfg).items() if k != "preset" and v != base[k]}


# ----------------------------------------------------------------------------- validation
POSITIVE_INTS = ("num_clients", "rounds", "local_epochs", "batch_size", "server_update_interval",
                 "align_interval", "align_epochs", "align_batch_size", "align_buffer_size",
                 "chunk_size", "checkpoint_every")


def validate(cfg: ExperimentConfig, explicit=None) -> None:
    """Cheap checks before any data is loaded.

    Args:
      cfg: the settings.
      explicit: the settings given explicitly (names; the CLI: flags on the command line).
        Flags that cannot have an effect are refused only when given explicitly (a value a
        preset set is not). None: those that differ from the defaults (of ``cfg.preset``).
    Raises:
      ConfigError: one line naming the flag, its value and what is allowed.
    """
    for dest, allowed in choices().items():
        v = getattr(cfg, dest)
        if v not in allowed and not (dest == "preset" and v is None):
            raise ConfigError(f"{flag(dest)} {v}: choose from {', '.join(allowed)}")
    for dest in POSITIVE_INTS:
        v = getattr(cfg, dest)
        if v <= 0:
            raise ConfigError(f"{flag(dest)} {v}: must be a positive integer")
    for dest in ("lr", "alpha", "comm_budget_gib"):
        v = getattr(cfg, dest)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{flag(dest)} {v}: must be a finite number > 0")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ConfigError(f"--weight-decay {cfg.weight_decay}: must be a finite number >= 0")
    if not 0.0 <= cfg.target_accuracy <= 1.0:
        raise ConfigError(f"--target-accuracy {cfg.target_accuracy}: must lie in [0, 1]")
    if cfg.data_dir is not None and not os.path.exists(cfg.data_dir):
        raise ConfigError(f"--data-dir {cfg.data_dir}: no such file or directory")
    if not (math.isfinite(cfg.adam_eps) and cfg.adam_eps > 0):
        raise ConfigError(f"--adam-eps {cfg.adam_eps}: must be a finite number > 0")
    for dest in ("aux_lr", "aux_weight_decay", "device_memory_gib"):
        v = getattr(cfg, dest)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{flag(dest)} {v}: must be a finite number >= 0")
    for dest in ("warmup_steps", "train_subset", "eval_subset", "generate", "warm_start",
                 "eval_batch_size", "align_client_chunk"):
        if getattr(cfg, dest) < 0:
            raise ConfigError(f"{flag(dest)} {getattr(cfg, dest)}: must be >= 0")
    for dest in ("seq_len", "max_new_tokens"):
        if getattr(cfg, dest) <= 0:
            raise ConfigError(f"{flag(dest)} {getattr(cfg, dest)}: must be a positive integer")
    lm_model, lm_data = cfg.model in LM_MODELS, cfg.dataset in LM_DATASETS
    if lm_model != lm_data:
        need = "--dataset e2e" if lm_model else "an image model (cnn, resnet18)"
        raise ConfigError(f"--model {cfg.model}: cannot be used with --dataset {cfg.dataset} (needs {need})")
    if lm_data and cfg.distribution != "iid":
        raise ConfigError(f"--distribution {cfg.distribution}: --dataset {cfg.dataset} has no class "
                          f"labels to skew; use iid")
    splits = cfg.e2e_splits.split(",")
    if len(splits) != 2 or not set(splits) <= {"train", "dev", "test"}:
        raise ConfigError(f"--e2e-splits {cfg.e2e_splits}: must be TRAIN,EVAL with each of train, dev, test")
    if cfg.cohort_size is not None and not 1 <= cfg.cohort_size <= cfg.num_clients:
        raise ConfigError(f"--cohort-size {cfg.cohort_size}: must lie in 1..{cfg.num_clients} "
                          f"(the population, --num-clients)")
    try:
        synthetic_shape(cfg.synthetic_shape)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.synthetic_samples_per_client < 0:
        raise ConfigError(f"--synthetic-samples-per-client {cfg.synthetic_samples_per_client}: must be >= 0")
    if cfg.num_processes < 1:
        raise ConfigError(f"--num-processes {cfg.num_processes}: must be a positive integer")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(f"--process-id {cfg.process_id}: must lie in 0..{cfg.num_processes - 1} "
                          f"for --num-processes {cfg.num_processes}")
    if cfg.num_processes > 1 and not cfg.coordinator:
        raise ConfigError(f"--num-processes {cfg.num_processes}: needs --coordinator HOST:PORT")
    if cfg.coordinator:
        from fslsage_jax.sharding import parse_coordinator
        try:
            parse_coordinator(cfg.coordinator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not (math.isfinite(cfg.distributed_timeout) and cfg.distributed_timeout > 0):
        raise ConfigError(f"--distributed-timeout {cfg.distributed_timeout}: must be a finite number > 0")
    check_effective(cfg, _set_by_user(cfg) if explicit is None else set(explicit))
    if cfg.generate and cfg.max_new_tokens >= cfg.seq_len:
        raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens}: must be smaller than --seq-len "
                          f"{cfg.seq_len} (the prompt needs room)")


def check_effective(cfg: ExperimentConfig, explicit: set[str]) -> None:
    """Refuse explicitly given settings that cannot have an effect with the others.

    Raises:
      ConfigError: one line naming the flag and why it would do nothing.
    """
    from fslsage_jax.data import READS_DATA_DIR

    def refuse(dest, why):
        raise ConfigError(f"{flag(dest)} {getattr(cfg, dest)}: {why}")

    if cfg.generate and cfg.model not in LM_MODELS:
        refuse("generate", "only for --model gpt2")
    for dest in LM_FLAGS:
        if dest in explicit and cfg.model not in LM_MODELS:
            refuse(dest, "only for --model gpt2")
    if "alpha" in explicit and cfg.distribution == "iid":
        refuse("alpha", "only for --distribution dirichlet (an iid split has no concentration)")
    if "data_dir" in explicit and cfg.dataset not in READS_DATA_DIR | set(LM_DATASETS):
        refuse("data_dir", f"--dataset {cfg.dataset} reads no files (only "
                           f"{', '.join(sorted(READS_DATA_DIR | set(LM_DATASETS)))} do)")
    for dest in ("synthetic_shape", "synthetic_samples_per_client"):
        if dest in explicit and cfg.dataset != "synthetic":
            refuse(dest, "only for --dataset synthetic")
    if "cohort_weighted" in explicit and cfg.cohort == cfg.num_clients:
        refuse("cohort_weighted", "only with --cohort-size smaller than --num-clients")
    if "chunk_size" in explicit and cfg.strategy != "chunked":
        refuse("chunk_size", f"only for --strategy chunked (not {cfg.strategy})")
    if "max_new_tokens" in explicit and not cfg.generate:
        refuse("max_new_tokens", "only with --generate")
    if "gpt2_size" in explicit and cfg.pretrained and os.path.isdir(cfg.pretrained):
        refuse("gpt2_size", f"the shape comes from --pretrained {cfg.pretrained}'s config.json")
    if cfg.algo in ALGORITHMS:
        algo_only = {f.name for f in dataclasses.fields(Config)} - COMMON_FIELDS
        for dest in sorted(explicit & algo_only):
            if dest not in ALGORITHMS[cfg.algo].uses:
                users = [n for n, a in ALGORITHMS.items() if dest in a.uses]
                refuse(dest, f"not used by --algo {cfg.algo} (only by {', '.join(users)})")


# ----------------------------------------------------------------------------- output directory
def check_out(path: str, overwrite: bool, resume: bool) -> None:
    """Refuse an ``out`` that cannot hold a fresh run, without creating anything."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"--out {path}: exists and is not a directory")
        if os.listdir(path) and not (overwrite or resume):
            raise ConfigError(f"--out {path}: exists and is not empty (pass --overwrite to reuse it, "
                              f"or --resume {path} to continue it)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {path}: cannot be created ({parent} is not a directory)")
    try:                       # os.access says yes to root even where creating fails
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".fslsage-probe-"))
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot be created in {parent} ({e.strerror})") from None


def prepare_out(path: str, overwrite: bool) -> str:
    """Create ``out`` (checked before by :func:`check_out`)."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"--out {path}: exists and is not empty (pass --overwrite to reuse it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot create ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out {path}: not writable")
    return path


# ----------------------------------------------------------------------------- model/data checks
def _cnn_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3:
        return f"needs images (H, W, C), got inputs of shape {tuple(input_shape)}"
    return None


def _resnet_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3 or min(input_shape[:2]) < 32:
        return (f"needs images of at least 32x32 (its client part downsamples 8x), got inputs of "
                f"shape {tuple(input_shape)}")
    return None


# model name -> (input_shape, num_classes) -> why the model cannot take this data, or None.
# Models without an entry are only checked by building them on the data's input shape.
MODEL_INPUT_CHECKS = {"cnn": _cnn_input_error, "resnet18": _resnet_input_error}


def check_model_input(model: str, dataset: str, input_shape: tuple, num_classes: int) -> None:
    """Raise :class:`ConfigError` if ``model`` cannot take ``dataset``'s inputs (MODEL_INPUT_CHECKS)."""
    rule = MODEL_INPUT_CHECKS.get(model)
    why = rule(tuple(input_shape), num_classes) if rule else None
    if why:
        raise ConfigError(f"--model {model}: cannot be used with --dataset {dataset}: {why}")


# ----------------------------------------------------------------------------- models and data
def gpt2_config(cfg: ExperimentConfig):
    """The GPT-2 shape: ``pretrained``'s config.json when it is a local folder, else ``gpt2_size``."""
    from fslsage_jax.models.gpt2 import GPT2_MEDIUM, GPT2_TINY
    if cfg.pretrained and os.path.isdir(cfg.pretrained):
        from fslsage_jax.models.gpt2_weights import read_config
        try:
            return read_config(cfg.pretrained)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--pretrained {cfg.pretrained}: cannot read its config.json ({e})") from None
    return GPT2_TINY if cfg.gpt2_size == "tiny" else GPT2_MEDIUM


def make_split(cfg: ExperimentConfig, input_shape: tuple, num_classes: int, transform=None,
               input_dtype=None):
    """The split model for the settings; :class:`ConfigError` if it cannot take these inputs."""
    from fslsage_jax.models import MODELS
    if cfg.model in LM_MODELS:
        from fslsage_jax.models.gpt2 import make_gpt2
        try:
            return make_gpt2(gpt2_config(cfg), cfg.seq_len)
        except ValueError as e:
            raise ConfigError(f"--seq-len {cfg.seq_len}: {e}") from None
    check_model_input(cfg.model, cfg.dataset, input_shape, num_classes)
    try:
        split = MODELS[cfg.model](tuple(input_shape), num_classes)
    except Exception as e:  # noqa: BLE001 (any failure to build the model on these shapes)
        raise ConfigError(f"--model {cfg.model}: cannot be built for --dataset {cfg.dataset} inputs of "
                          f"shape {tuple(input_shape)} ({type(e).__name__}: {e})") from None
    if transform is not None:
        split = dataclasses.replace(split, input_fn=transform, input_dtype=input_dtype)
    return split


def synthetic_shape(text: str) -> tuple[int, ...]:
    """``"8x8x1"`` -> ``(8, 8, 1)``; ``ValueError`` unless three positive integers."""
    try:
        shape = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--synthetic-shape {text}: expected HxWxC, e.g. 8x8x1")
    return shape


def image_shape(cfg: ExperimentConfig) -> tuple[tuple[int, ...], int]:
    """``(input shape, classes)`` of the dataset without loading it (synthetic: its flags)."""
    from fslsage_jax.data import dataset_shape
    shape, classes = dataset_shape(cfg.dataset)
    if cfg.dataset == "synthetic":
        shape = synthetic_shape(cfg.synthetic_shape)
    return shape, classes


def _dataset_kwargs(cfg: ExperimentConfig) -> dict:
    """Extra arguments of the dataset loader: the synthetic data's shape and size."""
    if cfg.dataset != "synthetic":
        return {}
    kw = {"shape": synthetic_shape(cfg.synthetic_shape)}
    if cfg.synthetic_samples_per_client:
        kw["n_train"] = cfg.synthetic_samples_per_client * cfg.num_clients
    return kw


def describe_model(cfg: ExperimentConfig) -> dict:
    """The split's parameter, state and byte counts from shapes only (no data is loaded)."""
    from fslsage_jax.split import describe
    if cfg.model in LM_MODELS:
        split = make_split(cfg, (cfg.seq_len,), 0)
    else:
        shape, classes = image_shape(cfg)
        split = make_split(cfg, shape, classes)
    try:
        return describe(split)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--model {cfg.model}: cannot be built for --dataset {cfg.dataset} "
                          f"({type(e).__name__}: {e})") from None


# (train, evaluation) samples of each dataset, for the memory plan (no data is loaded)
DATASET_SIZES = {"digits": (1437, 360), "synthetic": (1024, 256), "cifar10": (50000, 10000),
                 "cifar100": (50000, 10000)}
E2E_SPLIT_SIZES = {"train": 42061, "dev": 4672, "test": 4693}


def plan_memory(cfg: ExperimentConfig) -> list[dict]:
    """The memory plan of every algorithm the experiment runs (:func:`fslsage_jax.memory.plan`),
    for the run's true shapes (subsets and partition sizes included), without loading data or
    weights."""
    from fslsage_jax import memory
    if cfg.model in LM_MODELS:
        split = make_split(cfg, (cfg.seq_len,), 0)
        tr, ev = cfg.e2e_splits.split(",")
        n_train, n_test = E2E_SPLIT_SIZES[tr], E2E_SPLIT_SIZES[ev]
    else:
        shape, classes = image_shape(cfg)
        split = make_split(cfg, shape, classes)
        n_train, n_test = DATASET_SIZES[cfg.dataset]
        if cfg.dataset == "synthetic" and cfg.synthetic_samples_per_client:
            n_train = cfg.synthetic_samples_per_client * cfg.num_clients
    n_train, n_test = min(n_train, cfg.train_subset or n_train), min(n_test, cfg.eval_subset or n_test)
    if cfg.distribution == "iid":
        n_max = n_train // cfg.num_clients
    else:   # Dirichlet shards: floor(n/m) each as well (SPEC), the largest bounds the padding
        n_max = -(-n_train // cfg.num_clients)
    algo_cfg = dataclasses.replace(algorithm_config(cfg), num_clients=cfg.cohort)
    return [memory.plan(name, split, algo_cfg, n_max, n_test) for name in cfg.algos]


def write_memory_plan(cfg: ExperimentConfig) -> tuple[str, bool]:
    """``--memory-plan``: :func:`plan_memory`, ``memory_plan.json`` in ``cfg.out``; returns the
    table and whether every plan fits ``device_memory_gib`` (else the device's own memory;
    True when neither is known)."""
    from fslsage_jax import memory
    from fslsage_jax.simulate import write_json_atomic
    limit = int(cfg.device_memory_gib * memory.GIB) if cfg.device_memory_gib else memory.device_memory_bytes()
    plans = plan_memory(cfg)
    prepare_out(cfg.out, True)
    write_json_atomic(os.path.join(cfg.out, "memory_plan.json"),
                      {"limit_bytes": limit, "plans": plans, "config": dataclasses.asdict(cfg)})
    text = memory.table(plans, limit)
    if limit is None:
        text += "\nthe device reports no memory size; pass --device-memory-gib to check a limit"
    return text, limit is None or all(p["peak_bytes"] <= limit for p in plans)


def _subset(ds, cfg: ExperimentConfig):
    n_tr = cfg.train_subset or len(ds.y_train)
    n_te = cfg.eval_subset or len(ds.y_test)
    return ds._replace(x_train=ds.x_train[:n_tr], y_train=ds.y_train[:n_tr],
                       x_test=ds.x_test[:n_te], y_test=ds.y_test[:n_te])


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_task(cfg: ExperimentConfig, log: Callable[[str], None] | None = _stderr):
    """``(dataset, split model, frozen weights or None, on_finish hook or None)``.

    Raises:
      ConfigError: missing or unreadable data, tokenizer or weights.
    """
    if cfg.model in LM_MODELS:
        return load_lm_task(cfg, log)
    from fslsage_jax import data
    try:
        ds = data.load_dataset(cfg.dataset, seed=cfg.seed, data_dir=cfg.data_dir, **_dataset_kwargs(cfg))
    except (ValueError, FileNotFoundError, OSError) as e:
        where = f"--data-dir {cfg.data_dir}" if cfg.data_dir else f"--dataset {cfg.dataset}"
        raise ConfigError(f"{where}: cannot load dataset {cfg.dataset} ({type(e).__name__}: {e})") from None
    ds = _subset(ds, cfg)
    split = make_split(cfg, ds.x_train.shape[1:], ds.num_classes, ds.transform, ds.x_train.dtype)
    return ds, split, None, None


def load_lm_task(cfg: ExperimentConfig, log: Callable[[str], None] | None = _stderr):
    """E2E + GPT-2: tokenizer, token arrays, pretrained (or random) frozen weights and the
    end-of-run generation + BLEU hook (``log`` gets the notice about random weights)."""
    from fslsage_jax.data.e2e import load_e2e
    from fslsage_jax.models.gpt2_weights import load_gpt2_weights, load_tokenizer, random_init_notice
    name = cfg.tokenizer or cfg.pretrained or "gpt2"
    try:
        tok = load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, ...)
        raise ConfigError(f"--tokenizer {name}: cannot load a GPT-2 tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pass a folder with vocab.json "
                          f"and merges.txt, or a hub name when online") from None
    train_split, eval_split = cfg.e2e_splits.split(",")
    try:
        ds = load_e2e(tok, cfg.data_dir, cfg.seq_len, train_split=train_split, eval_split=eval_split)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"--data-dir {cfg.data_dir}: cannot load E2E ({type(e).__name__}: {e})") from None
    ds = _subset(ds, cfg)
    split = make_split(cfg, (cfg.seq_len,), ds.num_classes)
    if ds.num_classes > split.num_classes:
        raise ConfigError(f"--tokenizer {name}: vocabulary of {ds.num_classes} tokens is larger than "
                          f"the model's {split.num_classes}")
    config = gpt2_config(cfg)
    frozen = None
    if cfg.pretrained:
        try:
            w = load_gpt2_weights(cfg.pretrained, config)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--pretrained {cfg.pretrained}: {e}") from None
        frozen = (w.client, w.server, w.aux)
    elif log is not None:
        log(random_init_notice(config))
    on_finish = make_generation_hook(cfg, ds, split, tok) if cfg.generate else None
    return ds, split, frozen, on_finish


def make_generation_hook(cfg: ExperimentConfig, ds, split, tok):
    """``on_finish(algo, state)``: greedy decoding of ``generate`` evaluation MRs, corpus BLEU
    against all their references; prints a few samples, writes generations.json."""
    def on_finish(algo, state):
        from fslsage_jax.data.e2e import encode_prompts
        from fslsage_jax.lm import corpus_bleu, decode_generated, greedy_generate
        from fslsage_jax.simulate import write_json_atomic
        n = min(cfg.generate, len(ds.test_mrs))
        mrs, refs = ds.test_mrs[:n], ds.test_refs[:n]
        width = cfg.seq_len - cfg.max_new_tokens
        if width < 1:
            return {"bleu": None, "generate_error": "--max-new-tokens leaves no room for a prompt"}
        prompts, lens = encode_prompts(tok, mrs, width)
        cv, sv = algo.global_model(state)
        tokens = greedy_generate(split, cv, sv, prompts, lens, cfg.max_new_tokens, ds.eos_id)
        hyps = decode_generated(tok, tokens, ds.eos_id)
        bleu = corpus_bleu(hyps, refs)
        for mr, h in list(zip(mrs, hyps))[:3]:
            print(f"  MR: {mr}\n  -> {h}", flush=True)
        print(f"BLEU on {n} evaluation meaning representations: {bleu:.2f}", flush=True)
        if cfg.out:
            run_dir = os.path.join(cfg.out, algo.name) if cfg.algo == "all" else cfg.out
            write_json_atomic(os.path.join(run_dir, "generations.json"),
                              [{"mr": m, "hypothesis": h, "references": r}
                               for m, h, r in zip(mrs, hyps, refs)])
        return {"bleu": bleu, "generated": n}
    return on_finish


# ----------------------------------------------------------------------------- the experiment
@dataclasses.dataclass(frozen=True)
class Experiment:
    """A built experiment: the settings (``strategy`` resolved), the task, the client partition
    and the algorithms' config, ready for :func:`run`."""
    config: ExperimentConfig
    dataset: Any
    split: Any
    clients: Any
    algo_config: Config
    frozen: Any = None
    on_finish: Callable | None = None

    def run_config(self) -> dict:
        """What ``config.json`` records: every setting, the algorithms' config, data facts."""
        import jax
        ds = self.dataset
        return {**dataclasses.asdict(self.config), "config": dataclasses.asdict(self.algo_config),
                "n_train": len(ds.y_train), "n_test": len(ds.y_test), "num_classes": ds.num_classes,
                "input_shape": list(ds.x_train.shape[1:]),
                "client_sample_counts": [int(c) for c in self.clients.counts],
                "jax_version": jax.__version__, "backend": jax.default_backend()}


def partition_clients(cfg: ExperimentConfig, ds):
    """The training set split over ``num_clients`` clients as padded arrays + counts."""
    from fslsage_jax.data import partition, to_client_arrays
    n_train = len(ds.y_train)
    if cfg.num_clients > n_train:
        raise ConfigError(f"--num-clients {cfg.num_clients}: more clients than the {n_train} "
                          f"training samples")
    try:
        parts = partition(ds.y_train, cfg.num_clients, cfg.distribution, cfg.alpha, ds.num_classes, cfg.seed)
        return to_client_arrays(ds.x_train, ds.y_train, parts)
    except ValueError as e:
        raise ConfigError(f"--num-clients {cfg.num_clients} --distribution {cfg.distribution} "
                          f"--alpha {cfg.alpha}: {e}") from None


def algorithm_config(cfg: ExperimentConfig) -> Config:
    """The algorithms' :class:`Config` from the settings of the same names (``strategy`` resolved)."""
    return Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if hasattr(cfg, f.name)})


def build(cfg: ExperimentConfig, log: Callable[[str], None] | None = _stderr) -> Experiment:
    """Load the task, partition it, resolve ``strategy="auto"`` and build the algorithms' config.

    Raises:
      ConfigError: data, weights or partition that cannot be used with these settings.
    """
    import jax
    ds, split, frozen, on_finish = load_task(cfg, log)
    clients = partition_clients(cfg, ds)
    if run_devices(cfg) != 1:
        from fslsage_jax.sharding import check_divisible, client_mesh
        try:
            check_divisible(cfg.cohort, client_mesh(run_devices(cfg)))
        except ValueError as e:
            raise ConfigError(f"--devices {cfg.devices}: {e}") from None
    if cfg.strategy == "auto":
        cfg = dataclasses.replace(cfg, strategy=auto_strategy(
            jax.default_backend(), tuple(ds.x_train.shape[1:]), cfg.cohort))
    return Experiment(cfg, ds, split, clients, algorithm_config(cfg), frozen, on_finish)


def _simulate(exp: Experiment, name: str, run_dir: str | None, resume: bool, stop_requested, log) -> dict:
    """One algorithm's run: the one call into the host loop."""
    from fslsage_jax.simulate import run_simulation
    cfg = exp.config
    from fslsage_jax.simulate import RunOptions, Task
    task = Task(exp.split, exp.algo_config, exp.clients, exp.dataset.x_test, exp.dataset.y_test,
                exp.frozen, exp.on_finish)
    return run_simulation(name, task, RunOptions(
        rounds=cfg.rounds, seed=cfg.seed, comm_budget_bytes=int(cfg.comm_budget_gib * 2 ** 30),
        out_dir=run_dir, target_accuracy=cfg.target_accuracy, progress=not cfg.no_progress,
        checkpoint_every=cfg.checkpoint_every, resume=resume, stop_requested=stop_requested, log=log,
        devices=run_devices(cfg), cohort_size=cfg.cohort_size, cohort_weighted=cfg.cohort_weighted))


def run_devices(cfg: ExperimentConfig):
    """The devices the client axis is sharded over: ``devices``, or every process's devices
    in a multi-process run."""
    return "auto" if cfg.num_processes > 1 and cfg.devices == 1 else cfg.devices


def start_distributed(cfg: ExperimentConfig) -> None:
    """Join the multi-process run of ``coordinator`` (nothing for one process); call it
    before any other JAX work.

    Raises:
      ConfigError: the coordinator did not answer within ``distributed_timeout`` seconds.
    """
    if cfg.num_processes == 1 and not cfg.coordinator:
        return
    from fslsage_jax.sharding import init_distributed
    try:
        init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.distributed_timeout)
    except (ValueError, TimeoutError) as e:
        raise ConfigError(str(e)) from None


class StopFlag:
    """Set by SIGINT / SIGTERM: pass it as ``run(..., stop_requested=StopFlag().install())`` and
    the run stops after the current round with a checkpoint; a second signal kills the process
    at once. ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this round with a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}



def run(exp: Experiment, *, stop_requested: Callable[[], bool] | None = None,
        log: Callable[[str], None] | None = None, echo: Callable[[str], None] | None = None,
        on_summary: Callable[[dict, str | None], None] | None = None) -> list[dict]:
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
    from fslsage_jax.simulate import write_json_atomic
    import jax
    cfg, say = exp.config, echo or (lambda msg: None)
    algos, resuming = cfg.algos, bool(cfg.resume)
    writer = jax.process_index() == 0          # a multi-process run: process 0 writes
    out = (prepare_out(cfg.out, cfg.overwrite or resuming) if writer else cfg.out) if cfg.out else None
    run_config = exp.run_config()
    if out and writer and len(algos) > 1:
        write_json_atomic(os.path.join(out, "config.json"), run_config)
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
            write_json_atomic(os.path.join(run_dir, "config.json"), {**run_config, "algo": name})
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


# ----------------------------------------------------------------------------- resume
# Settings that may differ from a run's config.json on resume: results do not depend on
# them (strategy, step loop and chunk size agree within 1e-5) or they only extend the run.
# Every other setting, including settings added later, must match.
RESUME_MAY_DIFFER = frozenset({"resume", "out", "overwrite", "rounds", "comm_budget_gib",
                               "target_accuracy", "strategy", "step_loop", "chunk_size",
                               "no_progress", "checkpoint_every", "data_dir", "describe",
                               "devices", "generate", "max_new_tokens", "memory_plan",
                               "device_memory_gib", "compilation_cache", "eval_batch_size",
                               "align_client_chunk", "coordinator", "num_processes", "process_id",
                               "distributed_timeout"})


def resume_config(cfg: ExperimentConfig, explicit: dict | None = None) -> ExperimentConfig:
    """The settings of the run in ``cfg.resume`` (its config.json) plus the allowed overrides.

    Args:
      cfg: settings with ``resume`` = the run directory.
      explicit: the settings given explicitly (name -> value; the CLI: its command-line flags).
        None: those of ``cfg`` that differ from the defaults.
    Raises:
      ConfigError: the directory is no run directory or has no checkpoint, or a given setting
        differs from the run's where results depend on it.
    """
    from fslsage_jax import checkpoint

    run_dir = cfg.resume
    given = ({k: getattr(cfg, k) for k in _set_by_user(cfg)} if explicit is None else dict(explicit))
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--resume {run_dir}: no such directory")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    try:
        with open(cfg_path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {run_dir}: unreadable config.json ({e})") from None
    if given.get("out") is not None and os.path.abspath(given["out"]) != os.path.abspath(run_dir):
        raise ConfigError(f"--out {given['out']}: cannot be combined with --resume {run_dir} (the run "
                          f"continues in {run_dir})")
    defaults = dataclasses.asdict(ExperimentConfig())
    differ = [f"{flag(k)} {v} (run: {stored.get(k, defaults.get(k))})" for k, v in sorted(given.items())
              if k not in RESUME_MAY_DIFFER and v != stored.get(k, defaults.get(k))]
    if differ:
        raise ConfigError(f"--resume {run_dir}: settings differ from the run's config.json: "
                          f"{', '.join(differ)}")
    new = ExperimentConfig(**{**defaults, **{k: v for k, v in stored.items() if k in defaults},
                              **given, "resume": run_dir, "out": run_dir})
    subdirs = [os.path.join(run_dir, a) for a in ALGORITHMS] if new.algo == "all" else [run_dir]
    ckpts = [checkpoint.latest(d) for d in subdirs if os.path.isdir(d)]
    ckpts = [c for c in ckpts if c is not None]
    if not ckpts:
        raise ConfigError(f"--resume {run_dir}: no checkpoint yet (the run stopped before its first "
                          f"one); start it again with --out {run_dir} --overwrite")
    done = max(c.rounds for c in ckpts)
    if new.rounds < done:
        raise ConfigError(f"--rounds {new.rounds}: the run in {run_dir} has already completed {done} rounds")
    return new


def resume_plan(run_dir: str, rounds: int) -> tuple[str, dict | None]:
    """What resuming an ``algo="all"`` run does with one algorithm's sub-directory.

    Returns ``("skip", summary)`` if it finished (diverged, budget spent, or all ``rounds``
    done), ``("resume", None)`` if it has a checkpoint, else ``("fresh", None)``.
    """
    from fslsage_jax import checkpoint

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
