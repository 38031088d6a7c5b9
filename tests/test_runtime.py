"""The torch-free runtime (issue 18): the numpy ensemble × TTA against the torch path on real
X-rays, the pieces it is made of, the CPU facts and the mask agreement that gates precisions."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading

import numpy as np
import pytest
import torch
from test_export import _model_cfg

from pneumoseg.data.dataset import normalize
from pneumoseg.inference import cpu
from pneumoseg.inference import export as ex
from pneumoseg.inference import runtime as rt
from pneumoseg.inference.ensemble import Member, _resize, predict_probs
from pneumoseg.models.families import family_for
from pneumoseg.models.registry import build_model

from conftest import real_xrays


@pytest.mark.parametrize("in_channels", [1, 3])
def test_normalize_np_is_the_training_normalisation(in_channels):
    x8 = np.random.default_rng(0).integers(0, 256, (2, 16, 24), dtype=np.uint8)
    np.testing.assert_array_equal(rt.normalize_np(x8, in_channels),
                                  normalize(x8, in_channels).numpy())  # fmt: skip


@pytest.mark.parametrize("size", [(40, 40), (24, 56), (64, 64), (100, 80), (57, 33)])
def test_resize_np_matches_torch(size):
    """Shrinking (antialiased), growing and mixed: what the torch TTA path computes."""
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    want = _resize(torch.from_numpy(x), size).numpy()
    got = rt.resize_np(x, size)
    assert got.shape == want.shape and np.abs(got - want).max() < 2e-5


@pytest.mark.parametrize(
    "a, b, t, dice, same",
    [
        ([[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.2, 0.8]], 0.5, 1.0, 1.0),
        ([[0.9, 0.9], [0.1, 0.1]], [[0.9, 0.1], [0.1, 0.1]], 0.5, 2 / 3, 0.75),
        ([[0.1, 0.1], [0.1, 0.1]], [[0.2, 0.3], [0.0, 0.4]], 0.5, 1.0, 1.0),  # both empty
        ([[0.6, 0.1], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]], 0.5, 0.0, 0.75),
        ([[0.5, 0.51], [0.1, 0.1]], [[0.51, 0.51], [0.1, 0.1]], 0.5, 2 / 3, 0.75),  # p > t, not >=
    ],
)  # fmt: skip
def test_agreement_table(a, b, t, dice, same):
    got = rt.agreement(np.array(a, np.float32), np.array(b, np.float32), t)
    assert got["dice"] == pytest.approx(dice) and got["same_side"] == pytest.approx(same)
    assert got["max_abs_dp"] == pytest.approx(np.abs(np.subtract(a, b)).max())


@pytest.mark.parametrize(
    "text, model, flags, bf16, vnni",
    [
        ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
         "avx512_vnni\n", "AMD EPYC 9R14", {"fpu", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"},
         True, True),
        ("model name\t: Intel Xeon\nflags\t: avx2 avx_vnni\n", "Intel Xeon", {"avx2", "avx_vnni"},
         False, True),
        ("model name\t: Old\nflags\t: sse4_2\n", "Old", {"sse4_2"}, False, False),
        ("", "", set(), False, False),
    ],
)  # fmt: skip
def test_cpuinfo_parsing(text, model, flags, bf16, vnni, monkeypatch):
    got_model, got_flags = cpu.parse_cpuinfo(text)
    assert got_model == model and got_flags == flags
    assert any(f in got_flags for f in cpu.BF16_FLAGS) == bf16
    assert any(f in got_flags for f in cpu.INT8_FLAGS) == vnni


def test_cpu_key_changes_with_the_flags(monkeypatch):
    base = {"model": "X", "flags": ["avx2"], "bf16": False, "vnni": False}
    monkeypatch.setattr(cpu, "cpu_facts", lambda: base)
    k1 = cpu.cpu_key()
    monkeypatch.setattr(cpu, "cpu_facts", lambda: {**base, "flags": ["avx2", "avx512_bf16"]})
    assert cpu.cpu_key() != k1


@pytest.fixture(scope="module")
def exported(real_dir, tmp_path_factory):
    """Two tiny fold models (one with an aux head, one channel) exported, and real X-rays."""
    tmp = tmp_path_factory.mktemp("rt")
    images = real_xrays(real_dir, 2)
    out = []
    for k, over in enumerate([{"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
                               "decoder_channels": [16, 8, 8, 8, 8]},
                              {"arch": "unet", "encoder": "resnet18", "encoder_weights": None,
                               "in_channels": 1, "aux_head": True,
                               "decoder_channels": [16, 8, 8, 8, 8]}]):  # fmt: skip
        torch.manual_seed(k)
        mcfg = _model_cfg(over)
        model = build_model(mcfg).eval()
        member = type("M", (), {"model": model, "path": tmp / f"fold{k}" / "model.pt"})
        member.path.parent.mkdir()
        torch.save(model.state_dict(), member.path)
        x = normalize(images, int(mcfg.get("in_channels", 3)))
        ex._export_member(family_for(mcfg), member, x, tmp / f"fold{k}.onnx", f"fold{k}.onnx")
        out.append((Member(model, 0.6 if k == 0 else 0.4, mcfg), tmp / f"fold{k}.onnx"))
    return out, images


@pytest.mark.parametrize("runtime", rt.RUNTIMES)
@pytest.mark.parametrize("tta", [[], ["hflip"], ["hflip", "vflip", 0.875], [1.125]])
def test_numpy_ensemble_matches_torch_on_real_xrays(exported, runtime, tta):
    """The weighted blend of two exported models (3 and 1 channels, one with an aux head) with
    flips and scaled views, in numpy, against predict_probs in torch fp32."""
    members, images = exported
    want, want_cls = predict_probs([m for m, _ in members], images, tta, "cpu", None,
                                   channels_last=False)  # fmt: skip
    ems = [rt.ExportedMember(rt.open_session(p, runtime, "fp32", 1), m.weight,
                             int(m.cfg.get("in_channels", 3)), p.name) for m, p in members]  # fmt: skip
    got, cls = rt.predict_probs_np(ems, images, tta, max_forward=2)
    assert got.shape == tuple(want.shape) and got.dtype == np.float32
    assert np.abs(got - want.numpy()).max() <= 1e-4
    assert cls is not None and np.abs(cls - want_cls.numpy()).max() <= 1e-4


def test_resize_back_np_matches_torch():
    from pneumoseg.inference.ensemble import resize_to_original

    p = torch.from_numpy(np.random.default_rng(2).random((3, 64, 64), dtype=np.float32))
    sizes = [(64, 64), (1024, 1000), (40, 50)]
    for a, b in zip(rt.resize_back_np(p.numpy(), sizes), resize_to_original(p, sizes), strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize(
    "precision, native, hint",
    [("fp32", True, "f32"), ("fp32", False, "f32"), ("bf16", True, "bf16"),
     ("int8", True, "bf16"), ("int8", False, "f32")],
)  # fmt: skip
def test_openvino_precision_hint(exported, precision, native, hint, monkeypatch):
    """fp32 is f32 even where OpenVINO's default is bf16; an int8 model's floating-point
    remainder runs in bf16 only on CPUs with native bf16 (compiled, the property read back)."""
    pytest.importorskip("openvino")
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    assert rt.ov_precision_hint(precision) == hint
    session = rt.OvSession(exported[0][0][1], threads=1, precision=precision)
    got = str(session.compiled.get_property("INFERENCE_PRECISION_HINT"))
    if hint == "bf16" and not cpu.cpu_facts()["bf16"]:
        return  # OpenVINO itself falls back to f32 on a CPU without bf16
    assert got.endswith("bfloat16'>" if hint == "bf16" else "float32'>"), got


@pytest.mark.parametrize(
    "row, native, ok",
    [({"runtime": "openvino", "precision": "int8"}, True, False),  # checked at f32, runs at bf16
     ({"runtime": "openvino", "precision": "int8"}, False, True),
     ({"runtime": "openvino", "precision": "int8", "ov_hint": "bf16"}, True, True),
     ({"runtime": "openvino", "precision": "int8", "ov_hint": "bf16"}, False, False),
     ({"runtime": "openvino", "precision": "bf16"}, True, True),
     ({"runtime": "openvino", "precision": "fp32", "ov_hint": "bf16"}, True, False),
     ({"runtime": "onnxruntime", "precision": "int8"}, True, True),
     ({"runtime": "torch", "precision": "bf16"}, False, True)],
)  # fmt: skip
def test_checked_as_run(row, native, ok, monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    assert rt.checked_as_run(row) == ok


def test_sessions_refuse_a_damaged_file(tmp_path):
    from pneumoseg.errors import ModelFileError

    bad = tmp_path / "fold0.onnx"
    bad.write_bytes(b"\x08\x07 not a model")
    for runtime in rt.RUNTIMES:
        with pytest.raises(ModelFileError, match="cannot load it"):
            rt.open_session(bad, runtime, "fp32")


# --------------------------------------------------------------------------------------------------
# a detector: Mask R-CNN's detections made into probabilities outside the graph
# --------------------------------------------------------------------------------------------------
MASKRCNN = {"arch": "maskrcnn", "encoder": "resnet18", "encoder_weights": None, "fpn_channels": 32,
            "roi_samples": 64, "rpn_proposals": 300, "detections_per_img": 20}  # fmt: skip


@pytest.fixture(scope="module")
def detector(real_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    mcfg = {**_model_cfg(MASKRCNN), "input_size": 64}
    model = build_model(mcfg).eval()
    member = type("M", (), {"model": model, "path": tmp / "fold0" / "model.pt"})
    member.path.parent.mkdir()
    torch.save(model.state_dict(), member.path)
    images = real_xrays(real_dir, 2)
    row = ex._export_member(family_for(mcfg), member, normalize(images, 3), tmp / "m.onnx",
                            "fold0.onnx")  # fmt: skip
    return Member(model, 1.0, mcfg), tmp / "m.onnx", images, row


def test_maskrcnn_exports_with_parity_on_real_xrays(detector):
    member, _, _, row = detector
    assert row["outputs"] == ["masks", "scores"] and row["max_abs_dp"] <= ex.PARITY_TOL
    assert ex.detector_min_score(member.model) == 0.05


@pytest.mark.parametrize("runtime", ["onnxruntime"])  # OpenVINO: refused (rt.UNSUPPORTED)
@pytest.mark.parametrize("min_score", [0.05, 0.0, 0.2])
def test_detector_ensemble_matches_torch(detector, runtime, min_score):
    """hflip TTA, one image per graph run, the min_score applied outside the graph: what the
    family's predict gives in torch (at the same min_score, set as a tuning would)."""
    from pneumoseg.models.families import family_for as fam_of

    member, path, images, _ = detector
    fam_of(member.cfg).set_option(member.model, "min_score", min_score)
    try:
        want, cls = predict_probs([member], images, ["hflip"], "cpu", None, channels_last=False)
    finally:
        fam_of(member.cfg).set_option(member.model, "min_score", 0.05)
    em = rt.ExportedMember(rt.open_session(path, runtime, "fp32", 1), 1.0, 3, "fold0.onnx",
                           head="detections", min_score=min_score)  # fmt: skip
    got, got_cls = rt.predict_probs_np([em], images, ["hflip"])
    assert cls is None and got_cls is None
    assert np.abs(got - want.numpy()).max() <= 1e-4
    assert want.max() > 0  # detections were kept: the maps are not all zero


