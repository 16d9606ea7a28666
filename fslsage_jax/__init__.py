"""fslsage_jax: FSL-SAGE (Nair et al., ICML 2025) and federated split learning
baselines in JAX, with every simulated client a slice of one pytree.

The public API, re-exported here:
- split models: :class:`SplitModel`, :class:`Vars`, :func:`init_split`,
  :func:`apply_part`, :func:`describe`, :func:`make_cnn`;
- pure single-client steps: the :mod:`steps` module (client forward/backward,
  server step, auxiliary gradient estimate, alignment, CSE-FSL and FedAvg steps);
- client-axis helpers: :func:`lift`, :func:`weighted_average`, FIFO
  :func:`buffer_init` / :func:`buffer_push`;
- algorithms: ``ALGORITHMS`` (name -> :class:`AlgorithmDef`; calling one builds the
  algorithm: ``ALGORITHMS[name](split, Config, n_max)``), :class:`Config`;
- your own model and data: :func:`train` (returns a :class:`Result`: final state,
  trained global model, summary), per-round callbacks receiving a :class:`RoundEvent`;
- algorithms built from their pieces: :class:`State`, :class:`ClientState`,
  :class:`Context`, :class:`Parts`, :class:`Hyper` (see docs/architecture.md);
- the ledger :mod:`comm` and the host loop :func:`run` / :func:`run_simulation` on a
  :class:`Task` with :class:`RunOptions`.
"""
from fslsage_jax import comm
from fslsage_jax.algorithms import ALGORITHMS, AlgorithmDef, steps
from fslsage_jax.algorithms.base import ClientState, Context, Parts, Server, State
from fslsage_jax.algorithms.definition import Hyper
from fslsage_jax.algorithms.buffer import Buffer, buffer_init, buffer_push
from fslsage_jax.algorithms.config import Config, make_optimizer
from fslsage_jax.algorithms.engine import Algorithm, ClientArrays
from fslsage_jax.algorithms.lifting import lift
from fslsage_jax.algorithms.trees import broadcast, weighted_average
from fslsage_jax.models import MODELS, make_cnn
from fslsage_jax.simulate import Result, RoundEvent, RunOptions, Task, run, run_simulation
from fslsage_jax.api import client_arrays, train
from fslsage_jax.split import SplitModel, Vars, apply_part, describe, init_split

__version__ = "0.1.0"

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmDef", "Buffer", "ClientArrays", "ClientState", "Config",
           "Context", "Hyper", "MODELS", "Parts", "Result", "RoundEvent", "RunOptions", "Server", "SplitModel",
           "State", "Task", "Vars", "apply_part", "broadcast", "buffer_init", "buffer_push", "client_arrays",
           "comm", "describe", "init_split", "lift", "make_cnn", "make_optimizer", "run", "run_simulation",
           "steps", "train", "weighted_average"]
