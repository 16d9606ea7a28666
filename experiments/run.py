#!/usr/bin/env python
"""Run federated split learning experiments: FSL-SAGE and its baselines.

    python experiments/run.py --algo fsl_sage          # FSL-SAGE on digits, a minute on a laptop
    python experiments/run.py --algo all               # the five algorithms, one comparison table
    python experiments/run.py --describe               # the model split as JSON
    python experiments/run.py --preset cifar10_resnet18 --data-dir ~/data   # the paper's CIFAR-10 run
    python experiments/run.py --preset e2e_gpt2_tiny --data-dir E2E --tokenizer VOCAB  # GPT-2 + LoRA

Writes config.json, metrics.jsonl (one line per round, flushed every round),
summary.json and checkpoints/ into --out (default runs/<algo>-<dataset>-<timestamp>/).

    python experiments/run.py --resume runs/fsl_sage-digits-...   # continue a stopped run

Exit codes: 0 done; 2 bad flag (one line on stderr, nothing written); 3 a run
diverged (non-finite loss or parameter); 130 / 143 stopped by SIGINT / SIGTERM
after writing a checkpoint (resumable with --resume).
The experiment (settings, checks, data, models, resume) is :mod:`fslsage_jax.experiment`; this
script parses flags, words the library's errors as flags, prints and handles signals.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fslsage_jax import checkpoint  # noqa: E402
from fslsage_jax import experiment as ex  # noqa: E402
from fslsage_jax.algorithms import ALGORITHMS  # noqa: E402
from fslsage_jax.client_store import RAM_LIMIT_BYTES  # noqa: E402
from fslsage_jax.memory import DeviceMemoryError  # noqa: E402
from fslsage_jax.presets import PRESETS, preset_defaults  # noqa: E402
from fslsage_jax.results import format_table  # noqa: E402
from fslsage_jax.runtime import configure_runtime  # noqa: E402
from fslsage_jax.sharding import parse_devices  # noqa: E402


def flag(dest: str) -> str:
    """The CLI flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


