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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fslsage_jax.algorithms import ALGORITHMS  # noqa: E402

ALGOS = tuple(ALGORITHMS)

DEFAULT_ROUNDS = 50
DEFAULT_CHECKPOINT_EVERY = 10


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (``error: ...``, exit code 2), no usage block."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(str(message).split())}\n")


LM_DATASETS = ("e2e",)
LM_MODELS = ("gpt2",)
GPT2_SIZES = ("tiny", "medium")


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; ``preset`` (a key of ``PRESETS``) replaces the defaults it names."""
    from fslsage_jax.algorithms.config import OPTIMIZERS, STEP_LOOPS, STRATEGIES, Config
    from fslsage_jax.data import DATASETS
    from fslsage_jax.models import MODELS
    from fslsage_jax.presets import PRESETS
    from fslsage_jax.sharding import parse_devices
    c = Config()
    p = OneLineParser(
        description="Federated split learning simulation (FSL-SAGE, Nair et al. ICML 2025, and "
                    "baselines). All clients are one pytree; every round runs as compiled JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default=None, choices=sorted(PRESETS),
      help="set every hyperparameter of one of the paper's experiments (printed when used); "
           "flags given explicitly override it")
    a("--algo", default="fsl_sage", choices=ALGOS + ("all",),
      help="algorithm, or 'all' to run the five on the same partition and seed")
    a("--dataset", default="digits", choices=sorted(DATASETS) + list(LM_DATASETS),
      help="digits: scikit-learn's bundled 8x8 handwritten digits (real data, offline); "
           "synthetic: random images for speed tests; cifar10/cifar100: from --data-dir "
           "(the original archive or its folder) or tensorflow-datasets; e2e: E2E NLG for "
           "--model gpt2, from --data-dir (the CSV release) or tensorflow-datasets")
    a("--model", default="cnn", choices=sorted(MODELS) + list(LM_MODELS),
      help="split model: cnn (the original's small CNN), resnet18 (the paper's image model), "
           "gpt2 (GPT-2 with LoRA, --dataset e2e)")
    a("--num-clients", type=int, default=c.num_clients, help="number of simulated clients m")
    a("--rounds", type=int, default=DEFAULT_ROUNDS, help="maximum number of rounds R")
    a("--local-epochs", type=int, default=c.local_epochs, help="local epochs E per round")
    a("--batch-size", type=int, default=c.batch_size, help="local minibatch size B")
    a("--lr", type=float, default=c.lr, help="Adam learning rate (client, server, CSE-FSL aux)")
    a("--weight-decay", type=float, default=c.weight_decay,
      help="weight decay: L2 added to the gradient for --optimizer adam (PyTorch Adam), "
           "decoupled for adamw")
    a("--optimizer", default=c.optimizer, choices=OPTIMIZERS,
      help="client/server optimizer: adam (the image recipe) or adamw (the GPT-2 LoRA recipe)")
    a("--adam-eps", type=float, default=c.adam_eps, help="Adam epsilon")
    a("--warmup-steps", type=int, default=c.warmup_steps,
      help="linear learning-rate warm-up over this many optimizer steps (0: none)")
    a("--train-subset", type=int, default=0, metavar="N",
      help="train on the first N training samples only (0: all); for quick runs")
    a("--eval-subset", type=int, default=0, metavar="N",
      help="evaluate on the first N test samples only (0: all)")
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
    a("--data-dir", default=None,
      help="dataset files: for cifar10/cifar100 the original cifar-10-python.tar.gz / "
           "cifar-100-python.tar.gz or its extracted folder (or a folder holding either); for e2e "
           "the folder with trainset.csv, devset.csv, testset_w_refs.csv")
    g = p.add_argument_group("language model (--model gpt2 --dataset e2e)")
    g.add_argument("--gpt2-size", default="medium", choices=GPT2_SIZES,
                   help="GPT-2 shape when no --pretrained config is read: medium (24 blocks, "
                        "width 1024) or tiny (4 blocks, width 64; seconds per round on a CPU)")
    g.add_argument("--pretrained", default=None, metavar="PATH_OR_NAME",
                   help="Hugging Face GPT-2 weights: a folder with model.safetensors and "
                        "config.json, or a hub name (e.g. gpt2-medium) when online; without it "
                        "the model is randomly initialised")
    g.add_argument("--tokenizer", default=None, metavar="PATH_OR_NAME",
                   help="GPT-2 tokenizer: a folder with vocab.json and merges.txt, or a hub name "
                        "(default: --pretrained, else gpt2)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (pad/truncate)")
    g.add_argument("--e2e-splits", default="train,dev", metavar="TRAIN,EVAL",
                   help="E2E splits to train and evaluate on (of train, dev, test)")
    g.add_argument("--generate", type=int, default=0, metavar="N",
                   help="at the end, greedily decode N evaluation meaning representations and "
                        "report corpus BLEU against all their references")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    a("--out", default=None, help="output directory (default runs/<algo>-<dataset>-<timestamp>/)")
    a("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue the run in RUN_DIR from its last checkpoint, with its config.json settings "
           "(--rounds and --comm-budget-gib may be raised; --strategy, --step-loop, --chunk-size "
           "may change; other settings must match). With --algo all runs, finished algorithms are "
           "skipped and unstarted ones start from round 0")
    a("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
      help="save a checkpoint every this many rounds (and always when a run stops, except "
           "on divergence); the last 3 are kept")
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
    if preset is not None:
        from fslsage_jax.presets import preset_defaults
        p.set_defaults(**preset_defaults(preset))
    return p


def preset_of(argv: list[str]) -> str | None:
    """The ``--preset`` value in ``argv`` (None if absent); unknown names fail later in parsing."""
    from fslsage_jax.presets import PRESETS
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    name = pre.parse_known_args(argv)[0].preset
    return name if name in PRESETS else None


def fail(msg: str) -> None:
    """Exit 2 with one line on stderr."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    raise SystemExit(2)


