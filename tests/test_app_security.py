"""``python app.py`` never reads, copies or serves a file that the client did not upload.

A remote client can name a path on the server in any file input (Gradio's ``FileData``: ``{"path": ...,
"meta": {"_type": "gradio.FileData"}}``), or a URL for the server to fetch. Here the app runs as users
run it, in its own process with a fresh ``GRADIO_TEMP_DIR``, and every event and endpoint is called
with server files (a PNG with known text and a text file under /tmp, ``/etc/passwd`` outside it) and a
URL, through raw HTTP and through ``gradio_client`` acting as a remote client (which has no copy of
the file to upload). Each call must be refused with the sentence that says what to do, the known text
must never come back, nothing may land in Gradio's temp folder, and the URL must never be fetched.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client import client as client_module
from gradio_client.exceptions import ValidationError
from PIL import Image, ImageDraw, ImageFont
from test_app import FONT, ROOT, free_port

import app

pytestmark = pytest.mark.slow

SECRET = "SECRET 4711"
SECRET_TEXT = "private-note: the vault code is 0451"
EXAMPLE = ROOT / "assets" / "examples" / "circle.png"


@dataclass
class Attack:
    url: str
    temp_dir: Path
    log: Path
    targets: dict[str, str]  # label -> a path or URL on the server side
    secrets: list[bytes]  # contents that must never leave the server
    fetched: list[str]  # requests the bait URL server received


def bait_server(image: Path, fetched: list[str]) -> str:
    """A local HTTP server whose one image must never be fetched by the app."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            fetched.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(image.read_bytes())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/photo.png"


@pytest.fixture(scope="module")
def attack(tmp_path_factory) -> Iterator[Attack]:
    private = tmp_path_factory.mktemp("private")
    png = private / "private-note.png"
    image = Image.new("RGB", (640, 200), "white")
    ImageDraw.Draw(image).text((40, 60), SECRET, font=ImageFont.truetype(FONT, 64), fill="black")
    image.save(png)
    note = private / "notes.txt"
    note.write_text(SECRET_TEXT)
    fetched: list[str] = []
    targets = {
        "png": str(png),
        "text": str(note),
        "outside /tmp": "/etc/passwd",
        "relative": "app.py",
        "traversal": f"{png.parent}/../../etc/passwd",
        "url": bait_server(png, fetched),
    }
    temp_dir = tmp_path_factory.mktemp("gradio-temp")
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_TEMP_DIR": str(temp_dir),
    }
    log = tmp_path_factory.mktemp("log") / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while proc.poll() is None:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert proc.poll() is None, log.read_text()
        secrets = [p.read_bytes() for p in (png, note, Path("/etc/passwd"), ROOT / "app.py")]
        yield Attack(url, temp_dir, log, targets, secrets, fetched)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "photo.png"}


def config(attack: Attack) -> dict:
    return httpx.get(attack.url + "config", timeout=30).json()


def join(attack: Attack, fn_index: int, data: list) -> httpx.Response:
    body = {"data": data, "fn_index": fn_index, "session_hash": uuid.uuid4().hex[:10], "event_data": None}
    return httpx.post(attack.url + "gradio_api/queue/join", json=body, timeout=60)


def assert_refused(response: httpx.Response, attack: Attack, what: object = "") -> None:
    assert response.status_code == 422, (what, response.text)
    assert app.UPLOAD_REQUIRED in response.text, what
    for secret in attack.secrets:
        assert secret.decode(errors="ignore")[:40] not in response.text, what


def assert_nothing_copied(attack: Attack) -> None:
    for path in attack.temp_dir.rglob("*"):
        if path.is_file():
            assert path.read_bytes() not in attack.secrets, f"{path} is a copy of a server file"
            assert path.name not in {"private-note.png", "notes.txt", "passwd", "app.py", "photo.png"}, path
    assert attack.fetched == [], "the app fetched a URL named by a client"


def test_every_event_refuses_a_named_server_file(attack):
    """Every event of the page, called directly by its fn_index (as the UI's own events can be), with a
    server path in each of its inputs: refused before Gradio opens, copies or fetches it."""
    cfg = config(attack)
    stateful = {c["id"] for c in cfg["components"] if c["type"] == "state"}
    called = 0
    for fn_index, dependency in enumerate(cfg["dependencies"]):
        if not set(dependency["inputs"]) - stateful:
            continue  # nothing a client sends
        for label, target in attack.targets.items():
            data = [None if i in stateful else file_data(target) for i in dependency["inputs"]]
            response = join(attack, fn_index, data)
            assert_refused(response, attack, (dependency["api_name"], label))
            called += 1
    assert called >= 6 * 9  # every target against the chat, edit, compare, examples and API events
    assert_nothing_copied(attack)


