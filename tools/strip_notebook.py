"""Strip Jupyter notebooks for version control (an offline, dependency-free nbstripout).

    python tools/strip_notebook.py notebooks/*.ipynb          # strip in place
    python tools/strip_notebook.py --check notebooks/*.ipynb  # exit 1 if any needs stripping

Removes cell outputs, execution counts, volatile cell metadata (execution timings, collapsed /
scrolled state) and volatile notebook metadata (widget state, language version, signatures, papermill
records). Cell tags (e.g. ``parameters``), the kernelspec and the cell sources are kept. Files that
are already clean are not rewritten. Used as a pre-commit hook (``files: \\.ipynb$``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

CELL_META_DROP = {"execution", "collapsed", "scrolled", "ExecuteTime", "papermill", "pycharm"}
NB_META_DROP = {"widgets", "signature", "papermill", "varInspector", "toc", "vscode", "colab"}
LANGUAGE_INFO_KEEP = {"name"}


def strip(nb: dict) -> dict:
    """A stripped copy of the notebook dict ``nb`` (the nbformat-4 JSON structure)."""
    nb = copy.deepcopy(nb)
    meta = nb.setdefault("metadata", {})
    for key in NB_META_DROP & set(meta):
        del meta[key]
    if isinstance(meta.get("language_info"), dict):
        meta["language_info"] = {
            k: v for k, v in meta["language_info"].items() if k in LANGUAGE_INFO_KEEP
        }
    for cell in nb.get("cells", []):
        cmeta = cell.get("metadata", {})
        for key in CELL_META_DROP & set(cmeta):
            del cmeta[key]
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        elif "attachments" in cell and not cell["attachments"]:
            del cell["attachments"]
    return nb


def has_outputs(nb: dict) -> bool:
    return any(
        c.get("outputs") or c.get("execution_count") is not None
        for c in nb.get("cells", [])
        if c.get("cell_type") == "code"
    )


def dumps(nb: dict) -> str:
    """JSON as Jupyter writes it (indent 1, sorted keys, unicode kept, trailing newline)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a notebook needs stripping"
    )
    args = ap.parse_args(argv)

    dirty = []
    for path in args.notebooks:
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: cannot read notebook: {e}", file=sys.stderr)
            return 2
        clean = strip(nb)
        if clean == nb:
            continue
        dirty.append(path)
        if args.check:
            what = "outputs" if has_outputs(nb) else "volatile metadata"
            print(f"{path}: has {what} (run tools/strip_notebook.py {path})", file=sys.stderr)
        else:
            _write(path, dumps(clean))
            print(f"stripped {path}", file=sys.stderr)
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
