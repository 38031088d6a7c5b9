"""predict.backend / predict.precision / predict.threads (issue 18): the same Predictor through
torch, ONNX Runtime and OpenVINO, the automatic choice, and every way a runtime is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoseg.inference import cpu
from pneumoseg.inference import export_checks as checks

from conftest import REPO, run_cli, tiny_overrides

DEMO = str(REPO / "configs" / "demo.yaml")
EXP = "exp_backends"


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory) -> Path:
    """A trained tiny experiment (2 folds) with a tuning, exported; its own copy of the data's
    runs folder so other modules' experiments do not mix in."""
    over = _over(tiny_data)
    for fold in ("0", "1"):
        code, out = run_cli("train", "--config", DEMO, "--fold", fold, "--quiet", *over)
        assert code == 0, out
    code, out = run_cli("oof_tune", "--config", DEMO, *over)
    assert code == 0, out
    _set_threshold_in_a_gap(tiny_data)
    code, out = run_cli("export", "--config", DEMO, "--force", *over)
    assert code == 0, out
    return tiny_data


def _set_threshold_in_a_gap(root: Path) -> None:
    """The tuned post-processing, with its threshold moved to the widest gap between the torch
    fp32 probabilities of the test images (no component filter): masks with positives on most
    images, and no pixel within the gap's half-width of the threshold, so the rows of runtimes
    that agree within that margin must be identical and differ only where they do not."""
    from pneumoseg.config import load_config
    from pneumoseg.data.cache import cache_dir, open_cache
    from pneumoseg.inference.predictor import Predictor, postprocess_path
    from pneumoseg.postprocessing.postprocess import load_params, save_params

    cfg = load_config(DEMO, _over(root, "predict.backend=torch", "predict.precision=fp32"))
    images = np.asarray(open_cache(cache_dir(cfg, "test")).images)
    probs, _ = Predictor(cfg).probs(images, [im.shape for im in images])
    p = np.unique(np.concatenate([x.ravel() for x in probs]))
    lo, hi = np.searchsorted(p, np.quantile(p, [0.5, 0.95]))
    k = lo + int(np.argmax(np.diff(p[lo:hi])))
    gap = float(p[k + 1] - p[k])
    assert gap > 2e-5, gap  # twice the margin the runtimes must agree within (they do by ~1e-6)
    path = postprocess_path(cfg)
    params = {**load_params(path), "method": "threshold", "threshold": float(p[k] + gap / 2),
              "min_area": 0, "cls_threshold": None}  # fmt: skip
    save_params(params, path)


def _over(root: Path, *extra: str) -> list[str]:
    # OpenVINO's int8 (NNCF's accuracy control: minutes per export) only where a test asks for it
    return [*tiny_overrides(root), f"exp={EXP}", "train.epochs=1", "train.top_k=1",
            f"predict.out_dir={root / 'subs'}", "export.int8=[onnxruntime]", *extra]  # fmt: skip


def _manifest(root: Path) -> dict:
    return json.loads((root / "runs" / EXP / "export" / "manifest.json").read_text())


def _submission(root: Path, name: str, *extra: str) -> tuple[list[str], str]:
    code, out = run_cli("predict", "--config", DEMO, "--submission", *_over(root, *extra),
                        f"predict.out_dir={root / 'subs' / name}")  # fmt: skip
    assert code == 0, out
    return (root / "subs" / name / f"{EXP}.csv").read_text().splitlines(), out


def test_fp32_rows_identical_across_backends(world):
    torch_rows, out = _submission(world, "torch", "predict.backend=torch", "predict.precision=fp32")
    assert "runtime: torch fp32" in out
    assert len(torch_rows) == 7 and any(r.split(",")[1] not in ("", "-1") for r in torch_rows[1:])
    for backend in ("onnxruntime", "openvino"):
        rows, out = _submission(world, backend, f"predict.backend={backend}",
                                "predict.precision=fp32")  # fmt: skip
        assert f"runtime: {backend} fp32" in out
        assert rows == torch_rows, backend


