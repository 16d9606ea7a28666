"""The CLI with the paper's models: presets, offline --describe, model/dataset checks, and a
whole GPT-2 + LoRA run (pretrained weights, E2E CSVs, tokenizer, generation, BLEU) on tiny files."""
import csv
import importlib.util
import json
import math
import os

import pytest

from test_gpt2 import hf_tensors, write_hf_folder

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("run", os.path.join(HERE, "..", "experiments", "run.py"))
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)


def test_describe_resnet18_cifar100_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # no data anywhere
    assert run.main(["--dataset", "cifar100", "--model", "resnet18", "--describe"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["param_counts"] == {"client": 683072, "server": 10544740, "aux": 2125412,
                                 "full": 683072 + 10544740}
    assert d["state_counts"]["client"] == 1920 and d["cut_shape"] == [4, 4, 128]


def test_describe_gpt2_medium_lora(capsys):
    assert run.main(["--preset", "e2e_gpt2_medium", "--describe"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["param_counts"]["client"] + d["param_counts"]["server"] == 393_216
    assert d["cut_shape"] == [512, 1024]


def test_preset_sets_paper_values_and_explicit_flags_win(capsys):
    a = run.build_parser("cifar10_resnet18").parse_args(["--batch-size", "32"])
    assert (a.dataset, a.model, a.num_clients, a.batch_size, a.lr, a.weight_decay) == (
        "cifar10", "resnet18", 10, 32, 1e-3, 1e-4)
    assert (a.server_update_interval, a.align_interval, a.align_epochs, a.align_batch_size,
            a.align_buffer_size, a.rounds, a.comm_budget_gib, a.target_accuracy) == (
        5, 10, 100, 1000, 1000, 200, 200.0, 0.81)
    g = run.build_parser("e2e_gpt2_medium").parse_args([])
    assert (g.optimizer, g.lr, g.weight_decay, g.adam_eps, g.warmup_steps, g.batch_size, g.seq_len,
            g.align_epochs, g.align_batch_size, g.align_buffer_size) == (
        "adamw", 2e-4, 0.01, 1e-6, 500, 8, 512, 40, 8, 64)
    assert run.main(["--preset", "cifar10_resnet18", "--num-clients", "4", "--describe"]) == 0
    err = capsys.readouterr().err
    assert "preset cifar10_resnet18:" in err and "--num-clients 10 (overridden: 4)" in err


@pytest.mark.parametrize("argv, words", [
    (["--model", "gpt2"], "--model gpt2: cannot be used with --dataset digits"),
    (["--dataset", "e2e"], "--model cnn: cannot be used with --dataset e2e"),
    (["--model", "resnet18"], "needs images of at least 32x32"),
    (["--model", "gpt2", "--dataset", "e2e", "--distribution", "dirichlet"], "--distribution dirichlet"),
    (["--generate", "3"], "--generate 3: only for --model gpt2"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
])
def test_model_dataset_mismatch_exit_2(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _byte_tokenizer(path):
    """A byte-level GPT-2 BPE without merges: every byte is a token, plus <|endoftext|>."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(sorted(cs))}
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")


def test_gpt2_e2e_cli_pretrained_generation_bleu(tmp_path):
    from fslsage_jax.models.gpt2 import GPT2Config
    tok = tmp_path / "tok"
    _byte_tokenizer(tok)
    c = GPT2Config(vocab_size=257, n_positions=48, n_embd=16, n_layer=4, n_head=2)
    hf = tmp_path / "hf"
    hf.mkdir()
    write_hf_folder(hf, c, hf_tensors(c))
    data = tmp_path / "e2e"
    data.mkdir()
    for name, n in (("trainset.csv", 16), ("devset.csv", 6)):
        with open(data / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mr", "ref"])
            for i in range(n):
                w.writerow([f"name[P{i % 3}], food[F{i % 2}]", f"P{i % 3} serves F{i % 2}."])
    out = tmp_path / "run"
    code = run.main(["--model", "gpt2", "--dataset", "e2e", "--data-dir", str(data), "--tokenizer",
                     str(tok), "--pretrained", str(hf), "--seq-len", "40", "--num-clients", "2",
                     "--batch-size", "4", "--rounds", "2", "--optimizer", "adamw", "--lr", "1e-2",
                     "--align-interval", "1", "--align-epochs", "1", "--align-batch-size", "4",
                     "--align-buffer-size", "8", "--generate", "2", "--max-new-tokens", "8",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(recs) == 2 and all(r["perplexity"] == pytest.approx(math.exp(r["test_loss"])) for r in recs)
    s = json.load(open(out / "summary.json"))
    assert s["param_counts"]["client"] == 2 * 2 * 16 * 4          # the pretrained config's width
    assert isinstance(s["bleu"], float) and s["generated"] == 2
    gens = json.load(open(out / "generations.json"))
    assert len(gens) == 2 and all(len(g["references"]) >= 1 for g in gens)


def test_cifar_without_data_or_network_is_one_line_and_fast(tmp_path):
    """A subprocess (pytest would capture tfds's log records): exit 2, ONE line naming both ways."""
    import subprocess
    import sys
    import time
    env = {**os.environ, "FSLSAGE_OFFLINE": "1", "TFDS_DATA_DIR": str(tmp_path / "tfds"),
           "PYTHONPATH": os.path.join(HERE, ".."), "JAX_PLATFORMS": "cpu"}
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(HERE, "..", "experiments", "run.py"), "--dataset",
                        "cifar10", "--model", "resnet18", "--out", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True, timeout=60)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, err
    assert "--data-dir" in err[0] and "tfds" in err[0] and time.time() - t0 < 60   # not the ~205 s tfds retry loop
    assert not (tmp_path / "o").exists()
