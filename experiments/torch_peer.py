#!/usr/bin/env python
"""A PyTorch peer of fslsage_jax's FSL-SAGE (and SplitFed-SS): the same CNN split and steps,
written as the usual per-client PyTorch loop, timed on the same data. A performance reference only.

    pip install -e '.[bench]'        # adds torch (CPU is enough)
    python experiments/torch_peer.py --dataset digits --num-clients 4 --batch-size 32 --rounds 40 --seed 0
    python experiments/torch_peer.py --algo sl_single_server --dataset synthetic \
        --synthetic-shape 8x8x1 --synthetic-samples-per-client 22 --num-clients 256 --rounds 3

Prints one JSON object: per-round times (ordinary and alignment rounds), evaluation time,
whole-process time, final test accuracy and loss.

Written from the behaviour contract (docs/semantics.md: FSL-SAGE, Nair et al., ICML 2025), not
from the authors' code:
- model (``simple_conv``): client conv5x5(64, same) ReLU, max-pool 3x3/2 (pad 1), LRN(4),
  conv5x5(64) ReLU, LRN, max-pool, flatten; server dense 384-192-classes; auxiliary one
  linear layer. Conv weights PyTorch's default U(+-1/sqrt(fan_in)) with zero bias (as
  fslsage_jax), dense weights and biases N(0, 0.05).
- one round: every client in turn runs one local epoch in shuffled minibatches of B (last
  smaller batch included). Client step k: z = client(x); every Q steps (k % Q == 0) it
  uploads (z, y): the server takes one Adam step on CE(server(z), y) and appends (z, y) to
  the client's FIFO alignment buffer (newest ``align_buffer_size`` samples). Every l rounds,
  at k == 0 after that upload, the client's auxiliary model is aligned: targets
  g = grad_z CE(server(z_buf), y_buf) with the current server, then ``align_epochs`` passes
  of Adam steps on sum((grad_z CE(aux(z_b), y_b) - g_b)^2) (second order, create_graph).
  The client's update direction is g_hat = grad_z CE(aux(z), y), pushed through the
  client by ``z.backward(g_hat)``. End of round: FedAvg of the client models (weights
  n_i / n); auxiliary models are never averaged.
- optimizers: Adam lr 1e-3 with L2 weight decay 1e-4 for clients and server (one state
  per client, kept across rounds); alignment Adam lr 1e-3, no decay, one per client.
- evaluation after every round: test loss and accuracy of server(avg_client(x)).

Same data as ``experiments/run.py``: ``fslsage_jax.data.load_dataset(name, seed)`` and the
IID ``partition``. Threads: ``torch.set_num_threads(--threads)`` (default: the machine's
cores). torch is an optional extra (``bench``); the library and tests never import it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_T_START = time.time()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- model
class Client(tnn.Module):
    """conv5x5 ReLU pool LRN conv5x5 ReLU LRN pool flatten (NCHW)."""

    def __init__(self, in_ch: int, features: int = 64):
        super().__init__()
        self.c1 = tnn.Conv2d(in_ch, features, 5, padding=2)
        self.c2 = tnn.Conv2d(features, features, 5, padding=2)
        self.lrn = tnn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0)
        self.pool = tnn.MaxPool2d(3, 2, padding=1)
        for c in (self.c1, self.c2):       # PyTorch's default weight init; zero bias (as ours)
            tnn.init.zeros_(c.bias)

    def forward(self, x):
        x = self.lrn(self.pool(F.relu(self.c1(x))))
        x = self.pool(self.lrn(F.relu(self.c2(x))))
        return x.flatten(1)


def _dense(i: int, o: int) -> tnn.Linear:
    layer = tnn.Linear(i, o)
    tnn.init.normal_(layer.weight, 0.0, 0.05)
    tnn.init.normal_(layer.bias, 0.0, 0.05)
    return layer


class Server(tnn.Module):
    def __init__(self, d: int, classes: int):
        super().__init__()
        self.net = tnn.Sequential(_dense(d, 384), tnn.ReLU(), _dense(384, 192), tnn.ReLU(),
                                  _dense(192, classes))

    def forward(self, z):
        return self.net(z)


class Aux(tnn.Module):
    def __init__(self, d: int, classes: int):
        super().__init__()
        self.fc = _dense(d, classes)

    def forward(self, z):
        return self.fc(z)


# ----------------------------------------------------------------------------- pieces
class Fifo:
    """Per-client FIFO of uploaded (z, y): keeps the newest ``cap`` samples."""

    def __init__(self, cap: int):
        self.cap, self.z, self.y = cap, None, None

    def push(self, z, y):
        self.z = z if self.z is None else torch.cat([self.z, z])[-self.cap:]
        self.y = y if self.y is None else torch.cat([self.y, y])[-self.cap:]


def aux_grad(aux, z, y, create_graph=False):
    """grad_z of the mean auxiliary CE (``z`` must require grad)."""
    return torch.autograd.grad(F.cross_entropy(aux(z), y), z, create_graph=create_graph)[0]


def align(aux, aux_opt, server, buf: Fifo, epochs: int, batch: int, gen: torch.Generator):
    """Fit grad_z CE(aux) to the current server's grad_z CE on the buffer (second order)."""
    z_all, y_all = buf.z, buf.y
    n = z_all.shape[0]
    for p in server.parameters():
        p.requires_grad_(False)
    targets = []
    for i in range(0, n, batch):       # per-sample true gradients: grad_z of the summed CE
        zb = z_all[i:i + batch].clone().requires_grad_(True)
        loss = F.cross_entropy(server(zb), y_all[i:i + batch], reduction="sum")
        targets.append(torch.autograd.grad(loss, zb)[0])
    for p in server.parameters():
        p.requires_grad_(True)
    target = torch.cat(targets)
    first = last = 0.0
    for e in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            zb = z_all[idx].clone().requires_grad_(True)
            g = aux_grad(aux, zb, y_all[idx], create_graph=True)
            t = target[idx] / idx.numel()      # the minibatch-mean scale of g
            loss = ((g - t) ** 2).sum()
            aux_opt.zero_grad(set_to_none=True)
            loss.backward()
            aux_opt.step()
            total += float(loss.detach())
        first = total if e == 0 else first
        last = total
    return first, last


