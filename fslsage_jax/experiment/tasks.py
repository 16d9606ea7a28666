"""The built-in tasks: datasets and models by name, each entry carrying its own loader, input
checks and sizes, and the generic code that loads a task from the settings.

``BUILTIN_DATASETS`` and ``BUILTIN_MODELS`` are plain dicts (no registration by import side
effect). A model takes the datasets of its ``kind`` (``"image"``, ``"text"``); GPT-2 and E2E
(:mod:`fslsage_jax.experiment.language`) are entries like the image ones. Settings are
:class:`~fslsage_jax.experiment.ExperimentConfig` fields; errors are
:class:`~fslsage_jax.experiment.ConfigError` naming them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fslsage_jax import data, models
from fslsage_jax.experiment import language
from fslsage_jax.experiment.errors import ConfigError
from fslsage_jax.experiment.language import GPT2_SIZES
from fslsage_jax.split import describe

if TYPE_CHECKING:
    from fslsage_jax.experiment.config import ExperimentConfig

__all__ = ["BUILTIN_DATASETS", "BUILTIN_MODELS", "GPT2_SIZES", "DatasetEntry", "ModelEntry", "describe_model",
           "load_task", "make_split", "pairing_error", "synthetic_shape"]

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A built-in dataset.

    Attributes:
      kind: what a sample is (``"image"``, ``"text"``); models of the same kind take it.
      load: ``load(cfg, encoder) -> Dataset`` (``encoder``: what the model encodes raw data
        with, e.g. a tokenizer; None for images); raises ConfigError.
      shape: ``shape(cfg) -> (input shape, classes)`` without loading anything.
      sizes: ``sizes(cfg) -> (train, evaluation samples)`` without loading anything.
      reads_data_dir: its loader reads ``data_dir``.
      labelled: it has class labels that a non-iid partition can skew.
      fields: the settings only this dataset reads.
    """
    kind: str
    load: Callable[[ExperimentConfig, Any], Any]
    shape: Callable[[ExperimentConfig], tuple[tuple[int, ...], int]]
    sizes: Callable[[ExperimentConfig], tuple[int, int]]
    reads_data_dir: bool = False
    labelled: bool = True
    fields: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A built-in split model.

    Attributes:
      kind: the kind of dataset it takes (see :class:`DatasetEntry`).
      make: ``make(cfg, input_shape, num_classes) -> SplitModel``; raises ConfigError.
      input_error: ``input_error(input_shape, num_classes)``: why it cannot take such inputs,
        or None; checked before ``make`` (models without one are only checked by building).
      encoder: ``encoder(cfg)``: what datasets are encoded with for it (GPT-2: its tokenizer).
      extras: ``extras(cfg, dataset, split, encoder, log, echo) -> (frozen, on_finish)``:
        frozen weights and the end-of-run hook (see ``simulate.Task``).
      fields: the settings only this model reads (refused when given for another model).
      switches: those of ``fields`` that turn something on (refused when set for another model).
      check_effective: ``check_effective(cfg, explicit)``: its own "cannot have an effect" checks.
    """
    kind: str
    make: Callable[[ExperimentConfig, tuple, int], Any]
    input_error: Callable[[tuple, int], str | None] | None = None
    encoder: Callable[[ExperimentConfig], Any] | None = None
    extras: Callable[..., tuple[Any, Callable | None]] | None = None
    fields: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()
    check_effective: Callable[[ExperimentConfig, set], None] | None = None


# ----------------------------------------------------------------------------- images
def synthetic_shape(text: str) -> tuple[int, ...]:
    """``"8x8x1"`` -> ``(8, 8, 1)``; ConfigError (a ValueError) unless three positive integers."""
    try:
        shape = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError("{synthetic_shape} {}: expected HxWxC, e.g. 8x8x1", text)
    return shape


def _image_dataset(name: str, sizes: tuple[int, int]) -> DatasetEntry:
    """An image dataset of :func:`fslsage_jax.data.load_dataset` (looked up when loading)."""
    return DatasetEntry("image", load=lambda cfg, encoder: _load_images(cfg),
                        shape=lambda cfg: data.dataset_shape(name), sizes=lambda cfg: sizes,
                        reads_data_dir=name in data.READS_DATA_DIR)


def _load_images(cfg: ExperimentConfig, **kwargs):
    try:
        return data.load_dataset(cfg.dataset, seed=cfg.seed, data_dir=cfg.data_dir, **kwargs)
    except (ValueError, FileNotFoundError, OSError) as e:
        where, value = ("data_dir", cfg.data_dir) if cfg.data_dir else ("dataset", cfg.dataset)
        raise ConfigError("{" + where + "} {}: cannot load dataset {} ({}: {})", value, cfg.dataset,
                          type(e).__name__, e) from None


def _load_synthetic(cfg: ExperimentConfig, encoder=None):
    kw = {"shape": synthetic_shape(cfg.synthetic_shape)}
    if cfg.synthetic_samples_per_client:
        kw["n_train"] = cfg.synthetic_samples_per_client * cfg.num_clients
    return _load_images(cfg, **kw)


def _synthetic_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    n_train = cfg.synthetic_samples_per_client * cfg.num_clients or 1024
    return n_train, 256


def _cnn_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3:
        return f"needs images (H, W, C), got inputs of shape {tuple(input_shape)}"
    return None


def _resnet_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3 or min(input_shape[:2]) < 32:
        return (f"needs images of at least 32x32 (its client part downsamples 8x), got inputs of "
                f"shape {tuple(input_shape)}")
    return None


def _image_model(name: str, input_error) -> ModelEntry:
    """A model of :data:`fslsage_jax.models.MODELS` (looked up when building)."""
    def make(cfg: ExperimentConfig, input_shape: tuple, num_classes: int):
        try:
            return models.MODELS[name](tuple(input_shape), num_classes)
        except Exception as e:  # noqa: BLE001 (any failure to build the model on these shapes)
            raise ConfigError("{model} {}: cannot be built for {dataset} {} inputs of shape {} ({}: {})",
                              cfg.model, cfg.dataset, tuple(input_shape), type(e).__name__, e) from None
    return ModelEntry("image", make, input_error)


# ----------------------------------------------------------------------------- the registry
BUILTIN_DATASETS: dict[str, DatasetEntry] = {
    "cifar10": _image_dataset("cifar10", (50000, 10000)),
    "cifar100": _image_dataset("cifar100", (50000, 10000)),
    "digits": _image_dataset("digits", (1437, 360)),
    "synthetic": DatasetEntry("image", load=_load_synthetic,
                              shape=lambda cfg: (synthetic_shape(cfg.synthetic_shape), data.dataset_shape("synthetic")[1]),
                              sizes=_synthetic_sizes,
                              fields=("synthetic_shape", "synthetic_samples_per_client")),
    "e2e": DatasetEntry("text", load=language.load_e2e, shape=language.e2e_shape, sizes=language.e2e_sizes,
                        reads_data_dir=True, labelled=False),
}

BUILTIN_MODELS: dict[str, ModelEntry] = {
    "cnn": _image_model("cnn", _cnn_input_error),
    "resnet18": _image_model("resnet18", _resnet_input_error),
    "gpt2": ModelEntry("text", language.make_split, encoder=language.load_tokenizer, extras=language.extras,
                       fields=language.GPT2_FIELDS, switches=("generate",),
                       check_effective=language.check_effective),
}


def _names_of_kind(registry: dict, kind: str) -> list[str]:
    """The entries of ``registry`` of ``kind``, in registry order."""
    return [n for n, e in registry.items() if e.kind == kind]


def pairing_error(model: str, dataset: str) -> ConfigError | None:
    """The refusal of ``model`` on ``dataset`` when their kinds differ, else None."""
    m, d = BUILTIN_MODELS[model], BUILTIN_DATASETS[dataset]
    if m.kind == d.kind:
        return None
    if m.kind == "image":   # the CLI's wording since GPT-2 was added: it names the image models
        need = f"an image model ({', '.join(_names_of_kind(BUILTIN_MODELS, 'image'))})"
    else:
        need = "{dataset} " + ", ".join(_names_of_kind(BUILTIN_DATASETS, m.kind))
    return ConfigError("{model} {}: cannot be used with {dataset} {} (needs " + need + ")", model, dataset)


# ----------------------------------------------------------------------------- loading
def make_split(cfg: ExperimentConfig, input_shape: tuple, num_classes: int, transform=None,
               input_dtype=None):
    """The split model for the settings; :class:`ConfigError` if it cannot take these inputs."""
    entry = BUILTIN_MODELS[cfg.model]
    why = entry.input_error(tuple(input_shape), num_classes) if entry.input_error else None
    if why:
        raise ConfigError("{model} {}: cannot be used with {dataset} {}: {}", cfg.model, cfg.dataset, why)
    split = entry.make(cfg, input_shape, num_classes)
    if transform is not None:
        split = dataclasses.replace(split, input_fn=transform, input_dtype=input_dtype)
    return split


def describe_model(cfg: ExperimentConfig) -> dict:
    """The split's parameter, state and byte counts from shapes only (no data is loaded)."""
    shape, classes = BUILTIN_DATASETS[cfg.dataset].shape(cfg)
    split = make_split(cfg, shape, classes)
    try:
        return describe(split)
    except Exception as e:  # noqa: BLE001
        raise ConfigError("{model} {}: cannot be built for {dataset} {} ({}: {})", cfg.model, cfg.dataset,
                          type(e).__name__, e) from None


