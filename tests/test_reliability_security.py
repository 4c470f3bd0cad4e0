"""Security: only safe deserialisation anywhere in the code, no path from a client reaches outside the
upload area, downloads are checked by sha256, tokens never reach the logs, and the request limits
are configurable."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
import re
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import random_hf_model, write_hf_dir
from gradio import FileData
from PIL import Image

import app
import llama_adapter
from llama_adapter import CheckpointError, InputError
from llama_adapter import weights as weights_module
from llama_adapter.pipeline import Limits

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_reliabilityTestTokenDoNotLog0123456789"


# -- deserialisation -------------------------------------------------------------------------------------


def python_files() -> list[Path]:
    return [
        p
        for p in sorted(ROOT.rglob("*.py"))
        if not any(part.startswith(".") or part in ("venv", "node_modules") for part in p.relative_to(ROOT).parts)
    ]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _forces_weights_only(function: ast.AST) -> bool:
    """``kwargs["weights_only"] = True`` in ``function``: a wrapper that makes every load safe."""
    return any(
        isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Subscript) and getattr(t.slice, "value", None) == "weights_only" for t in n.targets)
        and _is_true(n.value)
        for n in ast.walk(function)
    )


def unsafe_calls(path: Path, root: Path = ROOT) -> list[str]:
    """Calls that could run code from data: pickle/marshal/shelve/dill/joblib loads, torch.load without
    weights_only=True, yaml.load without a safe loader, numpy.load allowing pickles, eval and exec,
    and trust_remote_code=True."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        leaf = name.rsplit(".", 1)[-1]
        problem = None
        if name.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib") and leaf != "dumps":
            if leaf in ("load", "loads", "open", "Unpickler"):
                problem = "unpickles"
        elif leaf == "load" and (name == "torch.load" or name.endswith("_torch.load")):
            if not _is_true(_keyword(node, "weights_only")):
                inside = [f for f in functions if f.lineno <= node.lineno <= (f.end_lineno or f.lineno)]
                if not (inside and _forces_weights_only(inside[-1])):
                    problem = "torch.load without weights_only=True"
        elif name in ("torch.jit.load", "yaml.unsafe_load", "yaml.full_load"):
            problem = "can build arbitrary objects"
        elif name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or "Safe" not in _dotted(loader):
                problem = "yaml.load without SafeLoader"
        elif leaf == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
            problem = "numpy.load with allow_pickle=True"
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            problem = f"{node.func.id}() of a string"
        if _is_true(_keyword(node, "trust_remote_code")):
            problem = "trust_remote_code=True"
        if problem:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {name}(): {problem}")
    return found


# Each exception names the one call and why it is bounded.
VETTED = {
    # OpenAI's CLIP ViT-L/14 file is a TorchScript archive, which no weights-only reader opens. It is
    # read once, only after its sha256 matched OpenAI's published hash (download_pinned), and its
    # tensors are kept as safetensors.
    "llama_adapter/encoders.py: torch.jit.load()",
}


def test_no_code_path_deserialises_unsafely():
    files = python_files()
    assert len(files) > 40 and ROOT / "app.py" in files
    found = [problem for path in files for problem in unsafe_calls(path)]
    vetted = [p for p in found if re.sub(r":\d+:", ":", p).split(": can build")[0] in VETTED]
    assert [p for p in found if p not in vetted] == []
    assert len(vetted) == len(VETTED), "a vetted call is gone: drop it from VETTED"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    load = "torch" + ".load"  # written in pieces so that scans of this repository do not flag the sample
    bad.write_text(
        "import pickle, torch, yaml\n"
        "pickle" + ".loads(b'')\n"
        f"{load}('x.pth')\n"
        f"{load}('x.pth', weights_only=False)\n"
        "yaml.load('a: 1', Loader=yaml.Loader)\n"
        "eval('1 + 1')\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "torch.load('y.pth', weights_only=True)\n"
        "yaml.load('a: 1', Loader=yaml.SafeLoader)\n"
        "model.eval()\n"
    )
    assert [line.split(":")[1] for line in unsafe_calls(bad, tmp_path)] == ["2", "3", "4", "5", "6", "7"]


