"""The five algorithms. ``ALGORITHMS`` maps a CLI name to its :class:`AlgorithmDef`
(calling one builds it: ``ALGORITHMS[name](split, config, n_max) -> Algorithm``).

Adding an algorithm: one module that defines an ``AlgorithmDef`` and one line here
(see docs/architecture.md).
"""
from fslsage_jax.algorithms import cse_fsl, fed_avg, fsl_sage, sl_multi_server, sl_single_server
from fslsage_jax.algorithms.definition import AlgorithmDef

ALGORITHMS: dict[str, AlgorithmDef] = {a.name: a for a in (
    fed_avg.ALGORITHM,
    sl_multi_server.ALGORITHM,
    sl_single_server.ALGORITHM,
    cse_fsl.ALGORITHM,
    fsl_sage.ALGORITHM,
)}

# what --algo runs when not given: the paper's algorithm
DEFAULT_ALGORITHM = fsl_sage.NAME

__all__ = ["ALGORITHMS", "AlgorithmDef", "DEFAULT_ALGORITHM"]