@pytest.mark.parametrize(
    "scores, min_score, want",
    [([0.9, 0.3], 0.5, [[0.9, 0.0], [0.45, 0.0]]),
     ([0.9, 0.3], 0.2, [[0.9, 0.3], [0.45, 0.3]]),
     ([0.1, 0.3], 0.5, [[0.0, 0.0], [0.0, 0.0]]),
     ([], 0.0, [[0.0, 0.0], [0.0, 0.0]])],
)  # fmt: skip
def test_detections_to_probs_table(scores, min_score, want):
    masks = np.array([[[[1.0, 0.0], [0.5, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]], np.float32)
    got = rt.detections_to_probs(masks[: len(scores)], np.array(scores, np.float32), min_score,
                                 (2, 2))  # fmt: skip
    np.testing.assert_allclose(got[0], want, atol=1e-7)


def test_openvino_run_failure_is_a_clean_error():
    """OpenVINO's CPU plugin raising on one input (as it does in Mask R-CNN's RoI heads) is a
    typed error that says what to use instead, not a traceback."""
    import threading

    from pneumoseg.errors import ModelFileError

    class Request:
        def infer(self, inputs):
            raise RuntimeError("[CPU] Reshape node ... conflicts with the reshape pattern")

    session = rt.OvSession.__new__(rt.OvSession)
    session.compiled = type("C", (), {"create_infer_request": lambda self: Request(),
                                      "outputs": []})()  # fmt: skip
    session._local = threading.local()
    with pytest.raises(ModelFileError, match="OpenVINO could not run this model on an input of "
                                             r"shape \(1, 3, 64, 64\).*onnxruntime"):  # fmt: skip
        session.run(np.zeros((1, 3, 64, 64), np.float32))


SIGNAL_AFTER_OPENVINO = r"""
import faulthandler, gc, os, signal, sys
from pathlib import Path
import numpy as np
faulthandler.enable()
onnx, out, mode = sys.argv[1:]
if mode == "pipeline":  # what an export does: sessions made and dropped, NNCF, the CPU check
    from pneumoseg.inference import cpu, export_checks
    from pneumoseg.inference.runtime import OvSession
    a, b = OvSession(onnx), OvSession(onnx, precision="fp32", threads=1)
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    a.run(x[:1]), b.run(x[:1])
    export_checks.quantize_int8_openvino(Path(onnx), Path(out), x, 0.5)
    cpu._openvino_flags()
else:  # two plain OpenVINO Cores, dropped in the order they were made
    import openvino as ov
    a, b = ov.Core(), ov.Core()
    a.get_property("CPU", "FULL_DEVICE_NAME"), b.get_property("CPU", "FULL_DEVICE_NAME")
del a; gc.collect(); del b; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)  # a signal with a Python handler, as SIGCHLD or SIGINT
print("alive", flush=True)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="OpenVINO swaps signal stacks on Linux only"
)
@pytest.mark.parametrize("mode, survives", [("pipeline", True), ("plain cores", False)])
def test_signals_still_work_after_openvino(tmp_path, mode, survives):
    """OpenVINO's CPU plugins, destroyed in the order they were made, leave the thread on an
    unmapped signal stack: the next signal handled in Python kills the process (SIGSEGV, nothing
    printed; a DataLoader's SIGCHLD did, in a long test session). The pipeline's one Core with
    its own signal stack, and NNCF in a child process, keep a handled signal harmless."""
    import subprocess

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 1, 3, padding=1), torch.nn.Sigmoid()).eval()  # fmt: skip
    onnx = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(onnx), dynamo=False,
                      input_names=["image"], dynamic_axes={"image": {0: "n"}})  # fmt: skip
    res = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_OPENVINO, str(onnx),
                          str(tmp_path / "m.int8-ov.xml"), mode.split()[0]],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if survives:
        assert res.returncode == 0 and res.stdout.split()[-2:] == ["handled", "alive"], res.stderr
        assert (tmp_path / "m.int8-ov.xml").is_file() and not list(tmp_path.glob(".nncf-*"))
    else:  # if this starts passing, OpenVINO fixed it and openvino_core's workaround may go
        assert res.returncode == -signal.SIGSEGV and "alive" not in res.stdout, res


def test_the_one_core_leaves_this_thread_on_a_stack_of_ours():
    from pneumoseg.inference import openvino_core as oc

    core = oc.ov_core()
    assert oc.ov_core() is core
    if sys.platform.startswith("linux"):  # made on this thread, or another one that kept its own
        oc.keep_signal_stack()
        buf = oc._STACKS[threading.get_ident()]
        assert oc.current_signal_stack() == (ctypes.addressof(buf), oc.STACK_BYTES)
