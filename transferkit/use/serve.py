"""A page to try a model: drop an image, see the top-k classes and a Grad-CAM overlay.

``GET /`` is a single HTML page with a few lines of plain JavaScript that posts the image's bytes to
``POST /api/predict``, which answers JSON (``{"top": [{"class", "probability"}], "cam_png":
"data:image/png;base64,...", "cam_class", "size"}``), so ``curl --data-binary @photo.jpg
http://127.0.0.1:8000/api/predict`` works too, and so does a form upload (``curl -F file=@photo.jpg ...``).

Meant for one person on their own machine, and safe to leave running there: served by uvicorn (its listen
backlog, keep-alive timeout and connection cap: a burst gets queued or a 503, never a reset connection) behind
starlette; a request must name this server in its ``Host`` (a web page on another site cannot reach it through
DNS rebinding) and a POST from another origin is refused (no CSRF); every answer carries a strict
Content-Security-Policy. Uploads are capped in bytes (``max_upload_mb``) and in decoded pixels
(:mod:`transferkit.data.untrusted`); :data:`MODEL_WORKERS` threads decode and call the model, one model call at a
time, and slow clients get :data:`HEAD_TIMEOUT_S` / :data:`BODY_TIMEOUT_S`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import re
import socket
import threading
from collections.abc import Sequence

import numpy as np

from transferkit import params
from transferkit.errors import TransferkitError
from transferkit.use.web_guard import HostCheck, check_allowed_host, client_name, exposure_warning, guarded

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 10.0
PREDICT_PATH = "/api/predict"
MAX_CONNECTIONS = 64  # open connections + requests in progress; past it uvicorn answers 503
BACKLOG = 2048  # connections the kernel queues before the server accepts them
HEAD_TIMEOUT_S = 5  # to send a request's line and headers (uvicorn has no such limit of its own)
BODY_TIMEOUT_S = 60  # to send the body
KEEP_ALIVE_S = 5
MODEL_WORKERS = 2  # threads that decode uploads and call the model; the other requests wait without a thread
DRAIN_FACTOR = 8  # an upload this many times over the limit is not read away: the connection is closed
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one format for everything the server says


class ModelService:
    """The model behind the page: image bytes in, the JSON answer out. Uploads are decoded within pixel bounds;
    one request at a time uses the model (CAM hooks and torch modules are not thread-safe)."""

    def __init__(self, predictor, topk: int = 5, method: str = "gradcam", label: str | None = None):
        from transferkit.use.explain import ClassActivationMaps, explained_models

        params.TOPK.check("topk", topk)
        self.predictor = predictor
        self.label = label or predictor.metadata.get("backbone", "model")  # the page's name for the model
        self.topk = min(topk, len(predictor.class_names))
        self.cams = ClassActivationMaps(explained_models(predictor)[0][1], method)  # an ensemble: its first network
        members = predictor.members or (predictor,)
        self.decode_short_side = max(m.preprocessing.decode_short_side for m in members)
        self._lock = threading.Lock()

    def answer(self, data: bytes) -> dict:
        """Top-k classes and a CAM overlay (PNG data URL) for the predicted class of the image in ``data``."""
        from transferkit.data.decode import ImageDecodeError
        from transferkit.data.untrusted import ImageTooLarge, decode_untrusted
        from transferkit.reports.plots import cam_overlay

        try:
            decoded = decode_untrusted(data, self.decode_short_side)
        except ImageTooLarge as exc:
            raise BadUpload(str(exc), 413) from None
        except ImageDecodeError as exc:
            raise BadUpload(str(exc)) from None
        with self._lock:
            if self.predictor.members:  # the ensemble answers; the map shows where its first network looked for that
                probabilities = self.predictor.predict_proba([decoded.image])[0]
                result = self.cams(decoded.image, int(self.predictor.task.decide(probabilities)))
            else:
                result = self.cams(decoded.image)
                probabilities = result.probabilities
        order = np.argsort(-probabilities)[: self.topk]
        names = self.predictor.class_names
        return {
            "top": [{"class": names[i], "probability": round(float(probabilities[i]), 6)} for i in order],
            "cam_class": names[result.target],
            "cam_png": _data_url(cam_overlay(result.view, result.heatmap)),
            "seen_png": _data_url(result.view),  # the pixels the model was given: its resize and crop of the frame
            "size": list(decoded.size),
        }


class BadUpload(TransferkitError):
    """A request that cannot be answered, with its HTTP status (400 unless said)."""

    def __init__(self, message: str, status: int = 400, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


def make_server(service: ModelService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, allowed_hosts: Sequence[str] = ()) -> Server:
    """A bound (not yet serving) server for ``service``; port 0 picks a free port."""
    params.MAX_UPLOAD_MB.check("max_upload_mb", max_upload_mb)
    page = _page(service)
    app = guarded(_app(service, page.text, int(max_upload_mb * 2**20), max_upload_mb), HostCheck(host, allowed_hosts),
                   page.csp)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return Server(app, sock)


class Server:
    """uvicorn on an already bound socket (so the port is known, and taken, before serving)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        self.socket = sock
        self.address = sock.getsockname()[:2]
        config = uvicorn.Config(app, http=_protocol_class(), lifespan="off", limit_concurrency=MAX_CONNECTIONS,
                                backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5,
                                server_header=False)
        self.uvicorn = uvicorn.Server(config)

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or :meth:`stop`."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def _app(service: ModelService, page: str, limit: int, max_upload_mb: float):
    """The starlette app: the page, the predict endpoint, and JSON for every error."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    workers = anyio.CapacityLimiter(MODEL_WORKERS)

    async def index(request):
        return HTMLResponse(page)

    async def predict(request):
        try:
            with anyio.fail_after(BODY_TIMEOUT_S):
                body = await _read_body(request, limit, max_upload_mb)
            data = await _form_file(request, body) if _is_form(request) else body
            return JSONResponse(await anyio.to_thread.run_sync(service.answer, data, limiter=workers))
        except BadUpload as exc:
            return JSONResponse({"error": str(exc)}, exc.status, {"Connection": "close"} if exc.close else None)
        except TimeoutError:
            return JSONResponse({"error": f"the upload took over {BODY_TIMEOUT_S} s; send it again"}, 408,
                                {"Connection": "close"})
        except ClientDisconnect:
            log.info("%s hung up before sending its whole upload", client_name(request))
            return JSONResponse({"error": "the upload was cut short"}, 400)  # nobody reads it; uvicorn drops it

    async def error(request, exc: HTTPException):
        message = {404: f"no page {request.url.path}; the page is /, images are POSTed to {PREDICT_PATH}",
                   405: f"{request.method} is not allowed here; GET / or POST {PREDICT_PATH}"}.get(exc.status_code,
                                                                                             exc.detail)
        return JSONResponse({"error": message}, exc.status_code, exc.headers)

    return Starlette(routes=[Route("/", index, methods=["GET"]), Route(PREDICT_PATH, predict, methods=["POST"])],
                     exception_handlers={HTTPException: error})


async def _read_body(request, limit: int, max_upload_mb: float) -> bytes:
    """The request's body, refused (413) when it is over ``limit`` bytes; a moderately oversized body is read away
    before the answer so the client sees the 413, not a broken pipe or a reset."""
    declared = request.headers.get("content-length")  # h11 has checked that it is a number
    over = f"the upload is over the {max_upload_mb:g} MB limit"
    if declared is not None and int(declared) > limit:
        refusal = BadUpload(f"upload of {int(declared) / 2**20:.1f} MB is over the {max_upload_mb:g} MB limit", 413,
                            close=int(declared) > DRAIN_FACTOR * limit)
        if not refusal.close:  # read it away first: a client still sending when the answer comes gets a broken pipe
            async for _ in request.stream():
                pass
        raise refusal
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadUpload(over, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_form(request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _form_file(request, body: bytes) -> bytes:
    """The one file of a multipart form upload (``curl -F file=@photo.jpg``), parsed from the body already read."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except HTTPException as exc:
        raise BadUpload(f"malformed form upload: {exc.detail}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise BadUpload("the form has no file; send the image as a file field (curl -F file=@photo.jpg)")
        return await files[0].read()
    finally:
        await form.close()


def _protocol_class():
    """uvicorn's h11 protocol plus a deadline for each request's line and headers: without one, a client that
    connects and sends nothing (or a byte at a time) holds one of the MAX_CONNECTIONS slots forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            self._arm()  # the next request on a kept-alive connection gets its own deadline
            super().on_response_complete()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._expire)

        def _expire(self):
            answering = self.cycle is not None and not self.cycle.response_complete
            if not answering and not self.transport.is_closing():
                log.info("%s:%d sent no complete request within %d s; connection closed", *self.client, HEAD_TIMEOUT_S)
                self.transport.close()

    return HeadDeadline


class _Page:
    """The HTML page and the Content-Security-Policy that lets exactly its inline script and style run."""

    def __init__(self, text: str):
        self.text = text
        script, style = (_sha256(re.search(f"<{tag}>(.*?)</{tag}>", text, re.S).group(1)) for tag in ("script", "style"))
        self.csp = (f"default-src 'none'; script-src {script}; style-src {style}; img-src 'self' data: blob:; "
                    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _page(service: ModelService) -> _Page:
    predictor = service.predictor
    title = html.escape(f"transferkit: {service.label}")
    classes = html.escape(", ".join(predictor.class_names[:20]) + (" ..." if len(predictor.class_names) > 20 else ""))
    filled = {"{title}": title, "{classes}": classes, "{endpoint}": PREDICT_PATH,
              "{about}": html.escape(model_summary(predictor.metadata)),
              "{seen}": html.escape(predictor.preprocessing.describe())}
    text = _PAGE
    for key, value in filled.items():
        text = text.replace(key, value)
    return _Page(text)


def model_summary(metadata) -> str:
    """``tf_efficientnet_lite0, val_accuracy 0.951 (epoch 0)``: what the page says of the model it serves."""
    scores = metadata.get("metrics") or {}
    parts = [metadata.get("backbone") or metadata.get("kind", "model")]
    if "val_accuracy" in scores:
        parts.append(f"val_accuracy {scores['val_accuracy']:.3f} (epoch {scores.get('epoch', '?')})")
    return ", ".join(parts)


def _data_url(image: np.ndarray) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body { font-family: sans-serif; margin: 2em; max-width: 60em; }
 #drop { border: 2px dashed #888; padding: 2em; text-align: center; border-radius: 8px; }
 #drop.over { background: #eef; }
 #error { color: #b00; }
 .prob { color: #555; margin-left: 0.5em; }
 figure { display: inline-block; width: 30%; margin: 0 1em 0 0; vertical-align: top; }
 figure img { max-width: 100%; }
 figcaption { color: #555; font-size: 0.85em; }
 #legend { height: 0.8em; background: linear-gradient(to right, #00007f, #0000ff, #00ffff, #7fff7f, #ffff00, #ff0000, #7f0000); }
 #scale { display: flex; justify-content: space-between; font-size: 0.8em; color: #555; }
</style></head>
<body>
<h1>{title}</h1>
<p>{about}</p>
<p>Classes: {classes}</p>
<form id="form"><div id="drop">Drop an image here or
 <input type="file" id="file" name="image" accept="image/*"></div></form>
<p id="status"></p><p id="error"></p>
<ol id="top"></ol>
<div>
<figure><img id="input" alt=""><figcaption>your image</figcaption></figure>
<figure><img id="seen" alt=""><figcaption>what the model saw: {seen}</figcaption></figure>
<figure><img id="cam" alt=""><figcaption id="camcaption">class activation map</figcaption>
 <div id="legend"></div><div id="scale"><span>little weight</span><span>most weight for the class</span></div></figure>
</div>
<script>
const $ = (id) => document.getElementById(id);
async function send(file) {
  $("error").textContent = ""; $("top").innerHTML = ""; $("cam").removeAttribute("src"); $("seen").removeAttribute("src");
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
  $("seen").src = answer.seen_png; $("cam").src = answer.cam_png; $("cam").alt = "Grad-CAM for " + answer.cam_class;
  $("camcaption").textContent = "where the model looked for " + answer.cam_class + " (Grad-CAM)";
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
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, device: str = "auto", allowed_hosts: Sequence[str] = (),
          announce=print) -> None:
    """Load the model and serve the page until interrupted (Ctrl-C)."""
    from transferkit.core.runtime import select_device
    from transferkit.models.predictors import load_predictor

    params.MAX_UPLOAD_MB.check("max_upload_mb", max_upload_mb)
    for name in allowed_hosts:
        check_allowed_host(name)
    from transferkit.models.saved_model import find_checkpoint

    checkpoint = find_checkpoint(model_spec)
    service = ModelService(load_predictor(checkpoint, select_device(device)), topk=topk, label=checkpoint.parent.name)
    try:
        server = make_server(service, host, port, max_upload_mb, allowed_hosts)
        warning = exposure_warning(host)
        if warning:
            announce(warning)
        bound_host, bound_port = server.address
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        announce(f"serving {model_spec} at http://{shown}:{bound_port}/ (JSON: POST image bytes to "
                 f"{PREDICT_PATH}); Ctrl-C stops")
        server.serve_forever()
    finally:
        service.cams.close()
