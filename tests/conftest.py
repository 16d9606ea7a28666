"""Shared fixtures: a tiny dense split model that compiles in about a second."""
import flax.linen as nn
import jax
import pytest

jax.config.update("jax_enable_x64", False)

from fslsage_jax.split import SplitModel


class ToyClient(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))


class ToyServer(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, z, train=False):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(5)(z)))


class ToyAux(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, z, train=False):
        return nn.Dense(self.num_classes)(z)


def make_toy(num_classes: int = 3) -> SplitModel:
    """Input 4 features -> cut 6 -> 3 classes; auxiliary is linear."""
    return SplitModel("toy", ToyClient(), ToyServer(num_classes), ToyAux(num_classes), (4,),
                      num_classes)


@pytest.fixture
def toy():
    return make_toy()
