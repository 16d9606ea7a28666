"""The command line: --describe, --help, validation, outputs of a small run."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import run  # noqa: E402


def test_describe_matches_spec_reference_sizes(capsys):
    # a 32x32x3 input and 10 classes: the original code's sizes
    assert run.main(["--dataset", "synthetic", "--describe"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["param_counts"] == {"client": 107328, "server": 1649098, "aux": 40970,
                                 "full": 107328 + 1649098}
    assert d["cut_shape"] == [4096] and d["cut_bytes_per_sample"] == 4096 * 4
    assert d["model_bytes"]["client"] == 107328 * 4 and d["state_counts"]["client"] == 0


def test_help_lists_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--algo", "--dataset", "--model", "--num-clients", "--rounds", "--local-epochs",
                 "--batch-size", "--lr", "--weight-decay", "--seed", "--server-update-interval",
                 "--align-interval", "--align-epochs", "--align-batch-size",
                 "--align-buffer-size", "--distribution", "--alpha", "--comm-budget-gib",
                 "--data-dir", "--out", "--strategy", "--describe"]:
        assert flag in text
    assert "(default: fsl_sage)" in text and "(default: 256)" in text


@pytest.mark.parametrize("argv, flag", [
    (["--num-clients", "0"], "--num-clients"), (["--alpha", "-1"], "--alpha"),
    (["--comm-budget-gib", "0"], "--comm-budget-gib"), (["--server-update-interval", "0"], "--server-update-interval"),
    (["--num-clients", "5000"], "--num-clients")])
def test_bad_values_exit_2_with_one_line(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
    assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        run.main(["--out", str(tmp_path), "--rounds", "1"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_auto_strategy_follows_the_measurements():
    from fslsage_jax.algorithms.lifting import AUTO_CHUNK_SIZE, auto_settings, auto_strategy
    assert auto_settings("cpu", (8, 8, 1), 1024) == {"strategy": "chunked", "chunk_size": AUTO_CHUNK_SIZE}
    assert auto_settings("cpu", (8, 8, 1), AUTO_CHUNK_SIZE) == {"strategy": "vmap"}   # few digits clients
    assert auto_strategy("cpu", (32, 32, 3), 4) == "unroll"    # CIFAR-sized: unroll 3.4x faster
    assert auto_strategy("cpu", (32, 32, 3), 64) == "vmap"     # unroll's compile grows with m
    assert auto_strategy("cpu", (16,)) == "vmap"               # not an image
    assert auto_strategy("gpu", (32, 32, 3)) == "vmap"