def test_real_dicom_agrees_across_backends(world, real_dir):
    """A real 1024² DICOM through each backend: probabilities within 1e-4 of torch fp32, and the
    masks differ only at pixels that close to the threshold (a million resized pixels: some
    land within 1e-6 of it)."""
    from pneumoseg.config import load_config
    from pneumoseg.data.intake import read_image
    from pneumoseg.inference.predictor import Predictor

    image = read_image(sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0])
    got = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        cfg = load_config(
            DEMO, _over(world, f"predict.backend={backend}", "predict.precision=fp32")
        )
        pred = Predictor(cfg)
        (prob,), _ = pred.probs_of([image])
        got[backend] = (prob, pred.finish(prob, None)[0], pred.params["threshold"])
    ref, ref_mask, t = got["torch"]
    assert ref.shape == image.shape and 0 < ref_mask.sum() < ref_mask.size
    for backend in ("onnxruntime", "openvino"):
        prob, mask, _ = got[backend]
        assert np.abs(prob - ref).max() <= 1e-4
        assert np.all(np.abs(ref[mask != ref_mask] - t) <= 1e-4)


def test_manifest_records_this_cpus_runtimes(world):
    runtimes = _manifest(world)["runtimes"]
    assert runtimes["cpu_key"] == cpu.cpu_key() and runtimes["cpu"] == cpu.describe()
    measured = {(r["runtime"], r["precision"]): r for r in runtimes["measured"]}
    assert ("torch", "fp32") in measured and ("onnxruntime", "fp32") in measured
    assert ("openvino", "fp32") in measured
    assert (("openvino", "bf16") in measured) == cpu.native_bf16()
    for (runtime, precision), row in measured.items():
        if runtime != "torch" and precision == "fp32":
            assert row["passed"] == (row["max_abs_dp"] <= 1e-4) and row["passed"], row
        if precision in ("bf16", "int8"):
            assert row["passed"] == (row["dice"] >= checks.MIN_DICE), row
    files = {p.name for p in (world / "runs" / EXP / "export").iterdir()}
    names = {
        "onnxruntime": ["fold0.int8.onnx"],
        "openvino": ["fold0.int8-ov.xml", "fold0.int8-ov.bin"],
    }
    for runtime, int8 in _manifest(world)["int8"].items():
        row = measured.get((runtime, "int8"), {"passed": False})
        assert int8["passed"] == row["passed"], runtime
        assert all((name in files) == int8["passed"] for name in names[runtime]), runtime


def test_auto_picks_the_fastest_that_passed(world):
    measured = _manifest(world)["runtimes"]["measured"]
    ok = [r for r in measured if r["passed"] and r.get("layout") != "NCHW"]
    best = min(ok, key=lambda r: r["s_per_image"])
    _, out = _submission(world, "auto")
    assert f"runtime: {best['runtime']} {best['precision']}" in out, out


