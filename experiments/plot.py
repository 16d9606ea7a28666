#!/usr/bin/env python
"""Plot test accuracy against communication and against rounds for runs of experiments/run.py.

    python experiments/plot.py runs/digits_all                      # an --algo all directory
    python experiments/plot.py runs/a runs/b --target 0.81 --out fig.png

Writes ONE PNG with two panels side by side: (left) test accuracy vs cumulative
communication in GiB, with a dashed line at the target accuracy and, per run, a
marker and label at the GiB where it first reaches the target (the FSL-SAGE
paper's figure); (right) test accuracy vs round. Prints a table of final and
best accuracy and GiB to the target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fslsage_jax.algorithms import ALGORITHMS  # noqa: E402
from fslsage_jax.results import (DEFAULT_TARGET, ResultsError, Run, algo_color,  # noqa: E402
                                 algo_label, default_target, find_runs, format_table,
                                 gib_to_target, load_run, series, summarize)

# config.json keys that never distinguish one experiment from another in a label
_LABEL_IGNORE = {"algo", "out", "overwrite", "no_progress", "describe", "data_dir", "config", "strategy",
                 "chunk_size", "step_loop", "jax_version", "backend", "client_sample_counts", "n_train",
                 "n_test", "num_classes", "input_shape", "target_accuracy", "comm_budget_gib"}


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_labels(runs: list[Run]) -> list[str]:
    """One label per run: the algorithm's name, plus ``key=value`` for every config.json entry that
    differs between the runs (e.g. alpha), plus the directory name if labels still collide."""
    keys = set().union(*(r.config.keys() for r in runs)) - _LABEL_IGNORE
    differing = sorted(k for k in keys
                       if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1)
    labels = []
    for r in runs:
        extra = ", ".join(f"{k}={_fmt(r.config.get(k))}" for k in differing)
        name = algo_label(r.algo)
        labels.append(f"{name} ({extra})" if extra else name)
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{os.path.basename(os.path.normpath(r.path))}]" for lab, r in zip(labels, runs)]
    return labels


def table(runs: list[Run], labels: list[str], target: float) -> str:
    """Markdown table: run, final accuracy, best accuracy, total GiB, GiB to target, rounds."""
    return format_table([{**summarize(r.records, target), "name": lab} for r, lab in zip(runs, labels)],
                        target, name_header="run", target_format="g")


def _colors(runs: list[Run]) -> list[str]:
    algos = [r.algo for r in runs]
    if len(set(algos)) == len(algos) and all(a in ALGORITHMS and ALGORITHMS[a].color for a in algos):
        return [algo_color(a) for a in algos]
    return [f"C{i % 10}" for i in range(len(runs))]


def plot_runs(runs: list[Run], out: str, target: float, title: str | None = None,
              logx: bool = False, ymin: float | None = None) -> str:
    """Draw the two-panel figure (accuracy vs GiB with target crossings; accuracy vs round) to ``out``.

    Args:
      runs: loaded runs.
      out: PNG path (parent directories are created).
      target: target accuracy for the dashed line and crossing markers.
      title: figure title (None: none).
      logx: log scale for the GiB axis.
      ymin: lower accuracy limit (None: just below the lowest accuracy or the target).
    Returns:
      ``out``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(runs)
    colors = _colors(runs)
    fig, (ax_c, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    lo = min(min(series(r)[2]) for r in runs)
    crossings = [gib_to_target(r.records, target) for r in runs]
    rank = {i: k for k, i in enumerate(sorted((i for i, g in enumerate(crossings) if g is not None),
                                              key=lambda i: crossings[i]))}
    for i, (r, lab, col) in enumerate(zip(runs, labels, colors)):
        rounds, gibs, accs = series(r)
        ax_c.plot(gibs, accs, color=col, label=lab, lw=1.5)
        ax_r.plot(rounds, accs, color=col, label=lab, lw=1.5)
        g = crossings[i]
        if g is not None:
            ax_c.plot([g], [target], marker="o", color=col, ms=6, mec="black", mew=0.6, zorder=5)
            ax_c.annotate(f"{g:.3g} GiB", xy=(g, target), xytext=(14, -16 - 15 * rank[i]),
                          textcoords="offset points", fontsize=8, color=col,
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                          arrowprops={"arrowstyle": "-", "color": col, "lw": 0.6})
    for ax in (ax_c, ax_r):
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:g}")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.set_ylim(ymin if ymin is not None else max(0.0, min(lo, target) - 0.05), 1.0)
    ax_c.set_xlabel("cumulative communication (GiB)")
    if logx:
        ax_c.set_xscale("log")
    ax_r.set_xlabel("round")
    ax_c.set_title("accuracy vs communication", fontsize=10)
    ax_r.set_title("accuracy vs round", fontsize=10)
    ax_r.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    desc = ("Plot runs of experiments/run.py. Writes ONE PNG with two panels: test accuracy vs "
            "cumulative communication (GiB), with a dashed line at the target accuracy and a marker + "
            "label at the GiB where each run first reaches it; and test accuracy vs round. Prints a "
            "table (final, best accuracy, GiB to target).")
    p = argparse.ArgumentParser(description=textwrap.fill(desc, 79),
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (with metrics.jsonl), or parents of them such as an "
                        "--algo all output directory (expanded to their sub-runs)")
    p.add_argument("--target", type=float, default=None,
                   help="target accuracy (default: the runs' --target-accuracy from summary.json, "
                        f"else {DEFAULT_TARGET})")
    p.add_argument("--out", default=None,
                   help="output PNG (default: <first RUN_DIR>/accuracy.png)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--logx", action="store_true", help="log scale for the GiB axis")
    p.add_argument("--ymin", type=float, default=None,
                   help="lower limit of the accuracy axes (default: just below the lowest accuracy)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.target is not None and not 0 <= args.target <= 1:
            raise ResultsError(f"--target {args.target}: must be in [0, 1]")
        runs = [load_run(d) for d in find_runs(args.runs)]
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = args.target if args.target is not None else default_target(runs)
    out = args.out or os.path.join(args.runs[0], "accuracy.png")
    plot_runs(runs, out, target, args.title, args.logx, args.ymin)
    print(table(runs, run_labels(runs), target))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
