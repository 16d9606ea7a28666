"""The five algorithms. ``ALGORITHMS`` maps a CLI name to ``make(split, config, n_max)``."""
from fslsage_jax.algorithms import cse_fsl, fed_avg, fsl_sage, splitfed

ALGORITHMS = {
    "fed_avg": fed_avg.make,
    "sl_multi_server": splitfed.make_multi_server,
    "sl_single_server": splitfed.make_single_server,
    "cse_fsl": cse_fsl.make,
    "fsl_sage": fsl_sage.make,
}

__all__ = ["ALGORITHMS"]
