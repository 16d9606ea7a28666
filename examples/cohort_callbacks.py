"""A population of 200 clients, a cohort of 20 per round, and a callback that logs
per-round metrics and stops the run early.

Only the cohort's state is on the device in a round; every other client's own
state (optimizer moments, auxiliary model, alignment buffer) waits on the host.

    python examples/cohort_callbacks.py
"""
import flax.linen as nn
import numpy as np
from sklearn.datasets import load_digits

import fslsage_jax as fj


class Client(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))


class Head(nn.Module):              # server and auxiliary model alike: cut layer -> logits
    @nn.compact
    def __call__(self, z):
        return nn.Dense(10)(z)


def main(max_rounds: int = 40, stop_at: float = 0.7) -> list[dict]:
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    order = np.random.default_rng(1).permutation(len(x))
    x_train, y_train = x[order[:1600]], y[order[:1600]]
    x_test, y_test = x[order[1600:]], y[order[1600:]]
    clients = (x_train.reshape(200, 8, 64), y_train.reshape(200, 8))   # 200 clients of 8 samples

    log = []

    def on_round(event: fj.RoundEvent) -> bool:
        m = event.metrics
        log.append({"round": event.round, "accuracy": m["test_accuracy"], "bytes": m["comm_bytes"]})
        print(f"round {event.round:2d}  accuracy {m['test_accuracy']:.4f}  train loss "
              f"{m['train_loss']:.4f}  {m['comm_bytes']:>9,} bytes")
        return m["test_accuracy"] >= stop_at          # True stops the run

    split = fj.SplitModel("tiny", Client(), Head(), Head(), input_shape=(64,), num_classes=10)
    config = fj.Config(num_clients=200, batch_size=8, lr=3e-3, align_interval=5, align_epochs=10,
                       align_batch_size=64, align_buffer_size=64)
    result = fj.train("fsl_sage", split, clients, (x_test, y_test), config, rounds=max_rounds,
                      cohort_size=20, callbacks=[on_round])
    s = result.summary
    print(f"stopped after {s['rounds_run']} rounds ({s['stop_reason']}); "
          f"{s['clients_taken_part']} of 200 clients took part")
    return log


if __name__ == "__main__":
    main()
