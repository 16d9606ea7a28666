"""README's "Run an experiment from Python" example runs as written, through the library's
experiment builder (no CLI), and trains FSL-SAGE on digits."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs_fsl_sage_on_digits(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        block = f.read().split("## Run an experiment from Python")[1]
    code = block.split("```python")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 12
    ns = {}
    exec(compile(code, "README-library-example", "exec"), ns)
    s, exp = ns["summary"], ns["exp"]
    assert s["algo"] == "fsl_sage" and s["rounds_run"] == 3 and s["stop_reason"] == "rounds"
    assert s["client_sample_counts"] == [125] * 4
    assert exp.config.strategy == "vmap"                         # "auto": 4 digits clients on CPU
    z = 4 * s["cut_shape"][0]
    # 125 samples, batch 32: local steps k = 0..3, of which (Q = 5) k = 0 uploads 32 samples
    assert s["comm"]["smashed_up"] == 3 * 4 * 32 * z and s["comm"]["labels_up"] == 3 * 4 * 32 * 4
    assert s["comm"]["aux_down"] == 4 * s["model_bytes"]["aux"]   # aligned at round 0 (l = 10)
    assert s["comm"]["model_up"] == 3 * 4 * s["model_bytes"]["client"]
    assert s["final_accuracy"] > 0.15                            # chance: 0.1
    assert f"{s['final_accuracy']}" in capsys.readouterr().out
