"""Split models. ``MODELS`` maps a name to ``make(input_shape, num_classes) -> SplitModel``.

GPT-2 (a language model configured by a :class:`GPT2Config`, not by an image shape and a
class count) is built with :func:`make_gpt2` and is not in ``MODELS``.
"""
from fslsage_jax.models.cnn import make_cnn
from fslsage_jax.models.gpt2 import GPT2_MEDIUM, GPT2_TINY, GPT2Config, make_gpt2
from fslsage_jax.models.resnet import ResNet18, make_resnet18

MODELS = {"cnn": make_cnn, "resnet18": make_resnet18}

__all__ = ["GPT2_MEDIUM", "GPT2_TINY", "MODELS", "GPT2Config", "ResNet18", "make_cnn", "make_gpt2",
           "make_resnet18"]
