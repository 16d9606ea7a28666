#!/usr/bin/env python
"""Ours against the PyTorch per-client loop (experiments/torch_peer.py), back to back.

    pip install -e '.[bench]'        # torch, for the peer
    python experiments/peer_bench.py --repeats 2 --out runs/peer

Runs, alternately and ``--repeats`` times each, the CLI's FSL-SAGE run of the
issue's configuration (digits, 4 IID clients, batch 32, 40 rounds, seed 0) and
the PyTorch peer on the same data and partition, each as its own process
(start-up, imports, compilation and data loading included). From each it
reads the whole-process wall and CPU time, the median ordinary round (no
alignment), the alignment rounds and the median evaluation time, and prints
one markdown table with the ratios PyTorch / ours (> 1: we are faster). Our
first repeat starts with whatever compilation cache exists; pass
``--cold`` to give our runs a fresh cache directory each time.

Scaling mode (``--scaling``): for every K in ``--clients`` (default 4,16,64,256,1024) and
every algorithm in ``--algos`` (default fsl_sage,sl_single_server), ours then the peer,
each ``--repeats`` times, on digits-sized clients: the digits data while every client
gets at least ``--min-digits-samples`` of its 1,437 training images (K <= 64 by default),
else a synthetic 8x8x1 population of ``--samples-per-client`` images per client (22, as
digits at K = 64). It runs ``--rounds`` rounds (default 4) with alignment every
``--align-interval`` rounds (default 2), so round 0 is alignment plus compilation, round
2 a compiled alignment round, rounds 1 and 3 ordinary rounds. Printed per K and
algorithm: the median ordinary round, the alignment round, round 0 and our compile
time (round 0 minus a compiled round of the same kind), the whole process, the ratios
PyTorch / ours and the 1-minute load average before and after::

    python experiments/peer_bench.py --scaling --clients 4,16,64 --repeats 1 --out runs/peer-scaling
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_ours(args, out_dir: str, cache_dir: str | None) -> dict:
    """The CLI run as a subprocess; times from its metrics.jsonl and the process clock."""
    cmd = [sys.executable, os.path.join(HERE, "run.py"), "--algo", "fsl_sage", "--dataset", "digits",
           "--num-clients", str(args.num_clients), "--batch-size", str(args.batch_size),
           "--rounds", str(args.rounds), "--seed", str(args.seed), "--out", out_dir, "--overwrite",
           "--no-progress"]
    env = dict(os.environ, **({"FSLSAGE_JAX_CACHE_DIR": cache_dir} if cache_dir else {}))
    cpu0, t0 = _child_cpu(), time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall, cpu = time.time() - t0, _child_cpu() - cpu0
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    interval = 10
    ordinary = [r["round_time_s"] for r in recs if r["round"] % interval]
    return {"wall_time_s": wall, "process_cpu_s": cpu, "round0_s": recs[0]["round_time_s"],
            "median_ordinary_round_s": statistics.median(ordinary),
            "align_round_times_s": [r["round_time_s"] for r in recs if r["round"] % interval == 0][1:],
            "eval_time_s": statistics.median(r["eval_time_s"] for r in recs[1:]),
            "final_accuracy": recs[-1]["test_accuracy"]}


def run_peer(args) -> dict:
    """experiments/torch_peer.py as a subprocess (its JSON line)."""
    cmd = [sys.executable, os.path.join(HERE, "torch_peer.py"), "--dataset", "digits",
           "--num-clients", str(args.num_clients), "--batch-size", str(args.batch_size),
           "--rounds", str(args.rounds), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cpu0, t0 = _child_cpu(), time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_time_s=time.time() - t0, process_cpu_s=_child_cpu() - cpu0,
               align_round_times_s=res["align_round_times_s"][1:])
    return res


def table(ours: list[dict], peer: list[dict]) -> str:
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    rows = [("whole process, wall s", "wall_time_s"), ("whole process, CPU s", "process_cpu_s"),
            ("median ordinary round, s", "median_ordinary_round_s"), ("evaluation, s", "eval_time_s")]
    lines = ["| | ours | PyTorch loop | PyTorch / ours |", "|---|---|---|---|"]
    for name, k in rows:
        a, b = med(ours, k), med(peer, k)
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    al = lambda rows: statistics.median(t for r in rows for t in r["align_round_times_s"] or [float("nan")])
    lines.append(f"| alignment round, s | {al(ours):.3f} | {al(peer):.3f} | {al(peer) / al(ours):.2f}x |")
    lines.append(f"| final accuracy | {med(ours, 'final_accuracy'):.4f} | {med(peer, 'final_accuracy'):.4f} | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scaling mode
DIGITS_TRAIN = 1437


def _scaling_data(args, k: int) -> tuple[list[str], str, int]:
    """``(dataset flags, label, samples per client)`` for K clients."""
    if DIGITS_TRAIN // k >= args.min_digits_samples:
        return ["--dataset", "digits"], "digits", DIGITS_TRAIN // k
    n = args.samples_per_client
    return (["--dataset", "synthetic", "--synthetic-shape", "8x8x1",
             "--synthetic-samples-per-client", str(n)], f"synthetic 8x8x1 x{n}", n)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _align_flags(args, algo: str) -> list[str]:
    """``--align-interval`` for FSL-SAGE (the CLI refuses it for the other algorithms)."""
    return ["--align-interval", str(args.align_interval)] if algo == "fsl_sage" else []


def _kind_times(rounds: list[float], algo: str, interval: int) -> dict:
    """Ordinary / alignment / round-0 / compile times from per-round wall times."""
    aligns = [t for r, t in enumerate(rounds) if algo == "fsl_sage" and r % interval == 0]
    ordinary = [t for r, t in enumerate(rounds)
                if r > 0 and not (algo == "fsl_sage" and r % interval == 0)]
    ordinary_med = statistics.median(ordinary) if ordinary else float("nan")
    align_med = statistics.median(aligns[1:]) if aligns[1:] else float("nan")
    same_kind = align_med if algo == "fsl_sage" else ordinary_med
    return {"ordinary_round_s": ordinary_med, "align_round_s": align_med, "round0_s": rounds[0],
            "compile_s": rounds[0] - same_kind}


def scaling_ours(args, algo: str, k: int, out_dir: str) -> dict:
    data, _, _ = _scaling_data(args, k)
    cmd = [sys.executable, os.path.join(HERE, "run.py"), "--algo", algo, *data,
           "--num-clients", str(k), "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
           *_align_flags(args, algo), "--seed", str(args.seed), "--out", out_dir, "--overwrite",
           "--no-progress"]
    env = dict(os.environ, FSLSAGE_JAX_CACHE_DIR=tempfile.mkdtemp(prefix="fslsage-cache-"))
    load0, cpu0, t0 = _load(), _child_cpu(), time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    res = {"wall_time_s": time.time() - t0, "process_cpu_s": _child_cpu() - cpu0,
           "load_before": load0, "load_after": _load()}
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    res.update(_kind_times([r["round_time_s"] for r in recs], algo, args.align_interval))
    return res


def scaling_peer(args, algo: str, k: int) -> dict:
    data, _, _ = _scaling_data(args, k)
    cmd = [sys.executable, os.path.join(HERE, "torch_peer.py"), "--algo", algo, *data,
           "--num-clients", str(k), "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
           *_align_flags(args, algo), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load0, cpu0, t0 = _load(), _child_cpu(), time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peer = json.loads(out.strip().splitlines()[-1])
    res = {"wall_time_s": time.time() - t0, "process_cpu_s": _child_cpu() - cpu0,
           "load_before": load0, "load_after": _load()}
    res.update(_kind_times(peer["round_times_s"], algo, args.align_interval))
    return res


def scaling_table(rows: list[dict]) -> str:
    """One markdown row per (K, algorithm): medians over the repeats."""
    f = lambda v: "-" if v != v else f"{v:.3f}"           # NaN: no such round
    ratio = lambda a, b: "-" if a != a or b != b or a <= 0 else f"{b / a:.2f}x"
    lines = ["| K | algorithm | data | ordinary round ours / PyTorch | ratio | alignment round "
             "ours / PyTorch | ratio | round 0 ours / PyTorch | our compile | whole process "
             "ours / PyTorch | ratio | ours us per client-sample | load before-after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = lambda side, key: statistics.median(x[key] for x in r[side])
        o, p = (lambda key: med("ours", key)), (lambda key: med("peer", key))
        loads = [x[k] for side in ("ours", "peer") for x in r[side] for k in ("load_before", "load_after")]
        per_sample = o("ordinary_round_s") / (r["k"] * r["samples_per_client"]) * 1e6
        lines.append(
            f"| {r['k']} | {r['algo']} | {r['data']} | {f(o('ordinary_round_s'))} / {f(p('ordinary_round_s'))} "
            f"| {ratio(o('ordinary_round_s'), p('ordinary_round_s'))} | {f(o('align_round_s'))} / "
            f"{f(p('align_round_s'))} | {ratio(o('align_round_s'), p('align_round_s'))} | "
            f"{f(o('round0_s'))} / {f(p('round0_s'))} | {f(o('compile_s'))} | {f(o('wall_time_s'))} / "
            f"{f(p('wall_time_s'))} | {ratio(o('wall_time_s'), p('wall_time_s'))} | {per_sample:.1f} | "
            f"{min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def scaling(args) -> int:
    rows = []
    for k in args.clients:
        for algo in args.algos:
            _, label, n = _scaling_data(args, k)
            row = {"k": k, "algo": algo, "data": label, "samples_per_client": n, "ours": [], "peer": []}
            for i in range(args.repeats):
                row["ours"].append(scaling_ours(args, algo, k, os.path.join(args.out, f"{algo}-{k}-{i}")))
                if not args.no_peer:
                    row["peer"].append(scaling_peer(args, algo, k))
                print(f"K={k} {algo} repeat {i}: ours {row['ours'][-1]['wall_time_s']:.1f} s"
                      + (f", PyTorch {row['peer'][-1]['wall_time_s']:.1f} s" if row["peer"] else ""),
                      file=sys.stderr, flush=True)
            if not row["peer"]:      # ours only: the table shows NaN for the peer
                row["peer"] = [dict.fromkeys(row["ours"][0], float("nan"))]
            rows.append(row)
            with open(os.path.join(args.out, "scaling.json"), "w") as fh:
                json.dump({"rows": rows, "args": vars(args)}, fh, indent=1)
    md = scaling_table(rows)
    print(md)
    with open(os.path.join(args.out, "scaling.md"), "w") as fh:
        fh.write(md + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-clients", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--cold", action="store_true", help="a fresh compilation cache for each of our runs")
    p.add_argument("--out", default=os.path.join("runs", "peer"), help="where to write peer.json, peer.md")
    g = p.add_argument_group("scaling mode")
    g.add_argument("--scaling", action="store_true", help="K clients x algorithms table (see above)")
    ints = lambda text: [int(v) for v in text.split(",")]
    g.add_argument("--clients", type=ints, default=[4, 16, 64, 256, 1024], help="K values")
    g.add_argument("--algos", type=lambda t: t.split(","), default=["fsl_sage", "sl_single_server"])
    g.add_argument("--align-interval", type=int, default=2, help="FSL-SAGE alignment every l rounds")
    g.add_argument("--samples-per-client", type=int, default=22, help="synthetic clients' samples")
    g.add_argument("--min-digits-samples", type=int, default=16,
                   help="use digits while every client gets at least this many samples")
    g.add_argument("--no-peer", action="store_true", help="ours only (no torch needed)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.scaling:
        if "--rounds" not in (argv if argv is not None else sys.argv[1:]):
            args.rounds = 4
        return scaling(args)
    ours, peer = [], []
    for i in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="fslsage-cache-") if args.cold else None
        ours.append(run_ours(args, os.path.join(args.out, f"ours-{i}"), cache))
        peer.append(run_peer(args))
        print(f"repeat {i}: ours {ours[-1]['wall_time_s']:.1f} s, PyTorch {peer[-1]['wall_time_s']:.1f} s",
              file=sys.stderr, flush=True)
    md = table(ours, peer)
    print(md)
    with open(os.path.join(args.out, "peer.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "peer.json"), "w") as f:
        json.dump({"ours": ours, "peer": peer, "args": vars(args),
                   "load_average": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
