"""`transferkit serve`: the try-a-model page, its JSON endpoint, and what a browser sees (headless Chromium).

Every server here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
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

from transferkit.use.serve import exposure_warning

pytestmark = pytest.mark.slow  # a real server process (and Chromium) per module


@pytest.fixture(scope="module")
def server(tiny_classifier, tmp_path_factory):
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
        yield type("Server", (), {"url": url, "log": log, "listening": listening, "folder": folder})
    finally:
        stop_process_tree(process)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_binds_loopback_by_default(server):
    assert [(addr.ip, addr.port) for addr in server.listening] == [("127.0.0.1", int(server.url.rsplit(":", 1)[1]))]
    assert f"at {server.url}/" in server.log.read_text()
    assert "warning" not in server.log.read_text()


def test_exposure_warning_only_off_loopback():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert exposure_warning("::1") is None
    assert "anyone who can reach this machine" in exposure_warning("0.0.0.0")


def test_json_endpoint_answers_an_image_and_refuses_the_rest(server, tmp_path):
    image = make_image(tmp_path / "cat.png", CLASS_COLOURS["cat"], size=(80, 60)).read_bytes()
    status, answer = _post(server.url + "/api/predict", image)
    assert status == 200
    assert [row["class"] for row in answer["top"]] == ["cat", "dog"]
    assert sum(row["probability"] for row in answer["top"]) == pytest.approx(1.0, abs=1e-4)
    assert answer["cam_png"].startswith("data:image/png;base64,") and answer["size"] == [80, 60]

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

        browser.choose_file("#file", text)
        error = browser.wait_for("document.getElementById('error').textContent")
        assert "not an image" in error
        assert browser.evaluate("document.querySelectorAll('#top li').length") == 0
    finally:
        browser.close()
