"""Split models. ``MODELS`` maps a name to ``make(input_shape, num_classes) -> SplitModel``."""
from fslsage_jax.models.cnn import make_cnn
from fslsage_jax.models.resnet import ResNet18, make_resnet18

MODELS = {"cnn": make_cnn, "resnet18": make_resnet18}

__all__ = ["MODELS", "ResNet18", "make_cnn", "make_resnet18"]
