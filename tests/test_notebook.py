"""The EDA notebook: stored stripped, and runs headless on tiny datasets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "eda.ipynb"


def strip_tool(*args):
    """``make strip-notebooks`` (or ``check-notebooks`` with ``--check``) on the given notebook:
    nbstripout with the project's flags, as make test and the pre-commit hook run it."""
    target = "check-notebooks" if "--check" in args else "strip-notebooks"
    paths = " ".join(str(a) for a in args if a != "--check")
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), target, f"NOTEBOOKS={paths}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_stored_notebook_has_no_outputs():
    r = strip_tool("--check", NOTEBOOK)
    assert r.returncode == 0, r.stdout + r.stderr
    nb = json.loads(NOTEBOOK.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "parameters" in first["metadata"].get("tags", [])
    assert 'CONFIG = "configs/demo.yaml"' in "".join(first["source"])


def test_strip_tool(tmp_path):
    nb = json.loads(NOTEBOOK.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    cell["execution_count"] = 3
    cell["metadata"]["execution"] = {"iopub.status.idle": "2024-01-01T00:00:00Z"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.9"}
    nb["metadata"]["widgets"] = {"state": {}}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    r = strip_tool("--check", path)
    assert r.returncode != 0 and "would have stripped" in r.stdout + r.stderr
    assert json.loads(path.read_text()) == nb  # --check changes nothing
    assert strip_tool(path).returncode == 0
    clean = json.loads(path.read_text())
    c = next(c for c in clean["cells"] if c["cell_type"] == "code")
    assert c["outputs"] == [] and c["execution_count"] is None
    assert c["metadata"] == {"tags": ["parameters"]}
    assert clean["metadata"]["language_info"] == {"name": "python"}
    assert "widgets" not in clean["metadata"]
    assert [x["source"] for x in clean["cells"]] == [x["source"] for x in nb["cells"]]
    assert strip_tool("--check", path).returncode == 0
    before = path.stat().st_mtime_ns
    assert (
        strip_tool(path).returncode == 0 and path.stat().st_mtime_ns == before
    )  # clean: untouched
    path.write_text("{not json")
    assert strip_tool("--check", path).returncode != 0


# ------------------------------------------------------------------------ executing it
def _kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel running this interpreter: the installed ``python3`` spec when it resolves to it
    (jupyter_client runs a bare ``python`` argv as ``sys.executable``), else a temporary spec."""
    pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        exe = spec.argv[0]
        ok = exe in {"python", "python3", f"python3.{sys.version_info[1]}"} or (
            Path(exe).resolve() == Path(sys.executable).resolve()
        )
    except NoSuchKernel:
        ok = False
    if ok:
        return "python3"
    kdir = tmp_path / "jupyter" / "kernels" / "pneumoseg-test"
    kdir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kdir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "pneumoseg test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "pneumoseg-test"


def execute(overrides, kernel_name):
    """Run the notebook with the parameters replaced (a cell injected after the parameters cell,
    as papermill does) -> the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = f"CONFIG = None\nOVERRIDES = {list(overrides)!r}\nSAMPLE = 16\nN_OVERLAYS = 6\n"
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(params))
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


def outputs(nb):
    text, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                text.append(o["text"])
            if "image/png" in o.get("data", {}):
                images += 1
            assert o.get("output_type") != "error"
    return "".join(text), images


def test_notebook_runs_on_png_layout(tmp_path, monkeypatch):
    """A hand-made vbookshelf-style PNG set: 20 images, 8 with a disc mask."""
    cv2 = pytest.importorskip("cv2")
    root = tmp_path / "pngset"
    (root / "png_images").mkdir(parents=True)
    (root / "png_masks").mkdir()
    rng = np.random.default_rng(0)
    lines = ["new_filename,ImageId,has_pneumo"]
    for i in range(20):
        label = int(i % 5 < 2)
        name = f"{i}_train_{label}_.png"
        img = rng.normal(120, 30, (48, 48)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        if label:
            cv2.circle(mask, (24, 24), 4 + i % 7, 255, -1)
        cv2.imwrite(str(root / "png_images" / name), img)
        cv2.imwrite(str(root / "png_masks" / name), mask)
        lines.append(f"{name},1.2.3.{i},{label}")
    (root / "stage_1_train_images.csv").write_text("\n".join(lines) + "\n")
    overrides = [
        "data.layout=png",
        f"data.root={root}",
        "data.train_images=png_images",
        "data.original_size=48",
    ]
    nb = execute(overrides, _kernel_name(tmp_path, monkeypatch))
    text, images = outputs(nb)
    assert "20 training images" in text and "positives: 8 / 20" in text
    assert images >= 6


def test_notebook_runs_on_synthetic(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    run_script(
        "make_synthetic",
        "--out",
        str(out),
        "--n-train",
        "24",
        "--n-test",
        "4",
        "--size",
        "64",
        "--seed",
        "0",
    )
    overrides = [f"data.root={out}", "data.original_size=64", "data.patient_map=nih_id.csv"]
    nb = execute(overrides, _kernel_name(tmp_path, monkeypatch))
    text, images = outputs(nb)
    assert "24 training images" in text and "(siim layout)" in text
    assert "view:" in text and "sex:" in text
    assert images >= 6
