#!/usr/bin/env python
"""Measure how fast a federated round runs, against two references on the same samples.

For every algorithm x model x number of clients x client-axis strategy x step
loop it times, after a warm-up round, the round of the compiled engine
(median of --rounds rounds), its compile time (first round minus the steady
median), samples per second and memory, and two references:

  loop:  the same algorithm driven by a Python loop over clients that calls a
         jitted single-client step (the client step, and for split algorithms
         the server step, per client): how the original code and most FL
         frameworks run a round;
  limit: one jitted centralised train step of client+server (no federation)
         over the same number of samples in the same batch size.

It prints the ratios loop/ours (speed-up over the loop) and ours/limit
(overhead over centralised training), and writes JSON and a markdown table.

    python experiments/bench.py --quick                     # under a minute on a laptop CPU
    python experiments/bench.py --models cnn:32x32x3 resnet18:32x32x3 --clients 10 100 1000
    python experiments/bench.py --large                     # 1,000 and 10,000 clients, chunked
    python experiments/bench.py --devices 8 --clients 64    # client axis over 8 devices

Data: the library's synthetic images (``make_synthetic``, iid). Memory: see
``memory_now``. Steady rounds of FSL-SAGE skip alignment (it runs every
``align_interval`` rounds, in round 0 here); the loop reference skips it too.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fslsage_jax.algorithms import ALGORITHMS, steps  # noqa: E402
from fslsage_jax.algorithms.config import Config, optimizer_for  # noqa: E402
from fslsage_jax.algorithms.engine import ClientArrays  # noqa: E402
from fslsage_jax.data import make_synthetic, partition, to_client_arrays  # noqa: E402
from fslsage_jax.experiment import synthetic_shape  # noqa: E402
from fslsage_jax.memory import abstract_inputs  # noqa: E402
from fslsage_jax.models import GPT2_TINY, MODELS, make_gpt2  # noqa: E402
from fslsage_jax.models.cnn import CNNClient, CNNServer, LinearAux  # noqa: E402
from fslsage_jax.sharding import client_mesh, shard_data, shard_state, state_sharding  # noqa: E402
from fslsage_jax import checkpoint  # noqa: E402
from fslsage_jax.split import SplitModel, init_split, tree_bytes  # noqa: E402

STRATEGIES = ("vmap", "map", "chunked", "unroll")
# Default shape per model (``NAME:SHAPE`` overrides it): HxWxC, or a token model's sequence length
DEFAULT_SHAPES = {"cnn": "32x32x3", "cnn16": "8x8x1", "resnet18": "32x32x3", "gpt2tiny": "64"}
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- models and data
def bench_models() -> dict:
    """``fslsage_jax.models.MODELS`` plus ``cnn16`` (the cnn with 16 instead of 64 conv
    channels, small enough for 10,000 clients on one device) and ``gpt2tiny`` (the
    ``e2e_gpt2_tiny`` GPT-2 with LoRA; its shape is the sequence length)."""
    def cnn16(shape, k):
        return SplitModel("cnn16", CNNClient(features=16), CNNServer(k), LinearAux(k), tuple(shape), k)

    def gpt2tiny(shape, k):
        return make_gpt2(GPT2_TINY, int(shape[0]))
    return {**MODELS, "cnn16": cnn16, "gpt2tiny": gpt2tiny}


def parse_model(spec: str) -> tuple[str, tuple]:
    """``"cnn:32x32x3"`` -> ``("cnn", (32, 32, 3))``, ``"gpt2tiny:64"`` -> ``("gpt2tiny", (64,))``;
    a bare name takes its default shape. ``ValueError`` on a malformed shape."""
    name, _, shape = spec.partition(":")
    shape = shape or DEFAULT_SHAPES.get(name, "32x32x3")
    return name, (synthetic_shape(shape) if "x" in shape.lower() else (int(shape),))


def synthetic(split, m: int, n: int, seed: int = 0) -> ClientArrays:
    """m clients of n samples of the model's input shape: the library's synthetic images
    (``make_synthetic``, an iid partition); token models get uniform random tokens."""
    if np.issubdtype(np.dtype(split.input_dtype), np.integer):     # GPT-2
        rng = np.random.default_rng(seed)
        x = rng.integers(0, split.num_classes, (m, n, *split.input_shape)).astype(split.input_dtype)
        y = rng.integers(0, split.num_classes, (m, n, *split.label_shape)).astype(np.int32)
        return ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.full((m,), n, jnp.int32))
    ds = make_synthetic(seed, n_train=m * n, n_test=0, shape=split.input_shape, num_classes=split.num_classes)
    c = to_client_arrays(ds.x_train, ds.y_train, partition(ds.y_train, m, "iid", seed=seed))
    return ClientArrays(jnp.asarray(c.x), jnp.asarray(c.y), jnp.asarray(c.counts))


# ----------------------------------------------------------------------------- memory
def memory_now() -> dict:
    """The process's peak memory: the device's ``peak_bytes_in_use`` where the backend reports
    it (GPU/TPU), else the peak resident set size (CPU); and the current RSS."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:   # noqa: BLE001 - backends without memory stats raise or return None
        stats = {}
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = rss_peak
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "rss_bytes": rss,
                "memory_source": "device.memory_stats peak_bytes_in_use (process-wide peak)"}
    return {"peak_memory_bytes": rss_peak, "rss_bytes": rss,
            "memory_source": "process RSS (CPU: no device memory stats)"}


