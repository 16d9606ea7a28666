"""--memory-plan: every program compiled from abstract inputs, a JSON plan, exit 4 when over."""
import json

from conftest import cli_main


def test_cli_memory_plan_writes_the_plan_and_refuses_a_too_small_device(tmp_path, capsys):
    """The CLI's main() in this process (a CLI start costs seconds); main's value is the exit code."""
    out = tmp_path / "plan"
    code = cli_main(["--memory-plan", "--num-clients", "2", "--batch-size", "8", "--train-subset", "64",
                     "--eval-subset", "32", "--align-batch-size", "16", "--align-buffer-size", "16",
                     "--device-memory-gib", "0.001", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 4, stderr
    assert "DOES NOT FIT" in stdout and "round_step" in stdout
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["limit_bytes"] == int(0.001 * 2 ** 30)
    (only,) = plan["plans"]
    assert only["algo"] == "fsl_sage" and only["config"]["n_max"] == 32 and only["config"]["n_test"] == 32
    assert set(only["programs"]) == {"round_begin", "round_step", "round_finish", "evaluate"}
    assert only["peak_bytes"] > plan["limit_bytes"]
    # digits 8x8x1 float32: 2 clients x 32 samples x (64 x 4 + 4 label bytes) + 2 counts
    assert only["resident"]["client_data"] == 2 * 32 * (64 * 4 + 4) + 2 * 4
    assert not (out / "metrics.jsonl").exists()          # nothing ran
