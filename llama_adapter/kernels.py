"""The project's own CPU kernels (``llama_adapter/csrc``), built on first use with the system's C++
compiler for this CPU (``-march=native``) and kept in :func:`~llama_adapter.weights.cache_dir`
under a name that hashes the source, torch's version and the CPU, so the next start loads them in
milliseconds. Where no compiler is found or the build fails (a CPU without AVX2),
:func:`decode_kernels_available` says False with a logged warning, and callers keep torch's kernels."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .weights import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "linear.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp"]


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _library_path() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_signature().encode(), " ".join(FLAGS).encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"linear-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    torch_dir = Path(torch.__file__).parent
    command = [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        str(SOURCE),
        f"-L{torch_dir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
        "-o",
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a second process never loads a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([*command, str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)


@functools.cache
def decode_kernels_available() -> bool:
    """Whether ``torch.ops.llama_adapter.float_linear`` and ``int8_linear`` are loaded (building them
    the first time): on x86-64 with AVX2 and FMA or AVX-512, unless ``LLAMA_ADAPTER_KERNELS=torch``
    asks for torch's own kernels."""
    if os.environ.get("LLAMA_ADAPTER_KERNELS", "own") == "torch" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    target = _library_path()
    try:
        if not target.exists():
            log.info("Building the decode kernels for this CPU (once, ~10 s; kept in %s)", target.parent)
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("The decode kernels could not be built (%s); using torch's", e)
        return False
    torch.library.register_fake("llama_adapter::float_linear", _product_shape)
    torch.library.register_fake("llama_adapter::int8_linear", _product_shape)
    return True


def _product_shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
