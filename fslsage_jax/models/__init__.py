"""Split models. ``MODELS`` maps a name to ``make(input_shape, num_classes) -> SplitModel``."""
from fslsage_jax.models.cnn import make_cnn

MODELS = {"cnn": make_cnn}

__all__ = ["MODELS", "make_cnn"]
