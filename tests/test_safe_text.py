"""Safe ids and CSV cells (pneumoseg.safe_text), and the page's static/csv.js on the same table.
Expected values are written out by hand (the hashes: ``sha256sum`` of the value's UTF-8 bytes)."""

import csv
import io
import json
import shutil
import subprocess  # nosec B404
from pathlib import Path

import pytest

from pneumoseg.safe_text import csv_cell, csv_row, hashed_id, is_dicom_uid, neutralise, safe_id

CSV_JS = Path(__file__).resolve().parents[1] / "src" / "pneumoseg" / "serve" / "static" / "csv.js"
HOSTILE_UID = '=HYPERLINK("http://x"),1\nEVIL,2'  # the SOPInstanceUID

UIDS = {
    "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319": True,  # a real SIIM UID
    "0": True,
    "1.0.2": True,  # a component "0" is fine
    "1.02.3": False,  # a leading zero is not
    "1..2": False,
    ".1.2": False,
    "1.2.": False,
    "": False,
    "1.2a": False,
    "1." + "2" * 62: True,  # 64 characters
    "1." + "2" * 63: False,  # 65
    "ID_0011fe81e": False,  # a Kaggle id: not a UID (a safe stem, below)
}


@pytest.mark.parametrize("value", UIDS)
def test_dicom_uid_rules(value):
    assert is_dicom_uid(value) is UIDS[value]


IDS = [
    # (raw value, fallback, expected id)
    ("1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319", "image-0", "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"),
    ("1.2.840.113619\x00", "image-0", "1.2.840.113619"),  # DICOM NUL padding dropped
    ("ID_0011fe81e", "image-0", "ID_0011fe81e"),
    ("1.02.3", "image-0", "1.02.3"),  # not a valid UID, but a safe stem
    ("a" * 128, "image-0", "a" * 128),
    ("a" * 129, "image-0", "sha256-c12cb024a2e5"),
    (HOSTILE_UID, "image-0", "sha256-25e67775f52d"),
    ("a b;rm", "image-0", "sha256-8b7eb4c81266"),
    ("../x", "image-0", "sha256-d6b96a97d147"),
    ("Doe^Jane", "image-0", "sha256-ff37cfdaa951"),
    ("-1", "image-0", "sha256-1bad6b8cf971"),  # an id never starts with "-"
    (None, "image-3", "image-3"),
    ("  \x00", "image-3", "image-3"),
]  # fmt: skip


@pytest.mark.parametrize("value,fallback,expected", IDS)
def test_safe_id(value, fallback, expected):
    assert safe_id(value, fallback) == expected
    assert safe_id(expected, "image-0") == expected  # a safe id stays as it is


def test_safe_id_needs_a_safe_fallback_and_hashes_deterministically():
    with pytest.raises(ValueError, match="fallback"):
        safe_id(None, "image 1")
    assert hashed_id(HOSTILE_UID) == hashed_id(HOSTILE_UID) != hashed_id(HOSTILE_UID + " ")


# (value, the cell as written): formulas get a ', numbers and RLE strings stay, all quoted
CELLS = [
    ("-1", '"-1"'),
    ("+3", '"+3"'),
    ("-2.5e3", '"-2.5e3"'),
    ("387620 23 996 33 986", '"387620 23 996 33 986"'),
    ("1.2.276.0.7230010.3", '"1.2.276.0.7230010.3"'),
    ("=1+2", '"\'=1+2"'),
    ("-1+cmd|' /C calc'!A0", "\"'-1+cmd|' /C calc'!A0\""),
    ("+A1", '"\'+A1"'),
    ("@SUM(A1)", '"\'@SUM(A1)"'),
    ("\t=1", '"\'\t=1"'),
    ("\r=1", '"\'\r=1"'),
    ("-", '"\'-"'),
    ("a,b", '"a,b"'),
    ('say "hi"', '"say ""hi"""'),
    (HOSTILE_UID, '"\'=HYPERLINK(""http://x""),1\nEVIL,2"'),
    ("", '""'),
    ("-١", '"\'-١"'),  # an Arabic-Indic digit is not a plain number in a spreadsheet
]


@pytest.mark.parametrize("value,cell", CELLS)
def test_csv_cell(value, cell):
    assert csv_cell(value) == cell
    assert neutralise(value) == next(csv.reader(io.StringIO(cell)))[0]  # a CSV reader reads it back


def test_csv_row_keeps_one_row_per_record():
    text = "\n".join(csv_row(r) for r in [["ImageId", "EncodedPixels"], [HOSTILE_UID, "-1"],
                                          ["ID_1", "1 2"]]) + "\n"  # fmt: skip
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["ImageId", "EncodedPixels"], ["'" + HOSTILE_UID, "-1"], ["ID_1", "1 2"]]


def node_csv(header: list, rows: list) -> str:
    """csvText of the page's csv.js, run by Node."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed (the page's csv.js is checked with it)")
    script = (f"const c = require({json.dumps(str(CSV_JS))});"
              "const [h, r] = JSON.parse(process.argv[1]);"
              "process.stdout.write(c.csvText(h, r));")  # fmt: skip
    out = subprocess.run([node, "-e", script, json.dumps([header, rows])],  # nosec B603
                         capture_output=True, check=True, timeout=60)  # fmt: skip
    return out.stdout.decode("utf-8")


def test_the_page_writes_the_same_csv():
    values = [v for v, _ in CELLS]
    js = node_csv(["value"], [[v] for v in values])
    assert js == '"value"\n' + "".join(cell + "\n" for _, cell in CELLS)
    assert [r[0] for r in csv.reader(io.StringIO(js))][1:] == [neutralise(v) for v in values]
