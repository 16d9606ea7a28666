"""FSL-SAGE's reported train loss is the server's mean loss over the samples that were
uploaded (local steps with k % Q == 0), not over every local step. Checked on the toy split
with lr = 0 (the server never moves) and one repeated row per client (a batch's loss does not
depend on the shuffle), against numpy forward passes and the upload schedule counted by hand."""
import json

import jax
import numpy as np

from fslsage_jax.simulate import RunOptions, Task, run_simulation
from conftest import make_toy, toy_config

COUNTS, B, Q = (5, 3, 6), 2, 2


def toy_logits_np(cv, sv, x):
    """make_toy's forward by hand: Dense-tanh client; Dense-relu-Dense server."""
    c, s = (jax.tree_util.tree_map(np.asarray, v.params) for v in (cv, sv))
    z = np.tanh(x @ c["Dense_0"]["kernel"] + c["Dense_0"]["bias"])
    # flax names layers in construction order: Dense_0 (the output layer) is built first
    hidden, out = sorted(s.values(), key=lambda d: d["kernel"].shape[0] != z.shape[1])
    h = np.maximum(z @ hidden["kernel"] + hidden["bias"], 0.0)
    return h @ out["kernel"] + out["bias"]


def cross_entropy_np(logits, y):
    a = logits - logits.max(-1, keepdims=True)
    return -(a[np.arange(len(y)), y] - np.log(np.exp(a).sum(-1)))


def uploaded_samples(n: int) -> int:
    """Real samples client with n samples uploads in one epoch: its steps k = 0..ceil(n/B)-1
    carry min(B, n - k B) samples; those with k % Q == 0 upload."""
    return sum(min(B, n - k * B) for k in range(-(-n // B)) if k % Q == 0)


def test_train_loss_is_the_mean_server_loss_over_uploaded_samples(tmp_path):
    m, n_max = len(COUNTS), max(COUNTS)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(m, 4)).astype(np.float32)
    labels = np.array([0, 2, 1], np.int32)
    x = np.zeros((m, n_max, 4), np.float32)
    y = np.zeros((m, n_max), np.int32)
    for i, n in enumerate(COUNTS):
        x[i, :n], y[i, :n] = rows[i], labels[i]
    clients = type("C", (), {"x": x, "y": y, "counts": np.array(COUNTS, np.int32)})()
    final = {}
    task = Task(make_toy(), toy_config(batch_size=B, server_update_interval=Q, lr=0.0, weight_decay=0.0),
                clients, rows, labels, on_finish=lambda algo, state: final.update(
                    model=jax.tree_util.tree_map(np.asarray, algo.global_model(state))) or {})
    run_simulation("fsl_sage", task, RunOptions(rounds=1, out_dir=str(tmp_path), progress=False))
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])

    cv, sv = final["model"]                        # lr = 0: the initial models
    per_client = cross_entropy_np(toy_logits_np(cv, sv, rows), labels)      # [m]
    up = np.array([uploaded_samples(n) for n in COUNTS], np.float64)        # 3, 2, 4
    assert list(up) == [3, 2, 4]
    want = float(np.dot(up, per_client) / up.sum())
    assert abs(rec["train_loss"] - want) < 1e-5 * max(1.0, want), (rec["train_loss"], want)
    # every step (3 + 2 + 3 batches, 14 samples) would average to a different number
    every = float(np.dot(up, per_client) / sum(COUNTS))
    assert abs(want - every) > 0.1 * want
