from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_precommit_config_is_local_and_names_hooks():
    cfg = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {}
    for repo in cfg["repos"]:
        assert repo["repo"] == "local", "hook repositories cannot be cloned offline"
        for hook in repo["hooks"]:
            assert hook["language"] == "system"
            hooks[hook["id"]] = hook
    assert {"ruff", "ruff-format", "bandit", "pytest", "strip-notebooks"} <= set(hooks)
    # every entry's executable exists in the venv or is make
    for hook in hooks.values():
        exe = hook["entry"].split()[0]
        assert exe == "make" or exe.startswith(".venv/bin/"), exe


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci
    assert "make test" in readme and "make demo" in readme
    assert readme.index("make demo") < readme.index("make test")
