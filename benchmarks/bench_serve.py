"""The web app under concurrent clients: latency, throughput, errors and peak memory.

    python benchmarks/bench_serve.py [--duration 20] [--setups demo r34_512 r34_512_x5]
                                     [--backends torch auto]
                                     [--images ../shared/data/siim-real/stage2_test]

Each setup starts ``src/serve.py`` on a free 127.0.0.1 port (its own process, default limits:
concurrency 1 on a CPU and a queue of 2) and runs two client loads for ``--duration`` seconds
each, every client uploading the real SIIM DICOMs (1024², JPEG) one request at a time, round robin:

* ``at cap``: as many clients as the server admits (concurrency + queue): every answer must be 200;
* ``3x cap``: three times as many: the extra requests must get a clean 503 at once, nothing else.

Setups, all with hflip TTA: ``demo`` (the demo experiment: 3 ResNet18 U-Nets at 128 px; needs
``make demo`` first), ``r34_512`` (one ResNet34 U-Net at 512 px, untrained weights: the timing is
the same) and ``r34_512_x5`` (five of them, a 5-fold ensemble). Each setup is served once per
``--backends`` entry (``predict.backend``: torch, auto, onnxruntime, openvino); before a non-torch
one the experiment is exported (a copy of the demo's runs; the r34 models checked and timed on
four of the real DICOMs) and the ``backend`` column is what the server's ``/health`` says runs.
Printed per load: requests, 200s, 503s, other statuses, p50/p95 latency of the 200s, images/s,
and the server's peak RSS (VmHWM).

``--hostile`` instead sends single hostile requests (issue 14, item 7), each to a fresh
``r34_512`` server with the default limits, and prints the status, the time and the server's peak
RSS before and after: 16 highly compressed 6000x6000 PNGs (561 KB), 16 2000x2000 PNGs (64 M
pixels: the default per-request cap) and a real DICOM whose header says 64x64 but whose JPEG
stream says 12000x12000.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess  # nosec B404
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from pneumoseg.config import load_config  # noqa: E402
from pneumoseg.models.registry import build_model, model_cfg  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_experiment(root: Path, folds: int) -> list[str]:
    """``folds`` untrained ResNet34 U-Nets (512 px) as runs/r34/fold<k>/model.pt; the overrides
    that serve them."""
    over = ["model.encoder_weights=null", f"train.out_dir={root}", "exp=r34", "train.device=cpu"]
    cfg = load_config(REPO / "configs" / "r34_unet_512.yaml", over)
    for k in range(folds):
        torch.manual_seed(k)
        model = build_model(model_cfg(cfg))
        (root / "r34" / f"fold{k}").mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "config": {"model": cfg["model"],
                    "cache": {"size": 512}}}, root / "r34" / f"fold{k}" / "model.pt")  # fmt: skip
    return ["--config", "configs/r34_unet_512.yaml", *over, f"predict.folds={list(range(folds))}"]


def start_server(argv: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(  # nosec B603  (our own script, fixed argv)
        [sys.executable, str(REPO / "src" / "serve.py"), *argv, "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
            if health["model_loaded"]:
                return proc, url
            raise SystemExit(f"the server has no model: {health['problem']}")
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, images: list[bytes], clients: int, duration: float) -> dict:
    """``clients`` threads posting one image per request until ``duration`` has passed."""
    lat, statuses, lock = [], [], threading.Lock()
    stop = time.perf_counter() + duration

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            k = i
            while time.perf_counter() < stop:
                data = images[k % len(images)]
                k += clients
                t0 = time.perf_counter()
                r = http.post(f"{url}/api/predict", files=[("files", ("x.dcm", data))])
                dt = time.perf_counter() - t0
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        lat.append(dt)
                if r.status_code == 503:
                    time.sleep(0.05)  # a polite client backs off a little

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.count(200)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {
        "clients": clients,
        "requests": len(statuses),
        "200": ok,
        "503": statuses.count(503),
        "other": len(statuses) - ok - statuses.count(503),
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": q[18],
        "img_per_s": ok / wall,
    }


def hostile_requests(dicom: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The issue's hostile requests: name -> files, built from zeros and a real DICOM."""
    import io

    import cv2
    import numpy as np
    import pydicom

    def png(side: int) -> bytes:
        pic = np.zeros((side, side), np.uint8)
        return cv2.imencode(".png", pic, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()

    ds = pydicom.dcmread(dicom)
    ds.Rows = ds.Columns = 64
    buf = io.BytesIO()
    ds.save_as(buf)
    bomb = bytearray(buf.getvalue())
    sof = bomb.index(b"\xff\xc0\x00\x0b")  # baseline frame header: its height and width
    bomb[sof + 5 : sof + 9] = (12000).to_bytes(2, "big") * 2
    big, cap = png(6000), png(2000)
    return {
        f"16 x 6000^2 PNG ({16 * len(big) // 1000} KB)": [(f"{k}.png", big) for k in range(16)],
        "16 x 2000^2 PNG (64 M px)": [(f"{k}.png", cap) for k in range(16)],
        "DICOM 64^2, JPEG 12000^2": [("x.dcm", bytes(bomb))],
    }


def run_hostile(images: Path) -> None:
    dicom = sorted(images.glob("*.dcm"))[0]
    print(f"{'request':28} {'status':>6} {'s':>6} {'RSS before MB':>13} {'peak RSS MB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        argv = untrained_experiment(Path(tmp) / "r34", 1)
        for name, files in hostile_requests(dicom).items():
            proc, url = start_server(argv)
            try:
                before = peak_rss_mb(proc.pid)
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/api/predict", files=[("files", f) for f in files],
                               timeout=600)  # fmt: skip
                dt = time.perf_counter() - t0
                print(f"{name:28} {r.status_code:>6} {dt:>6.1f} {before:>13.0f} "
                      f"{peak_rss_mb(proc.pid):>11.0f}", flush=True)  # fmt: skip
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    ap.add_argument("--setups", nargs="+", default=["demo", "r34_512", "r34_512_x5"])
    ap.add_argument("--backends", nargs="+", default=["torch", "auto"],
                    choices=["torch", "auto", "onnxruntime", "openvino"])  # fmt: skip
    ap.add_argument("--images", type=Path,
                    default=REPO.parent / "shared" / "data" / "siim-real" / "stage2_test")  # fmt: skip
    ap.add_argument("--hostile", action="store_true", help="the hostile requests instead")
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.glob("*.dcm"))]
    if not images:
        raise SystemExit(f"no DICOMs in {args.images}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {len(images)} real DICOMs")  # fmt: skip
    if args.hostile:
        return run_hostile(args.images)
    print(f"{'setup':12} {'backend':17} {'load':8} {'clients':>7} {'requests':>8} {'200':>5} "
          f"{'503':>5} {'other':>5} {'p50 s':>7} {'p95 s':>7} {'img/s':>6} "
          f"{'peak RSS MB':>11}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            argv = setup_argv(setup, Path(tmp), args)
            if argv is None:
                continue
            for backend in args.backends:
                serve_one(setup, [*argv, f"predict.backend={backend}"], images, args.duration)


def setup_argv(setup: str, tmp: Path, args) -> list[str] | None:
    """The serve.py arguments of a setup, its models exported when a backend needs them."""
    exported = any(b != "torch" for b in args.backends)
    if setup == "demo":
        if not list((REPO / "runs" / "demo").glob("fold*/model.pt")):
            print("demo: no runs/demo models (run `make demo` first): skipped")
            return None
        argv = ["--config", "configs/demo.yaml"]
        if exported:  # a copy: the user's runs/demo/export is not touched
            runs = tmp / "demo_runs"
            shutil.copytree(REPO / "runs" / "demo", runs / "demo",
                            ignore=shutil.ignore_patterns("export", "*.lock"))  # fmt: skip
            argv.append(f"train.out_dir={runs}")
    else:
        folds = 5 if setup.endswith("_x5") else 1
        argv = untrained_experiment(tmp / setup, folds)
    if exported:
        from pneumoseg.inference.export import export_experiments

        cfg = load_config(REPO / argv[1], argv[2:])
        images = None if setup == "demo" else real_images(args.images, 4, 512)
        export_experiments(cfg, force=True, images=images)
    return argv


def real_images(folder: Path, n: int, size: int):
    """``n`` real DICOMs of ``folder`` decoded and resized to ``size``: uint8 (n, size, size)."""
    import numpy as np

    from pneumoseg.data.intake import read_image
    from pneumoseg.data.resize import resize_image

    files = sorted(folder.glob("*.dcm"))[:n]
    if len(files) < n:
        raise SystemExit(f"{folder}: {len(files)} DICOM(s), {n} needed")
    return np.stack([resize_image(read_image(f), size) for f in files])


def serve_one(setup: str, argv: list[str], images: list[bytes], duration: float) -> None:
    proc, url = start_server(argv)
    try:
        h = httpx.get(f"{url}/health").json()
        backend = f"{h['backend']} {h['precision']}"
        cap = h["concurrency"] + h["queue"]
        for name, clients in (("at cap", cap), ("3x cap", 3 * cap)):
            r = load(url, images, clients, duration)
            print(f"{setup:12} {backend:17} {name:8} {r['clients']:>7} {r['requests']:>8} "
                  f"{r['200']:>5} {r['503']:>5} {r['other']:>5} {r['p50_s']:>7.2f} "
                  f"{r['p95_s']:>7.2f} {r['img_per_s']:>6.2f} "
                  f"{peak_rss_mb(proc.pid):>11.0f}", flush=True)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
