"""The memory plan of a run: every program it would execute, compiled for the run's
true shapes from abstract inputs (no data, no weights), with XLA's memory analysis.

``plan(algo_name, split, cfg, n_max, eval_shape)`` lowers and compiles the
round's programs (its per-step program, or the whole round under
``step_loop="scan"``, plus the programs around the local steps; FSL-SAGE's
alignment runs inside the step program, in a branch) and the evaluation program
of one minibatch, with ``jax.ShapeDtypeStruct`` inputs of the shapes the run
would have. Each program gets ``{"peak_bytes", "argument_bytes",
"temp_bytes", "output_bytes", "alias_bytes"}``; the resident state (simulation
state with its frozen weights, client data, the evaluation set) is added once.

A program's device peak is estimated as its arguments plus outputs plus
temporaries minus what is aliased (donated), or XLA's own peak where the
backend reports one; the run's peak is the largest of resident + (program
peak - its arguments that are resident anyway). Compiling is what takes the
time (a minute or more for GPT-2 medium on a CPU); nothing runs.

When a program does not fit after all, ``with memory_errors_named(program):`` around
its call turns XLA's out-of-memory error into a :class:`DeviceMemoryError` naming it.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate, resolve_config
from fslsage_jax.split import SplitModel, tree_bytes

GIB = 2 ** 30


class DeviceMemoryError(MemoryError):
    """A program of the run did not fit in device memory.

    Attributes:
      program: which one (``"round step"``, ``"evaluation"``, ...).
      nbytes: the bytes it asked for (None when the backend did not say).
    """

    def __init__(self, program: str, nbytes: int | None, detail: str):
        self.program, self.nbytes, self.detail = program, nbytes, detail
        asked = f"{nbytes:,} bytes ({nbytes / GIB:.2f} GiB)" if nbytes else "an allocation"
        super().__init__(f"the {program} program asked for {asked} and did not fit in device memory")


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory")
_BYTES = re.compile(r"allocating (\d+) bytes|(\d+) bytes")


def as_memory_error(e: Exception, program: str) -> DeviceMemoryError | None:
    """``e`` as a :class:`DeviceMemoryError` if it is XLA's out-of-memory error, else None."""
    text = str(e)
    if not isinstance(e, jax.errors.JaxRuntimeError) or not _OOM.search(text):
        return None
    m = _BYTES.search(text)
    return DeviceMemoryError(program, int(m.group(1) or m.group(2)) if m else None, text.splitlines()[0][:300])


@contextlib.contextmanager
def memory_errors_named(program: str):
    """Re-raise XLA's out-of-memory error inside as a :class:`DeviceMemoryError` naming
    ``program``."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        err = as_memory_error(e, program)
        if err is None:
            raise
        raise err from e


def _stats(compiled) -> dict:
    m = compiled.memory_analysis()
    arg, out, tmp = int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes)
    alias = int(m.alias_size_in_bytes)
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return {"peak_bytes": max(peak, arg + out + tmp - alias), "argument_bytes": arg, "temp_bytes": tmp,
            "output_bytes": out, "alias_bytes": alias}


def abstract_inputs(algo_name: str, split: SplitModel, cfg: Config, n_max: int,
                    eval_shape: tuple[int, ...]) -> tuple[Any, ClientArrays, Any, Any]:
    """``(state, data, test_x, test_y)`` as ``ShapeDtypeStruct`` trees of a run's true shapes."""
    algo = ALGORITHMS[algo_name](split, cfg, n_max)
    state = jax.eval_shape(algo.init, jax.random.key(0))
    m = cfg.num_clients
    data = ClientArrays(jax.ShapeDtypeStruct((m, n_max, *split.input_shape), split.input_dtype),
                        jax.ShapeDtypeStruct((m, n_max, *split.label_shape), jnp.int32),
                        jax.ShapeDtypeStruct((m,), jnp.int32))
    n_test = int(eval_shape[0])
    test_x = jax.ShapeDtypeStruct((n_test, *split.input_shape), split.input_dtype)
    test_y = jax.ShapeDtypeStruct((n_test, *split.label_shape), jnp.int32)
    return state, data, test_x, test_y


def plan(algo_name: str, split: SplitModel, cfg: Config, n_max: int, n_test: int) -> dict:
    """The memory plan of one algorithm's run (see the module docstring).

    Args:
      algo_name: a key of ``ALGORITHMS``.
      split, cfg: the split model and configuration of the run.
      n_max: padded samples per client.
      n_test: evaluation samples.
    Returns:
      ``{"programs": {name: stats}, "resident_bytes", "resident": {...}, "peak_bytes",
      "config": {...}}`` (bytes as integers).
    """
    cfg = resolve_config(cfg, split)
    algo = ALGORITHMS[algo_name](split, cfg, n_max)
    state, data, test_x, test_y = abstract_inputs(algo_name, split, cfg, n_max, (n_test,))
    resident = {"state": tree_bytes(state), "client_data": tree_bytes(data),
                "eval_data": tree_bytes((test_x, test_y))}
    resident_total = sum(resident.values())
    programs = {name: _stats(low.compile()) for name, low in algo.run_round.lower_all(state, data).items()}
    cv, sv = jax.eval_shape(algo.global_model, state)
    evaluate = make_evaluate(split, cfg.eval_batch_size)
    programs["evaluate"] = _stats(evaluate.lower(cv, sv, test_x, test_y).compile())
    # arguments of the round programs are the resident state and data; evaluation reads the
    # global model (a slice of the state) and a minibatch
    peak = max(resident_total + p["peak_bytes"] - min(p["argument_bytes"], resident_total)
               for p in programs.values())
    return {"algo": algo_name, "programs": programs, "resident": resident,
            "resident_bytes": resident_total, "peak_bytes": int(peak),
            "config": {"num_clients": cfg.num_clients, "batch_size": cfg.batch_size,
                       "strategy": cfg.strategy, "step_loop": cfg.step_loop,
                       "eval_batch_size": cfg.eval_batch_size,
                       "align_client_chunk": cfg.align_client_chunk, "n_max": n_max, "n_test": n_test}}


def device_memory_bytes() -> int | None:
    """The first device's memory where the backend reports it (GPU/TPU), else None."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def table(plans: list[dict], limit_bytes: int | None) -> str:
    """A plain-text table of the plans: per program peak, temporaries and arguments (GiB)."""
    rows = [f"{'algo':<18}{'program':<14}{'peak GiB':>10}{'temp GiB':>10}{'args GiB':>10}"]
    for p in plans:
        for name, s in p["programs"].items():
            rows.append(f"{p['algo']:<18}{name:<14}{s['peak_bytes'] / GIB:>10.3f}"
                        f"{s['temp_bytes'] / GIB:>10.3f}{s['argument_bytes'] / GIB:>10.3f}")
        rows.append(f"{p['algo']:<18}{'resident':<14}{p['resident_bytes'] / GIB:>10.3f}")
        fits = "" if limit_bytes is None else ("  fits" if p["peak_bytes"] <= limit_bytes else "  DOES NOT FIT")
        rows.append(f"{p['algo']:<18}{'RUN PEAK':<14}{p['peak_bytes'] / GIB:>10.3f}{fits}")
    if limit_bytes is not None:
        rows.append(f"limit: {limit_bytes / GIB:.1f} GiB")
    return "\n".join(rows)


__all__ = ["plan", "table", "device_memory_bytes", "abstract_inputs", "GIB"]
