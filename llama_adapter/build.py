"""Building a model: the one place that turns (base, adapter, device, dtype, quantize, compile)
into a ready model. :func:`load` reads the weights and returns a serving :class:`Pipeline`;
:func:`build_model` gives the unfused, trainable model that training starts from. Both follow
the same rules: dtype names, which tensors take the base dtype, the "auto" prompt template."""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig, LlamaConfig, plain_adapter_config
from .encoders import build_image_encoder
from .errors import CheckpointError
from .model import AdapterLinear, LlamaAdapter, adapter_state_dict, parameter_group
from .pipeline import Limits, Pipeline
from .prompts import Template
from .quantize import can_pack, pack_linears, quantize_model, use_decode_kernels
from .tokenizer import Tokenizer
from .weights import AdapterWeights, BaseWeights, check_keys, load_adapter, load_base, read_adapter_metadata

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_ADAPTER = ASSETS / "demo-adapter.safetensors"
DEFAULT_BASE = "smollm2-135m"

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
ADAPTER_DTYPE = torch.float32
"""Adapter tensors and every other trainable tensor (norms, biases, scales, gates, LoRA, the
visual branch) keep this precision whatever the base file holds, as the released code does
(it casts them to float32): trained values stay exact, and training updates them in full precision."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype from its name (``fp32``, ``bf16``, ``fp16`` or the long names); ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


AUTO = "auto"
"""``quantize``'s default: the fastest verified precision for the device (:func:`choose_precision`)."""


def choose_precision(
    device: torch.device, dtype: torch.dtype | str | None, quantize: str | None
) -> tuple[torch.dtype, str | None, str]:
    """The base's dtype and quantization, and why. Whatever is asked is kept; with neither asked,
    the fastest setting whose quality we verified: on CPU, weight-only int8 (2.6× float32's decoding
    speed, perplexity within 0.7 % of float32's, the demo model's held-out answers re-checked; see
    the README), also where the CPU has native bfloat16, since int8 reads half of bfloat16's bytes
    per token; on a GPU, bfloat16 (float16 where bfloat16 is missing). ``quantize=None`` or an
    explicit ``dtype`` with ``quantize`` left to ``"auto"`` give unquantized weights in that dtype."""
    asked = parse_dtype(dtype)
    if quantize != AUTO:
        return asked or default_dtype(device), quantize, "as asked"
    if asked is None and device.type == "cpu":
        why = "the CPU default (2.6× float32's decoding speed; pass quantize=None or dtype='fp32' for exact float32)"
        return torch.float32, "int8", why
    return asked or default_dtype(device), None, "as asked" if asked else f"the {device.type} default"


def default_template(adapter: AdapterConfig | None, tokenizer: Tokenizer, saved: Template | None = None) -> Template:
    """The prompt template when none is asked for: the one the adapter was trained with
    (``saved``); Alpaca for the official wiring (the released checkpoints were trained on it) and
    for tokenizers without a chat template; otherwise the base model's own chat template."""
    if saved:
        return saved
    if adapter is not None and adapter.wiring == "official":
        return "alpaca"
    return "chat" if tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) is not None else "alpaca"


# -- the model ---------------------------------------------------------------------------------------


def build_model(
    base: BaseWeights,
    adapter: AdapterWeights | None,
    *,
    adapter_config: AdapterConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_weights: str | None = "openai",
    pretrained_encoder: bool = True,
) -> LlamaAdapter:
    """The unfused, trainable model: built on the meta device, base tensors assigned without
    copies, the rest initialised as a fresh adapter, dtypes set by :func:`set_dtypes`, then the
    adapter file read key-exactly (``adapter_config`` is used when there is no file)."""
    acfg = adapter.config if adapter is not None else adapter_config or plain_adapter_config()
    with torch.device("meta"):
        model = LlamaAdapter(base.config, acfg)
    expected_base = {
        n: p.shape
        for n, p in model.named_parameters()
        if parameter_group(model, n) is None or n.endswith("norm.weight") and n.split(".")[0] in ("layers", "norm")
    }
    check_keys(expected_base, base.state_dict, f"Base model {base.source}")
    model.load_state_dict(base.state_dict, strict=False, assign=True)
    model.materialize("cpu")
    if acfg.image_encoder is not None:
        model.image_encoder = build_image_encoder(
            acfg.image_encoder, pretrained=pretrained_encoder, clip_weights=clip_weights
        )
    # Before the adapter is read: its tensors are copied into the model's, which must already
    # hold its precision (a norm that came in with a float16 base file would round it).
    set_dtypes(model, dtype)
    if adapter is not None:
        load_adapter_into(model, adapter)
    return model.to(device)


