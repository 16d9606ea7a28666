"""The communication ledger against docs/semantics.md's table, with every number worked out by hand.

Toy split model (tests/conftest.py): client Dense(4->6) = 30 floats = 120 B;
server Dense(6->5) + Dense(5->3) = 53 floats = 212 B; auxiliary Dense(6->3) =
21 floats = 84 B; cut activation 6 floats = 24 B per sample; label int32 = 4 B.
Two clients with 5 and 4 samples, batch 2: client 0 has minibatches of 2, 2, 1
(an uneven last batch), client 1 of 2, 2.
"""
import types

import numpy as np
import pytest

from fslsage_jax.algorithms.config import Config
from fslsage_jax.comm import GIB, Ledger, round_bytes, sizes_of
from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.simulate import RunOptions, Task, run_simulation


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(2, 5)).astype(np.int32)
    x[1, 4], y[1, 4] = 0, 0                                  # padding row of client 1
    return types.SimpleNamespace(x=x, y=y, counts=np.array([5, 4], np.int32))


def _run(toy, algo, rounds=2, **kw):
    cfg = Config(num_clients=2, batch_size=2, server_update_interval=2, align_interval=2,
                 align_epochs=2, align_batch_size=4, align_buffer_size=6, **kw)
    tx = np.zeros((3, 4), np.float32)
    s = run_simulation(algo, Task(toy, cfg, _data(), tx, np.zeros(3, np.int32)),
                       RunOptions(rounds=rounds, progress=False, out_dir=None))
    return s


def test_sizes_of_toy(toy):
    s = sizes_of(toy)
    assert (s.client, s.server, s.aux, s.full, s.z_per_sample, s.label_per_sample) == \
        (120, 212, 84, 332, 24, 4)


# Per round, by hand:
#  SplitFed: every sample's z goes up and its dL/dz comes down: 9 * 24 = 216 B each way;
#            models: 2 clients * 120 B up and down; labels 9 * 4.
#  FedAvg:   models only: 2 * (120 + 212) = 664 B each way.
#  CSE-FSL:  Q = 2: client 0 uploads at k = 0 (2 samples) and k = 2 (1 sample), client 1 at
#            k = 0 (2): 5 * 24 = 120 B; models 2 * (120 + 84) = 408 B each way; labels 5 * 4.
#  FSL-SAGE: uploads as CSE-FSL; models 2 * 120 each way; l = 2: round 0 sends both
#            aligned auxiliary models down (2 * 84), round 1 sends none.
PER_ROUND = {
    "sl_multi_server": [dict(smashed_up=216, grad_down=216, model_up=240, model_down=240,
                             aux_down=0, labels_up=36)] * 2,
    "sl_single_server": [dict(smashed_up=216, grad_down=216, model_up=240, model_down=240,
                              aux_down=0, labels_up=36)] * 2,
    "fed_avg": [dict(smashed_up=0, grad_down=0, model_up=664, model_down=664, aux_down=0,
                     labels_up=0)] * 2,
    "cse_fsl": [dict(smashed_up=120, grad_down=0, model_up=408, model_down=408, aux_down=0,
                     labels_up=20)] * 2,
    "fsl_sage": [dict(smashed_up=120, grad_down=0, model_up=240, model_down=240, aux_down=168,
                      labels_up=20),
                 dict(smashed_up=120, grad_down=0, model_up=240, model_down=240, aux_down=0,
                      labels_up=20)],
}


@pytest.mark.parametrize("algo", sorted(PER_ROUND))
def test_ledger_matches_hand_computed_bytes(toy, algo):
    s = _run(toy, algo)
    want = {k: sum(r[k] for r in PER_ROUND[algo]) for k in PER_ROUND[algo][0]}
    assert s["comm"] == want
    assert s["total_bytes"] == sum(v for k, v in want.items() if k != "labels_up")
    assert s["total_gib"] == s["total_bytes"] / GIB


def test_two_local_epochs_use_each_clients_own_iteration_index(toy):
    # E = 2: client 0's k runs 0..5 (3 minibatches per epoch): uploads at k = 0 (2 samples),
    # k = 2 (1), k = 4 (epoch 1, minibatch 1: 2) -> 5; client 1's k runs 0..3: uploads at
    # k = 0 (2) and k = 2 (epoch 1, minibatch 0: 2) -> 4. 9 samples * 24 B in one round.
    s = _run(toy, "cse_fsl", rounds=1, local_epochs=2)
    assert s["comm"]["smashed_up"] == 9 * 24 and s["comm"]["labels_up"] == 9 * 4


def test_budget_stops_as_soon_as_reached(toy):
    cfg = Config(num_clients=2, batch_size=2)
    # SplitFed-MS costs 912 B per round: a budget of 1000 B stops after round 2 (1824 B).
    s = run_simulation("sl_multi_server", Task(toy, cfg, _data(), np.zeros((3, 4), np.float32),
                                               np.zeros(3, np.int32)),
                       RunOptions(rounds=10, comm_budget_bytes=1000, progress=False))
    assert s["rounds_run"] == 2 and s["stop_reason"] == "comm_budget" and s["total_bytes"] == 1824


def test_round_bytes_and_ledger_arithmetic():
    from fslsage_jax.comm import Sizes
    sizes = Sizes(client=1000, server=5000, aux=300, z_per_sample=16384, label_per_sample=4)
    r = round_bytes(ALGORITHMS["fsl_sage"].model_bytes(sizes), sizes,
                    {"z_up": 2560, "g_down": 0, "aux_down": 10, "models": 10, "aux_models": 0})
    assert r == dict(smashed_up=2560 * 16384, grad_down=0, model_up=10_000, model_down=10_000,
                     aux_down=3000, labels_up=10240)
    led = Ledger.empty().add(r).add(r)
    assert led.total == 2 * (2560 * 16384 + 20_000 + 3000)
    assert led.counts["labels_up"] == 20480
