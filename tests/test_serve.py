"""`transferkit serve`: the try-a-model page, its JSON endpoint, what a browser sees (headless Chromium), and
hostile clients: other Hosts and Origins, bursts, bombs, slow and broken connections (issue 24).

Every server here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    CHROMIUM,
    CLASS_COLOURS,
    free_port,
    make_image,
    requires_chromium,
    stop_process_tree,
    wait_for_http,
)
from PIL import Image

from transferkit.cli import main
from transferkit.errors import TransferkitError
from transferkit.use.serve import HEAD_TIMEOUT_S
from transferkit.use.web_guard import HostCheck, check_allowed_host, cross_origin, exposure_warning


@pytest.fixture(scope="module")
def server(tiny_classifier, tmp_path_factory):  # a real server process: every test using it is marked slow
    """`transferkit serve` on a free loopback port, started as a user would (default --host)."""
    import psutil

    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = folder / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", "--model", str(tiny_classifier),
                                    "--port", str(port), "--device", "cpu", "--max-upload-mb", "0.5"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/", process, log=log)
        listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        yield type("Server", (), {"url": url, "log": log, "listening": listening, "folder": folder, "port": port,
                                  "pid": process.pid})
    finally:
        stop_process_tree(process)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_binds_loopback_by_default(server):
    assert [(addr.ip, addr.port) for addr in server.listening] == [("127.0.0.1", int(server.url.rsplit(":", 1)[1]))]
    assert f"at {server.url}/" in server.log.read_text()
    assert "warning" not in server.log.read_text()


def test_exposure_warning_only_off_loopback():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert exposure_warning("::1") is None
    assert "anyone who can reach this machine" in exposure_warning("0.0.0.0")


@pytest.mark.slow
def test_json_endpoint_answers_an_image_and_refuses_the_rest(server, tmp_path):
    image = make_image(tmp_path / "cat.png", CLASS_COLOURS["cat"], size=(80, 60)).read_bytes()
    status, answer = _post(server.url + "/api/predict", image)
    assert status == 200
    assert [row["class"] for row in answer["top"]] == ["cat", "dog"]
    assert sum(row["probability"] for row in answer["top"]) == pytest.approx(1.0, abs=1e-4)
    assert answer["cam_png"].startswith("data:image/png;base64,") and answer["size"] == [80, 60]
    seen = Image.open(io.BytesIO(base64.b64decode(answer["seen_png"].split(",", 1)[1])))
    assert seen.size == (64, 64)  # the tiny model's input: the frame as its preprocessing resized and cropped it

    status, answer = _post(server.url + "/api/predict", b"just some text, not an image\n")
    assert status == 400 and "not an image" in answer["error"]
    status, answer = _post(server.url + "/api/predict", b"\0" * (600 * 1024))
    assert status == 413 and "over the 0.5 MB limit" in answer["error"]


class _DevTools:
    """Chromium driven over the DevTools protocol through --remote-debugging-pipe (fds 3 and 4, NUL-framed JSON):
    no websocket client or browser-automation package needed."""

    def __init__(self, profile: Path):
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()

        def map_pipes():  # the browser reads commands on fd 3 and writes answers on fd 4
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=map_pipes, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.session = None

    def call(self, method: str, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait_for("document.readyState === 'complete' && document.getElementById('file') !== null")

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"page never satisfied {expression!r}; body: {self.evaluate('document.body.innerText')}")

    def choose_file(self, selector: str, path: Path) -> None:
        """What a user does in the file dialog; Chromium fires the input's change event."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=20)
        except Exception:
            stop_process_tree(self.process)
        finally:
            os.close(self._write)
            os.close(self._read)


