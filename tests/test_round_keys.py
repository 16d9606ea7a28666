"""Every round of a run draws fresh randomness from the run's seed: a new shuffle and new
dropout masks each round. Observed with lr = 0, where the models never move and a round's
train loss depends only on what the round's key drew:

- FSL-SAGE with Q = 2 uploads only the samples of even local steps, so the train loss (the
  server's mean loss over uploaded samples) is a function of the shuffle;
- SplitFed-MS sees every sample every round, so without dropout every round's loss is the
  same number up to float rounding of the order (measured: within 1e-7; rounds are told apart
  at 1e-5), and with dropout in the server it changes with the masks."""
import json

import flax.linen as nn
import numpy as np

from fslsage_jax.simulate import RunOptions, Task, run_simulation
from fslsage_jax.split import SplitModel
from conftest import ToyAux, ToyClient, make_toy, toy_client_data, toy_config

ROUNDS = 4


class DropoutServer(nn.Module):
    rate: float = 0.5

    @nn.compact
    def __call__(self, z, train=False):
        h = nn.relu(nn.Dense(5)(z))
        if self.rate:
            h = nn.Dropout(self.rate, deterministic=not train)(h)
        return nn.Dense(3)(h)


def train_losses(algo, split, tmp_path, **cfg):
    data = toy_client_data(n=8)          # 8, 7, 6 samples
    task = Task(split, toy_config(lr=0.0, weight_decay=0.0, **cfg), data, data.x[0], data.y[0])
    run_simulation(algo, task, RunOptions(rounds=ROUNDS, seed=3, out_dir=str(tmp_path), progress=False))
    return [json.loads(l)["train_loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_each_round_draws_a_new_shuffle(tmp_path):
    losses = train_losses("fsl_sage", make_toy(), tmp_path, server_update_interval=2)
    assert len(losses) == ROUNDS
    # 4 of 8, 4 of 7, 4 of 6 samples upload: a repeated shuffle repeats the loss exactly
    assert min_gap(losses) > 1e-5 and max(losses) - min(losses) > 1e-3, losses


def test_each_round_draws_new_dropout_masks(tmp_path):
    split = SplitModel("toy-dropout", ToyClient(), DropoutServer(0.5), ToyAux(), (4,), 3)
    losses = train_losses("sl_multi_server", split, tmp_path)
    assert min_gap(losses) > 1e-5 and max(losses) - min(losses) > 1e-3, losses


def min_gap(values) -> float:
    """The smallest difference between two of ``values``."""
    v = np.sort(np.asarray(values, np.float64))
    return float(np.diff(v).min())