def test_auto_on_another_kind_of_cpu_uses_onnxruntime_fp32(world, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_key", lambda: "another-cpu")
    _, out = _submission(world, "other_cpu")
    assert "runtime: onnxruntime fp32" in out and "no runtime measured" in out


def test_bf16_refused_on_a_cpu_without_it(world, monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    for backend in ("openvino", "torch"):
        code, out = run_cli("predict", "--config", DEMO, "--submission",
                            *_over(world, f"predict.backend={backend}", "predict.precision=bf16"))  # fmt: skip
        assert code == 2 and "needs a CPU with native bf16" in out, out


@pytest.mark.parametrize(
    "override, message",
    [
        ("predict.backend=tensorrt", "predict.backend: unknown value 'tensorrt'; valid: auto, torch"),
        ("predict.precision=int4", "predict.precision: unknown value 'int4'"),
        ("predict.threads=0", "predict.threads: must be a whole number from 1 to 1024"),
        ("predict.threads=1025", "predict.threads: must be a whole number"),
        ("predict.threads=1.5", "'predict.threads' must be int or null, got float 1.5"),
        ("predict.threads=two", "'predict.threads' must be int or null, got str 'two'"),
        ("predict.threads=true", "'predict.threads' must be int or null, got bool True"),
        ("predict.threads=-2", "predict.threads: must be a whole number"),
        ("predict.backend=torch predict.precision=int8", "int8 runs on exported models only"),
        ("predict.backend=onnxruntime predict.precision=bf16", "ONNX Runtime has no bf16"),
        ("export.int8=[tensorrt]", "export.int8: unknown value 'tensorrt'; valid: onnxruntime, "
                                   "openvino"),
        ("export.int8=[openvino,openvino]", "export.int8: ['openvino', 'openvino'] names a "
                                            "runtime twice"),
        ("export.int8=[1]", "export.int8: must be a list of runtime names"),
        ("export.int8=[[openvino]]", "export.int8: must be a list of runtime names"),
        ("export.int8=openvino", "'export.int8' must be list"),
        ("export.int8=null", "'export.int8' must be list"),
        ("export.int9=[]", "export.int9"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("script", ["predict", "export"])
def test_bad_runtime_options_are_config_errors(tmp_path, override, message, script):
    args = ["--submission"] if script == "predict" else ["--force"]
    code, out = run_cli(script, "--config", DEMO, *args, f"train.out_dir={tmp_path}",
                        *override.split())  # fmt: skip
    assert code == 2 and message in out, out
    assert not any(tmp_path.iterdir())


@pytest.fixture
def copy_world(world, tmp_path) -> Path:
    """The trained experiment's runs copied, so a test can damage them (without the training's
    resume state and checkpoints: 0.2 of the 0.55 GB)."""
    shutil.copytree(world / "runs" / EXP, tmp_path / "runs" / EXP,
                    ignore=shutil.ignore_patterns("last.pt", "checkpoints"))  # fmt: skip
    return tmp_path


def _over_copy(world: Path, copy: Path, *extra: str) -> list[str]:
    return [*_over(world), f"train.out_dir={copy / 'runs'}", f"predict.out_dir={copy / 'subs'}",
            *extra]  # fmt: skip


def test_stale_export_is_refused_or_skipped(world, copy_world):
    model = copy_world / "runs" / EXP / "fold1" / "model.pt"
    shutil.copy(copy_world / "runs" / EXP / "fold0" / "model.pt", model)  # "retrained"
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *_over_copy(world, copy_world, "predict.backend=onnxruntime"))  # fmt: skip
    assert code == 2 and "is stale" in out and "fold1/model.pt changed" in out, out
    # auto: a warning and torch (whose tuning check then names the retrained model)
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *_over_copy(world, copy_world))  # fmt: skip
    assert "not using the export of exp_backends" in out and "is stale" in out
    assert code == 2 and "was retrained (or replaced) after the tuning" in out


def test_export_without_model_files_serves(world, copy_world):
    """A serving copy of runs/ with the exports and the tuning but no model.pt."""
    for pt in (copy_world / "runs" / EXP).glob("fold*/*.pt"):
        pt.unlink()
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *_over_copy(world, copy_world, "predict.backend=onnxruntime",
                                    "predict.precision=fp32"))  # fmt: skip
    assert code == 0, out
    torch_rows, _ = _submission(
        world, "torch_ref", "predict.backend=torch", "predict.precision=fp32"
    )
    assert (copy_world / "subs" / f"{EXP}.csv").read_text().splitlines() == torch_rows


def test_corrupt_onnx_with_a_forged_digest_is_a_clean_error(world, copy_world):
    from pneumoseg.tuning.provenance import file_digest

    folder = copy_world / "runs" / EXP / "export"
    onnx = folder / "fold0.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])  # truncated
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["folds"][0]["onnx_digest"] = file_digest(onnx)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for backend in ("onnxruntime", "openvino"):  # fp32: the damaged file (auto may pick int8)
        code, out = run_cli("predict", "--config", DEMO, "--submission",
                            *_over_copy(world, copy_world, f"predict.backend={backend}",
                                        "predict.precision=fp32"))  # fmt: skip
        assert code == 2 and "cannot load it" in out and "Traceback" not in out, out


def test_int8_that_fails_its_check_is_not_kept(world, copy_world, monkeypatch):
    monkeypatch.setattr(checks, "MIN_DICE", 1.01)  # no int8 can agree this well
    over = _over_copy(world, copy_world, "export.int8=[onnxruntime,openvino]")
    code, out = run_cli("export", "--config", DEMO, "--force", *over)
    assert code == 0, out
    folder = copy_world / "runs" / EXP / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["int8"]["onnxruntime"]["passed"]
    assert not manifest["int8"]["openvino"]["passed"]
    assert not [p for p in folder.iterdir() if ".int8" in p.name]  # the earlier export's too
    for backend in ("openvino", "onnxruntime"):
        code, out = run_cli("predict", "--config", DEMO, "--submission",
                            *over, f"predict.backend={backend}", "predict.precision=int8")  # fmt: skip
        assert code == 2 and f"no int8 model for {backend} passed its check at export" in out, out
    code, out = run_cli("predict", "--config", DEMO, "--submission", *over)
    assert code == 0 and "int8" not in out.split("runtime:")[1].splitlines()[0], out


@pytest.fixture(scope="module")
def int8_world(world, tmp_path_factory) -> Path:
    """A copy of the trained experiment whose export kept both runtimes' int8 models, whatever
    their agreement (MIN_DICE 0): made once, copied again by a test that damages it."""
    root = tmp_path_factory.mktemp("int8_world")
    shutil.copytree(world / "runs" / EXP, root / "runs" / EXP,
                    ignore=shutil.ignore_patterns("last.pt", "checkpoints"))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checks, "MIN_DICE", 0.0)
        code, out = run_cli("export", "--config", DEMO, "--force",
                            *_over_copy(world, root, "export.int8=[onnxruntime,openvino]"))  # fmt: skip
    assert code == 0, out
    return root


def test_int8_kept_runs_on_both_runtimes(world, int8_world, tmp_path):
    manifest = json.loads((int8_world / "runs" / EXP / "export" / "manifest.json").read_text())
    for runtime in ("onnxruntime", "openvino"):
        assert manifest["int8"][runtime]["passed"] is True, runtime
        assert len(manifest["int8"][runtime]["folds"]) == 2
    for row in manifest["int8"]["openvino"]["folds"]:  # NNCF's report: k of n back in fp32
        k, _, n = row["reverted"].partition(" of ")
        assert row["reverted"] == "none" or 0 < int(k) <= int(n), row
        assert set(row["digests"]) == {row["file"], row["file"][:-4] + ".bin"}
    for backend in ("onnxruntime", "openvino"):
        code, out = run_cli("predict", "--config", DEMO, "--submission",
                            *_over_copy(world, int8_world, f"predict.backend={backend}",
                                        "predict.precision=int8",
                                        f"predict.out_dir={tmp_path / backend}"))  # fmt: skip
        assert code == 0 and f"runtime: {backend} int8" in out, out
        rows = (tmp_path / backend / f"{EXP}.csv").read_text().splitlines()
        assert len(rows) == 7


@pytest.mark.parametrize("why", ["nncf missing", "quantizer fails"])
def test_int8_for_one_runtime_only(world, copy_world, monkeypatch, why):
    """OpenVINO's int8 model not made (NNCF not installed, or its quantization raising): the
    export keeps ONNX Runtime's, records why, and OpenVINO int8 is refused by name."""
    monkeypatch.setattr(checks, "MIN_DICE", 0.0)
    if why == "nncf missing":
        monkeypatch.setattr(checks, "int8_runtimes", lambda: {
            "onnxruntime": None, "openvino": "nncf is not installed (pip install nncf)"})  # fmt: skip
        expect = "nncf is not installed (pip install nncf)"
    else:
        real = checks.quantize

        def fails(runtime, *args):
            if runtime == "openvino":
                raise RuntimeError("NNCF failed")
            return real(runtime, *args)

        monkeypatch.setattr(checks, "quantize", fails)
        expect = "quantization failed (RuntimeError)"
    over = _over_copy(world, copy_world, "export.int8=[onnxruntime,openvino]")
    code, out = run_cli("export", "--config", DEMO, "--force", *over)
    assert code == 0, out
    folder = copy_world / "runs" / EXP / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["int8"]["onnxruntime"]["passed"] is True
    assert manifest["int8"]["openvino"] == {**manifest["int8"]["openvino"], "passed": False,
                                            "why": expect}  # fmt: skip
    assert not list(folder.glob("*int8-ov*")) and not list(folder.glob(".*"))  # no temp left
    assert ("openvino", "int8") not in {(r["runtime"], r["precision"])
                                        for r in manifest["runtimes"]["measured"]}  # fmt: skip
    code, out = run_cli("predict", "--config", DEMO, "--submission", *over,
                        "predict.backend=openvino", "predict.precision=int8")  # fmt: skip
    assert code == 2 and expect in out and "Traceback" not in out, out
    code, out = run_cli("predict", "--config", DEMO, "--submission", *over,
                        "predict.backend=onnxruntime", "predict.precision=int8")  # fmt: skip
    assert code == 0 and "runtime: onnxruntime int8" in out, out


def _truncate_with_forged_digest(name: str):
    """A damage: the file cut short, and the manifest's digest forged to match it."""

    def damage(folder: Path, manifest: dict) -> None:
        from pneumoseg.tuning.provenance import file_digest

        path = folder / name
        path.write_bytes(path.read_bytes()[:3000])
        for row in manifest["int8"]["openvino"]["folds"]:
            if name in row["digests"]:
                row["digests"][name] = file_digest(path)

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f, m: f.joinpath("fold1.int8-ov.bin").write_bytes(b"\0" * 64),
         "fold1.int8-ov.bin is missing or changed"),
        (lambda f, m: f.joinpath("fold0.int8-ov.bin").unlink(), "fold0.int8-ov.bin is missing"),
        (lambda f, m: m["int8"]["openvino"]["folds"][0]["digests"].update({"../model.pt": "0"}),
         "manifest.json is damaged"),
        (lambda f, m: m["int8"]["openvino"]["folds"][0].update(file="fold9.int8-ov.xml"),
         "manifest.json is damaged"),
        (lambda f, m: m["int8"].update(openvino=["passed"]), "no int8 model for openvino passed"),
        (lambda f, m: m["int8"]["openvino"].pop("folds"), "manifest.json is damaged"),
        (_truncate_with_forged_digest("fold0.int8-ov.bin"), "OpenVINO cannot load it"),
        (_truncate_with_forged_digest("fold1.int8-ov.xml"), "OpenVINO cannot load it"),
    ],
)  # fmt: skip
def test_damaged_openvino_int8_is_a_clean_error(world, int8_world, tmp_path, damage, message):
    shutil.copytree(int8_world / "runs", tmp_path / "runs")
    folder = tmp_path / "runs" / EXP / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out = run_cli("predict", "--config", DEMO, "--submission",
                        *_over_copy(world, tmp_path, "predict.backend=openvino",
                                    "predict.precision=int8"))  # fmt: skip
    assert code == 2 and message in out and "Traceback" not in out, out


