"""Your own flax split model and numpy arrays, trained with FSL-SAGE.

Four clients hold uneven shards of scikit-learn's 8x8 digits; the model is a
small MLP cut after its first layer. ``fslsage_jax.train`` returns the trained
global model, which we evaluate ourselves with plain flax calls.

    python examples/own_model.py
"""
import flax.linen as nn
import numpy as np
from sklearn.datasets import load_digits

import fslsage_jax as fj


class Client(nn.Module):            # the client's part: input -> cut layer (a plain module: no train=)
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))


class Server(nn.Module):            # the server's part: cut layer -> logits
    @nn.compact
    def __call__(self, z):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(z)))


class Aux(nn.Module):               # the client's small auxiliary model of the server
    @nn.compact
    def __call__(self, z):
        return nn.Dense(10)(z)


def main(rounds: int = 15) -> float:
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), y.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    cuts = [0, 500, 850, 1200, 1500]             # four clients of 500, 350, 350, 300 samples
    clients = [(x_train[a:b], y_train[a:b]) for a, b in zip(cuts, cuts[1:])]

    split = fj.SplitModel("my_mlp", Client(), Server(), Aux(), input_shape=(8, 8, 1), num_classes=10)
    config = fj.Config(num_clients=4, batch_size=32, align_interval=5, align_epochs=20,
                       align_batch_size=250, align_buffer_size=250)
    result = fj.train("fsl_sage", split, clients, (x_test, y_test), config, rounds=rounds)

    # the trained global model, evaluated by hand: client part, then server part
    z, _ = fj.apply_part(split.client, result.client, x_test, train=False)
    logits, _ = fj.apply_part(split.server, result.server, z, train=False)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
    s = result.summary
    print(f"test accuracy {accuracy:.4f} (the library's own evaluation: {s['final_accuracy']:.4f}); "
          f"{s['total_bytes']:,} bytes sent in {s['rounds_run']} rounds")
    return accuracy


if __name__ == "__main__":
    main()
