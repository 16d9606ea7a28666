"""The five algorithms. ``ALGORITHMS`` maps a CLI name to its :class:`AlgorithmDef`
(calling one builds it: ``ALGORITHMS[name](split, config, n_max) -> Algorithm``).

Adding an algorithm: one module that defines an ``AlgorithmDef`` and one line here.
"""
from fslsage_jax.algorithms import cse_fsl, fed_avg, fsl_sage, splitfed
from fslsage_jax.algorithms.definition import AlgorithmDef

ALGORITHMS: dict[str, AlgorithmDef] = {
    "fed_avg": fed_avg.ALGORITHM,
    "sl_multi_server": splitfed.MULTI_SERVER,
    "sl_single_server": splitfed.SINGLE_SERVER,
    "cse_fsl": cse_fsl.ALGORITHM,
    "fsl_sage": fsl_sage.ALGORITHM,
}

__all__ = ["ALGORITHMS", "AlgorithmDef"]