def test_an_export_of_another_format_is_stale(world, copy_world):
    """A manifest of the format before per-runtime int8 records: refused with an explicit backend,
    skipped by auto, made again by --update."""
    folder = copy_world / "runs" / EXP / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    over = _over_copy(world, copy_world)
    code, out = run_cli("predict", "--config", DEMO, "--submission", *over,
                        "predict.backend=openvino")  # fmt: skip
    assert code == 2 and "written by another version of pneumoseg (format 1" in out, out
    code, out = run_cli("export", "--config", DEMO, "--update", *over)
    assert code == 0 and "exporting again" in out, out
    assert json.loads((folder / "manifest.json").read_text())["format"] == 2


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "none"),
        (["Accuracy drop: 0.05 (absolute)", "4 out of 44 were reverted back to the "
          "floating-point precision:\n\t/model/x"], "4 of 44"),
        (["Reverted 3 operations to the floating-point precision"], "none"),
    ],
)  # fmt: skip
def test_nncf_report_of_reverted_operations(messages, expected):
    import logging

    report = checks._NncfReport()
    for text in messages:
        report.emit(logging.LogRecord("nncf", logging.INFO, __file__, 1, text, None, None))
    assert report.reverted == expected


@pytest.mark.parametrize(
    "stem, runtime, tmp, name, files",
    [
        ("fold0", "onnxruntime", False, "fold0.int8.onnx", ["fold0.int8.onnx"]),
        ("fold3", "openvino", False, "fold3.int8-ov.xml", ["fold3.int8-ov.xml", "fold3.int8-ov.bin"]),
        ("full", "openvino", True, ".full.int8-ov.tmp.xml", [".full.int8-ov.tmp.xml",
                                                             ".full.int8-ov.tmp.bin"]),
    ],
)  # fmt: skip
def test_int8_file_names(stem, runtime, tmp, name, files):
    assert checks.int8_name(stem, runtime, tmp) == name
    assert [p.name for p in checks.int8_files(Path(name))] == files


