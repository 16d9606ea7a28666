#!/usr/bin/env python
"""Sweep algorithms x Dirichlet alphas through experiments/run.py, then plot accuracy at a fixed
communication budget against alpha.

    python experiments/sweep.py --out runs/sweep --rounds 20                  # digits, 5 x 5 runs
    python experiments/sweep.py --out runs/sweep --algos fsl_sage cse_fsl --alphas 0.1 1 10 --rounds 20
    python experiments/sweep.py --plot-only runs/sweep --at-gib 0.05          # re-plot

Each run goes to OUT/alpha_<A>/<algo>/ (run.py's config.json, metrics.jsonl, summary.json); a run
whose summary.json exists is skipped, so a killed sweep restarts where it stopped. Flags that this
script does not know are passed to run.py unchanged (e.g. --dataset, --rounds, --num-clients,
--comm-budget-gib, --preset). Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from fslsage_jax.algorithms import ALGORITHMS  # noqa: E402
from fslsage_jax.results import (ResultsError, accuracy_at_gib, algo_color, algo_label,  # noqa: E402
                                 algo_rank, default_target, load_run, series, summarize)

DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
ALGOS = tuple(ALGORITHMS)
_RESERVED = ("--algo", "--distribution", "--alpha", "--out", "--overwrite")


def _run_main():
    """``main`` of experiments/run.py, the CLI whose flags the sweep passes on (a script, not a
    package module: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("_fslsage_experiments_run", os.path.join(HERE, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def alpha_dir(out: str, alpha: float, algo: str) -> str:
    """OUT/alpha_<A>/<algo>, with A printed as %g (1, 10, 0.1, 10000)."""
    return os.path.join(out, f"alpha_{alpha:g}", algo)


def run_one(run_main, out_dir: str, algo: str, alpha: float, extra: list[str]) -> tuple[str, str | None]:
    """Run one (algo, alpha) through run.py's ``main`` unless its summary.json exists.

    Returns:
      (status, error): status is "skipped" (already done), "ok", "diverged" or "failed" (run.py
      exited with an error, whose message was printed to stderr).
    """
    if os.path.isfile(os.path.join(out_dir, "summary.json")):
        return "skipped", None
    argv = list(extra) + ["--distribution", "dirichlet", "--alpha", repr(float(alpha)), "--algo", algo,
                          "--out", out_dir, "--overwrite"]
    print(f"[sweep] alpha={alpha:g} {algo}: run.py {' '.join(argv)}", flush=True)
    try:
        rc = run_main(argv)
    except SystemExit as e:  # run.py's one-line validation errors
        return "failed", f"run.py exited with {e.code}"
    return ("diverged" if rc == 3 else "ok" if rc == 0 else "failed"), None


def discover(out: str) -> list[tuple[float, str, str]]:
    """(alpha, algo, dir) of every run under OUT/alpha_*/<algo>/ that has metrics.jsonl."""
    found = []
    if not os.path.isdir(out):
        return found
    for d in os.listdir(out):
        if not d.startswith("alpha_"):
            continue
        try:
            alpha = float(d[len("alpha_"):])
        except ValueError:
            continue
        for algo in os.listdir(os.path.join(out, d)):
            run_dir = os.path.join(out, d, algo)
            if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
                found.append((alpha, algo, run_dir))
    return sorted(found, key=lambda t: (algo_rank(t[1]), t[1], t[0]))


def collect(found: list[tuple[float, str, str]], at_gib: float | None,
            target: float | None = None) -> dict:
    """Per-run numbers and the accuracy at the budget ``at_gib`` (None: the smallest final GiB of the
    finished runs, those with summary.json; of all runs if none has finished).

    Returns:
      the sweep.json dict: at_gib, target_accuracy, algos, alphas, results (one dict per run).
    """
    runs = [(alpha, algo, load_run(d)) for alpha, algo, d in found]
    if not runs:
        raise ResultsError("no runs with metrics.jsonl found")
    done = [r for _, _, r in runs if r.summary] or [r for _, _, r in runs]  # a run still going: ignored
    budget = float(at_gib) if at_gib is not None else min(series(r)[1][-1] for r in done)
    tgt = target if target is not None else default_target([r for _, _, r in runs])
    results = []
    for alpha, algo, r in runs:
        _, gibs, accs = series(r)
        results.append({"alpha": alpha, "algo": algo, "dir": r.path,
                        "accuracy_at_gib": accuracy_at_gib(gibs, accs, budget), **summarize(r.records, tgt),
                        "stop_reason": r.summary.get("stop_reason", "incomplete")})
    algos = sorted({x["algo"] for x in results}, key=lambda a: (algo_rank(a), a))
    return {"at_gib": budget, "target_accuracy": tgt, "algos": algos,
            "alphas": sorted({x["alpha"] for x in results}), "results": results}


def format_md(sweep: dict) -> str:
    """Markdown table: one row per algorithm, one column per alpha, cells = accuracy at the budget."""
    alphas, g = sweep["alphas"], sweep["at_gib"]
    cell = {(x["algo"], x["alpha"]): x["accuracy_at_gib"] for x in sweep["results"]}
    head = "| algorithm | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |"
    note = (f"Test accuracy at {g:.4g} GiB of communication (last round with cumulative GiB <= budget; "
            "'-': the first round already exceeds it, blank: not run).")
    rows = [note, "", head,
            "|---|" + "---|" * len(alphas)]
    for algo in sweep["algos"]:
        vals = []
        for a in alphas:
            v = cell.get((algo, a), "")
            vals.append("" if v == "" else "-" if v is None else f"{v:.4f}")
        rows.append(f"| {algo_label(algo)} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def plot_sweep(sweep: dict, out: str, title: str | None = None) -> str:
    """Accuracy at the budget vs alpha (log x), one line per algorithm, written as PNG to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for i, algo in enumerate(sweep["algos"]):
        pts = sorted((x["alpha"], x["accuracy_at_gib"]) for x in sweep["results"]
                     if x["algo"] == algo and x["accuracy_at_gib"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.5,
                    color=algo_color(algo, i), label=algo_label(algo))
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet alpha (smaller = more heterogeneous)")
    ax.set_ylabel(f"test accuracy at {sweep['at_gib']:.3g} GiB")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or f"accuracy at a {sweep['at_gib']:.3g} GiB communication budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_outputs(out: str, sweep: dict, title: str | None = None) -> None:
    """OUT/sweep.json, OUT/sweep.md and OUT/sweep.png."""
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=2)
    md = format_md(sweep)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(md + "\n")
    plot_sweep(sweep, os.path.join(out, "sweep.png"), title)
    print(md)
    print(f"wrote {os.path.join(out, 'sweep.json')}, sweep.md, sweep.png")


def build_parser() -> argparse.ArgumentParser:
    desc = ("Run algorithms x Dirichlet alphas through experiments/run.py (in this process), each into "
            "OUT/alpha_<A>/<algo>/, skipping runs whose summary.json exists. Then write OUT/sweep.json, "
            "OUT/sweep.md and OUT/sweep.png: test accuracy at a fixed communication budget (the last "
            "round with cumulative GiB <= --at-gib) vs alpha, one line per algorithm. Unknown flags go "
            "to run.py unchanged, e.g. --dataset digits --rounds 20 --comm-budget-gib 0.1 "
            "(see run.py --help).")
    p = argparse.ArgumentParser(description=textwrap.fill(desc, 79),
                                epilog="examples:\n" + __doc__.split("\n\n")[1], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="sweep directory (required unless --plot-only)")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS, metavar="ALGO",
                   help=f"algorithms (default: all five: {' '.join(ALGOS)})")
    p.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS), metavar="A",
                   help="Dirichlet concentrations, smaller = more heterogeneous "
                        f"(default: {' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    p.add_argument("--at-gib", type=float, default=None,
                   help="communication budget in GiB for the plot (default: the smallest final GiB "
                        "over all runs, so no run is cut off by its own end; a run whose first round "
                        "already costs more has no value there)")
    p.add_argument("--plot-only", metavar="OUT", default=None,
                   help="run nothing: re-read OUT/alpha_*/<algo>/ and rewrite sweep.json/md/png")
    p.add_argument("--title", default=None, help="plot title")
    return p


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    bad = [a for a in extra if a.split("=")[0] in _RESERVED]
    if bad:
        print(f"error: {bad[0]}: set by the sweep (use --algos, --alphas, --out)", file=sys.stderr)
        return 2
    if args.at_gib is not None and not args.at_gib > 0:
        print(f"error: --at-gib {args.at_gib}: must be > 0", file=sys.stderr)
        return 2
    if any(not a > 0 for a in args.alphas):
        print("error: --alphas: every alpha must be > 0", file=sys.stderr)
        return 2
    out = args.plot_only or args.out
    if out is None:
        print("error: --out is required (or --plot-only OUT)", file=sys.stderr)
        return 2
    failures = []
    if args.plot_only is None:
        os.makedirs(out, exist_ok=True)
        run_main = _run_main()
        for alpha in args.alphas:
            for algo in args.algos:
                status, err = run_one(run_main, alpha_dir(out, alpha, algo), algo, alpha, extra)
                if status == "failed":
                    failures.append(f"alpha={alpha:g} {algo}: {err}")
                    print(f"[sweep] alpha={alpha:g} {algo}: FAILED ({err}), continuing", file=sys.stderr)
    elif extra:
        print(f"error: --plot-only takes no run.py flags (got {' '.join(extra)})", file=sys.stderr)
        return 2
    try:
        sweep = collect(discover(out), args.at_gib)
    except ResultsError as e:
        print(f"error: {out}: {e}", file=sys.stderr)
        return 2
    sweep["failed"] = failures
    write_outputs(out, sweep, args.title)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
