"""`transferkit serve` under load and hostile uploads, on 127.0.0.1 (issue 24).

A tf_efficientnet_lite0 classifier (real ImageNet backbone from ../shared/weights, fresh 2-class head) is served
by ``transferkit serve --device cpu`` in a subprocess, then:

1. ``--requests`` POSTs of a real 720p JPEG photo at ``--concurrency`` (each answer is top-k + a Grad-CAM PNG);
2. a burst: ``--burst`` requests released together (a barrier), each on its own connection;
3. ``--bombs`` near-bomb PNGs (4000x4000 1-bit, 16 M pixels, ~2 KB: just under the pixel limit, so decoded) at
   ``--bomb-concurrency``, then as many real bombs (9000x9000 1-bit, 9.9 KB, ~850 MB as RGB; refused); the same
   two through the logged pyfunc model served by ``mlflow models serve --env-manager local`` (sqlite store in a
   temp folder);
4. ``--stalled`` connections that never send a request (slowloris), and 5 requests while they are open and after the
   server has closed them (``HEAD_TIMEOUT_S``).

5. what the box-reduce of a large non-JPEG upload costs in fidelity: the ../shared/photos resized to a short side of
   1100-3000 px and saved as PNG, the backbone's pooled features of the full decode against those of
   :func:`transferkit.data.untrusted.decode_untrusted` (cosine; the JPEG draft's own figure is in input.md).

For each phase: answers by status, connection errors (resets, broken pipes: the issue's bug), p50/p95 latency,
wall time, and the server's peak RSS (VmHWM, which only grows) and its largest sampled RSS during the phase.
The machine is shared: latencies include other work on it.

    .venv/bin/python bench/bench_serve.py
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import BACKBONE, REPO, SHARED, WEIGHTS
from PIL import Image

PHOTO = SHARED / "photos" / "cat_720p.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--bombs", type=int, default=20)
    parser.add_argument("--bomb-concurrency", type=int, default=4)
    parser.add_argument("--stalled", type=int, default=200, help="connections that never send a request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = _checkpoint(Path(tmp))
        photo = PHOTO.read_bytes()
        near, bomb = (_png(Image.new("1", size)) for size in ((4000, 4000), (9000, 9000)))
        serve = [sys.executable, "-m", "transferkit", "serve", "--model", str(model), "--port", "{port}", "--device",
                 "cpu"]
        with _Server(serve, Path(tmp) / "server.log", ready="/") as server:
            print(f"model {BACKBONE} (2 classes), server pid {server.pid}, idle RSS {server.rss_mb():.0f} MB; "
                  f"photo {len(photo) / 1024:.0f} KB, near-bomb {len(near) / 1024:.1f} KB, bomb {len(bomb) / 1024:.1f} KB")
            server.request(photo)  # warm-up: first Grad-CAM call
            print(f"\n{'phase':<34}{'answers':<24}{'conn. errors':>13}{'p50 s':>8}{'p95 s':>8}{'wall s':>8}{'peak RSS MB':>13}"
                  f"{'max RSS in phase':>18}")
            _phase(server, f"{args.requests} photos @ {args.concurrency}", [photo] * args.requests, args.concurrency)
            _phase(server, f"burst of {args.burst} at once", [photo] * args.burst, args.burst, barrier=True)
            _phase(server, f"{args.bombs} near-bomb PNGs @ {args.bomb_concurrency}", [near] * args.bombs,
                   args.bomb_concurrency)
            _phase(server, f"{args.bombs} bomb PNGs @ {args.bomb_concurrency}", [bomb] * args.bombs,
                   args.bomb_concurrency)
            _stalled(server, args.stalled, photo)
            errors = [line for line in server.log.read_text().splitlines() if "Traceback" in line]
            print(f"\nserver log: {len(server.log.read_text().splitlines())} lines, {len(errors)} tracebacks")
        _pyfunc_bombs(model, Path(tmp), near, bomb, args.bombs, args.bomb_concurrency)
        _reduce_fidelity(model)


def _pyfunc_bombs(model: Path, tmp: Path, near: bytes, bomb: bytes, count: int, concurrency: int) -> None:
    """The same PNGs sent to the logged pyfunc model through ``mlflow models serve`` (base64 in JSON)."""
    import base64
    import json
    import os

    import mlflow

    from transferkit.tracking.pyfunc_model import log_model

    store = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        uri = log_model(model).model_uri
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h",
               "127.0.0.1", "-p", "{port}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,  # mlflow starts `uvicorn` from PATH: this venv's
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    with _Server(command, tmp / "mlflow.log", ready="/ping", path="/invocations",
                 content_type="application/json", env=env) as server:
        print(f"\nmlflow models serve, pid {server.pid} (+ worker), idle RSS {server.rss_mb():.0f} MB")
        for name, png in (("near-bomb", near), ("bomb", bomb)):
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}})
            _phase(server, f"{count} {name} PNGs @ {concurrency}", [body.encode()] * count, concurrency)


def _reduce_fidelity(model: Path) -> None:
    import numpy as np
    import torch

    from transferkit.data.decode import load_image
    from transferkit.data.untrusted import decode_untrusted
    from transferkit.models.predictors import load_predictor

    predictor = load_predictor(model, torch.device("cpu"))
    transform, short = predictor.preprocessing.eval_transform(), predictor.preprocessing.decode_short_side
    photos = [Image.open(path).convert("RGB") for path in sorted((SHARED / "photos").glob("*.jpg"))]

    def features(image):
        with torch.inference_mode():
            net = predictor.model
            return net.forward_head(net.forward_features(transform(image)[None]), pre_logits=True)

    print(f"\nbox-reduce fidelity ({len(photos)} photos as PNG, working short side {short} px)")
    for side in (1100, 1600, 2200, 3000):
        cosines = []
        for photo in photos:
            scale = side / min(photo.size)
            data = _png(photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC))
            reduced = decode_untrusted(data, short).image
            full = load_image(io.BytesIO(data))
            cosines.append(torch.nn.functional.cosine_similarity(features(full), features(reduced)).item())
        print(f"  short side {side:>4} px -> {min(reduced.shape[:2]):>4} px kept: feature cosine mean "
              f"{np.mean(cosines):.5f}, min {np.min(cosines):.5f}")


def _stalled(server, count: int, photo: bytes) -> None:
    """``count`` connections that never send a request (slowloris), and what a real client gets meanwhile."""
    import socket

    from transferkit.use.serve import HEAD_TIMEOUT_S

    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    _phase(server, f"5 photos, {count} stalled open", [photo] * 5, 1)
    time.sleep(HEAD_TIMEOUT_S + 1)
    closed = 0
    for sock in stalled:
        sock.settimeout(1)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            pass
        sock.close()
    _phase(server, f"5 photos after {closed}/{count} closed", [photo] * 5, 1)


def _phase(server, name: str, bodies: list[bytes], concurrency: int, barrier: bool = False) -> None:
    gate = threading.Barrier(len(bodies)) if barrier else None
    server.sampled_max = 0.0

    def one(body: bytes):
        if gate is not None:
            gate.wait()
        start = time.perf_counter()
        try:
            status = server.request(body)
        except OSError as exc:  # ConnectionResetError, BrokenPipeError, RemoteDisconnected, timeouts
            return type(exc).__name__, time.perf_counter() - start
        return status, time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    statuses = [status for status, _ in results]
    answered = sorted({s for s in statuses if isinstance(s, int)})
    answers = ", ".join(f"{statuses.count(s)}x{s}" for s in answered)
    errors = len([s for s in statuses if not isinstance(s, int)])
    latencies = sorted(seconds for status, seconds in results if isinstance(status, int))
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    sampled = f"{server.sampled_max:.0f}" if server.sampled_max else "-"  # a phase shorter than one sample
    print(f"{name:<34}{answers:<24}{errors:>13}{p50:>8.2f}{p95:>8.2f}{wall:>8.1f}{server.peak_rss_mb():>13.0f}"
          f"{sampled:>18}")


class _Server:
    """A server subprocess (``command`` with ``{port}`` filled in) on a free loopback port, ready once GET ``ready``
    answers 200; the RSS of its process tree (mlflow serves from a child) sampled every 20 ms."""

    def __init__(self, command: list[str], log: Path, ready: str, path: str = "/api/predict",
                 content_type: str = "application/octet-stream", env: dict | None = None):
        self.command, self.log, self.ready, self.path = command, log, ready, path
        self.content_type, self.env = content_type, env
        self.sampled_max = 0.0

    def __enter__(self):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([part.format(port=self.port) for part in self.command], cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.pid = self.process.pid
        deadline = time.monotonic() + 240
        while not self._answers(self.ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.command[:4]} did not start:\n{self.log.read_text()}")
            time.sleep(0.5)
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc):
        import psutil

        self._stop.set()
        children = psutil.Process(self.pid).children(recursive=True)
        self.process.terminate()
        self.process.wait(timeout=60)
        for child in psutil.wait_procs(children, timeout=20)[1]:
            child.kill()

    def _answers(self, path: str) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def request(self, body: bytes) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            connection.request("POST", self.path, body, {"Content-Type": self.content_type})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def rss_mb(self) -> float:
        return sum(_status_kb(pid, "VmRSS") for pid in self._tree()) / 1024

    def peak_rss_mb(self) -> float:
        """The largest VmHWM in the tree (the process that holds the model)."""
        return max(_status_kb(pid, "VmHWM") for pid in self._tree()) / 1024

    def _tree(self) -> list[int]:
        import psutil

        return [self.pid, *(child.pid for child in psutil.Process(self.pid).children(recursive=True))]

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.sampled_max = max(self.sampled_max, self.rss_mb())
            except (OSError, KeyError):
                continue  # a child came or went


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _checkpoint(folder: Path) -> Path:
    from transferkit.models.backbones import load_backbone
    from transferkit.models.saved_model import checkpoint_metadata, save_checkpoint

    model, preprocessing = load_backbone(BACKBONE, weights=WEIGHTS, num_classes=2)
    metadata = checkpoint_metadata(model, kind="classifier", class_names=["cat", "dog"], preprocessing=preprocessing)
    (folder / "model").mkdir()
    save_checkpoint(folder / "model" / "model", model, metadata)
    return folder / "model"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
