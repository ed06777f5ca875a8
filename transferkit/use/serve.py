"""A page to try a model: drop an image, see the top-k classes and a Grad-CAM overlay.

Standard library only (:class:`http.server.ThreadingHTTPServer`): ``GET /`` is a single HTML page with a few
lines of plain JavaScript that posts the image's bytes to ``POST /api/predict``, which answers JSON
(``{"top": [{"class", "probability"}], "cam_png": "data:image/png;base64,...", "cam_class", "size"}``), so
``curl --data-binary @photo.jpg http://127.0.0.1:8000/api/predict`` works too. Meant for one person on
their own machine: bound to 127.0.0.1 unless told otherwise, one model call at a time, uploads capped
at ``max_upload_mb``; anything that is not a decodable image is a 400 with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import ipaddress
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from transferkit import params
from transferkit.errors import TransferkitError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 10.0
PREDICT_PATH = "/api/predict"


class ModelService:
    """The model behind the page: image bytes in, the JSON answer out. One request at a time uses the model
    (CAM hooks and torch modules are not thread-safe); the HTTP threads only wait on the lock."""

    def __init__(self, predictor, topk: int = 5, method: str = "gradcam"):
        from transferkit.use.explain import ClassActivationMaps

        params.TOPK.check("topk", topk)
        self.predictor = predictor
        self.topk = min(topk, len(predictor.class_names))
        self.cams = ClassActivationMaps(predictor, method)
        self._lock = threading.Lock()

    def answer(self, data: bytes) -> dict:
        """Top-k classes and a CAM overlay (PNG data URL) for the predicted class of the image in ``data``."""
        from transferkit.data.decode import ImageDecodeError, load_image
        from transferkit.reports.plots import cam_overlay

        try:
            image = load_image(io.BytesIO(data))
        except ImageDecodeError:
            raise BadUpload("the upload is not an image this server can decode; send a JPEG, PNG, BMP, WebP or "
                            "TIFF file") from None
        with self._lock:
            result = self.cams(image)
        order = np.argsort(-result.probabilities)[: self.topk]
        names = self.predictor.class_names
        return {
            "top": [{"class": names[i], "probability": round(float(result.probabilities[i]), 6)} for i in order],
            "cam_class": names[result.target],
            "cam_png": "data:image/png;base64," + base64.b64encode(_png(cam_overlay(result.view, result.heatmap))).decode(),
            "size": [int(image.shape[1]), int(image.shape[0])],
        }


class BadUpload(TransferkitError):
    """The request's body cannot be answered (answered with HTTP 400)."""


def make_server(service: ModelService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for ``service``; port 0 picks a free port."""
    params.MAX_UPLOAD_MB.check("max_upload_mb", max_upload_mb)
    page = _page(service).encode()
    limit = int(max_upload_mb * 1024 * 1024)

    class Handler(BaseHTTPRequestHandler):
        server_version = "transferkit"

        def do_GET(self):
            if self.path.split("?")[0] != "/":
                return self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}; the page is /"})
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")

        def do_POST(self):
            if self.path != PREDICT_PATH:
                return self._send_json(HTTPStatus.NOT_FOUND, {"error": f"POST images to {PREDICT_PATH}"})
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "send the image bytes with a Content-Length"})
            if int(length) > limit:
                self._discard(int(length))
                return self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                       {"error": f"upload of {int(length) / 2**20:.1f} MB is over the {max_upload_mb:g} MB limit"})
            body = self.rfile.read(int(length))
            try:
                self._send_json(HTTPStatus.OK, service.answer(body))
            except BadUpload as exc:
                self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

        def _discard(self, length: int) -> None:
            """Read an oversized body away in small chunks (no memory held) so the client sees the 413 rather than
            a reset connection; a body far over the limit is not read, the connection is closed instead."""
            if length > 8 * limit:
                self.close_connection = True
                return
            while length > 0:
                length -= len(self.rfile.read(min(length, 1 << 16)) or b"") or length

        def _send_json(self, status, payload):
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status, body: bytes, content_type: str):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    server.daemon_threads = True
    return server


def exposure_warning(host: str) -> str | None:
    """A warning when ``host`` is reachable from other machines (anything but a loopback address)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine can upload images to the model; "
            "there is no authentication. Use the default --host 127.0.0.1 unless you mean it.")


def _page(service: ModelService) -> str:
    predictor = service.predictor
    title = html.escape(f"transferkit: {predictor.metadata.get('backbone', 'model')}")
    classes = html.escape(", ".join(predictor.class_names[:20]) + (" ..." if len(predictor.class_names) > 20 else ""))
    return _PAGE.replace("{title}", title).replace("{classes}", classes).replace("{endpoint}", PREDICT_PATH)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body { font-family: sans-serif; margin: 2em; max-width: 60em; }
 #drop { border: 2px dashed #888; padding: 2em; text-align: center; border-radius: 8px; }
 #drop.over { background: #eef; }
 #error { color: #b00; }
 .prob { color: #555; margin-left: 0.5em; }
 img { max-width: 45%; margin-right: 1em; vertical-align: top; }
</style></head>
<body>
<h1>{title}</h1>
<p>Classes: {classes}</p>
<form id="form"><div id="drop">Drop an image here or
 <input type="file" id="file" name="image" accept="image/*"></div></form>
<p id="status"></p><p id="error"></p>
<ol id="top"></ol>
<div><img id="input" alt=""><img id="cam" alt=""></div>
<script>
const $ = (id) => document.getElementById(id);
async function send(file) {
  $("error").textContent = ""; $("top").innerHTML = ""; $("cam").removeAttribute("src");
  $("input").src = URL.createObjectURL(file); $("status").textContent = "asking the model...";
  const response = await fetch("{endpoint}", {method: "POST", body: file});
  const answer = await response.json(); $("status").textContent = "";
  if (!response.ok) { $("error").textContent = answer.error; return; }
  for (const row of answer.top) {
    const item = document.createElement("li");
    item.innerHTML = '<span class="name"></span><span class="prob"></span>';
    item.querySelector(".name").textContent = row["class"];
    item.querySelector(".prob").textContent = (100 * row.probability).toFixed(1) + "%";
    $("top").appendChild(item);
  }
  $("cam").src = answer.cam_png; $("cam").alt = "Grad-CAM for " + answer.cam_class;
  $("status").textContent = "Grad-CAM for " + answer.cam_class;
}
$("file").addEventListener("change", () => $("file").files.length && send($("file").files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""


def serve(model_spec, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, topk: int = 5,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, device: str = "auto", announce=print) -> None:
    """Load the model and serve the page until interrupted (Ctrl-C)."""
    from transferkit.core.runtime import select_device
    from transferkit.models.predictors import load_predictor

    service = ModelService(load_predictor(model_spec, select_device(device)), topk=topk)
    server = make_server(service, host, port, max_upload_mb)
    warning = exposure_warning(host)
    if warning:
        announce(warning)
    bound_host, bound_port = server.server_address[:2]
    announce(f"serving {model_spec} at http://{bound_host}:{bound_port}/ (JSON: POST image bytes to "
             f"{PREDICT_PATH}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.cams.close()
