#!/usr/bin/env python
"""Run federated split learning experiments: FSL-SAGE and its baselines.

    python experiments/run.py --algo fsl_sage          # FSL-SAGE on digits, a minute on a laptop
    python experiments/run.py --algo all               # the five algorithms, one comparison table
    python experiments/run.py --describe               # the model split as JSON

Writes config.json, metrics.jsonl (one line per round) and summary.json into
--out (default runs/<algo>-<dataset>-<timestamp>/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ALGOS = ("fed_avg", "sl_multi_server", "sl_single_server", "cse_fsl", "fsl_sage")
DEFAULT_ROUNDS = 50


def build_parser() -> argparse.ArgumentParser:
    from fslsage_jax.algorithms.common import STEP_LOOPS, STRATEGIES, Config
    from fslsage_jax.data import DATASETS
    from fslsage_jax.models import MODELS
    from fslsage_jax.sharding import parse_devices
    c = Config()
    p = argparse.ArgumentParser(
        description="Federated split learning simulation (FSL-SAGE, Nair et al. ICML 2025, and "
                    "baselines). All clients are one pytree; every round runs as compiled JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--algo", default="fsl_sage", choices=ALGOS + ("all",),
      help="algorithm, or 'all' to run the five on the same partition and seed")
    a("--dataset", default="digits", choices=sorted(DATASETS),
      help="digits: scikit-learn's bundled 8x8 handwritten digits (real data, offline); "
           "synthetic: random images for speed tests")
    a("--model", default="cnn", choices=sorted(MODELS), help="split model")
    a("--num-clients", type=int, default=c.num_clients, help="number of simulated clients m")
    a("--rounds", type=int, default=DEFAULT_ROUNDS, help="maximum number of rounds R")
    a("--local-epochs", type=int, default=c.local_epochs, help="local epochs E per round")
    a("--batch-size", type=int, default=c.batch_size, help="local minibatch size B")
    a("--lr", type=float, default=c.lr, help="Adam learning rate (client, server, CSE-FSL aux)")
    a("--weight-decay", type=float, default=c.weight_decay, help="L2 weight decay (PyTorch Adam style)")
    a("--seed", type=int, default=0, help="seed for data split, partition, models and shuffles")
    a("--server-update-interval", type=int, default=c.server_update_interval,
      help="Q: CSE-FSL/FSL-SAGE clients upload when their local step k %% Q == 0")
    a("--align-interval", type=int, default=c.align_interval,
      help="l: FSL-SAGE aligns the auxiliary models every l rounds")
    a("--align-epochs", type=int, default=c.align_epochs, help="FSL-SAGE alignment passes over the buffer")
    a("--align-batch-size", type=int, default=c.align_batch_size, help="FSL-SAGE alignment minibatch")
    a("--align-buffer-size", type=int, default=c.align_buffer_size,
      help="FSL-SAGE per-client FIFO of uploaded (z, y) used for alignment")
    a("--distribution", default="iid", choices=("iid", "dirichlet"), help="how data is split over clients")
    a("--alpha", type=float, default=1.0, help="Dirichlet concentration (smaller = more heterogeneous)")
    a("--comm-budget-gib", type=float, default=200.0,
      help="stop once cumulative communication reaches this many GiB (2^30 bytes)")
    a("--target-accuracy", type=float, default=0.9,
      help="report the GiB at which test accuracy first reaches this")
    a("--data-dir", default=None, help="directory with dataset files (for datasets read from disk)")
    a("--out", default=None, help="output directory (default runs/<algo>-<dataset>-<timestamp>/)")
    a("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    a("--strategy", default="auto", choices=("auto",) + STRATEGIES,
      help="how the client axis runs: auto (the fastest measured for this backend and input "
           "size: vmap, or unroll for images larger than 16x16 on CPU), vmap (batched), map "
           "(lax.map, one client after another), "
           "chunked (lax.map over vmapped chunks of --chunk-size), unroll (sequential, unrolled "
           "in the compiled program)")
    a("--chunk-size", type=int, default=c.chunk_size, help="clients per chunk for --strategy chunked")
    a("--step-loop", default=c.step_loop, choices=STEP_LOOPS,
      help="scan: a round is one compiled lax.scan over local steps; host: one compiled call "
           "per local step (faster for convolutions on XLA:CPU)")
    a("--devices", type=parse_devices, default=1,
      help="shard the client axis over N local devices (N must divide --num-clients); 0 or auto: all")
    a("--describe", action="store_true",
      help="print the model split as JSON (parameter, state and byte counts, cut shape) and exit")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def validate(args) -> None:
    """Cheap checks before any heavy work: exit 2 with one line naming the flag."""
    for flag in ("num_clients", "rounds", "local_epochs", "batch_size", "server_update_interval",
                 "align_interval", "align_epochs", "align_batch_size", "align_buffer_size",
                 "chunk_size"):
        v = getattr(args, flag)
        if v <= 0:
            fail(f"--{flag.replace('_', '-')} {v}: must be a positive integer")
    for flag in ("lr", "alpha", "comm_budget_gib"):
        v = getattr(args, flag)
        if not v > 0:
            fail(f"--{flag.replace('_', '-')} {v}: must be > 0")
    if args.weight_decay < 0:
        fail(f"--weight-decay {args.weight_decay}: must be >= 0")


def prepare_out(path: str, overwrite: bool) -> str:
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        fail(f"--out {path}: exists and is not empty (pass --overwrite to reuse it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"--out {path}: cannot create ({e.strerror})")
    if not os.access(path, os.W_OK):
        fail(f"--out {path}: not writable")
    return path


def format_table(summaries: list[dict], target: float) -> str:
    head = (f"| algorithm | final acc | best acc | total GiB | GiB to {target:.2f} | rounds | "
            f"s/round |\n|---|---|---|---|---|---|---|")
    rows = []
    for s in summaries:
        g = s["gib_to_target"]
        rt = s["mean_round_time_s"] or s["first_round_time_s"]
        rows.append(f"| {s['algo']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
                    f"{s['total_gib']:.4f} | {'-' if g is None else f'{g:.4f}'} | "
                    f"{s['rounds_run']} | {rt:.3f} |")
    return "\n".join([head] + rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)

    from fslsage_jax.data import load_dataset, partition, to_client_arrays
    from fslsage_jax.models import MODELS
    from fslsage_jax.split import describe

    try:
        ds = load_dataset(args.dataset, seed=args.seed, data_dir=args.data_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(f"--dataset {args.dataset}: {e}")
    split = MODELS[args.model](ds.x_train.shape[1:], ds.num_classes)
    if args.describe:
        print(json.dumps(describe(split), indent=2))
        return 0

    n_train = len(ds.y_train)
    if args.num_clients > n_train:
        fail(f"--num-clients {args.num_clients}: more clients than the {n_train} training samples")
    parts = partition(ds.y_train, args.num_clients, args.distribution, args.alpha,
                      ds.num_classes, args.seed)
    clients = to_client_arrays(ds.x_train, ds.y_train, parts)
    smallest = int(clients.counts.min())
    if args.batch_size > smallest:
        fail(f"--batch-size {args.batch_size}: larger than the smallest client shard "
             f"({smallest} samples); use fewer clients or a smaller batch")

    import jax
    from fslsage_jax.algorithms.common import Config, auto_strategy
    from fslsage_jax.simulate import run_simulation, write_json_atomic

    if args.devices != 1:
        from fslsage_jax.sharding import check_divisible, client_mesh
        try:
            check_divisible(args.num_clients, client_mesh(args.devices))
        except ValueError as e:
            fail(f"--devices {args.devices}: {e}")
    if args.strategy == "auto":
        args.strategy = auto_strategy(jax.default_backend(), tuple(ds.x_train.shape[1:]), args.num_clients)
    cfg = Config(num_clients=args.num_clients, local_epochs=args.local_epochs,
                 batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                 server_update_interval=args.server_update_interval,
                 align_interval=args.align_interval, align_epochs=args.align_epochs,
                 align_batch_size=args.align_batch_size, align_buffer_size=args.align_buffer_size,
                 strategy=args.strategy, chunk_size=args.chunk_size, step_loop=args.step_loop)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = prepare_out(args.out or os.path.join("runs", f"{args.algo}-{args.dataset}-{stamp}"),
                      args.overwrite)
    algos = ALGOS if args.algo == "all" else (args.algo,)
    summaries = []
    for name in algos:
        run_dir = prepare_out(os.path.join(out, name), args.overwrite) if len(algos) > 1 else out
        write_json_atomic(os.path.join(run_dir, "config.json"),
                          {**vars(args), "algo": name, "config": dataclasses.asdict(cfg),
                           "n_train": n_train, "n_test": int(len(ds.y_test)),
                           "num_classes": ds.num_classes, "input_shape": list(ds.x_train.shape[1:]),
                           "client_sample_counts": [int(c) for c in clients.counts],
                           "jax_version": jax.__version__, "backend": jax.default_backend()})
        s = run_simulation(name, split, cfg, clients, ds.x_test, ds.y_test, rounds=args.rounds,
                           seed=args.seed, comm_budget_bytes=int(args.comm_budget_gib * 2 ** 30),
                           out_dir=run_dir, target_accuracy=args.target_accuracy,
                           progress=not args.no_progress,
                           devices=args.devices)
        summaries.append(s)
        print(f"{name}: accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}), "
              f"{s['total_gib']:.4f} GiB, {s['rounds_run']} rounds, stop: {s['stop_reason']}, "
              f"{s['wall_time_s']:.1f} s -> {run_dir}", flush=True)
    table = format_table(summaries, args.target_accuracy)
    print(table)
    if len(algos) > 1:
        with open(os.path.join(out, "comparison.md"), "w") as f:
            f.write(table + "\n")
        write_json_atomic(os.path.join(out, "comparison.json"), summaries)
    return 3 if any(s["stop_reason"] == "diverged" for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