def test_a_third_party_loader_that_does_not_say_weights_only_refuses_pickles_too(tmp_path):
    """EfficientNet-Lite's ``from_pretrained`` (our default image encoder) calls torch.load without
    the argument: this torch's default must be the safe one."""
    from bad_inputs import Exploit
    from efficientnet_lite_pytorch import EfficientNet

    marker = tmp_path / "PWNED"
    torch.save({"w": Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(tmp_path / "evil.pth"))
    assert not marker.exists()


# -- paths from clients ----------------------------------------------------------------------------------


@pytest.fixture
def uploads(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def test_only_uploaded_and_example_files_are_opened(uploads, tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    (uploads / "abc").mkdir()
    photo = uploads / "abc" / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)
    (uploads / "abc" / "escape.png").symlink_to("/etc/passwd")
    assert app.upload_path({"path": str(photo)}) == str(photo)
    assert app.upload_path(FileData(path=str(photo))) == str(photo)
    assert app.upload_path({"path": str(examples / "a.png")}, [examples]) == str(examples / "a.png")
    assert app.upload_path(None) is None
    for outside in (
        "/etc/passwd",
        f"{uploads}/../../etc/passwd",
        str(uploads / "abc" / "escape.png"),  # a link out of the folder
        str(examples / "a.png"),  # examples only when the app has them
        str(tmp_path / "uploads-evil" / "x.png"),  # a neighbour whose name starts the same
    ):
        with pytest.raises(gr.Error, match="Upload the image with the request"):
            app.upload_path({"path": outside})
    for malformed in ("/etc/passwd", {"path": 7}, {"url": "http://x"}, ["/etc/passwd"]):
        with pytest.raises(gr.Error, match="Send the image as a file"):
            app.upload_path(malformed)


# -- downloads -------------------------------------------------------------------------------------------


def test_every_download_names_its_sha256():
    assert inspect.signature(weights_module.download).parameters["sha256"].default is inspect.Parameter.empty
    checksums = [sha for _, sha in weights_module.OFFICIAL_ADAPTERS.values()] + [weights_module.SMOLLM2["sha256"]]
    assert all(len(sha) == 64 and int(sha, 16) >= 0 for sha in checksums)
    source = inspect.getsource(weights_module)
    # urlopen appears once, in download(), which checks the digest before the file is used.
    assert source.count("urllib.request.urlopen(") == 1
    assert "sha256_file(part)" in inspect.getsource(weights_module.download)


# -- secrets ---------------------------------------------------------------------------------------------


def test_a_token_in_the_environment_never_reaches_the_logs(tiny_spm, tmp_path, monkeypatch, caplog, capfd):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    directory = write_hf_dir(random_hf_model("tiny"), tmp_path / "hf", tiny_spm)
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: None)
    with caplog.at_level(logging.DEBUG):
        pipe = llama_adapter.load(directory)
        pipe.generate("Hello", max_new_tokens=3)
        with pytest.raises(CheckpointError) as hub:
            llama_adapter.load("someone/a-model-that-is-not-here")  # offline: the hub refuses
        assert app.main(["--base", str(directory)]) == 0
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(hub.value)):
        assert TOKEN not in text and TOKEN[3:12] not in text
    assert "Loaded" in caplog.text  # the logs were captured at all


# -- limits ----------------------------------------------------------------------------------------------


def test_limits_come_from_flags_and_the_environment(monkeypatch):
    defaults = app.parse_args([])
    assert (defaults.max_image_pixels, defaults.max_prompt_chars) == (Limits.max_image_pixels, Limits.max_prompt_chars)
    assert (defaults.max_new_tokens, defaults.queue_size) == (app.MAX_NEW_TOKENS, app.QUEUE_SIZE)
    monkeypatch.setenv("LLAMA_ADAPTER_MAX_PROMPT_CHARS", "2000")
    monkeypatch.setenv("LLAMA_ADAPTER_QUEUE_SIZE", "4")
    args = app.parse_args(["--max-new-tokens", "64", "--max-image-pixels", "1_000_000"])
    assert (args.max_prompt_chars, args.queue_size, args.max_new_tokens, args.max_image_pixels) == (
        2000,
        4,
        64,
        1_000_000,
    )
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv("LLAMA_ADAPTER_MAX_NEW_TOKENS", bad)
        with pytest.raises(SystemExit):
            app.parse_args([])


def test_limits_are_enforced_by_the_pipeline(tiny_pipe):
    pipe = dataclasses.replace(tiny_pipe, limits=Limits(max_image_pixels=100, max_prompt_chars=20, max_new_tokens=8))
    assert pipe.generate("x" * 20, max_new_tokens=8) is not None
    with pytest.raises(InputError, match="21 characters; the limit is 20"):
        pipe.generate("x" * 21)
    with pytest.raises(InputError, match="21 characters; the limit is 20"):
        pipe.chat().ask("x" * 21)
    with pytest.raises(InputError, match="max_new_tokens is 9; the limit here is 8"):
        pipe.generate("Hi", max_new_tokens=9)
    with pytest.raises(InputError, match="11×10 = 110 pixels; the limit is 100"):
        llama_adapter.images.open_image(Image.new("RGB", (11, 10)), max_pixels=pipe.max_image_pixels)


def test_the_app_uses_its_limits(tiny_pipe):
    pipe = dataclasses.replace(tiny_pipe, limits=Limits(max_new_tokens=64))
    demo = app.build_demo(pipe, registry=app.Registry([]), examples_dir=Path("/nonexistent"), queue_size=3)
    [slider] = [b for b in demo.blocks.values() if getattr(b, "elem_id", "") == "max-tokens"]  # the side panel's
    assert slider.maximum == 64 and slider.value == 64
    assert demo._queue.max_size == 3 and "queue of up to 3" in app.header_markdown(pipe, 3)


def test_operators_widen_what_clients_may_name(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.png").write_bytes(b"x")
    roots = app.client_roots([shared])
    assert app.client_may_name(str(shared / "a.png"), roots)
    assert not app.client_may_name(str(tmp_path / "a.png"), roots)
    assert not app.client_may_name("a.png", roots)  # relative: against the working directory, refused
    assert not app.client_may_name("https://example.com/a.png", roots)
    assert app.client_may_name("https://example.com/a.png", roots, allow_urls=True)
    monkeypatch.setenv("LLAMA_ADAPTER_ALLOW_LOCAL_DIRS", f"{shared}{os.pathsep}/srv/more")
    monkeypatch.setenv("LLAMA_ADAPTER_ALLOW_REMOTE_IMAGES", "1")
    args = app.parse_args(["--allow-local-dir", "/srv/third"])
    assert args.allow_local_dir == [shared, Path("/srv/more"), Path("/srv/third")]
    assert args.allow_remote_images
    monkeypatch.delenv("LLAMA_ADAPTER_ALLOW_LOCAL_DIRS")
    monkeypatch.delenv("LLAMA_ADAPTER_ALLOW_REMOTE_IMAGES")
    defaults = app.parse_args([])
    assert defaults.allow_local_dir == [] and not defaults.allow_remote_images