def set_dtypes(model: LlamaAdapter, dtype: torch.dtype) -> None:
    """The one rule for dtypes: the frozen base and the image encoder take ``dtype``; every
    trainable tensor takes :data:`ADAPTER_DTYPE`, also the norms that came with the base file."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("image_encoder.") and param.dtype.is_floating_point:
                frozen = parameter_group(model, name) is None
                param.data = param.data.to(dtype if frozen else ADAPTER_DTYPE)
    if model.image_encoder is not None:
        model.image_encoder.to(dtype)


def load_adapter_into(model: LlamaAdapter, adapter: AdapterWeights) -> None:
    """Copy adapter tensors into ``model``: every key must map to an adapter parameter of the
    same shape and every adapter parameter must be filled."""
    params = adapter_state_dict(model)
    check_keys({n: p.shape for n, p in params.items()}, adapter.state_dict, f"Adapter {adapter.source}")
    with torch.no_grad():
        for name, tensor in adapter.state_dict.items():
            params[name].copy_(tensor)


def stored_dtypes(model: LlamaAdapter) -> dict[str, str | None]:
    """What the frozen base, the adapter (every trainable tensor) and the image encoder are
    stored in, read from the tensors of an unfused model."""
    found: dict[str, set[str]] = {"base": set(), "adapter": set(), "image_encoder": set()}
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            part = "image_encoder"
        else:
            part = "base" if parameter_group(model, name) is None else "adapter"
        found[part].add(str(param.dtype).removeprefix("torch."))
    return {part: "+".join(sorted(names)) or None for part, names in found.items()}


def prepare_for_inference(model: LlamaAdapter, *, quantize: str | None = None, compile: bool = False) -> bool:
    """Fuse, quantize or pack the base linears, switch to eval mode and optionally compile the
    decode step, in place. Returns whether it compiled.

    Fusing folds input scales into the frozen weights and stores norms and biases in the compute
    dtype. In float32 that changes nothing; in half precision the unfused model casts them to the
    activations' dtype at every call anyway, so the fused one computes the same, without the casts.
    """
    model.fuse()
    device = model.tok_embeddings.weight.device
    if quantize:
        quantize_model(model, quantize, prompt_copy=quantize == "int8" and wants_prompt_copy(model, device))
    elif can_pack(device, model.tok_embeddings.weight.dtype) and not compile:
        pack_linears(model)  # inductor cannot take oneDNN's packed weights
    else:
        use_decode_kernels(model)
    model.eval()
    return compile and compile_decoding(model)


PROMPT_COPY_MAX_WEIGHTS = 1_000_000_000
"""CPU int8 keeps a bfloat16 copy of the base for prompt chunks up to this many weights (2 bytes
each: +0.3 GB for the demo's SmolLM2-135M, where a 7B would need +13 GB)."""


def wants_prompt_copy(model: LlamaAdapter, device: torch.device) -> bool:
    """Whether int8 weights on ``device`` get a packed bfloat16 copy for prompt chunks
    (:class:`~llama_adapter.quantize.Int8Linear`), logged either way."""
    if not can_pack(device, torch.bfloat16):
        return False
    linears = [m.base for m in model.modules() if isinstance(m, AdapterLinear)] + [model.output]
    weights = sum(m.weight.numel() for m in linears if isinstance(m, nn.Linear))
    if weights > PROMPT_COPY_MAX_WEIGHTS:
        log.info(
            "Prompts are prefilled with the int8 weights (a bfloat16 copy of %.1fB weights would take %.0f GB more)",
            weights / 1e9,
            weights * 2 / 2**30,
        )
        return False
    log.info(
        "Prompts are prefilled with a bfloat16 copy of the weights (+%.0f MB; decoding stays int8)", weights * 2 / 2**20
    )
    return True


def can_compile(device: torch.device) -> bool:
    """Whether inductor can compile here; if not, a warning that says what to install."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        log.warning("Compiling needs a C++ compiler on CPU (apt install g++); decoding stays eager")
        return False
    return True


def compile_decoding(model: LlamaAdapter) -> bool:
    """Compile the model's decode step; on failure say why and keep decoding eager (slower, same
    answers) rather than refuse to serve. Returns whether it compiled."""
    if not can_compile(model.tok_embeddings.weight.device):
        return False
    started = time.perf_counter()
    log.info("Compiling the decode step (1-3 min the first time on a small CPU, seconds once cached)")
    try:
        model.compile_decoding()
    except Exception as e:  # inductor's failures are many and version-specific
        log.warning("Could not compile the decode step (%s: %s); decoding stays eager", type(e).__name__, e)
        return False
    log.info("Compiled the decode step in %.1f s", time.perf_counter() - started)
    return True


# -- a serving pipeline ------------------------------------------------------------------------------


def load(
    base: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = AUTO,
    compile: bool = False,
    clip_weights: str | None = "openai",
    template: Template | None = None,
    limits: Limits | None = None,
    force: bool = False,
) -> Pipeline:
    """Load a base model and (optionally) an adapter; return a :class:`Pipeline`.

    With neither, the shipped demo model (``assets/``) is used, or plain ``smollm2-135m`` when
    it is absent. ``base`` may also be ``"tiny"`` or ``"tiny-tied"``: random weights (seed 0)
    with a byte tokenizer, for tests and quick tries. ``adapter`` is an official name
    (``BIAS-7B``, ``LORA-BIAS-7B``, ``LORA-BIAS-7B-v21``, ``CAPTION-7B``), an official ``.pth`` or
    one of our ``.safetensors``; our adapters name their base, so ``base`` may be left out.
    ``dtype`` is the frozen base's (adapter tensors stay float32). ``quantize="int8"`` stores the
    base's linear weights in 8 bits (bitsandbytes on CUDA, weight-only int8 on CPU). With neither
    given, the fastest verified precision is chosen and logged (:func:`choose_precision`):
    weight-only int8 on CPU, bfloat16 on a GPU; ``quantize=None`` or ``dtype="fp32"`` give exact
    float32.
    ``compile=True`` compiles the one-token decode step with ``torch.compile`` before returning:
    1.1-1.4× faster decoding on CPU (``benchmarks/generate.py``), for 1-3 minutes of compiling
    the first time on a small CPU and seconds afterwards (inductor's cache on disk); if it cannot
    compile it warns and decodes eager. An official adapter on a base configured unlike LLaMA-1 7B
    (e.g. LLaMA-2) is refused; ``force=True`` loads it with a warning.
    """
    started = time.perf_counter()
    if base is None and adapter is None:
        adapter = DEFAULT_ADAPTER if DEFAULT_ADAPTER.is_file() else None
        base = None if adapter else DEFAULT_BASE
    if base is None:
        ours = str(adapter).endswith(".safetensors")
        base = read_adapter_metadata(Path(adapter)).get("base") if ours else None
        if base is None:
            raise CheckpointError(
                f"Adapter {adapter} needs a base model: pass base=<path to LLaMA-7B> (official adapters "
                "were trained on LLaMA-7B)."
            )
    base_weights = load_base(base)
    adapter_weights = load_adapter(adapter, base_weights.config, force=force) if adapter is not None else None
    pipe = build_pipeline(
        base_weights,
        adapter_weights,
        device=device,
        dtype=dtype,
        quantize=quantize,
        compile=compile,
        clip_weights=clip_weights,
        template=template,
        limits=limits,
    )
    pipe.info.update(
        base=str(base),
        adapter=str(adapter) if adapter is not None else None,
        load_seconds=round(time.perf_counter() - started, 2),
    )
    log.info("Loaded %s", pipe.info)
    return pipe


def build_pipeline(
    base: BaseWeights,
    adapter: AdapterWeights | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = AUTO,
    compile: bool = False,
    clip_weights: str | None = "openai",
    pretrained_encoder: bool = True,
    template: Template | None = None,
    limits: Limits | None = None,
) -> Pipeline:
    """A :class:`Pipeline` from weights already read (what :func:`load` does after reading them)."""
    device = torch.device(device)
    dtype, quantize, why = choose_precision(device, dtype, quantize)
    log.info("Precision: %s (%s)", f"{quantize} weights" if quantize else str(dtype).removeprefix("torch."), why)
    if adapter is not None and "base_config" in adapter.metadata:  # ours: it says which base it was trained on
        check_our_base(adapter, base)
    model = build_model(
        base, adapter, device=device, dtype=dtype, clip_weights=clip_weights, pretrained_encoder=pretrained_encoder
    )
    dtypes = stored_dtypes(model)
    compiled = prepare_for_inference(model, quantize=quantize, compile=compile)
    if quantize:
        dtypes["base"] = quantize
    if template is None:
        saved = adapter.metadata.get("prompt_template") if adapter is not None else None
        template = default_template(model.adapter_config, base.tokenizer, saved)
    info = {
        "base": base.source,
        "base_fingerprint": base.fingerprint,
        "adapter": adapter.source if adapter is not None else None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "dtypes": dtypes,
        "quantize": quantize,
        "precision_choice": why,
        "compiled": compiled,
        "template": template,
        "image_encoder": model.adapter_config.image_encoder,
    }
    system_prompt = adapter.metadata.get("system_prompt") if adapter is not None else None
    return Pipeline(
        model, base.tokenizer, template=template, info=info, system_prompt=system_prompt, limits=limits or Limits()
    )


def check_our_base(adapter: AdapterWeights, base: BaseWeights) -> None:
    """Refuse one of our adapters on a base of other shapes; warn on one of other weights."""
    expected = LlamaConfig(**adapter.metadata["base_config"])
    got = base.config
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
    if any(getattr(expected, k) != getattr(got, k) for k in shape):
        raise CheckpointError(
            f"Adapter {adapter.source} was trained on {adapter.metadata.get('base')!r} "
            f"(width {expected.dim}, {expected.n_layers} layers, vocabulary {expected.vocab_size}), but the base "
            f"you loaded has width {got.dim}, {got.n_layers} layers, vocabulary {got.vocab_size}: load it with "
            f"base={adapter.metadata.get('base')!r}."
        )
    if adapter.metadata.get("base_fingerprint") not in (None, base.fingerprint):
        warnings.warn(
            f"Adapter {adapter.source} was trained on a base with fingerprint {adapter.metadata['base_fingerprint']}; "
            f"this base has {base.fingerprint}. Same shapes, different weights: answers may be off.",
            stacklevel=4,
        )
