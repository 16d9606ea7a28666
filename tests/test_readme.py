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


def _docs():
    """README.md and every docs/*.md: {relative path: text}."""
    paths = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if f.endswith(".md")]
    out = {}
    for p in paths:
        with open(os.path.join(ROOT, p)) as f:
            out[p] = f.read()
    return out


def test_docs_links_resolve_and_every_figure_is_shown():
    docs = _docs()
    assert "docs/semantics.md" in docs
    for path, text in docs.items():
        assert "SPEC" not in text, f"{path} cites SPEC.md, which is not part of this repository"
        prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))   # no code
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target:
                resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target))
                assert os.path.exists(resolved), f"{path}: broken link {target}"
    figures = os.listdir(os.path.join(ROOT, "docs", "figures"))
    assert figures and all(f"(docs/figures/{f})" in docs["README.md"] for f in figures)


def test_flag_table_lists_every_cli_flag():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_readme_run", os.path.join(ROOT, "experiments", "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    flags = {o for a in run.build_parser()._actions for o in a.option_strings if o.startswith("--")}
    table = _readme().split("| flag | meaning |")[1].split("\n\n")[0]
    missing = sorted(f for f in flags - {"--help"} if f"`{f}" not in table)
    assert not missing, f"README's flag table omits {missing}"