def state_bytes(state, m: int) -> dict:
    """Bytes of the state per client (``state.clients``, divided by m) and shared (the rest)."""
    client = tree_bytes(state.clients)
    shared = tree_bytes(checkpoint.strip_frozen(state)._replace(clients=None)) + tree_bytes(state.frozen)
    return {"state_bytes_per_client": client / m, "state_bytes_shared": shared,
            "state_bytes_total": client + shared}


# ----------------------------------------------------------------------------- the engine
def _block(tree):
    return jax.block_until_ready(tree)


def time_engine(algo_name, split, cfg, data, rounds: int, devices=1) -> dict:
    """Time ``rounds`` steady rounds of the compiled engine after one warm-up round."""
    n_max = data.x.shape[1]
    mesh = client_mesh(devices) if devices != 1 else None
    algo = ALGORITHMS[algo_name](split, cfg, n_max, mesh and state_sharding(mesh))
    mem0 = memory_now()
    state = _block(algo.init(jax.random.key(0)))
    if mesh is not None:
        state, data = shard_state(state, mesh), shard_data(data, mesh)
    sizes = state_bytes(state, cfg.num_clients)
    t0 = time.perf_counter()
    state, _ = algo.run_round(state, data, jax.random.key(1))
    _block(state)
    first = time.perf_counter() - t0
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        state, metrics = algo.run_round(state, data, jax.random.key(2 + r))
        _block(state)
        times.append(time.perf_counter() - t0)
    mem1 = memory_now()
    med = statistics.median(times)
    samples = cfg.local_epochs * int(sum(int(c) for c in data.counts))
    out = {"round_s": med, "round_s_all": times, "first_round_s": first,
           "compile_s": max(first - med, 0.0), "samples_per_round": samples, "samples_per_s": samples / med,
           "train_loss": float(metrics["loss_sum"] / max(metrics["loss_n"], 1.0)), **sizes,
           **mem1, "rss_growth_bytes": mem1["rss_bytes"] - mem0["rss_bytes"]}
    del state
    return out