def dataset_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(train, evaluation) samples the run uses (subsets included), without loading data."""
    n_train, n_test = BUILTIN_DATASETS[cfg.dataset].sizes(cfg)
    return min(n_train, cfg.train_subset or n_train), min(n_test, cfg.eval_subset or n_test)


def _subset(ds, cfg: ExperimentConfig):
    n_tr = cfg.train_subset or len(ds.y_train)
    n_te = cfg.eval_subset or len(ds.y_test)
    return ds._replace(x_train=ds.x_train[:n_tr], y_train=ds.y_train[:n_tr],
                       x_test=ds.x_test[:n_te], y_test=ds.y_test[:n_te])


def load_task(cfg: ExperimentConfig, log: Log | None = None, echo: Log | None = None):
    """``(dataset, split model, frozen weights or None, on_finish hook or None)``.

    Args:
      cfg: the settings (validated).
      log: notices (e.g. random initial weights); None: silent.
      echo: what the end-of-run hook reports (e.g. generated samples and BLEU); None: silent.
    Raises:
      ConfigError: missing or unreadable data, tokenizer or weights.
    """
    model = BUILTIN_MODELS[cfg.model]
    encoder = model.encoder(cfg) if model.encoder else None
    ds = _subset(BUILTIN_DATASETS[cfg.dataset].load(cfg, encoder), cfg)
    split = make_split(cfg, ds.x_train.shape[1:], ds.num_classes, getattr(ds, "transform", None),
                       ds.x_train.dtype)
    frozen, on_finish = model.extras(cfg, ds, split, encoder, log, echo) if model.extras else (None, None)
    return ds, split, frozen, on_finish
