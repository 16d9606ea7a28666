"""Shared fixtures: a tiny dense split model that compiles in about a second."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Tests run tiny programs, so compiling them costs far more than running them. Two XLA:CPU
# settings each halve compilation: LLVM at -O0 (a toy FSL-SAGE round 7 s -> 3.5 s) and the
# legacy elemental emitters instead of the MLIR fusion emitters (test_equivalence +
# test_fidelity 104 -> 57 CPU-s at -O0). Results move only by float rounding (measured: the
# same size as -O0 vs -O2 after three CNN rounds), which no test depends on. Set before
# any backend starts; xdist workers and CLI subprocesses inherit them. A setting already in
# $XLA_FLAGS wins. XLA aborts on a flag it does not know (newer XLA drops the legacy
# emitters), so that one is kept only if a one-line JAX program accepts it.


def _xla_accepts(flags: str) -> bool:
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _flags and _xla_accepts(f"{_flags} --xla_cpu_use_fusion_emitters=false"):
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# load_digits keeps its split in a cache directory: a temporary one for the tests (the
# xdist workers inherit it), not ~/.cache
if "FSLSAGE_JAX_DATA_CACHE" not in os.environ:
    os.environ["FSLSAGE_JAX_DATA_CACHE"] = _data_cache = tempfile.mkdtemp(prefix="fslsage-data-")
    atexit.register(shutil.rmtree, _data_cache, ignore_errors=True)

import flax.linen as nn
import jax
import pytest

jax.config.update("jax_enable_x64", False)

import types

import numpy as np

from fslsage_jax.algorithms.config import Config
from fslsage_jax.split import SplitModel


class ToyClient(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))


class ToyServer(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, z, train=False):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(5)(z)))


class ToyAux(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, z, train=False):
        return nn.Dense(self.num_classes)(z)


def make_toy(num_classes: int = 3) -> SplitModel:
    """Input 4 features -> cut 6 -> 3 classes; auxiliary is linear."""
    return SplitModel("toy", ToyClient(), ToyServer(num_classes), ToyAux(num_classes), (4,),
                      num_classes)


@pytest.fixture
def toy():
    return make_toy()


def toy_client_data(m=3, n=6, seed=0):
    """Uneven toy shards for :func:`make_toy`: ``x [m, n, 4]``, labels 0..2, counts n, n-1, n-2."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, n, 4)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0.5)
    counts = np.array([n, n - 1, n - 2][:m], np.int32)
    return types.SimpleNamespace(x=x, y=y.astype(np.int32), counts=counts)


def toy_config(**kw):
    """A small Config for the toy model (3 clients, batch 2, Q = 2, l = 2, short alignment)."""
    base = {"num_clients": 3, "batch_size": 2, "server_update_interval": 2, "align_interval": 2,
            "align_epochs": 2, "align_batch_size": 4, "align_buffer_size": 6}
    return Config(**{**base, **kw})


# Runs the CLI's main() with the rename that publishes checkpoint round N (argv[1]) replaced by
# SIGKILL: the process dies in the middle of that save, after orbax wrote the state. Format with
# ``experiments=`` the experiments folder, write to a file, run it with N and the CLI's flags.
KILL_IN_SAVE = """
import os, signal, sys
doomed = ".tmp-round_%06d" % int(sys.argv[1])
replace = os.replace

def replace_or_die(src, dst, *a, **k):
    if os.path.basename(os.fspath(src)) == doomed:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *a, **k)

os.replace = replace_or_die
sys.path.insert(0, {experiments!r})
import run
sys.exit(run.main(sys.argv[2:]))
"""


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def cli_main(argv):
    """``experiments/run.py``'s ``main(argv)`` in this process (a CLI process costs seconds of
    imports and tracing; tests that need none of its process behaviour call this)."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    import run
    return run.main(argv)


def _cache_dir(tmp_path_factory):
    """This run's persistent compilation cache: one folder for the whole session, shared by the
    xdist workers (their base temporary folders have one parent) and the CLI subprocesses."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "xla-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every test process compiles into (and loads from) one fresh persistent cache: tests that
    build the same program again (a new algorithm object, another worker, a CLI run) load it
    instead of compiling it; a fresh folder keeps the run independent of ``~/.cache``."""
    from fslsage_jax.runtime import enable_compilation_cache
    return enable_compilation_cache(_cache_dir(tmp_path_factory))


@pytest.fixture(autouse=True)
def _keep_compilation_cache(compilation_cache):
    """A test that turns the cache off (``--no-compilation-cache``) turns it off for itself only."""
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", compilation_cache)


@pytest.fixture(scope="session")
def env(compilation_cache):
    """Environment of CLI subprocesses: this tree first, the session's compilation cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": compilation_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