def test_update_keeps_an_up_to_date_export_and_redoes_a_stale_one(world, copy_world):
    folder = copy_world / "runs" / EXP / "export"
    over = _over_copy(world, copy_world)
    before = (folder / "manifest.json").stat().st_mtime_ns
    code, out = run_cli("export", "--config", DEMO, "--update", *over)
    assert code == 0 and "is up to date" in out
    assert (folder / "manifest.json").stat().st_mtime_ns == before
    shutil.copy(copy_world / "runs" / EXP / "fold0" / "model.pt",
                copy_world / "runs" / EXP / "fold1" / "model.pt")  # fmt: skip
    code, out = run_cli("export", "--config", DEMO, "--update", *over)
    assert code == 0 and "exporting again" in out
    from pneumoseg.inference.exported import check_export

    check_export(folder)  # up to date with the new model.pt
    with pytest.raises(SystemExit) as e:  # argparse: --update and --force together
        run_cli("export", "--config", DEMO, "--update", "--force", *over)
    assert e.value.code == 2


def test_export_without_int8_then_update_adds_it(world, copy_world, monkeypatch):
    """export.int8=[]: an fp32-only export (no int8 file, both records say why), int8 refused by
    name, auto runs fp32; --update with int8 asked for again exports it again, and keeps an
    export whose int8 is no longer asked for."""
    folder = copy_world / "runs" / EXP / "export"
    over = _over_copy(world, copy_world)
    code, out = run_cli("export", "--config", DEMO, "--force", *over, "export.int8=[]")
    assert code == 0, out
    manifest = _manifest(copy_world)
    assert not [p for p in folder.iterdir() if ".int8" in p.name or p.name.startswith(".")]
    for runtime in ("onnxruntime", "openvino"):
        assert manifest["int8"][runtime] == {**manifest["int8"][runtime], "passed": False,
                                             "why": "not asked for (export.int8)"}  # fmt: skip
        assert (runtime, "int8") not in {(r["runtime"], r["precision"])
                                         for r in manifest["runtimes"]["measured"]}  # fmt: skip
        code, out = run_cli("predict", "--config", DEMO, "--submission", *over,
                            f"predict.backend={runtime}", "predict.precision=int8")  # fmt: skip
        assert code == 2 and "not asked for (export.int8)" in out, out
    code, out = run_cli("predict", "--config", DEMO, "--submission", *over)
    assert code == 0 and "int8" not in out.split("runtime:")[1].splitlines()[0], out
    code, out = run_cli("export", "--config", DEMO, "--update", *over, "export.int8=[]")
    assert code == 0 and "is up to date" in out, out
    monkeypatch.setattr(checks, "MIN_DICE", 0.0)  # kept whatever its agreement
    code, out = run_cli("export", "--config", DEMO, "--update", *over, "export.int8=[onnxruntime]")
    assert code == 0 and "has no int8 model for onnxruntime" in out, out
    manifest = _manifest(copy_world)
    assert manifest["int8"]["onnxruntime"]["passed"] is True
    assert manifest["int8"]["openvino"]["why"] == "not asked for (export.int8)"
    assert sorted(p.name for p in folder.glob("*int8*")) == ["fold0.int8.onnx", "fold1.int8.onnx"]
    code, out = run_cli("export", "--config", DEMO, "--update", *over, "export.int8=[]")
    assert code == 0 and "is up to date" in out, out
    assert len(list(folder.glob("*int8*"))) == 2


