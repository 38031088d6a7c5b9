"""The README's Python API section, executed exactly as written (on a tiny copy of the demo
config: 64 px, 2 folds of one step), and the package top's exports."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_DEMO

TINY = TINY_DEMO  # (conftest)


def readme_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


def test_the_readme_python_api_section_runs(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for key, values in TINY.items():
        cfg.setdefault(key, {}).update(values)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # in a fresh interpreter, from the folder the block expects to be run in (the repo root)
    proc = subprocess.run([sys.executable, "-c", readme_block()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"CV Dice 0\.\d{4} with \w+ post-processing", lines[0]), lines
    assert re.fullmatch(r"submissions/demo\.csv: 60 rows, test Dice [01]\.\d{4}", lines[1]), lines
    assert (tmp_path / "runs" / "demo" / "postprocess.yaml").is_file()
    assert (tmp_path / "data" / "synthetic" / ".pneumoseg-synthetic").is_file()


def test_import_is_light_and_the_phases_resolve():
    code = (
        "import sys, pneumoseg\n"
        "assert 'torch' not in sys.modules, 'import pneumoseg imported torch'\n"
        "for name in pneumoseg.__all__:\n"
        "    assert callable(getattr(pneumoseg, name)) or name == '__version__', name\n"
        "print(sorted(set(pneumoseg.__all__) & set(dir(pneumoseg))) == sorted(pneumoseg.__all__))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-3000:]


def test_an_unknown_name_is_an_attribute_error():
    import pneumoseg

    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        pneumoseg.fitt  # noqa: B018