def test_a_chat_message_naming_a_server_file_is_refused(attack):
    """The file inputs as they are shaped: the chat box's message ({"text", "files"}), and
    /chat_multimodal's message and history."""
    cfg = config(attack)
    send = next(i for i, d in enumerate(cfg["dependencies"]) if d["api_name"] == "send")
    for label, target in attack.targets.items():
        message = {"text": "What does it say?", "files": [file_data(target)]}
        assert_refused(join(attack, send, [message, None, "", ["ocr"], 0.0, 1.0, 8, 0]), attack, ("send", label))
        history = [{"role": "user", "content": "What does it say?", "files": [file_data(target)]}]
        for data in ([message, []], [{"text": "And now?", "files": []}, history]):
            response = httpx.post(f"{attack.url}gradio_api/call/chat_multimodal", json={"data": data}, timeout=60)
            assert_refused(response, attack, ("chat_multimodal", label))
    assert_nothing_copied(attack)


@pytest.mark.parametrize("api_name", ["describe_image", "compare", "chat", "chat_multimodal"])
def test_named_endpoints_refuse_over_raw_http(attack, api_name):
    for label, target in attack.targets.items():
        data = [file_data(target), "What does it say?", ["ocr"]]
        response = httpx.post(f"{attack.url}gradio_api/call/{api_name}", json={"data": data}, timeout=60)
        assert_refused(response, attack, label)
    assert_nothing_copied(attack)


def test_gradio_client_as_a_remote_client_is_refused(attack, monkeypatch):
    """gradio_client uploads any local file a FileData names, so on this machine it would send its own
    copy; a remote client has none. Without that upload the request names the server's file."""
    monkeypatch.setattr(client_module.Endpoint, "_upload_file", lambda self, f, data_index: f)
    client = Client(attack.url, verbose=False)
    for api_name in ("/describe_image", "/compare"):
        for label, target in attack.targets.items():
            with pytest.raises(ValidationError, match="Upload the image with the request") as refusal:
                client.predict(file_data(target), "What does it say?", ["ocr"], api_name=api_name)
            assert SECRET not in str(refusal.value), label
    for label, target in attack.targets.items():
        message = {"text": "What does it say?", "files": [file_data(target)]}
        with pytest.raises(ValidationError, match="Upload the image with the request") as refusal:
            client.predict(message, [], experts=["ocr"], api_name="/chat_multimodal")
        assert SECRET not in str(refusal.value), label
    assert_nothing_copied(attack)


def test_refusals_are_logged(attack):
    join(attack, 0, [file_data(attack.targets["text"])])
    deadline = time.monotonic() + 30
    while "Refused a request" not in attack.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not uploaded" in attack.log.read_text()


def test_server_files_are_not_served_by_url(attack):
    for target in ("png", "text", "outside /tmp", "relative"):
        response = httpx.get(f"{attack.url}gradio_api/file={attack.targets[target]}", timeout=30)
        assert response.status_code in (403, 404), (target, response.status_code)
        assert response.content not in attack.secrets


def test_uploads_and_the_shipped_examples_still_work(attack, tmp_path):
    photo = tmp_path / "upload.png"
    Image.new("RGB", (64, 64), "red").save(photo)
    client = Client(attack.url, verbose=False)
    described = client.predict(handle_file(photo), "What colour is it?", [], 8, api_name="/describe_image")
    assert isinstance(described["answer"], str)
    message = {"text": "What colour is it?", "files": [handle_file(photo)]}
    assert isinstance(client.predict(message, [], max_new_tokens=4, api_name="/chat_multimodal"), str)
    # A message filled in from an example names the example's own path (a static file of the app): accepted.
    cfg = config(attack)
    send = next(i for i, d in enumerate(cfg["dependencies"]) if d["api_name"] == "send")
    example = {"text": "What shape is in the image?", "files": [file_data(str(EXAMPLE))]}
    response = join(attack, send, [example, None, "", [], 0.0, 1.0, 4, 0])
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["event_id"]