def test_update_exports_again_over_a_damaged_int8_record(world, copy_world):
    folder = copy_world / "runs" / EXP / "export"
    manifest = _manifest(copy_world)
    manifest["int8"]["onnxruntime"] = ["passed"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out = run_cli("export", "--config", DEMO, "--update", *_over_copy(world, copy_world))
    assert code == 0 and "the int8 record of onnxruntime is damaged" in out, out
    assert isinstance(_manifest(copy_world)["int8"]["onnxruntime"], dict)


def test_an_openvino_row_checked_at_another_hint_is_not_chosen_and_exported_again(
    world, copy_world, monkeypatch
):
    """An export made before OpenVINO int8 ran its remainder in bf16 (no ov_hint: checked at
    f32): auto does not pick that row on a native-bf16 CPU, and --update exports again."""
    from pneumoseg.inference import backends

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    folder = copy_world / "runs" / EXP / "export"
    manifest = _manifest(copy_world)
    rows = [r for r in manifest["runtimes"]["measured"]
            if (r["runtime"], r["precision"]) != ("openvino", "int8")]  # fmt: skip
    for row in rows:
        row.pop("ov_hint", None)
    rows.append({"runtime": "openvino", "precision": "int8", "passed": True,
                 "s_per_image": 1e-9, "dice": 1.0})  # would be the fastest by far  # fmt: skip
    manifest["runtimes"]["measured"] = rows
    (folder / "manifest.json").write_text(json.dumps(manifest))
    chosen = backends._rows({EXP: (folder, manifest)})
    assert ("openvino", "int8") not in chosen and ("onnxruntime", "fp32") in chosen
    code, out = run_cli("export", "--config", DEMO, "--update", *_over_copy(world, copy_world))
    assert code == 0 and "OpenVINO int8 was checked at another precision" in out, out
    again = [r for r in _manifest(copy_world)["runtimes"]["measured"] if r["runtime"] == "openvino"]
    assert again and all("ov_hint" in r for r in again)
    code, out = run_cli("export", "--config", DEMO, "--update", *_over_copy(world, copy_world))
    assert code == 0 and "is up to date" in out, out


def test_threads_reach_the_runtime_and_health(world):
    from fastapi.testclient import TestClient

    from pneumoseg.config import load_config
    from pneumoseg.serve.app import create_app

    cfg = load_config(DEMO, _over(world, "predict.backend=onnxruntime", "predict.precision=fp32",
                                  "predict.threads=1"))  # fmt: skip
    app = create_app(cfg)
    with TestClient(app) as client:
        health = client.get("/health").json()
    assert health["backend"] == "onnxruntime" and health["precision"] == "fp32"
    assert health["threads"] == 1 and health["runtime_reason"] == "predict.backend: onnxruntime"
    import os

    assert health["concurrency"] == max(1, os.cpu_count() or 1)
    session = app.state.service.predictor.engine.members[0].session.session
    assert session.get_session_options().intra_op_num_threads == 1


# --------------------------------------------------------------------------------------------------
# serving without the training stack
# --------------------------------------------------------------------------------------------------
NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch from here on fails loudly: this is a torch-free install
from pneumoseg.config import load_config
from pneumoseg.data.intake import read_image
from pneumoseg.inference.predictor import Predictor
from pneumoseg.serve.app import create_app
cfg = load_config(sys.argv[1], sys.argv[3:])
pred = Predictor(cfg)
(prob,), cls = pred.probs_of([read_image(sys.argv[2])])
create_app(cfg, pred)
print(json.dumps({"rle": pred.finish(prob, cls)[1], "torch": sys.modules["torch"] is not None,
                  "backend": pred.backend}))
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "auto"])
def test_exported_predictor_imports_no_torch(world, real_dir, backend):
    """A fresh process that loads the config, predicts a real DICOM with an exported backend and
    builds the web app, with torch made unimportable: nothing tries to import it (the RLE is the
    one the exported models give in this process, checked in the serving-install test)."""
    import subprocess
    import sys

    dcm = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    over = _over(
        world,
        f"predict.backend={backend}",
        *(["predict.precision=fp32"] if backend != "auto" else []),
    )
    res = subprocess.run([sys.executable, "-c", NO_TORCH, DEMO, str(dcm), *over], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["backend"] != "torch", got


def test_serving_install_without_torch_answers_a_real_dicom(world, real_dir):
    """The serving install (requirements-serve.txt in its own venv, which .ci/run makes and names
    in PNEUMOSEG_SERVE_PYTHON) has no torch, and its web app answers /api/predict on a real DICOM
    with what the full install's exported predictor gives."""
    import os
    import subprocess

    import httpx

    from conftest import start_serve, stop_serve

    py = os.environ.get("PNEUMOSEG_SERVE_PYTHON")
    if not py:
        pytest.skip("no serving install: .ci/run makes one (PNEUMOSEG_SERVE_PYTHON)")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    assert subprocess.run([py, "-c", probe], check=False).returncode == 0, "torch is installed"
    dcm = sorted((real_dir / "stage2_test").glob("ID_*.dcm"))[0]
    over = _over(world, "predict.backend=onnxruntime", "predict.precision=fp32")
    proc, url = start_serve("--config", DEMO, *over, python=py)
    try:
        r = httpx.post(f"{url}/api/predict", timeout=120,
                       files=[("files", ("x.dcm", dcm.read_bytes(), "application/dicom"))])  # fmt: skip
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        log = stop_serve(proc)
    assert r.status_code == 200, (r.text, log)
    result = r.json()["results"][0]
    assert health["backend"] == "onnxruntime" and result["kind"] == "dicom"
    from pneumoseg.config import load_config
    from pneumoseg.data.intake import read_image
    from pneumoseg.inference.predictor import Predictor

    pred = Predictor(load_config(DEMO, over))
    (prob,), cls = pred.probs_of([read_image(dcm)])
    assert result["rle"] == pred.finish(prob, cls)[1]


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            out[name.lower().replace("_", "-")] = version
    return out


def test_serving_requirements_are_the_locks_pins_without_torch():
    serve, lock = _pins(REPO / "requirements-serve.txt"), _pins(REPO / "constraints.txt")
    assert {k: v for k, v in serve.items() if lock.get(k) != v} == {}
    assert not {"torch", "torchvision", "timm", "segmentation-models-pytorch",
                "albumentations", "triton"} & set(serve)  # fmt: skip
    wanted = [ln.strip().lower() for ln in (REPO / "requirements-serve.in").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert set(wanted) <= set(serve) and {"onnxruntime", "openvino", "fastapi"} <= set(serve)
