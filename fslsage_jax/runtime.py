"""Process-level runtime settings that make simulations faster on CPU.

Call :func:`configure_runtime` once, at the start of a program, before the first
JAX computation (the CLI ``experiments/run.py`` does). It does two things:

1. **Keeps freed memory in the process (glibc only).** XLA:CPU allocates large
   scratch buffers every step; glibc's default ``malloc`` serves them with
   ``mmap`` and returns them to the OS on ``free``, so every step faults fresh
   zeroed pages in again (on a 4-client digits run: millions of minor page
   faults, about 15 s of system time in 40 rounds, ~40% of a round). We call
   ``mallopt`` through ``ctypes`` so that large blocks come from the heap and
   freed memory is not trimmed back to the OS. Memory that was once in use stays
   mapped (the peak resident set is unchanged; it is simply not given back between
   steps). Equivalent to starting the process with ``MALLOC_MMAP_MAX_=0
   MALLOC_TRIM_THRESHOLD_=<large>``. Off glibc (macOS, musl, Windows) it does
   nothing. Opt out with ``FSLSAGE_MALLOC_TUNING=0``; the glibc environment
   variables above, when set by the user, win.

2. **Enables JAX's persistent compilation cache**, so a second run of the same
   configuration loads its compiled programs from disk instead of compiling
   them (round 0 of the digits run: seconds -> a fraction of that). The cache
   directory is, in order: ``$FSLSAGE_JAX_CACHE_DIR``, JAX's own
   ``jax_compilation_cache_dir`` / ``$JAX_COMPILATION_CACHE_DIR`` when the user
   set one, else ``$XDG_CACHE_HOME/fslsage_jax/jax_cache`` (``~/.cache/...``).
   Every program is cached (no minimum compile time). Turn it off with
   ``configure_runtime(compilation_cache=False)``, the CLI flag
   ``--no-compilation-cache`` or ``FSLSAGE_NO_COMPILATION_CACHE=1``. The cache
   is safe to delete at any time.

Library users who drive :func:`fslsage_jax.simulate.run_simulation` from their
own program get neither unless they call ``configure_runtime()`` themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

# Keep up to this many freed bytes at the top of the heap instead of trimming.
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20

_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v.strip().lower() in _TRUE


def _glibc():
    """The C library handle when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        ver = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    ver.restype = ctypes.c_char_p
    return libc if ver() else None


def tune_malloc() -> bool:
    """Ask glibc to keep freed memory (no mmap for large blocks, no trimming).

    Returns:
      True if the settings were applied; False off glibc, when opted out with
      ``FSLSAGE_MALLOC_TUNING=0``, or when the user set ``MALLOC_MMAP_MAX_`` /
      ``MALLOC_TRIM_THRESHOLD_`` themselves (theirs are kept).
    """
    if not _env_flag("FSLSAGE_MALLOC_TUNING", True):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                     "MALLOC_TOP_PAD_")):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    ok &= mallopt(_M_TOP_PAD, _TOP_PAD) == 1
    return bool(ok)


def user_cache_dir(name: str, env: str) -> str:
    """``$<env>`` if set, else ``$XDG_CACHE_HOME/fslsage_jax/<name>`` (``~/.cache/...``)."""
    d = os.environ.get(env)
    if d:
        return os.path.expanduser(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fslsage_jax", name)


def default_cache_dir() -> str:
    """``$FSLSAGE_JAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/fslsage_jax/jax_cache``."""
    return user_cache_dir("jax_cache", "FSLSAGE_JAX_CACHE_DIR")


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for every program.

    Args:
      cache_dir: where compiled programs go (None: an explicit
        ``$FSLSAGE_JAX_CACHE_DIR``, else JAX's configured directory if any, else
        :func:`default_cache_dir`).
    Returns:
      the directory in use, or None if it could not be created (the cache stays off).
    """
    import jax
    if cache_dir is None:
        cache_dir = (os.environ.get("FSLSAGE_JAX_CACHE_DIR")
                     or jax.config.jax_compilation_cache_dir or default_cache_dir())
    cache_dir = os.path.expanduser(cache_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for this process."""
    import jax
    jax.config.update("jax_enable_compilation_cache", False)


def configure_runtime(compilation_cache: bool = True) -> dict:
    """Apply the process-level speed settings; call once at program start.

    Args:
      compilation_cache: enable JAX's persistent compilation cache (also off when
        ``FSLSAGE_NO_COMPILATION_CACHE=1``); False turns it off for this process.
    Returns:
      ``{"malloc_tuned": bool, "compilation_cache_dir": str | None}``.
    """
    tuned = tune_malloc()
    cache = None
    if compilation_cache and not _env_flag("FSLSAGE_NO_COMPILATION_CACHE", False):
        cache = enable_compilation_cache()
    else:
        disable_compilation_cache()
    return {"malloc_tuned": tuned, "compilation_cache_dir": cache}