class StopFlag:
    """Set by SIGINT / SIGTERM: pass it as ``run(..., stop_requested=StopFlag().install())`` and
    the run stops after the current round with a checkpoint; a second signal kills the process
    at once. ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this round with a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (``error: ...``, exit code 2), no usage block."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(str(message).split())}\n")


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser (defaults and choices from :class:`ExperimentConfig`); ``preset`` (a key
    of ``PRESETS``) replaces the defaults it names."""
    d, choices = ex.ExperimentConfig(), ex.choices()
    p = OneLineParser(
        description="Federated split learning simulation (FSL-SAGE, Nair et al. ICML 2025, and "
                    "baselines). All clients are one pytree; every round runs as compiled JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def a(name, help, group=p, **kw):
        dest = kw.get("dest") or name[2:].replace("-", "_")
        kw.setdefault("default", getattr(d, dest))
        if dest in choices:
            kw["choices"] = choices[dest]
        if isinstance(kw["default"], bool):
            kw.setdefault("action", "store_true")
        elif isinstance(kw["default"], (int, float)) and "type" not in kw:
            kw["type"] = type(kw["default"])
        group.add_argument(name, help=help, **kw)

    a("--preset", "set every hyperparameter of one of the paper's experiments (printed when "
                  "used); flags given explicitly override it")
    a("--algo", "algorithm, or 'all' to run the five on the same partition and seed")
    a("--dataset", "digits: scikit-learn's 8x8 digits (real, offline); synthetic: random images for "
                   "speed tests; cifar10/cifar100: from --data-dir (the original archive or its folder) "
                   "or tensorflow-datasets; e2e: E2E NLG for --model gpt2 (CSVs in --data-dir, or tfds)")
    a("--model", "split model: cnn (the original's small CNN), resnet18 (the paper's image model), "
                 "gpt2 (GPT-2 with LoRA, --dataset e2e)")
    a("--num-clients", "number of simulated clients m")
    a("--rounds", "maximum number of rounds R")
    a("--local-epochs", "local epochs E per round")
    a("--batch-size", "local minibatch size B (a larger batch than a client's shard: one step on "
                      "its whole shard)")
    a("--lr", "Adam learning rate (client, server, CSE-FSL aux)")
    a("--weight-decay", "weight decay: L2 added to the gradient for --optimizer adam (PyTorch "
                        "Adam), decoupled for adamw")
    a("--optimizer", "client/server optimizer: adam (the image recipe) or adamw (the GPT-2 LoRA recipe)")
    a("--adam-eps", "Adam epsilon")
    a("--warmup-steps", "linear learning-rate warm-up over this many optimizer steps (0: none)")
    a("--train-subset", "train on the first N training samples only (0: all); for quick runs", metavar="N")
    a("--eval-subset", "evaluate on the first N test samples only (0: all)", metavar="N")
    a("--seed", "seed for data split, partition, models and shuffles")
    a("--server-update-interval", "Q: CSE-FSL/FSL-SAGE clients upload when their local step k %% Q == 0")
    a("--align-interval", "l: FSL-SAGE aligns the auxiliary models every l rounds")
    a("--align-epochs", "FSL-SAGE alignment passes over the buffer")
    a("--align-batch-size", "FSL-SAGE alignment minibatch")
    a("--align-buffer-size", "FSL-SAGE per-client FIFO of uploaded (z, y) used for alignment")
    a("--align-target-scale", "FSL-SAGE alignment targets: minibatch (the server's gradients of each "
                              "alignment minibatch's mean loss) or buffer (of the whole buffer's mean "
                              "loss, as the authors' code)")
    a("--align-client-chunk", "FSL-SAGE: clients aligned at once (0: all, or one at a time when a "
                              "client's buffer of cut activations exceeds 64 MiB)")
    a("--aux-lr", "the auxiliary model's own Adam learning rate (CSE-FSL training, FSL-SAGE alignment)")
    a("--aux-weight-decay", "the auxiliary model's weight decay (L2, as PyTorch Adam)")
    a("--warm-start", "FSL-SAGE: run this many CSE-FSL rounds first (the authors' option: 1); they "
                      "count in --rounds")
    a("--fedavg-server", "FedAvg: copies (textbook: every client trains a whole copy) or shared (the "
                         "authors' code: one server part updated by the clients in turn)")
    a("--distribution", "how data is split over clients")
    a("--alpha", "Dirichlet concentration (smaller = more heterogeneous)")
    a("--comm-budget-gib", "stop once cumulative communication reaches this many GiB (2^30 bytes)")
    a("--target-accuracy", "report the GiB at which test accuracy first reaches this")
    a("--data-dir", "dataset files: for cifar10/cifar100 the original cifar-10-python.tar.gz / "
                    "cifar-100-python.tar.gz or its extracted folder (or a folder holding either); "
                    "for e2e the folder with trainset.csv, devset.csv, testset_w_refs.csv")
    g = p.add_argument_group("language model (--model gpt2 --dataset e2e)")
    a("--gpt2-size", "GPT-2 shape when no --pretrained config is read: medium (24 blocks, width "
                     "1024) or tiny (4 blocks, width 64; seconds per round on a CPU)", g)
    a("--pretrained", "Hugging Face GPT-2 weights: a folder with model.safetensors and config.json, or a "
                      "hub name (gpt2-medium) when online; without it: random init", g, metavar="PATH_OR_NAME")
    a("--tokenizer", "GPT-2 tokenizer: a folder with vocab.json and merges.txt, or a hub name "
                     "(default: --pretrained, else gpt2)", g, metavar="PATH_OR_NAME")
    a("--seq-len", "tokens per sequence (pad/truncate)", g)
    a("--e2e-splits", "E2E splits to train and evaluate on (of train, dev, test)", g, metavar="TRAIN,EVAL")
    a("--generate", "at the end, greedily decode N evaluation meaning representations and report "
                    "corpus BLEU against all their references", g, metavar="N")
    a("--max-new-tokens", "tokens generated per prompt", g)
    a("--out", "output directory (default runs/<algo>-<dataset>-<timestamp>/)")
    a("--overwrite", "allow writing into a non-empty --out")
    a("--resume", "continue the run in RUN_DIR from its last checkpoint with its config.json settings "
                  "(--rounds, --comm-budget-gib may be raised; --strategy, --step-loop, --chunk-size may "
                  "change; others must match); --algo all: finished algorithms are skipped", metavar="RUN_DIR")
    a("--checkpoint-every", "save a checkpoint every this many rounds (and always when a run stops, "
                            "except on divergence); the last 3 are kept")
    a("--strategy", "how the client axis runs: auto (measured fastest on CPU: images up to 16x16 "
                    "vmap up to 4 clients, else chunks of 4; larger images unroll up to 16 clients, "
                    "else vmap; other backends vmap), vmap, map (lax.map: one client after another), "
                    "chunked (lax.map over vmapped chunks of --chunk-size), unroll (sequential, "
                    "unrolled when compiled)")
    a("--chunk-size", "clients per chunk for --strategy chunked")
    a("--step-loop", "scan: a round is one compiled lax.scan over local steps; host: one compiled "
                     "call per local step (faster for convolutions on XLA:CPU)")
    a("--devices", "shard the client axis over N local devices (N must divide --num-clients); 0 or "
                   "auto: all", type=parse_devices)
    a("--eval-batch-size", "evaluation minibatch (0: as large as keeps a batch's logits under 1 GiB, "
                           "at most 1000)")
    a("--describe", "print the model split as JSON (parameter, state and byte counts, cut shape) and exit")
    a("--memory-plan", "compile every program the run would execute for its true shapes (no data, no "
                       "weights), write memory_plan.json into --out, print a table and exit 0 if it "
                       "fits --device-memory-gib, else 4")
    a("--device-memory-gib", "device memory for --memory-plan (0: the device's own)")
    a("--no-compilation-cache", "do not use JAX's persistent compilation cache", dest="compilation_cache",
      action="store_false")
    a("--no-progress", "no progress bar")
    g = p.add_argument_group("population (cohort sampling) and synthetic data")
    a("--cohort-size", "K clients drawn per round out of the --num-clients population (default: all; "
                       "persistent per-client state then lives on the host)", g, type=int, metavar="K")
    a("--cohort-weighted", "draw the cohort with probability proportional to shard size", g)
    a("--population-store", "where the clients' persistent state lives between their rounds: auto "
                            f"(RAM up to {RAM_LIMIT_BYTES / 2 ** 30:g} GiB, memory-mapped files in "
                            "--out/population_store beyond), ram, disk; results are identical", g)
    a("--synthetic-shape", "--dataset synthetic: image shape HxWxC", g)
    a("--synthetic-samples-per-client", "--dataset synthetic: training samples per client (0: 1024 in "
                                        "all)", g)
    g = p.add_argument_group("multi-process (jax.distributed; one command per process)")
    a("--coordinator", "HOST:PORT of process 0 (it listens there)", g)
    a("--num-processes", "number of processes", g)
    a("--process-id", "this process, 0..N-1; only process 0 writes files", g)
    a("--distributed-timeout", "seconds to wait for the coordinator before exit 2", g)
    declared = {}                                  # hyperparameters algorithms declare themselves
    for name, algo in ALGORITHMS.items():
        for hp, h in algo.hyperparams.items():
            declared.setdefault(hp, (h, []))[1].append(name)
    if declared:
        g = p.add_argument_group("hyperparameters declared by algorithms (AlgorithmDef.hyperparams)")
        for hp, (h, owners) in sorted(declared.items()):
            g.add_argument("--" + hp.replace("_", "-"), dest=HP_PREFIX + hp, default=None,
                           type=type(h.default), help=f"{h.help} ({', '.join(owners)}; default {h.default})")
    if preset is not None:
        p.set_defaults(**preset_defaults(preset))
    return p


HP_PREFIX = "hp__"
OUT_OF_MEMORY = 4          # exit code: a program did not fit in device memory (as --memory-plan)


def experiment_config(args: argparse.Namespace) -> ex.ExperimentConfig:
    """The :class:`ExperimentConfig` of parsed arguments (declared hyperparameters given on the
    command line go to ``algo_params``)."""
    v = vars(args)
    params = tuple(sorted((k[len(HP_PREFIX):], x) for k, x in v.items() if k.startswith(HP_PREFIX) and x is not None))
    return ex.ExperimentConfig(**{k: x for k, x in v.items() if not k.startswith(HP_PREFIX)}, algo_params=params)


def preset_of(argv: list[str]) -> str | None:
    """The ``--preset`` value in ``argv`` (None if absent); unknown names fail later in parsing."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    name = pre.parse_known_args(argv)[0].preset
    return name if name in PRESETS else None


def explicit_flags(argv: list[str]) -> dict:
    """The flags given on the command line (dest -> parsed value), defaults left out."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    given = vars(p.parse_args(argv))
    if any(k.startswith(HP_PREFIX) for k in given):
        given = {k: v for k, v in given.items() if not k.startswith(HP_PREFIX)}
        given["algo_params"] = experiment_config(build_parser().parse_args(argv)).algo_params
    return given


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def say(msg: str) -> None:
    print(msg, flush=True)


def fail(msg) -> None:
    """Exit 2 with one line on stderr (a :class:`ConfigError` names settings as flags)."""
    if isinstance(msg, ex.ConfigError):
        msg = msg.render(flag)
    err(f"error: {' '.join(str(msg).split())}")
    raise SystemExit(2)


def exit_code(summaries: list[dict], stop: StopFlag) -> int:
    """130 / 143 if stopped by SIGINT / SIGTERM, else 3 if a run diverged, else 0."""
    if any(s["stop_reason"] == "interrupted" for s in summaries) and stop.signum is not None:
        return 128 + int(stop.signum)
    return 3 if any(s["stop_reason"] == "diverged" for s in summaries) else 0


def report_stop(s: dict, run_dir: str, out: str) -> None:
    """One line on stderr for a run that diverged or was interrupted."""
    c = checkpoint.latest(run_dir)
    last = f"last checkpoint after round {c.rounds}" if c else "no checkpoint"
    if s["stop_reason"] == "diverged":
        err(f"error: {s['algo']} diverged at round {s['diverged_round']} (non-finite loss or "
            f"parameters); {s['diverged_round']} completed rounds kept in "
            f"{os.path.join(run_dir, 'metrics.jsonl')}, {last}")
    elif s["stop_reason"] == "interrupted":
        err(f"{s['algo']} interrupted after {s['rounds_run']} rounds, {last}; continue with: "
            f"python experiments/run.py --resume {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = preset_of(argv)
    args = build_parser(preset).parse_args(argv)
    # before any JAX computation: glibc malloc tuning and the persistent compilation cache
    configure_runtime(compilation_cache=args.compilation_cache)
    given = explicit_flags(argv)
    if preset and not args.resume:
        err(f"preset {preset}: " + ", ".join(f"{flag(k)} {v}" + (
            f" (overridden: {given[k]})" if k in given else "") for k, v in preset_defaults(preset).items()))
    try:
        cfg = experiment_config(args)
        if cfg.resume:
            cfg = ex.resume_config(cfg, given)
        ex.validate(cfg, given)
        ex.start_distributed(cfg)
        if cfg.describe:
            print(json.dumps(ex.describe_model(cfg), indent=2))
            return 0
        out = cfg.out or os.path.join("runs", f"{cfg.algo}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg = dataclasses.replace(cfg, out=out)
        ex.check_out(out, cfg.overwrite, bool(cfg.resume))
        if cfg.memory_plan:
            text, fits, limit = ex.write_memory_plan(cfg)
            if limit is None:
                text += "\nthe device reports no memory size; pass --device-memory-gib to check a limit"
            print(text)
            return 0 if fits else 4
        exp = ex.build(cfg, log=err, echo=say)
        stop = StopFlag().install()
        try:
            summaries = ex.run(exp, stop_requested=stop, log=err, echo=say,
                               on_summary=lambda s, run_dir: report_stop(s, run_dir, out))
        finally:
            stop.restore()
    except ex.ConfigError as e:
        fail(e)
    except DeviceMemoryError as e:
        err(f"error: {e}: run --memory-plan to see every program's memory, or lower --batch-size, "
            f"--align-client-chunk or --eval-batch-size (checkpoints written so far are kept in {out})")
        return OUT_OF_MEMORY
    if summaries and all(s["rounds_run"] > 0 for s in summaries):
        print(format_table(summaries, cfg.target_accuracy))
    return exit_code(summaries, stop)


if __name__ == "__main__":
    sys.exit(main())