# ----------------------------------------------------------------------------- reference (a): per-client loop
def time_loop(algo_name, split, cfg, data, rounds: int, max_clients: int) -> dict:
    """Reference (a): the same algorithm definition run as a Python loop over clients that
    calls its jitted single-client steps (``strategy="loop"``: the per-client loop of the
    original code and most FL frameworks; the glue between steps runs eagerly).

    Measured on the first ``min(m, max_clients)`` clients (every client costs the
    same: same shard size and steps) and scaled linearly to m clients.
    """
    m, n = cfg.num_clients, data.x.shape[1]
    k = min(m, max_clients)
    loop_cfg = dataclasses.replace(cfg, num_clients=k, strategy="loop", step_loop="host")
    algo = ALGORITHMS[algo_name](split, loop_cfg, n)
    sub = ClientArrays(data.x[:k], data.y[:k], data.counts[:k])
    state = _block(algo.init(jax.random.key(0)))
    times = []
    for r in range(rounds + 1):          # round 0 (FSL-SAGE: with alignment) is the warm-up
        t0 = time.perf_counter()
        state, _ = algo.run_round(state, sub, jax.random.key(2 + r))
        _block(state)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    return {"loop_round_s": med * m / k, "loop_first_round_s": times[0] * m / k, "loop_clients_measured": k}


