#!/usr/bin/env python
"""Population-scale measurements: cohort rounds of FSL-SAGE out of a large population.

    python experiments/population_bench.py                      # the BENCHMARKS.md tables
    python experiments/population_bench.py --bytes-table        # per-client state (README)
    python experiments/population_bench.py --population 100000 --cohort 100 --rounds 4
    python experiments/population_bench.py --population 20000 --cohort 1000 --store disk --prefill

Each (N, K) setting runs in its own process (so its peak host RSS is its own):
digits-size ``cnn`` (synthetic 8x8x1 images, ``--samples-per-client`` each),
FSL-SAGE aligning every round (``--align-interval 1``) with a FIFO of
``--align-buffer-size`` samples. Reported: seconds per round (mean over the rounds
after the first, which compiles), peak host RSS, peak device memory (on CPU the
device is host memory: the RSS), the population store's bytes (clients that took
part x bytes per client) and what it would hold had every client taken part.

``--store ram|disk|auto`` picks where the population store keeps its rows (disk:
memory-mapped blocks in ``--store-dir``, default a temporary directory, removed at
the end); ``--prefill`` writes every client's row before the first round, so the
store starts as it is once every client has taken part. The time each round spends
gathering the cohort from the store and writing it back is reported apart
(``store_s_per_round``), with the machine's load average before the run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GIB = 2 ** 30


def measure(population: int, cohort: int, rounds: int, samples: int, buffer: int, batch: int,
            align_epochs: int, seed: int = 0, store: str = "ram", store_dir: str | None = None,
            prefill: bool = False, strategy: str = "auto", checkpoint: bool = False) -> dict:
    """One setting in this process; returns its numbers."""
    import jax
    import numpy as np

    from fslsage_jax.algorithms import ALGORITHMS
    from fslsage_jax.algorithms.config import Config
    from fslsage_jax.data import make_synthetic, partition, to_client_arrays
    from fslsage_jax.models import make_cnn
    from fslsage_jax.population import Cohort, bytes_per_client

    t0 = time.time()
    ds = make_synthetic(seed=seed, n_train=population * samples, n_test=256, shape=(8, 8, 1))
    clients = to_client_arrays(ds.x_train, ds.y_train, partition(ds.y_train, population, "iid", 1.0, 10, seed))
    t_data = time.time() - t0
    split = make_cnn((8, 8, 1), 10)
    cfg = Config(num_clients=cohort, batch_size=batch, strategy=strategy, align_interval=1, align_epochs=align_epochs,
                 align_batch_size=buffer, align_buffer_size=buffer)
    defn = ALGORITHMS["fsl_sage"]
    algo = defn(split, cfg, clients.x.shape[1])
    state = jax.jit(algo.init)(jax.random.key(seed))
    load = os.getloadavg()
    pop = Cohort(clients, cohort, seed, store=store, store_dir=store_dir)
    pop.start(state)
    t_fill = time.time()
    if prefill:        # every client's row written, as after all of them took part
        first = pop.store.gather(np.zeros(1, np.int64))
        for lo in range(0, population, cohort):
            ids = np.arange(lo, min(lo + cohort, population))
            pop.store.scatter(ids, jax.tree_util.tree_map(lambda x: np.repeat(x, len(ids), 0), first))
    t_fill = time.time() - t_fill
    times, store_times, acc = [], [], None
    for t in range(rounds):
        t1 = time.time()
        state, data = pop.inputs(state, t)
        jax.block_until_ready(state)
        t2 = time.time()
        state, acc = algo.run_round(state, data, jax.random.key(100 + t))
        jax.block_until_ready(state)
        t3 = time.time()
        pop.write_back(state)
        times.append(time.time() - t1)
        store_times.append(t2 - t1 + time.time() - t3)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_client = bytes_per_client(state)
    summary = pop.summary()
    save_s = load_s = None
    if checkpoint:     # the store's copy in a checkpoint (population.npz), written and read back
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            t1 = time.time()
            pop.save(d)
            save_s = time.time() - t1
            pop.load(d)
            load_s = time.time() - t1 - save_s
    rss_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pop.close()
    return {"population": population, "cohort": cohort, "rounds": rounds, "store": store,
            "strategy": strategy, "prefill": prefill, "prefill_s": t_fill,
            "checkpoint_save_s": save_s, "checkpoint_load_s": load_s, "peak_rss_with_checkpoint_gib": rss_all / GIB, "load_avg_before": list(load),
            "store_s_per_round": float(np.mean(store_times[1:])) if rounds > 1 else None,
            "store_disk_gib": summary["population_store_disk_bytes"] / GIB,
            "samples_per_client": samples, "align_buffer_size": buffer, "backend": dev.platform,
            "first_round_s": times[0], "s_per_round": float(np.mean(times[1:])) if rounds > 1 else None,
            "peak_rss_gib": rss / GIB,
            "peak_device_gib": (stats["peak_bytes_in_use"] / GIB) if stats else rss / GIB,
            "clients_taken_part": pop.store.num_stored, "store_gib": pop.store.nbytes / GIB,
            "bytes_per_client": per_client, "store_if_all_gib": per_client * population / GIB,
            "data_s": t_data, "aligned_clients_last_round": int(acc["aux_down"]),
            "models_last_round": int(acc["models"])}


def bytes_table() -> str:
    """Markdown: bytes each algorithm keeps per client (persistent fields), from shapes."""
    import jax

    from fslsage_jax.algorithms import ALGORITHMS
    from fslsage_jax.algorithms.config import Config
    from fslsage_jax.models import MODELS
    from fslsage_jax.population import bytes_per_client
    from dataclasses import replace

    models = [("cnn, digits 8x8x1", "cnn", (8, 8, 1), 10), ("cnn, 32x32x3", "cnn", (32, 32, 3), 10),
              ("resnet18, 32x32x3", "resnet18", (32, 32, 3), 10)]
    base = Config(num_clients=1, align_buffer_size=1000, align_batch_size=1000)   # the paper's buffer
    head = "| algorithm | " + " | ".join(m[0] for m in models) + " |"
    rows = [head, "|---|" + "---|" * len(models)]
    variants = []
    for name, defn in ALGORITHMS.items():       # variants from the settings each algorithm reads
        if "align_buffer_size" in defn.uses:
            variants.append((f"{name} (buffer 1000)", defn, base))
            variants.append((f"{name} (--align-buffer-size 64)", defn,
                             replace(base, align_buffer_size=64, align_batch_size=64)))
        else:
            variants.append((name, defn, base))
        if "fedavg_server" in defn.uses:
            variants.append((f"{name} (--fedavg-server shared)", defn, replace(base, fedavg_server="shared")))
    for name, defn, cfg in variants:
        cells = []
        for _, model, shape, classes in models:
            split = MODELS[model](shape, classes)
            b = bytes_per_client(jax.eval_shape(defn(split, cfg, 8).init, jax.random.key(0)))
            cells.append(f"{b:,} B ({b / 2 ** 20:.2f} MiB)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _child(args, population: int, cohort: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(population), str(cohort),
           "--rounds", str(args.rounds), "--samples-per-client", str(args.samples_per_client),
           "--align-buffer-size", str(args.align_buffer_size), "--batch-size", str(args.batch_size),
           "--align-epochs", str(args.align_epochs), "--store", args.store,
           "--strategy", args.strategy]
    if args.store_dir:
        cmd += ["--store-dir", args.store_dir]
    if args.prefill:
        cmd.append("--prefill")
    if args.checkpoint:
        cmd.append("--checkpoint")
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{population}/{cohort} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    out = ["| population N | cohort K | store | s/round | of it store s | first round s | peak host RSS GiB | "
           "peak device GiB | clients stored | store GiB (on disk) | store if all N took part GiB | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['population']:,} | {r['cohort']:,} | {r['store']}{' (prefilled)' * r['prefill']} | "
                   f"{r['s_per_round']:.3f} | {r['store_s_per_round']:.3f} | "
                   f"{r['first_round_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['peak_device_gib']:.2f} | "
                   f"{r['clients_taken_part']:,} | {r['store_gib']:.3f} ({r['store_disk_gib']:.3f}) | "
                   f"{r['store_if_all_gib']:.1f} | {r['load_avg_before'][0]:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, nargs="*", default=None,
                   help="population sizes N (default: the tables' 100000 with K 10, 100, 1000, and "
                        "1000, 10000, 100000 with K 100)")
    p.add_argument("--cohort", type=int, nargs="*", default=[100], help="cohort sizes K")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples-per-client", type=int, default=4)
    p.add_argument("--align-buffer-size", type=int, default=64)
    p.add_argument("--align-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--store", choices=("ram", "disk", "auto"), default="ram",
                   help="where the population store keeps its rows")
    p.add_argument("--strategy", default="auto", choices=("auto", "vmap", "map", "chunked", "unroll"),
                   help="how the client axis runs (Config.strategy)")
    p.add_argument("--store-dir", default=None, help="directory of a disk store, emptied and removed (default: a temporary one)")
    p.add_argument("--prefill", action="store_true",
                   help="write every client's row before the first round (a store as after every "
                        "client took part)")
    p.add_argument("--checkpoint", action="store_true",
                   help="after the rounds, time writing the store into a checkpoint and reading it back")
    p.add_argument("--bytes-table", action="store_true", help="print the per-client bytes table and exit")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bytes_table:
        print(bytes_table())
        return 0
    if args.one:
        print(json.dumps(measure(*args.one, args.rounds, args.samples_per_client, args.align_buffer_size,
                                 args.batch_size, args.align_epochs, store=args.store,
                                 store_dir=args.store_dir, prefill=args.prefill,
                                 strategy=args.strategy, checkpoint=args.checkpoint)))
        return 0
    if args.population is None:
        settings = [(100_000, k) for k in (10, 100, 1000)] + [(n, 100) for n in (1_000, 10_000)]
    else:
        settings = [(n, k) for n in args.population for k in args.cohort]
    rows = []
    for n, k in settings:
        rows.append(_child(args, n, k))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (r["population"], r["cohort"]))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
