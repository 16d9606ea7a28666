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
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
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