@torch.no_grad()
def evaluate(client, server, x, y):
    logits = server(client(x))
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def fedavg(clients, weights):
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    avg = {k: sum(wi * c.state_dict()[k] for wi, c in zip(w, clients)) for k in clients[0].state_dict()}
    for c in clients:
        c.load_state_dict(avg)


class _Rounds:
    """Per-round wall and CPU times, the end of a round (FedAvg of the client models, then
    the evaluation of client 0 with the server), and the result dict of both peers."""

    def __init__(self):
        self.times, self.cpu, self.eval_times, self.accs, self.losses = [], [], [], [], []
        self.t_train = time.time()

    def start(self):
        self.t0, self.c0 = time.time(), time.process_time()

    def end(self, clients, counts, server, xt, yt):
        fedavg(clients, counts)
        self.times.append(time.time() - self.t0)
        self.cpu.append(time.process_time() - self.c0)
        t1 = time.time()
        loss, acc = evaluate(clients[0], server, xt, yt)
        self.eval_times.append(time.time() - t1)
        self.accs.append(acc)
        self.losses.append(loss)

    def result(self, align_interval: int | None = None) -> dict:
        """Round j aligned when ``j % align_interval == 0`` (None: none did; round 0 is
        still not an ordinary round)."""
        aligned = (lambda j: j % align_interval == 0) if align_interval else (lambda j: j == 0)
        ordinary = [r for j, r in enumerate(self.times) if not aligned(j)]
        ordinary_cpu = [r for j, r in enumerate(self.cpu) if not aligned(j)]
        med = lambda v: statistics.median(v) if v else None
        return {"round_times_s": self.times, "round_cpu_s": self.cpu,
                "median_ordinary_round_cpu_s": med(ordinary_cpu), "median_ordinary_round_s": med(ordinary),
                "align_round_times_s": ([r for j, r in enumerate(self.times) if aligned(j)]
                                        if align_interval else []),
                "eval_time_s": statistics.median(self.eval_times), "first_eval_s": self.eval_times[0],
                "train_time_s": time.time() - self.t_train, "final_accuracy": self.accs[-1],
                "best_accuracy": max(self.accs), "final_test_loss": self.losses[-1], "accuracies": self.accs,
                "threads": torch.get_num_threads(), "torch_version": torch.__version__}


