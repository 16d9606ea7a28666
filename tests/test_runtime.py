"""fslsage_jax.runtime: malloc tuning (glibc only) and the persistent compilation cache."""
import json
import os
import subprocess
import sys

from fslsage_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_malloc_opt_out_and_user_settings_win(monkeypatch):
    monkeypatch.setenv("FSLSAGE_MALLOC_TUNING", "0")
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("FSLSAGE_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert runtime.tune_malloc() is False


def test_malloc_is_a_noop_off_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.tune_malloc() is False


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FSLSAGE_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.default_cache_dir() == str(tmp_path / "fslsage_jax" / "jax_cache")
    monkeypatch.setenv("FSLSAGE_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert runtime.default_cache_dir() == str(tmp_path / "c")


def _configure(env, arg):
    code = ("import json, jax; from fslsage_jax.runtime import configure_runtime; "
            f"r = configure_runtime({arg}); jax.jit(lambda x: x + 1)(1.0).block_until_ready(); "
            "print(json.dumps([r, jax.config.jax_enable_compilation_cache, "
            "jax.config.jax_compilation_cache_dir]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_runtime_cache_on_off(tmp_path):
    cache = tmp_path / "cache"
    r, enabled, d = _configure({"FSLSAGE_JAX_CACHE_DIR": str(cache)}, "")
    assert r["compilation_cache_dir"] == str(cache) == d and enabled
    assert any(cache.iterdir())             # the tiny program was written to the cache
    if sys.platform.startswith("linux") and runtime._glibc() is not None:
        assert r["malloc_tuned"] is True
    r, enabled, _ = _configure({"FSLSAGE_JAX_CACHE_DIR": str(cache)}, "compilation_cache=False")
    assert r["compilation_cache_dir"] is None and not enabled
    r, enabled, _ = _configure({"FSLSAGE_JAX_CACHE_DIR": str(cache),
                                "FSLSAGE_NO_COMPILATION_CACHE": "1"}, "")
    assert r["compilation_cache_dir"] is None and not enabled