POSITIVE_INTS = ("num_clients", "rounds", "local_epochs", "batch_size", "server_update_interval",
                 "align_interval", "align_epochs", "align_batch_size", "align_buffer_size",
                 "chunk_size", "checkpoint_every")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate(args) -> None:
    """Cheap checks before any heavy work: exit 2 with one line naming the flag."""
    for dest in POSITIVE_INTS:
        v = getattr(args, dest)
        if v <= 0:
            fail(f"{_flag(dest)} {v}: must be a positive integer")
    for dest in ("lr", "alpha", "comm_budget_gib"):
        v = getattr(args, dest)
        if not (math.isfinite(v) and v > 0):
            fail(f"{_flag(dest)} {v}: must be a finite number > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        fail(f"--weight-decay {args.weight_decay}: must be a finite number >= 0")
    if not 0.0 <= args.target_accuracy <= 1.0:
        fail(f"--target-accuracy {args.target_accuracy}: must lie in [0, 1]")
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        fail(f"--data-dir {args.data_dir}: no such file or directory")
    if not (math.isfinite(args.adam_eps) and args.adam_eps > 0):
        fail(f"--adam-eps {args.adam_eps}: must be a finite number > 0")
    for dest in ("warmup_steps", "train_subset", "eval_subset", "generate"):
        if getattr(args, dest) < 0:
            fail(f"{_flag(dest)} {getattr(args, dest)}: must be >= 0")
    for dest in ("seq_len", "max_new_tokens"):
        if getattr(args, dest) <= 0:
            fail(f"{_flag(dest)} {getattr(args, dest)}: must be a positive integer")
    lm_model, lm_data = args.model in LM_MODELS, args.dataset in LM_DATASETS
    if lm_model != lm_data:
        need = "--dataset e2e" if lm_model else "an image model (cnn, resnet18)"
        fail(f"--model {args.model}: cannot be used with --dataset {args.dataset} (needs {need})")
    if lm_data and args.distribution != "iid":
        fail(f"--distribution {args.distribution}: --dataset {args.dataset} has no class labels to "
             f"skew; use iid")
    splits = args.e2e_splits.split(",")
    if len(splits) != 2 or not set(splits) <= {"train", "dev", "test"}:
        fail(f"--e2e-splits {args.e2e_splits}: must be TRAIN,EVAL with each of train, dev, test")
    if args.generate and not lm_model:
        fail(f"--generate {args.generate}: only for --model gpt2")
    if args.generate and args.max_new_tokens >= args.seq_len:
        fail(f"--max-new-tokens {args.max_new_tokens}: must be smaller than --seq-len {args.seq_len} "
             f"(the prompt needs room)")


def check_out(path: str, overwrite: bool, resume: bool) -> None:
    """Refuse an --out that cannot hold a fresh run, without creating anything."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            fail(f"--out {path}: exists and is not a directory")
        if os.listdir(path) and not (overwrite or resume):
            fail(f"--out {path}: exists and is not empty (pass --overwrite to reuse it, "
                 f"or --resume {path} to continue it)")
        if not os.access(path, os.W_OK | os.X_OK):
            fail(f"--out {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"--out {path}: cannot be created ({parent} is not a directory)")
    try:                       # os.access says yes to root even where creating fails
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".fslsage-probe-"))
    except OSError as e:
        fail(f"--out {path}: cannot be created in {parent} ({e.strerror})")


def prepare_out(path: str, overwrite: bool) -> str:
    """Create --out (checked before by :func:`check_out`)."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        fail(f"--out {path}: exists and is not empty (pass --overwrite to reuse it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"--out {path}: cannot create ({e.strerror})")
    if not os.access(path, os.W_OK):
        fail(f"--out {path}: not writable")
    return path


# ----------------------------------------------------------------------------- model/data checks
def _cnn_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3:
        return f"needs images (H, W, C), got inputs of shape {tuple(input_shape)}"
    return None


def _resnet_input_error(input_shape: tuple, num_classes: int) -> str | None:
    if len(input_shape) != 3 or min(input_shape[:2]) < 32:
        return (f"needs images of at least 32x32 (its client part downsamples 8x), got inputs of "
                f"shape {tuple(input_shape)}")
    return None


# model name -> (input_shape, num_classes) -> why the model cannot take this data, or None.
# Models without an entry are only checked by building them on the data's input shape.
MODEL_INPUT_CHECKS = {"cnn": _cnn_input_error, "resnet18": _resnet_input_error}


def check_model_input(model: str, dataset: str, input_shape: tuple, num_classes: int) -> None:
    """Exit 2 if ``model`` cannot take ``dataset``'s inputs (rule of MODEL_INPUT_CHECKS)."""
    rule = MODEL_INPUT_CHECKS.get(model)
    why = rule(tuple(input_shape), num_classes) if rule else None
    if why:
        fail(f"--model {model}: cannot be used with --dataset {dataset}: {why}")


# ----------------------------------------------------------------------------- resume
# Settings that may differ from a run's config.json on --resume: results do not depend on
# them (strategy, step loop and chunk size agree within 1e-5) or they only extend the run.
# Every other flag, including flags added later, must match.
RESUME_MAY_DIFFER = frozenset({"resume", "out", "overwrite", "rounds", "comm_budget_gib",
                               "target_accuracy", "strategy", "step_loop", "chunk_size",
                               "no_progress", "checkpoint_every", "data_dir", "describe",
                               "devices", "generate", "max_new_tokens"})


def explicit_flags(argv: list[str]) -> dict:
    """The flags given on the command line (dest -> parsed value), defaults left out."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def resume_args(args, argv: list[str]) -> argparse.Namespace:
    """The settings of the run in ``args.resume`` (its config.json) plus the allowed overrides.

    Exits 2 if the directory is no run directory, has no checkpoint, or if a flag given on
    the command line differs from the run's setting where results depend on it.
    """
    from fslsage_jax import checkpoint

    run_dir = args.resume
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        fail(f"--resume {run_dir}: no such directory")
    if not os.path.isfile(cfg_path):
        fail(f"--resume {run_dir}: not a run directory (no config.json)")
    try:
        with open(cfg_path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--resume {run_dir}: unreadable config.json ({e})")
    given = explicit_flags(argv)
    if "out" in given and os.path.abspath(given["out"]) != os.path.abspath(run_dir):
        fail(f"--out {given['out']}: cannot be combined with --resume {run_dir} (the run continues "
             f"in {run_dir})")
    defaults = vars(build_parser().parse_args([]))
    differ = [f"{_flag(k)} {v} (run: {stored.get(k, defaults.get(k))})" for k, v in sorted(given.items())
              if k not in RESUME_MAY_DIFFER and v != stored.get(k, defaults.get(k))]
    if differ:
        fail(f"--resume {run_dir}: settings differ from the run's config.json: {', '.join(differ)}")
    merged = {**defaults, **{k: v for k, v in stored.items() if k in defaults}, **given,
              "resume": run_dir, "out": run_dir}
    ns = argparse.Namespace(**merged)
    subdirs = ([os.path.join(run_dir, a) for a in ALGOS] if ns.algo == "all" else [run_dir])
    ckpts = [checkpoint.latest(d) for d in subdirs if os.path.isdir(d)]
    ckpts = [c for c in ckpts if c is not None]
    if not ckpts:
        fail(f"--resume {run_dir}: no checkpoint yet (the run stopped before its first one); "
             f"start it again with --out {run_dir} --overwrite")
    done = max(c.rounds for c in ckpts)
    if ns.rounds < done:
        fail(f"--rounds {ns.rounds}: the run in {run_dir} has already completed {done} rounds")
    return ns


def resume_plan(run_dir: str, rounds: int) -> tuple[str, dict | None]:
    """What ``--resume`` of an ``--algo all`` run does with one algorithm's sub-directory.

    Returns ``("skip", summary)`` if it finished (diverged, budget spent, or all ``rounds``
    done), ``("resume", None)`` if it has a checkpoint, else ``("fresh", None)``.
    """
    from fslsage_jax import checkpoint

    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        s = None
    if s and (s["stop_reason"] in ("diverged", "comm_budget")
              or (s["stop_reason"] == "rounds" and s["rounds_run"] >= rounds)):
        return "skip", s
    if checkpoint.latest(run_dir) is not None:
        return "resume", None
    return "fresh", None


# ----------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGINT / SIGTERM: the run stops after the current round with a checkpoint.

    A second signal kills the process at once. ``restore()`` puts the previous handlers back.
    """

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


def exit_code(summaries: list[dict], stop: StopFlag) -> int:
    """130 / 143 if stopped by SIGINT / SIGTERM, else 3 if a run diverged, else 0."""
    if any(s["stop_reason"] == "interrupted" for s in summaries) and stop.signum is not None:
        return 128 + int(stop.signum)
    return 3 if any(s["stop_reason"] == "diverged" for s in summaries) else 0


def report_stop(s: dict, run_dir: str, out: str) -> None:
    """One line on stderr for a run that diverged or was interrupted."""
    from fslsage_jax import checkpoint

    c = checkpoint.latest(run_dir)
    last = f"last checkpoint after round {c.rounds}" if c else "no checkpoint"
    if s["stop_reason"] == "diverged":
        print(f"error: {s['algo']} diverged at round {s['diverged_round']} (non-finite loss or "
              f"parameters); {s['diverged_round']} completed rounds kept in "
              f"{os.path.join(run_dir, 'metrics.jsonl')}, {last}", file=sys.stderr, flush=True)
    elif s["stop_reason"] == "interrupted":
        print(f"{s['algo']} interrupted after {s['rounds_run']} rounds, {last}; continue with: "
              f"python experiments/run.py --resume {out}", file=sys.stderr, flush=True)


def format_table(summaries: list[dict], target: float) -> str:
    """Markdown comparison table; language-model runs get a perplexity column."""
    lm = any(s.get("final_perplexity") is not None for s in summaries)
    head = (f"| algorithm | final acc | best acc | {'final ppl | ' if lm else ''}total GiB | "
            f"GiB to {target:.2f} | rounds | s/round |\n|---|---|---|{'---|' if lm else ''}---|---|---|---|")
    rows = []
    for s in summaries:
        g = s["gib_to_target"]
        rt = s["mean_round_time_s"] or s["first_round_time_s"]
        ppl = f"{s['final_perplexity']:.2f} | " if lm and s.get("final_perplexity") is not None else (
            "- | " if lm else "")
        rows.append(f"| {s['algo']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {ppl}"
                    f"{s['total_gib']:.4f} | {'-' if g is None else f'{g:.4f}'} | "
                    f"{s['rounds_run']} | {rt:.3f} |")
    return "\n".join([head] + rows)


# ----------------------------------------------------------------------------- models and data
def gpt2_config(args):
    """The GPT-2 shape: --pretrained's config.json when it is a local folder, else --gpt2-size."""
    from fslsage_jax.models.gpt2 import GPT2_MEDIUM, GPT2_TINY
    if args.pretrained and os.path.isdir(args.pretrained):
        from fslsage_jax.models.gpt2_weights import read_config
        try:
            return read_config(args.pretrained)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--pretrained {args.pretrained}: cannot read its config.json ({e})")
    return GPT2_TINY if args.gpt2_size == "tiny" else GPT2_MEDIUM


def make_split(args, input_shape: tuple, num_classes: int, transform=None, input_dtype=None):
    """The split model for the flags; exit 2 if it cannot take these inputs."""
    from fslsage_jax.models import MODELS
    if args.model in LM_MODELS:
        from fslsage_jax.models.gpt2 import make_gpt2
        try:
            return make_gpt2(gpt2_config(args), args.seq_len)
        except ValueError as e:
            fail(f"--seq-len {args.seq_len}: {e}")
    check_model_input(args.model, args.dataset, input_shape, num_classes)
    try:
        split = MODELS[args.model](tuple(input_shape), num_classes)
    except Exception as e:  # noqa: BLE001 (any failure to build the model on these shapes)
        fail(f"--model {args.model}: cannot be built for --dataset {args.dataset} inputs of shape "
             f"{tuple(input_shape)} ({type(e).__name__}: {e})")
    if transform is not None:
        split = dataclasses.replace(split, input_fn=transform, input_dtype=input_dtype)
    return split


def describe_model(args) -> dict:
    """``--describe``: the split's counts from shapes only (no data is loaded)."""
    from fslsage_jax.data import dataset_shape
    from fslsage_jax.split import describe
    if args.model in LM_MODELS:
        split = make_split(args, (args.seq_len,), 0)
    else:
        shape, classes = dataset_shape(args.dataset)
        split = make_split(args, shape, classes)
    try:
        return describe(split)
    except Exception as e:  # noqa: BLE001
        fail(f"--model {args.model}: cannot be built for --dataset {args.dataset} ({type(e).__name__}: {e})")


def _subset(ds, args):
    n_tr = args.train_subset or len(ds.y_train)
    n_te = args.eval_subset or len(ds.y_test)
    return ds._replace(x_train=ds.x_train[:n_tr], y_train=ds.y_train[:n_tr],
                       x_test=ds.x_test[:n_te], y_test=ds.y_test[:n_te])


def load_task(args):
    """``(dataset, split model, frozen weights or None, on_finish hook or None)``; exit 2 on
    missing or unreadable data, tokenizer or weights."""
    if args.model in LM_MODELS:
        return load_lm_task(args)
    from fslsage_jax.data import load_dataset
    try:
        ds = load_dataset(args.dataset, seed=args.seed, data_dir=args.data_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        where = f"--data-dir {args.data_dir}" if args.data_dir else f"--dataset {args.dataset}"
        fail(f"{where}: cannot load dataset {args.dataset} ({type(e).__name__}: {e})")
    ds = _subset(ds, args)
    split = make_split(args, ds.x_train.shape[1:], ds.num_classes, ds.transform, ds.x_train.dtype)
    return ds, split, None, None


def load_lm_task(args):
    """E2E + GPT-2: tokenizer, token arrays, pretrained (or random) frozen weights and the
    end-of-run generation + BLEU hook."""
    from fslsage_jax.data.e2e import load_e2e
    from fslsage_jax.models.gpt2_weights import load_gpt2_weights, load_tokenizer, random_init_notice
    name = args.tokenizer or args.pretrained or "gpt2"
    try:
        tok = load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, ...)
        fail(f"--tokenizer {name}: cannot load a GPT-2 tokenizer ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}); pass a folder with vocab.json and "
             f"merges.txt, or a hub name when online")
    train_split, eval_split = args.e2e_splits.split(",")
    try:
        ds = load_e2e(tok, args.data_dir, args.seq_len, train_split=train_split, eval_split=eval_split)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(f"--data-dir {args.data_dir}: cannot load E2E ({type(e).__name__}: {e})")
    ds = _subset(ds, args)
    split = make_split(args, (args.seq_len,), ds.num_classes)
    if ds.num_classes > split.num_classes:
        fail(f"--tokenizer {name}: vocabulary of {ds.num_classes} tokens is larger than the model's "
             f"{split.num_classes}")
    config = gpt2_config(args)
    frozen = None
    if args.pretrained:
        try:
            w = load_gpt2_weights(args.pretrained, config)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--pretrained {args.pretrained}: {e}")
        frozen = (w.client, w.server, w.aux)
    else:
        print(random_init_notice(config), file=sys.stderr, flush=True)
    on_finish = make_generation_hook(args, ds, split, tok) if args.generate else None
    return ds, split, frozen, on_finish


def make_generation_hook(args, ds, split, tok):
    """``on_finish(algo, state)``: greedy decoding of --generate evaluation MRs, corpus BLEU
    against all their references; prints a few samples, writes generations.json."""
    def on_finish(algo, state):
        from fslsage_jax.data.e2e import encode_prompts
        from fslsage_jax.lm import corpus_bleu, decode_generated, greedy_generate
        from fslsage_jax.simulate import write_json_atomic
        n = min(args.generate, len(ds.test_mrs))
        mrs, refs = ds.test_mrs[:n], ds.test_refs[:n]
        width = args.seq_len - args.max_new_tokens
        if width < 1:
            return {"bleu": None, "generate_error": "--max-new-tokens leaves no room for a prompt"}
        prompts, lens = encode_prompts(tok, mrs, width)
        cv, sv = algo.global_model(state)
        tokens = greedy_generate(split, cv, sv, prompts, lens, args.max_new_tokens, ds.eos_id)
        hyps = decode_generated(tok, tokens, ds.eos_id)
        bleu = corpus_bleu(hyps, refs)
        for mr, h in list(zip(mrs, hyps))[:3]:
            print(f"  MR: {mr}\n  -> {h}", flush=True)
        print(f"BLEU on {n} evaluation meaning representations: {bleu:.2f}", flush=True)
        if args.out:
            run_dir = os.path.join(args.out, algo.name) if args.algo == "all" else args.out
            write_json_atomic(os.path.join(run_dir, "generations.json"),
                              [{"mr": m, "hypothesis": h, "references": r}
                               for m, h, r in zip(mrs, hyps, refs)])
        return {"bleu": bleu, "generated": n}
    return on_finish


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = preset_of(argv)
    args = build_parser(preset).parse_args(argv)
    if preset and not args.resume:
        from fslsage_jax.presets import preset_defaults
        given = explicit_flags(argv)
        print(f"preset {preset}: " + ", ".join(
            f"{_flag(k)} {v}" + (f" (overridden: {given[k]})" if k in given else "")
            for k, v in preset_defaults(preset).items()), file=sys.stderr, flush=True)
    if args.resume:
        args = resume_args(args, argv)
    validate(args)
    if not args.describe:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = args.out or os.path.join("runs", f"{args.algo}-{args.dataset}-{stamp}")
        check_out(args.out, args.overwrite, bool(args.resume))

    if args.describe:
        print(json.dumps(describe_model(args), indent=2))
        return 0
    ds, split, frozen, on_finish = load_task(args)
    from fslsage_jax.data import partition, to_client_arrays

    n_train = len(ds.y_train)
    if args.num_clients > n_train:
        fail(f"--num-clients {args.num_clients}: more clients than the {n_train} training samples")
    try:
        parts = partition(ds.y_train, args.num_clients, args.distribution, args.alpha,
                          ds.num_classes, args.seed)
        clients = to_client_arrays(ds.x_train, ds.y_train, parts)
    except ValueError as e:
        fail(f"--num-clients {args.num_clients} --distribution {args.distribution} "
             f"--alpha {args.alpha}: {e}")
    smallest = int(clients.counts.min())
    if args.batch_size > smallest:
        fail(f"--batch-size {args.batch_size}: larger than the smallest client shard "
             f"({smallest} samples); use fewer clients or a smaller batch")

    import jax

    from fslsage_jax.algorithms.config import Config

    from fslsage_jax.algorithms.lifting import auto_strategy
    from fslsage_jax.simulate import RunOptions, Task, run_simulation, write_json_atomic

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
                 optimizer=args.optimizer, adam_eps=args.adam_eps, warmup_steps=args.warmup_steps,
                 server_update_interval=args.server_update_interval,
                 align_interval=args.align_interval, align_epochs=args.align_epochs,
                 align_batch_size=args.align_batch_size, align_buffer_size=args.align_buffer_size,
                 strategy=args.strategy, chunk_size=args.chunk_size, step_loop=args.step_loop)
    resuming = bool(args.resume)
    out = prepare_out(args.out, args.overwrite or resuming)
    algos = ALGOS if args.algo == "all" else (args.algo,)
    run_config = {**vars(args), "config": dataclasses.asdict(cfg),
                  "n_train": n_train, "n_test": len(ds.y_test),
                  "num_classes": ds.num_classes, "input_shape": list(ds.x_train.shape[1:]),
                  "client_sample_counts": [int(c) for c in clients.counts],
                  "jax_version": jax.__version__, "backend": jax.default_backend()}
    if len(algos) > 1:
        write_json_atomic(os.path.join(out, "config.json"), run_config)
    stop = StopFlag().install()
    summaries = []
    try:
        for name in algos:
            run_dir = os.path.join(out, name) if len(algos) > 1 else out
            plan = "resume" if resuming else "fresh"
            if resuming and len(algos) > 1:
                plan, s = resume_plan(run_dir, args.rounds)
                if plan == "skip":
                    summaries.append(s)
                    print(f"{name}: finished before ({s['stop_reason']}), skipped", flush=True)
                    continue
            if len(algos) > 1:
                prepare_out(run_dir, args.overwrite or resuming)
            write_json_atomic(os.path.join(run_dir, "config.json"), {**run_config, "algo": name})
            s = run_simulation(name, Task(split, cfg, clients, ds.x_test, ds.y_test, frozen, on_finish),
                               RunOptions(rounds=args.rounds, seed=args.seed,
                                          comm_budget_bytes=int(args.comm_budget_gib * 2 ** 30),
                                          out_dir=run_dir, target_accuracy=args.target_accuracy,
                                          progress=not args.no_progress,
                                          checkpoint_every=args.checkpoint_every,
                                          resume=plan == "resume", stop_requested=stop,
                                          log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                          devices=args.devices))
            summaries.append(s)
            print(f"{name}: accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}), "
                  f"{s['total_gib']:.4f} GiB, {s['rounds_run']} rounds, stop: {s['stop_reason']}, "
                  f"{s['wall_time_s']:.1f} s -> {run_dir}", flush=True)
            report_stop(s, run_dir, out)
            if s["stop_reason"] == "interrupted":
                break
    finally:
        stop.restore()
    if summaries and all(s["rounds_run"] > 0 for s in summaries):
        table = format_table(summaries, args.target_accuracy)
        print(table)
        if len(algos) > 1 and len(summaries) == len(algos):
            with open(os.path.join(out, "comparison.md"), "w") as f:
                f.write(table + "\n")
            write_json_atomic(os.path.join(out, "comparison.json"), summaries)
    return exit_code(summaries, stop)


if __name__ == "__main__":
    sys.exit(main())
