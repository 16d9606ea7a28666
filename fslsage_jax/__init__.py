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
- the ledger :mod:`comm` and the host loop :func:`run_simulation` on a :class:`Task`
  with :class:`RunOptions`.
"""
from fslsage_jax import comm
from fslsage_jax.algorithms import ALGORITHMS, AlgorithmDef, steps
from fslsage_jax.algorithms.buffer import Buffer, buffer_init, buffer_push
from fslsage_jax.algorithms.config import Config, make_optimizer
from fslsage_jax.algorithms.engine import Algorithm, ClientArrays
from fslsage_jax.algorithms.lifting import lift
from fslsage_jax.algorithms.trees import broadcast, weighted_average
from fslsage_jax.models import MODELS, make_cnn
from fslsage_jax.simulate import RunOptions, Task, run_simulation
from fslsage_jax.split import SplitModel, Vars, apply_part, describe, init_split

__version__ = "0.1.0"

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmDef", "Buffer", "ClientArrays", "Config", "MODELS",
           "RunOptions", "SplitModel", "Task", "Vars", "apply_part", "broadcast", "buffer_init", "buffer_push", "comm",
           "describe", "init_split", "lift", "make_cnn", "make_optimizer", "run_simulation",
           "steps", "weighted_average"]
