"""What an algorithm declares about itself, in one place.

Each algorithm module defines one :class:`AlgorithmDef`; the plain dict
``fslsage_jax.algorithms.ALGORITHMS`` maps its CLI name to it. Nothing outside
``fslsage_jax/algorithms/`` compares against an algorithm's name: the ledger,
sharding, the simulation loop, the CLI, the benchmarks and the plots read these
fields instead. Every algorithm's state has the one shape of
:class:`fslsage_jax.algorithms.base.State`, so nothing here names state fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

from fslsage_jax.algorithms.base import make_algorithm

# Config fields every algorithm reads; an algorithm's ``uses`` lists the others it reads.
COMMON_FIELDS = frozenset({"num_clients", "local_epochs", "batch_size", "lr", "weight_decay",
                           "optimizer", "adam_eps", "warmup_steps", "strategy", "chunk_size",
                           "step_loop", "eval_batch_size", "params"})


class Hyper(NamedTuple):
    """A hyperparameter an algorithm declares itself: its default and a one-line help."""
    default: Any
    help: str = ""


@dataclasses.dataclass(frozen=True)
class AlgorithmDef:
    """Everything the rest of the library needs to know about one algorithm.

    Attributes:
      name: the CLI name (``--algo``).
      label: the display name (tables, figures).
      build: ``build(ctx: base.Context) -> base.Parts``: the algorithm's own pieces
        (one client's initial state, the lockstep step, the aggregation, the global
        model); :func:`fslsage_jax.algorithms.base.make_algorithm` compiles them.
      model_bytes: ``model_bytes(sizes) -> int``: bytes of the model each client sends up
        (and receives down) once per round, from :class:`fslsage_jax.comm.Sizes`.
      uses: the ``Config`` fields it reads beyond :data:`COMMON_FIELDS` (flags that can
        have an effect for it).
      hyperparams: hyperparameters it declares itself (name -> :class:`Hyper`), set
        through ``Config.params``; the CLI derives a flag for each.
      round_metrics: ``round_metrics(acc) -> dict``: the per-round metrics it adds to
        ``metrics.jsonl`` from the round's host accumulators (default: none).
      color: a matplotlib colour for its curves.
    """
    name: str
    label: str
    build: Callable
    model_bytes: Callable[[Any], int]
    uses: frozenset = frozenset()
    hyperparams: Mapping[str, Hyper] = dataclasses.field(default_factory=dict)
    round_metrics: Callable[[dict], dict] = lambda acc: {}
    color: str | None = None

    def defaults(self) -> dict:
        """The declared hyperparameters' defaults."""
        return {k: h.default for k, h in self.hyperparams.items()}

    def __call__(self, split, cfg, n_max: int, state_sharding=None):
        """The algorithm built for one split model and config (an ``engine.Algorithm``);
        ``state_sharding``: see :func:`~fslsage_jax.algorithms.base.make_algorithm`."""
        return make_algorithm(self.name, self.build, split, cfg, n_max, self.defaults(), state_sharding)

    def __hash__(self):
        return hash((self.name, self.build))