# ----------------------------------------------------------------------------- reference (b): centralised limit
def time_limit(split, cfg, data, rounds: int, max_steps: int) -> dict:
    """Reference (b): one jitted centralised client+server train step, looped over the same
    number of samples in the same batch size (measured on ``max_steps`` steps, scaled)."""
    B = cfg.batch_size
    opt = optimizer_for(cfg)
    (cv, fc), (sv, fs), _ = (v.shared() for v in init_split(split, jax.random.key(0)))
    os_ = opt.init((cv.params, sv.params))
    xs = data.x.reshape(-1, B, *data.x.shape[2:])
    ys = data.y.reshape(-1, B, *data.y.shape[2:])
    total = cfg.local_epochs * xs.shape[0]
    todo = min(total, max_steps)
    w = jnp.ones((B,), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(cv, sv, os_, fz, xs, ys, j, rng):
        x = jax.lax.dynamic_index_in_dim(xs, j % xs.shape[0], 0, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(ys, j % ys.shape[0], 0, keepdims=False)
        return steps.full_step(split, opt, cv.with_frozen(fz[0]), sv.with_frozen(fz[1]), os_, x, y, w,
                               rng)[:3]

    key = jax.random.key(4)
    cv, sv, os_ = _block(train_step(cv, sv, os_, (fc, fs), xs, ys, jnp.int32(0), key))     # compile
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for j in range(todo):
            cv, sv, os_ = train_step(cv, sv, os_, (fc, fs), xs, ys, jnp.int32(j), key)
        _block((cv, sv, os_))
        times.append(time.perf_counter() - t0)
    return {"limit_round_s": statistics.median(times) * total / todo, "limit_steps_measured": todo,
            "limit_steps": total}


# ----------------------------------------------------------------------------- the sweep
def estimate_bytes(algo_name, split, cfg, n_max) -> int:
    """State plus client data bytes of a config, from shapes only (nothing allocated)."""
    state, data, _, _ = abstract_inputs(algo_name, split, cfg, n_max, (0,))
    return tree_bytes(state) + tree_bytes(data)


def run_config(args, algo_name, model_name, shape, m, strategy, loop, models) -> dict:
    """Measure one configuration; returns a result row (with ``skipped`` set when not run)."""
    split = models[model_name](shape, NUM_CLASSES)
    n = args.samples_per_client
    cfg = Config(num_clients=m, local_epochs=args.local_epochs, batch_size=args.batch_size,
                 strategy=strategy, chunk_size=args.chunk_size, step_loop=loop,
                 align_buffer_size=args.align_buffer_size,
                 align_batch_size=args.align_batch_size or min(1000, args.align_buffer_size),
                 align_epochs=args.align_epochs)
    row = {"algo": algo_name, "model": model_name, "input_shape": list(shape), "clients": m,
           "samples_per_client": n, "batch_size": args.batch_size, "local_epochs": args.local_epochs,
           "strategy": strategy, "chunk_size": args.chunk_size if strategy == "chunked" else None,
           "step_loop": loop, "devices": args.devices}
    est = estimate_bytes(algo_name, split, cfg, n)
    row["estimated_bytes"] = est
    if est > args.max_gib * 2 ** 30:
        row["skipped"] = f"state+data {est / 2 ** 30:.1f} GiB > --max-gib {args.max_gib}"
        return row
    data = synthetic(split, m, n)
    row.update(time_engine(algo_name, split, cfg, data, args.rounds, args.devices))
    if not args.no_loop:
        row.update(time_loop(algo_name, split, cfg, data, args.rounds, args.loop_clients))
        row["loop_over_ours"] = row["loop_round_s"] / row["round_s"]
    if not args.no_limit:
        row.update(time_limit(split, cfg, data, args.rounds, args.limit_steps))
        row["ours_over_limit"] = row["round_s"] / row["limit_round_s"]
    return row


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    """The result rows as a markdown table."""
    head = ("| model | input | algo | m | strategy | loop | s/round | compile s | samples/s | "
            "loop s/round | limit s/round | loop/ours | ours/limit | state/client KiB | peak MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        strat = r["strategy"] + (f"({r['chunk_size']})" if r.get("chunk_size") else "")
        shape = "x".join(map(str, r["input_shape"]))
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {shape} | {r['algo']} | {r['clients']} | {strat} | "
                         f"{r['step_loop']} | skipped: {r['skipped']} |||||||||")
            continue
        scaled = r.get("loop_round_s") is not None and r["loop_clients_measured"] < r["clients"]
        loop_s_txt = _fmt(r.get("loop_round_s")) + ("*" if scaled else "")
        lines.append(
            f"| {r['model']} | {shape} | {r['algo']} | {r['clients']} | {strat} | {r['step_loop']} | "
            f"{r['round_s']:.3g} | {r['compile_s']:.3g} | {r['samples_per_s']:.4g} | {loop_s_txt} | "
            f"{_fmt(r.get('limit_round_s'))} | {_fmt(r.get('loop_over_ours'), '.2f')} | "
            f"{_fmt(r.get('ours_over_limit'), '.2f')} | {r['state_bytes_per_client'] / 1024:.1f} | "
            f"{r['peak_memory_bytes'] / 2 ** 20:.0f} |")
    return "\n".join(lines)


def environment() -> dict:
    """Device, versions, date: what a table needs to be read."""
    d = jax.devices()[0]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


PRESETS = {
    # about a minute on a 2-core CPU: the smallest meaningful comparison
    "quick": {"algos": ["fsl_sage"], "models": ["cnn:8x8x1"], "clients": [10],
              "strategies": ["vmap"], "step_loops": ["host"], "rounds": 2, "samples_per_client": 32,
              "batch_size": 16, "loop_clients": 10, "limit_steps": 20, "align_buffer_size": 64,
              "align_epochs": 1},
    # seconds (plus compilation): the smallest run of the whole pipeline
    "tiny": {"algos": ["fed_avg"], "models": ["cnn16:8x8x1"], "clients": [4], "strategies": ["vmap"],
             "step_loops": ["host"], "rounds": 1, "samples_per_client": 16, "batch_size": 8,
             "loop_clients": 2, "limit_steps": 4, "align_buffer_size": 16, "align_epochs": 1},
    # large-client simulation on one device
    "large": {"algos": ["fsl_sage", "sl_single_server"], "models": ["cnn16:8x8x1"], "clients": [1000, 10000],
              "strategies": ["chunked"], "chunk_size": 500, "step_loops": ["host"], "rounds": 2,
              "samples_per_client": 32, "batch_size": 32, "loop_clients": 20, "limit_steps": 200,
              "align_buffer_size": 32, "align_epochs": 1},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Times the compiled round against a per-client Python "
        "loop of jitted steps and against centralised training of the same samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS), help="algorithms to time")
    a("--models", nargs="+", default=None,
      help="models as NAME[:HxWxC] from fslsage_jax.models.MODELS plus cnn16 (a narrow cnn) and "
           "gpt2tiny[:LENGTH] (the tiny GPT-2); default: cnn:8x8x1 cnn:32x32x3 resnet18:32x32x3")
    a("--clients", nargs="+", type=int, default=[10, 100, 1000], help="numbers of clients m")
    a("--strategies", nargs="+", default=["vmap", "map", "chunked", "unroll"], choices=STRATEGIES,
      help="client-axis strategies (unroll only up to --unroll-max-clients)")
    a("--chunk-size", type=int, default=8, help="clients per vmapped chunk for the chunked strategy")
    a("--step-loops", nargs="+", default=["host", "scan"], choices=("host", "scan"),
      help="host: one compiled call per local step; scan: a round is one compiled lax.scan")
    a("--batch-size", type=int, default=32, help="local minibatch size B (also the limit's batch)")
    a("--samples-per-client", type=int, default=64, help="shard size n per client (a multiple of B)")
    a("--local-epochs", type=int, default=1, help="local epochs E per round")
    a("--rounds", type=int, default=3, help="timed rounds after the warm-up round (median reported)")
    a("--align-buffer-size", type=int, default=64, help="FSL-SAGE FIFO per client (memory per client)")
    a("--align-batch-size", type=int, default=0,
      help="FSL-SAGE alignment minibatch (0: min(1000, buffer)); keep it small for GPT-2 "
           "(its alignment holds batch x sequence x vocabulary logits twice)")
    a("--align-epochs", type=int, default=1, help="FSL-SAGE alignment passes (round 0 only here)")
    a("--unroll-max-clients", type=int, default=16, help="skip unroll above this many clients")
    a("--loop-clients", type=int, default=10,
      help="time the per-client loop on at most this many clients and scale linearly to m (marked *)")
    a("--limit-steps", type=int, default=200,
      help="time the centralised limit on at most this many steps and scale linearly")
    a("--no-loop", action="store_true", help="skip the per-client loop reference")
    a("--no-limit", action="store_true", help="skip the centralised limit reference")
    a("--max-gib", type=float, default=8.0, help="skip configs whose state+data exceed this many GiB")
    a("--devices", type=int, default=1, help="shard the client axis over this many local devices")
    a("--out", default=os.path.join("runs", "bench"), help="directory for bench.json and bench.md")
    a("--quick", action="store_true", help="preset: under a minute on CPU (fsl_sage, cnn 8x8x1, 10 clients, vmap)")
    a("--tiny", action="store_true", help="preset: a few seconds (for tests)")
    a("--large", action="store_true",
      help="preset: 1,000 and 10,000 clients with 32 samples each, cnn16 8x8x1, chunked, one device")
    return p


def parse(argv=None) -> argparse.Namespace:
    """Parse arguments; a preset overrides the defaults but not flags given explicitly."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("quick", "tiny", "large"):
        if getattr(args, name):
            p.set_defaults(**PRESETS[name])
            args = p.parse_args(argv)
            break
    args.models = args.models or ["cnn:8x8x1", "cnn:32x32x3", "resnet18:32x32x3"]
    if args.samples_per_client % args.batch_size:
        p.error(f"--samples-per-client {args.samples_per_client} must be a multiple of --batch-size "
                f"{args.batch_size}")
    try:
        args.specs = [parse_model(spec) for spec in args.models]
    except ValueError:
        p.error(f"--models {' '.join(args.models)}: expected NAME[:HxWxC] (images) or NAME[:LENGTH] "
                "(token models), e.g. cnn:8x8x1")
    unknown = [spec for spec, (name, _) in zip(args.models, args.specs) if name not in bench_models()]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; known: {sorted(bench_models())}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    models = bench_models()
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(f"# {env['device']} ({env['backend']}, {env['device_count']} device(s)), jax {env['jax']}, "
          f"{env['date']}", flush=True)
    rows = []
    for (name, shape), m, algo_name, strategy, loop in itertools.product(
            args.specs, args.clients, args.algos, args.strategies, args.step_loops):
        if strategy == "unroll" and m > args.unroll_max_clients:
            continue
        rows.append(run_config(args, algo_name, name, shape, m, strategy, loop, models))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"{env['device']} ({env['backend']}), jax {env['jax']}, {env['date']}\n\n"
                f"`{env['command']}`\n\n{table}\n\n* loop time measured on fewer clients and scaled "
                f"linearly.\n")
    print("\n" + table)
    print(f"\nwrote {os.path.join(args.out, 'bench.json')} and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
