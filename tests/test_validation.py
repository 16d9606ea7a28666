"""Every bad flag costs seconds: exit code 2, one line on stderr naming the flag, the
value and what is allowed, no traceback, and nothing written into a fresh --out."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import run

from fslsage_jax import experiment
from fslsage_jax.experiment import tasks

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
    line = _main_fails(["--dataset", "cifar10", "--model", "resnet18", "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "o")], capsys)
    assert line == f"error: --data-dir {tmp_path}: cannot load dataset cifar10 (OSError: archive truncated)"
    assert not (tmp_path / "o").exists()


def test_incompatible_model_and_dataset(tmp_path, capsys, monkeypatch):
    cnn = tasks.BUILTIN_MODELS["cnn"]
    assert cnn.input_error((8, 8, 1), 10) is None
    assert "needs images (H, W, C)" in cnn.input_error((64,), 10)
    # the real rule: ResNet-18's client part downsamples 8x, digits are 8x8
    line = _main_fails(["--model", "resnet18", "--out", str(tmp_path / "o")], capsys)
    assert line == ("error: --model resnet18: cannot be used with --dataset digits: needs images of "
                    "at least 32x32 (its client part downsamples 8x), got inputs of shape (8, 8, 1)")
    assert not (tmp_path / "o").exists()

    from fslsage_jax import models

    def unbuildable(shape, k):
        raise ValueError("kernel larger than input")
    monkeypatch.setitem(tasks.BUILTIN_MODELS, "cnn", dataclasses.replace(cnn, input_error=lambda shape, k: None))
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
    assert experiment.resume_plan(sub("a", done, True), 5) == ("skip", done)
    assert experiment.resume_plan(sub("b", done, True), 8) == ("resume", None)          # --rounds raised
    assert experiment.resume_plan(sub("c", {"stop_reason": "diverged", "rounds_run": 1}), 5)[0] == "skip"
    assert experiment.resume_plan(sub("d", {"stop_reason": "interrupted", "rounds_run": 2}, True), 5)[0] == "resume"
    assert experiment.resume_plan(sub("e"), 5) == ("fresh", None)


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


# flags that cannot have an effect: (argv, the one line must contain); issue 13 item 7
USELESS = [
    (["--alpha", "0.5"], "--alpha 0.5: only for --distribution dirichlet"),
    (["--data-dir", ROOT], f"--data-dir {ROOT}: --dataset digits reads no files"),
    (["--dataset", "synthetic", "--data-dir", ROOT], "--data-dir"),
    (["--algo", "cse_fsl", "--align-epochs", "3"], "--align-epochs 3: not used by --algo cse_fsl (only by fsl_sage)"),
    (["--algo", "fed_avg", "--align-interval", "2"], "--align-interval 2: not used by --algo fed_avg"),
    (["--algo", "sl_multi_server", "--align-batch-size", "8"], "--align-batch-size 8: not used by"),
    (["--algo", "sl_single_server", "--align-buffer-size", "8"], "--align-buffer-size 8: not used by"),
    (["--algo", "fed_avg", "--server-update-interval", "2"],
     "--server-update-interval 2: not used by --algo fed_avg (only by cse_fsl, fsl_sage)"),
    (["--algo", "sl_single_server", "--server-update-interval", "5"], "--server-update-interval 5"),
    (["--gpt2-size", "tiny"], "--gpt2-size tiny: only for --model gpt2"),
    (["--pretrained", "gpt2"], "--pretrained gpt2: only for --model gpt2"),
    (["--tokenizer", "gpt2"], "--tokenizer gpt2: only for --model gpt2"),
    (["--seq-len", "64"], "--seq-len 64: only for --model gpt2"),
    (["--e2e-splits", "train,test"], "--e2e-splits train,test: only for --model gpt2"),
    (["--max-new-tokens", "8"], "--max-new-tokens 8: only for --model gpt2"),
    (["--chunk-size", "4"], "--chunk-size 4: only for --strategy chunked"),
    (["--strategy", "vmap", "--chunk-size", "4"], "--chunk-size 4: only for --strategy chunked (not vmap)"),
    (["--model", "gpt2", "--dataset", "e2e", "--max-new-tokens", "8"], "--max-new-tokens 8: only with --generate"),
    (["--model", "gpt2", "--dataset", "e2e", "--pretrained", ROOT, "--gpt2-size", "tiny"],
     "--gpt2-size tiny: the shape comes from --pretrained"),
]


@pytest.fixture
def no_data(monkeypatch):
    """Loading any data fails the test: flags must be refused before."""
    from fslsage_jax import data
    from fslsage_jax.data import e2e

    def touched(*a, **k):
        pytest.fail("data loaded")
    monkeypatch.setattr(data, "load_dataset", touched)
    monkeypatch.setattr(e2e, "load_e2e", touched)


@pytest.mark.parametrize("argv, text", USELESS, ids=[" ".join(a) for a, _ in USELESS])
def test_flag_without_effect_exits_2_before_loading_data(argv, text, tmp_path, capsys, no_data):
    line = _main_fails([*argv, "--out", str(tmp_path / "fresh")], capsys)
    assert line.startswith("error: ") and text in line
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("argv", [
    ["--algo", "all", "--align-epochs", "3", "--server-update-interval", "2"],   # some algorithm uses them
    ["--algo", "cse_fsl", "--server-update-interval", "2"],
    ["--preset", "e2e_gpt2_tiny", "--algo", "cse_fsl"],       # align-* set by the preset: not explicit
    ["--preset", "cifar10_resnet18", "--algo", "fed_avg"],
    ["--distribution", "dirichlet", "--alpha", "0.5"],
    ["--strategy", "chunked", "--chunk-size", "4"],
    ["--model", "gpt2", "--dataset", "e2e", "--seq-len", "64", "--gpt2-size", "tiny", "--generate", "2",
     "--max-new-tokens", "8"],
], ids=lambda a: " ".join(a))
def test_flags_with_an_effect_are_accepted(argv, capsys, no_data):
    assert run.main([*argv, "--describe"]) == 0


def test_library_validate_refuses_the_same():
    from fslsage_jax.experiment import ConfigError, ExperimentConfig, preset_config
    from fslsage_jax.experiment import validate as library_validate

    def validate(cfg, explicit=None):       # the library's checks; its errors worded as the CLI words them
        try:
            library_validate(cfg, explicit)
        except ConfigError as e:
            raise ConfigError("{}", e.render(run.flag), field=e.field) from e

    with pytest.raises(ConfigError, match="--align-epochs 3: not used by --algo cse_fsl"):
        validate(ExperimentConfig(algo="cse_fsl", align_epochs=3))
    with pytest.raises(ConfigError, match="--batch-size 0: must be a positive integer"):
        validate(ExperimentConfig(batch_size=0))
    with pytest.raises(ConfigError, match="--algo nope: choose from fed_avg"):
        validate(ExperimentConfig(algo="nope"))
    validate(preset_config("e2e_gpt2_tiny", algo="cse_fsl"))          # preset values count as defaults
    validate(ExperimentConfig(algo="cse_fsl", align_epochs=3), explicit={"algo"})
    # the library names the settings by their field names, no flags
    with pytest.raises(ConfigError) as e:
        library_validate(ExperimentConfig(algo="cse_fsl", align_epochs=3))
    assert e.value.field == "align_epochs"
    assert str(e.value) == "align_epochs 3: not used by algo cse_fsl (only by fsl_sage)"
    with pytest.raises(ConfigError) as e:
        library_validate(ExperimentConfig(model="gpt2"))
    assert e.value.field == "model" and "--" not in str(e.value)


def test_batch_larger_than_every_shard_is_one_step_on_the_whole_shard(tmp_path):
    """Issue 13 item 6: 4 clients of 6 images (synthetic, digits' 8x8x1 and CNN), batch 256:
    ceil(6 / 256) = 1 step per epoch on the whole shard; FSL-SAGE uploads every sample at k = 0,
    SplitFed-MS (2 epochs) twice."""
    data = ["--dataset", "synthetic", "--synthetic-shape", "8x8x1", "--synthetic-samples-per-client", "6",
            "--eval-subset", "32", "--num-clients", "4", "--no-progress"]
    out = tmp_path / "sage"
    assert run.main(["--algo", "fsl_sage", *data, "--rounds", "2", "--align-epochs", "1",
                     "--align-batch-size", "8", "--align-buffer-size", "8", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n, z = sum(s["client_sample_counts"]), 4 * s["cut_shape"][0]
    assert max(s["client_sample_counts"]) < 256 and n == 4 * 6
    assert [r["comm"]["smashed_up"] for r in recs] == [n * z, 2 * n * z]
    assert [r["comm"]["labels_up"] for r in recs] == [4 * n, 8 * n]
    assert recs[-1]["comm"]["model_up"] == 2 * 4 * s["model_bytes"]["client"]
    assert [r["comm"]["aux_down"] for r in recs] == [4 * s["model_bytes"]["aux"]] * 2   # aligned at round 0 only
    stored = json.loads((out / "config.json").read_text())
    assert stored["provenance"] == "experiment_config" and stored["dataset"] == "synthetic"
    out = tmp_path / "ms"
    assert run.main(["--algo", "sl_multi_server", *data, "--rounds", "1", "--local-epochs", "2",
                     "--out", str(out)]) == 0
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec["comm"]["smashed_up"] == rec["comm"]["grad_down"] == 2 * n * z


# ----------------------------------------------------------------------------- provenance (issue 17 item 1)
def test_run_from_user_objects_records_its_provenance_and_resume_refuses_it(tmp_path, capsys):
    """An Experiment built from the user's own dataset and split model: config.json says
    user_objects and names no built-in dataset or model; --resume refuses it (exit 2, one line)
    instead of rebuilding digits + cnn."""
    import numpy as np
    from conftest import make_toy
    from fslsage_jax.data import Dataset, partition, to_client_arrays
    from fslsage_jax.experiment import (ConfigError, Experiment, ExperimentConfig, algorithm_config,
                                        resume_config)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
    ds = Dataset("mine", x[:24], y[:24], x[24:], y[24:], 3)
    clients = to_client_arrays(ds.x_train, ds.y_train, partition(ds.y_train, 3, "iid", 1.0, 3, 0))
    out = tmp_path / "mine"
    cfg = ExperimentConfig(algo="sl_single_server", num_clients=3, rounds=1, batch_size=4, strategy="vmap",
                           checkpoint_every=1, out=str(out), no_progress=True)
    (s,) = experiment.run(Experiment(cfg, ds, make_toy(), clients, algorithm_config(cfg)))
    assert s["rounds_run"] == 1
    stored = json.loads((out / "config.json").read_text())
    assert stored["provenance"] == "user_objects"
    assert stored["dataset"] is None and stored["model"] is None and stored["preset"] is None
    assert stored["n_train"] == 24 and stored["input_shape"] == [4] and stored["rounds"] == 1
    line = _main_fails(["--resume", str(out)], capsys)
    assert line.startswith(f"error: --resume {out}: its config.json says provenance user_objects")
    with pytest.raises(ConfigError) as e:
        resume_config(ExperimentConfig(resume=str(out)))
    assert e.value.field == "resume" and "--" not in str(e.value)


def test_run_config_provenance_and_older_runs(tmp_path, capsys):
    from fslsage_jax.experiment import rundir
    assert rundir.provenance({"dataset": "digits"}) == "experiment_config"       # a run from before the key
    with pytest.raises(ValueError, match="provenance 'mine'"):
        rundir.write_run_config(str(tmp_path), {}, "mine")
    path = rundir.write_run_config(str(tmp_path), {"a": 1}, "experiment_config")
    assert json.loads(open(path).read()) == {"a": 1, "provenance": "experiment_config"}
    d = _fake_run(tmp_path / "old")                                   # no provenance key: resumable
    assert "provenance" not in json.loads((d / "config.json").read_text())
    assert "--rounds 1: the run in" in _main_fails(["--resume", str(d), "--rounds", "1"], capsys)