# ----------------------------------------------------------------------------- the loop
def _setup(x_train_parts, y_train_parts, x_test, y_test, num_classes, seed, threads):
    """Threads, seeds, the data as NCHW tensors, m identical client models and the server:
    ``(gen, xs, ys, xt, yt, clients, server, cut_dim)``."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).float()
    xs = [to_t(x) for x in x_train_parts]
    ys = [torch.from_numpy(np.asarray(y)).long() for y in y_train_parts]
    xt, yt = to_t(x_test), torch.from_numpy(np.asarray(y_test)).long()
    in_ch = xs[0].shape[1]
    client0 = Client(in_ch)
    d = client0(xs[0][:1]).shape[1]
    clients = [Client(in_ch) for _ in range(len(xs))]
    for c in clients:
        c.load_state_dict(client0.state_dict())
    return gen, xs, ys, xt, yt, clients, Server(d, num_classes), d


def time_fsl_sage(x_train_parts, y_train_parts, x_test, y_test, rounds: int, batch_size: int,
                  num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 1e-4,
                  server_update_interval: int = 5, align_interval: int = 10,
                  align_epochs: int = 100, align_batch_size: int = 1000,
                  align_buffer_size: int = 1000, align_lr: float = 1e-3, seed: int = 0,
                  threads: int | None = None) -> dict:
    """Train FSL-SAGE with a per-client PyTorch loop and time it.

    Args:
      x_train_parts, y_train_parts: per-client NHWC float images and int labels (numpy).
      x_test, y_test: the test set (NHWC, numpy).
      rounds, batch_size: R and B; the other keywords as in ``fslsage_jax`` (paper defaults).
      seed: torch seed (initial models, shuffles).
      threads: ``torch.set_num_threads`` (None: the machine's cores).
    Returns:
      a dict with ``round_times_s`` (wall), ``round_cpu_s`` (process CPU time),
      ``median_ordinary_round_s``, ``median_ordinary_round_cpu_s``, ``align_round_times_s``,
      ``eval_time_s`` (median), ``first_eval_s``, ``train_time_s``, ``final_accuracy``,
      ``final_test_loss``, ``accuracies``.
    """
    gen, xs, ys, xt, yt, clients, server, d = _setup(x_train_parts, y_train_parts, x_test, y_test, num_classes,
                                                     seed, threads)
    m = len(xs)
    auxes = [Aux(d, num_classes) for _ in range(m)]
    for a in auxes[1:]:
        a.load_state_dict(auxes[0].state_dict())
    adam = lambda params, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd)
    copts = [adam(c.parameters(), weight_decay) for c in clients]
    sopt = adam(server.parameters(), weight_decay)
    aopts = [torch.optim.Adam(a.parameters(), lr=align_lr) for a in auxes]
    bufs = [Fifo(align_buffer_size) for _ in range(m)]
    counts = [len(y) for y in ys]

    log = _Rounds()
    for t in range(rounds):
        log.start()
        aligning = t % align_interval == 0
        for i in range(m):
            client, copt, aux = clients[i], copts[i], auxes[i]
            perm = torch.randperm(counts[i], generator=gen)
            for k, s in enumerate(range(0, counts[i], batch_size)):
                idx = perm[s:s + batch_size]
                x, y = xs[i][idx], ys[i][idx]
                z = client(x)
                zd = z.detach()
                if k % server_update_interval == 0:          # upload: server step + buffer
                    sopt.zero_grad(set_to_none=True)
                    F.cross_entropy(server(zd), y).backward()
                    sopt.step()
                    bufs[i].push(zd, y)
                    if aligning and k == 0:
                        align(aux, aopts[i], server, bufs[i], align_epochs, align_batch_size, gen)
                zg = zd.clone().requires_grad_(True)
                g_hat = aux_grad(aux, zg, y)
                copt.zero_grad(set_to_none=True)
                z.backward(g_hat)
                copt.step()
        log.end(clients, counts, server, xt, yt)
    return log.result(align_interval)


def time_splitfed_ss(x_train_parts, y_train_parts, x_test, y_test, rounds: int, batch_size: int,
                     num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 1e-4,
                     seed: int = 0, threads: int | None = None) -> dict:
    """Train SplitFed-SS (one shared server) with a per-client PyTorch loop and time it.

    Every client in turn runs one local epoch; each step: z = client(x), one Adam step of the
    shared server on CE(server(z), y), the true dL/dz back through the client, a client Adam
    step. End of round: FedAvg of the client models. Same arguments and result keys as
    :func:`time_fsl_sage` (no alignment rounds).
    """
    gen, xs, ys, xt, yt, clients, server, d = _setup(x_train_parts, y_train_parts, x_test, y_test, num_classes,
                                                     seed, threads)
    m = len(xs)
    copts = [torch.optim.Adam(c.parameters(), lr=lr, weight_decay=weight_decay) for c in clients]
    sopt = torch.optim.Adam(server.parameters(), lr=lr, weight_decay=weight_decay)
    counts = [len(y) for y in ys]
    log = _Rounds()
    for _ in range(rounds):
        log.start()
        for i in range(m):
            perm = torch.randperm(counts[i], generator=gen)
            for s in range(0, counts[i], batch_size):
                idx = perm[s:s + batch_size]
                z = clients[i](xs[i][idx])
                zg = z.detach().requires_grad_(True)
                sopt.zero_grad(set_to_none=True)
                F.cross_entropy(server(zg), ys[i][idx]).backward()
                sopt.step()
                copts[i].zero_grad(set_to_none=True)
                z.backward(zg.grad)
                copts[i].step()
        log.end(clients, counts, server, xt, yt)
    return log.result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="fsl_sage", choices=("fsl_sage", "sl_single_server"))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--synthetic-shape", default="32x32x3", help="--dataset synthetic: HxWxC")
    p.add_argument("--synthetic-samples-per-client", type=int, default=0,
                   help="--dataset synthetic: training samples per client (0: 1024 in all)")
    p.add_argument("--num-clients", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--align-interval", type=int, default=10)
    p.add_argument("--align-epochs", type=int, default=100)
    p.add_argument("--align-batch-size", type=int, default=1000)
    p.add_argument("--align-buffer-size", type=int, default=1000)
    a = p.parse_args(argv)
    from fslsage_jax.data import load_dataset, partition
    kw = {}
    if a.dataset == "synthetic":      # as experiments/run.py's --synthetic-* flags
        kw["shape"] = tuple(int(v) for v in a.synthetic_shape.split("x"))
        if a.synthetic_samples_per_client:
            kw["n_train"] = a.synthetic_samples_per_client * a.num_clients
    ds = load_dataset(a.dataset, seed=a.seed, **kw)
    parts = partition(ds.y_train, a.num_clients, "iid", 1.0, ds.num_classes, a.seed)
    data = ([ds.x_train[p] for p in parts], [ds.y_train[p] for p in parts], ds.x_test, ds.y_test,
            a.rounds, a.batch_size)
    if a.algo == "fsl_sage":
        out = time_fsl_sage(*data, num_classes=ds.num_classes, align_interval=a.align_interval,
                            align_epochs=a.align_epochs,
                            align_batch_size=a.align_batch_size,
                            align_buffer_size=a.align_buffer_size, seed=a.seed, threads=a.threads)
    else:
        out = time_splitfed_ss(*data, num_classes=ds.num_classes, seed=a.seed, threads=a.threads)
    out["wall_time_s"] = time.time() - _T_START      # whole process, imports included
    out["process_cpu_s"] = time.process_time()
    out.update(algo=a.algo, dataset=a.dataset, num_clients=a.num_clients, batch_size=a.batch_size,
               rounds=a.rounds, seed=a.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
