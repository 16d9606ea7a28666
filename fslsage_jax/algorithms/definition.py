"""What an algorithm declares about itself, in one place.

Each algorithm module defines one :class:`AlgorithmDef`; the plain dict
``fslsage_jax.algorithms.ALGORITHMS`` maps its CLI name to it. Nothing outside
``fslsage_jax/algorithms/`` compares against an algorithm's name: the ledger,
sharding, the simulation loop, the CLI, the benchmarks and the plots read these
fields instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

# Config fields every algorithm reads; an algorithm's ``uses`` lists the others it reads.
COMMON_FIELDS = frozenset({"num_clients", "local_epochs", "batch_size", "lr", "weight_decay",
                           "optimizer", "adam_eps", "warmup_steps", "strategy", "chunk_size",
                           "step_loop", "eval_batch_size"})


@dataclasses.dataclass(frozen=True)
class AlgorithmDef:
    """Everything the rest of the library needs to know about one algorithm.

    Attributes:
      name: the CLI name (``--algo``).
      label: the display name (tables, figures).
      make: ``make(split, cfg, n_max) -> Algorithm`` (the compiled round and its state).
      client_fields: state fields that carry a leading client axis (sharded over devices),
        or ``client_fields(cfg) -> tuple`` when they depend on the configuration; read
        them with :meth:`fields`.
      persistent_fields: the client-axis fields that each client keeps across rounds
        (its optimizer state, its own auxiliary model, its alignment buffer), or
        ``persistent_fields(cfg) -> tuple``; read them with :meth:`persistent`. The other
        client-axis fields are global: the round's aggregation makes them identical for
        every client. With cohort sampling (:mod:`fslsage_jax.population`) persistent
        fields live in a per-client host store. None: not declared (cohort sampling is
        refused).
      model_bytes: ``model_bytes(sizes) -> int``: bytes of the model each client sends up
        (and receives down) once per round, from :class:`fslsage_jax.comm.Sizes`.
      uses: the ``Config`` fields it reads beyond :data:`COMMON_FIELDS` (flags that can
        have an effect for it).
      round_metrics: ``round_metrics(acc) -> dict``: the per-round metrics it adds to
        ``metrics.jsonl`` from the round's host accumulators (default: none).
      color: a matplotlib colour for its curves.
    """
    name: str
    label: str
    make: Callable
    client_fields: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    model_bytes: Callable[[Any], int]
    uses: frozenset = frozenset()
    persistent_fields: tuple[str, ...] | Callable[[Any], tuple[str, ...]] | None = None
    round_metrics: Callable[[dict], dict] = lambda acc: {}
    color: str | None = None

    def fields(self, cfg) -> tuple[str, ...]:
        """The state fields with a client axis under ``cfg``."""
        return self.client_fields(cfg) if callable(self.client_fields) else self.client_fields

    def persistent(self, cfg) -> tuple[str, ...] | None:
        """The client-axis fields each client keeps across rounds under ``cfg`` (None: not declared)."""
        p = self.persistent_fields
        return p(cfg) if callable(p) else p

    def __call__(self, split, cfg, n_max: int):
        """``make(split, cfg, n_max)``: the algorithm built for one split model and config."""
        return self.make(split, cfg, n_max)
