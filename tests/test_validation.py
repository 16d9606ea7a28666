"""Every bad flag costs seconds: exit code 2, one line on stderr naming the flag, the
value and what is allowed, no traceback, and nothing written into a fresh --out."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import run

# (argv, text the one line must contain)
BAD = [
    (["--num-clients", "0"], "--num-clients 0: must be a positive integer"),
    (["--rounds", "-1"], "--rounds -1: must be a positive integer"),
    (["--local-epochs", "0"], "--local-epochs 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--server-update-interval", "0"], "--server-update-interval 0"),
    (["--align-interval", "-2"], "--align-interval -2"),
    (["--align-epochs", "0"], "--align-epochs 0"),
    (["--align-batch-size", "0"], "--align-batch-size 0"),
    (["--align-buffer-size", "0"], "--align-buffer-size 0"),
    (["--chunk-size", "0"], "--chunk-size 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: must be a positive integer"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--alpha", "0", "--distribution", "dirichlet"], "--alpha 0.0: must be a finite number > 0"),
    (["--alpha=-inf"], "--alpha -inf: must be a finite number > 0"),
    (["--comm-budget-gib", "0"], "--comm-budget-gib 0.0: must be a finite number > 0"),
    (["--comm-budget-gib", "nan"], "--comm-budget-gib nan"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number >= 0"),
    (["--target-accuracy", "2"], "--target-accuracy 2.0: must lie in [0, 1]"),
    (["--algo", "nope"], "argument --algo: invalid choice: 'nope' (choose from"),
    (["--dataset", "cifar99"], "argument --dataset: invalid choice: 'cifar99'"),
    (["--model", "resnet99"], "argument --model: invalid choice: 'resnet99'"),
    (["--strategy", "fast"], "argument --strategy: invalid choice: 'fast'"),
    (["--step-loop", "while"], "argument --step-loop: invalid choice"),
    (["--distribution", "zipf"], "argument --distribution: invalid choice"),
    (["--rounds", "abc"], "argument --rounds: invalid int value: 'abc'"),
    (["--bogus", "3"], "unrecognized arguments: --bogus 3"),
    (["--num-clients", "5000"], "--num-clients 5000: more clients than the 1437 training samples"),
    (["--batch-size", "1000"], "--batch-size 1000: larger than the smallest client shard (479 samples)"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data: no such file or directory"),
]


def _main_fails(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv, text", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_exits_2_with_one_line_and_writes_nothing(argv, text, tmp_path, capsys):
    line = _main_fails([*argv, "--out", str(tmp_path / "fresh")], capsys)
    assert line.startswith("error: ") and text in line
    assert not (tmp_path / "fresh").exists()


def test_out_checks_create_nothing(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    (tmp_path / "afile").write_text("x")
    assert "--out " in _main_fails(["--out", str(tmp_path / "full")], capsys)
    assert (tmp_path / "full" / "keep").read_text() == "x"
    line = _main_fails(["--out", str(tmp_path / "afile")], capsys)
    assert "exists and is not a directory" in line
    line = _main_fails(["--out", str(tmp_path / "afile" / "sub")], capsys)
    assert "cannot be created" in line and "is not a directory" in line
    line = _main_fails(["--out", "/proc/fslsage-run"], capsys)    # not writable, even for root
    assert line.startswith("error: --out /proc/fslsage-run: cannot be created")
    assert sorted(os.listdir(tmp_path)) == ["afile", "full"]


def test_unreadable_data_maps_to_exit_2(tmp_path, capsys, monkeypatch):
    from fslsage_jax import data

    def broken(*a, **k):
        raise OSError("archive truncated")
    monkeypatch.setattr(data, "load_dataset", broken)
    line = _main_fails(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert line == f"error: --data-dir {tmp_path}: cannot load dataset digits (OSError: archive truncated)"
    assert not (tmp_path / "o").exists()


def test_incompatible_model_and_dataset(tmp_path, capsys, monkeypatch):
    assert run._cnn_input_error((8, 8, 1), 10) is None
    assert "needs images (H, W, C)" in run._cnn_input_error((64,), 10)
    # the real rule: ResNet-18's client part downsamples 8x, digits are 8x8
    line = _main_fails(["--model", "resnet18", "--out", str(tmp_path / "o")], capsys)
    assert line == ("error: --model resnet18: cannot be used with --dataset digits: needs images of "
                    "at least 32x32 (its client part downsamples 8x), got inputs of shape (8, 8, 1)")
    assert not (tmp_path / "o").exists()

    from fslsage_jax import models

    def unbuildable(shape, k):
        raise ValueError("kernel larger than input")
    monkeypatch.setitem(run.MODEL_INPUT_CHECKS, "cnn", lambda shape, k: None)
    monkeypatch.setitem(models.MODELS, "cnn", unbuildable)
    line = _main_fails(["--out", str(tmp_path / "o")], capsys)
    assert line.startswith("error: --model cnn: cannot be built for --dataset digits inputs of shape (8, 8, 1)")
    assert not (tmp_path / "o").exists()


def _fake_run(d, rounds_done=2, **cfg):
    """A run directory with config.json and a checkpoint after ``rounds_done`` rounds."""
    stored = {**vars(run.build_parser().parse_args([])), "out": str(d), **cfg}
    os.makedirs(d / "checkpoints" / f"round_{rounds_done:06d}")
    (d / "checkpoints" / f"round_{rounds_done:06d}" / "meta.json").write_text(json.dumps({"rounds": rounds_done}))
    (d / "config.json").write_text(json.dumps(stored))
    return d


def test_resume_refuses_other_settings_naming_them(tmp_path, capsys):
    d = _fake_run(tmp_path / "r", lr=0.001, seed=0, rounds=10)
    line = _main_fails(["--resume", str(d), "--lr", "0.01", "--seed", "1", "--rounds", "20",
                        "--strategy", "map"], capsys)
    assert line == (f"error: --resume {d}: settings differ from the run's config.json: "
                    f"--lr 0.01 (run: 0.001), --seed 1 (run: 0)")


@pytest.mark.parametrize("extra, text", [
    (["--rounds", "1"], "--rounds 1: the run in {d} has already completed 2 rounds"),
    (["--out", "/tmp/elsewhere"], "--out /tmp/elsewhere: cannot be combined with --resume {d}"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: must be a positive integer"),
])
def test_resume_bad_overrides(tmp_path, capsys, extra, text):
    d = _fake_run(tmp_path / "r")
    assert text.format(d=d) in _main_fails(["--resume", str(d), *extra], capsys)


def test_resume_needs_a_run_directory_with_a_checkpoint(tmp_path, capsys):
    assert _main_fails(["--resume", str(tmp_path / "nope")], capsys) == \
        f"error: --resume {tmp_path / 'nope'}: no such directory"
    assert _main_fails(["--resume", str(tmp_path)], capsys) == \
        f"error: --resume {tmp_path}: not a run directory (no config.json)"
    (tmp_path / "config.json").write_text("{trunc")
    assert "unreadable config.json" in _main_fails(["--resume", str(tmp_path)], capsys)
    (tmp_path / "config.json").write_text(json.dumps(vars(run.build_parser().parse_args([]))))
    assert "no checkpoint yet" in _main_fails(["--resume", str(tmp_path)], capsys)
    os.makedirs(tmp_path / "checkpoints" / ".tmp-round_000002")        # a cut-short save is no checkpoint
    assert "no checkpoint yet" in _main_fails(["--resume", str(tmp_path)], capsys)


def test_resume_plan_of_an_all_run(tmp_path):
    def sub(name, summary=None, ckpt=False):
        d = tmp_path / name
        d.mkdir()
        if summary:
            (d / "summary.json").write_text(json.dumps(summary))
        if ckpt:
            os.makedirs(d / "checkpoints" / "round_000002")
            (d / "checkpoints" / "round_000002" / "meta.json").write_text("{}")
        return str(d)
    done = {"stop_reason": "rounds", "rounds_run": 5}
    assert run.resume_plan(sub("a", done, True), 5) == ("skip", done)
    assert run.resume_plan(sub("b", done, True), 8) == ("resume", None)          # --rounds raised
    assert run.resume_plan(sub("c", {"stop_reason": "diverged", "rounds_run": 1}), 5)[0] == "skip"
    assert run.resume_plan(sub("d", {"stop_reason": "interrupted", "rounds_run": 2}, True), 5)[0] == "resume"
    assert run.resume_plan(sub("e"), 5) == ("fresh", None)


def test_subprocess_error_is_one_line_without_traceback_within_seconds(tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algo", "fedsgd",
                        "--out", str(tmp_path / "o")], check=False, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: argument --algo: invalid choice: 'fedsgd' (choose from 'fed_avg'")
    assert not (tmp_path / "o").exists()
    assert time.time() - t0 < 60