@pytest.mark.slow
@requires_chromium
@pytest.mark.timeout(300)
def test_page_in_chromium_shows_the_top_class_and_refuses_a_text_file(server, tmp_path):
    dog = make_image(tmp_path / "dog.png", CLASS_COLOURS["dog"], size=(90, 70), seed=5)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    browser = _DevTools(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.choose_file("#file", dog)
        top = browser.wait_for("document.querySelector('#top li .name')?.textContent")
        assert top == "dog"
        assert browser.wait_for("document.getElementById('cam').naturalWidth") > 0  # the Grad-CAM overlay rendered
        assert browser.evaluate("document.getElementById('cam').alt") == "Grad-CAM for dog"
        assert browser.evaluate("document.getElementById('seen').naturalWidth") == 64  # the model's view
        assert browser.evaluate("document.title") == "transferkit: model"  # the model folder's name
        assert "64x64" in browser.evaluate("document.body.textContent")  # what the model saw, in words

        browser.choose_file("#file", text)
        error = browser.wait_for("document.getElementById('error').textContent")
        assert "not an image" in error
        assert browser.evaluate("document.querySelectorAll('#top li').length") == 0
    finally:
        browser.close()


# --------------------------------------------------------------------------- issue 24: hostile input and load


def _call(server, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 60):
    """One request with exactly these headers (``Host`` included, when given): (status, headers, JSON or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if is_json else raw
    finally:
        connection.close()


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_host_check_names_the_bound_address_localhost_and_allowed_hosts():
    loopback = HostCheck("127.0.0.1", ["mybox.local"])
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "MyBox.local:8000", "127.0.0.1"):
        assert loopback.refusal(host) is None, host
    for host in ("evil.example.com", "evil.example.com:8000", "10.0.0.5:8000", None, "", "127.0.0.1:x"):
        assert "--allowed-host" in loopback.refusal(host), host
    wildcard = HostCheck("0.0.0.0")
    assert wildcard.refusal("192.168.1.20:8000") is None and wildcard.refusal("rebind.example.com:8000") is not None
    assert HostCheck("192.168.1.20").refusal("localhost:8000") is not None  # not bound to loopback
    for bad in ("http://x", "x:8000", "a/b", ""):
        with pytest.raises(TransferkitError, match="--allowed-host"):
            check_allowed_host(bad)


def test_cross_origin_posts_are_refused_same_origin_and_curl_are_not():
    assert cross_origin({}, "127.0.0.1:8000") is None  # curl, scripts: no Origin
    assert cross_origin({"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}, "127.0.0.1:8000") is None
    assert "cross-origin" in cross_origin({"origin": "https://evil.example.com"}, "127.0.0.1:8000")
    assert "cross-origin" in cross_origin({"origin": "http://127.0.0.1:9999"}, "127.0.0.1:8000")  # another local port
    assert "cross-origin" in cross_origin({"origin": "null"}, "127.0.0.1:8000")  # sandboxed frame, file://
    assert "cross-site" in cross_origin({"sec-fetch-site": "cross-site"}, "127.0.0.1:8000")


@pytest.mark.parametrize("args, message", [
    (["--max-upload-mb", "inf"], "bad value for max_upload_mb: 'inf'; it must be a finite number"),
    (["--max-upload-mb", "1e308"], "bad value for max_upload_mb: 1e+308; it must be in (0, 1024]"),
    (["--allowed-host", "http://evil.example.com/"], "bad value for --allowed-host"),
])
def test_serve_refuses_bad_options_in_one_line(runner, tmp_path, args, message):
    result = runner.invoke(main, ["serve", "--model", str(tmp_path / "none"), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # not a traceback
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.slow
def test_other_hosts_and_origins_are_refused(server, tmp_path):
    image = make_image(tmp_path / "cat.png", CLASS_COLOURS["cat"], size=(40, 30)).read_bytes()
    status, _, answer = _call(server, "GET", "/", headers={"Host": "evil.example.com"})
    assert status == 400 and "--allowed-host" in answer["error"]
    assert _call(server, "GET", "/", headers={"Host": f"localhost:{server.port}"})[0] == 200
    status, _, answer = _call(server, "POST", "/api/predict", image, {"Origin": "https://evil.example.com"})
    assert status == 403 and "cross-origin" in answer["error"]
    status, _, answer = _call(server, "POST", "/api/predict", image, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    status, _, answer = _call(server, "POST", "/api/predict", image, {"Origin": f"http://127.0.0.1:{server.port}",
                                                                      "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and answer["top"][0]["class"] == "cat"


@pytest.mark.slow
def test_every_answer_has_security_headers_and_no_server_version(server):
    status, headers, page = _call(server, "GET", "/")
    assert status == 200
    csp = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    script = re.search(rb"<script>(.*?)</script>", page, re.S).group(1)
    assert f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" in csp  # exactly the page's script
    status, error_headers, answer = _call(server, "GET", "/nope")
    assert status == 404 and "the page is /" in answer["error"]
    for found in (headers, error_headers):
        assert found["x-content-type-options"] == "nosniff" and found["referrer-policy"] == "no-referrer"
        assert "server" not in found and "Python" not in json.dumps(found)


@pytest.mark.slow
def test_multipart_form_upload_is_answered(server, tmp_path):
    image = make_image(tmp_path / "dog.png", CLASS_COLOURS["dog"], size=(40, 30), seed=2).read_bytes()

    def form(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict]:
        body = b"".join(b"--XyZ\r\nContent-Disposition: form-data; name=\"%s\"%s\r\n\r\n%s\r\n"
                        % (name.encode(), b'; filename="%s"' % filename.encode() if filename else b"", data)
                        for name, filename, data in parts) + b"--XyZ--\r\n"
        return body, {"Content-Type": "multipart/form-data; boundary=XyZ"}

    status, _, answer = _call(server, "POST", "/api/predict", *form(("note", None, b"hi"), ("file", "dog.png", image)))
    assert status == 200 and answer["top"][0]["class"] == "dog" and answer["size"] == [40, 30]
    status, _, answer = _call(server, "POST", "/api/predict", *form(("note", None, b"hi")))
    assert status == 400 and "no file" in answer["error"]
    status, _, answer = _call(server, "POST", "/api/predict", *form(("file", "notes.txt", b"not an image")))
    assert status == 400 and "not an image" in answer["error"]


@pytest.mark.slow
def test_bomb_pngs_are_refused_quickly_and_memory_stays_bounded(server):
    bomb = _png_bytes(Image.new("1", (9000, 9000)))  # 9.9 KB; ~850 MB as decoded RGB
    near = _png_bytes(Image.new("1", (4000, 4000)))  # just under the pixel limit: decoded, then reduced
    before = _peak_rss_mb(server.pid)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        bombs = list(pool.map(lambda _: _call(server, "POST", "/api/predict", bomb), range(8)))
    assert time.monotonic() - start < 10
    assert {status for status, _, _ in bombs} == {413}
    assert "above the 16,777,216-pixel limit" in bombs[0][2]["error"]
    with ThreadPoolExecutor(4) as pool:
        nears = list(pool.map(lambda _: _call(server, "POST", "/api/predict", near), range(4)))
    assert {status for status, _, _ in nears} == {200} and nears[0][2]["size"] == [4000, 4000]
    assert _peak_rss_mb(server.pid) - before < 150  # unbounded, 8 bombs at 4 at a time would cost gigabytes


@pytest.mark.slow
def test_a_burst_of_60_requests_is_answered_not_reset(server, tmp_path):
    image = make_image(tmp_path / "cat.png", CLASS_COLOURS["cat"], size=(40, 30)).read_bytes()
    start = threading.Barrier(60)

    def one(_):
        start.wait()
        try:
            return _call(server, "POST", "/api/predict", image, timeout=120)[0]
        except OSError as exc:  # ConnectionResetError, BrokenPipeError, ...
            return type(exc).__name__

    with ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(one, range(60)))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 30


@pytest.mark.slow
def test_slow_and_broken_clients_cost_one_log_line_each(server):
    lines_before = len(server.log.read_text().splitlines())
    with socket.create_connection(("127.0.0.1", server.port)) as silent:  # connects, never sends a request
        silent.settimeout(HEAD_TIMEOUT_S + 5)
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 3
    with socket.create_connection(("127.0.0.1", server.port)) as early:  # hangs up in the middle of the body
        early.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 100000\r\n\r\n"
                      .encode() + b"\x89PNG" * 10)
        time.sleep(0.5)
    for length in (b"\xb2", b"9" * 5000):  # malformed Content-Length
        with socket.create_connection(("127.0.0.1", server.port)) as bad:
            bad.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + length + b"\r\n\r\n")
            bad.settimeout(10)
            assert bad.recv(100).startswith(b"HTTP/1.1 400")
    time.sleep(0.5)
    new = server.log.read_text().splitlines()[lines_before:]
    assert not [line for line in new if "Traceback" in line or "Error" in line], new
    assert sum("sent no complete request" in line for line in new) == 1
    assert sum("hung up before sending its whole upload" in line for line in new) == 1
    assert sum("Invalid HTTP request" in line for line in new) == 2
    assert len(new) <= 6, new
