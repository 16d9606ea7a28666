"""The README's API example runs as written, and .ci/run calls README's test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_api_example_runs():
    block = _readme().split("## Use the step functions from your own JAX code")[1]
    code = block.split("```python")[1].split("```")[0]
    ns = {}
    exec(compile(code, "README-example", "exec"), ns)
    assert ns["buf"].size == 32 and ns["avg"].params["Conv_0"]["kernel"].shape == (5, 5, 1, 64)
    assert ns["last"] < ns["first"]


def test_ci_runs_the_readme_test_command():
    cmds = re.findall(r"```bash\n(.*?)\n```", _readme().split("## Two commands")[1].split("##")[0])
    assert len(cmds) == 2 and "experiments/run.py" in cmds[0] and "pytest" in cmds[1]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert cmds[1] in f.read()
