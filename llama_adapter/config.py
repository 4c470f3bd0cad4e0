"""Model configuration: the LLaMA base and the Adapter V2 settings, with named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
"""The seven linear layers of a LLaMA block (Meta names); bias, scale and LoRA attach to these."""

Wiring = Literal["official", "paper"]

ROPE_SCALINGS = ("linear", "dynamic", "llama3")
"""RoPE scaling types this library computes (transformers' ``rope_type`` names)."""


@dataclass(frozen=True)
class RopeScaling:
    """How positions are stretched beyond the context a model was pre-trained on, with
    transformers' meanings (``rope_parameters`` / ``rope_scaling`` in ``config.json``):

    * ``linear``: every frequency divided by ``factor``.
    * ``dynamic`` (NTK): the base grows with the length of the sequence being computed, once it
      passes ``original_context``; within it the frequencies are the default ones.
    * ``llama3`` (Llama 3.1, 3.2): low frequencies divided by ``factor``, high ones kept, the band
      between (wavelengths from ``original_context / high_freq_factor`` to
      ``original_context / low_freq_factor``) interpolated.
    """

    type: Literal["linear", "dynamic", "llama3"]
    factor: float
    original_context: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise ValueError(f"RoPE scaling {self.type!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}")
        if self.factor < 1:
            raise ValueError(f"RoPE scaling factor must be at least 1, got {self.factor}")


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a LLaMA-architecture language model (Meta parameter names)."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from to_dict(), e.g. an adapter's metadata
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in LLAMA_PRESETS:
            raise ValueError(f"Unknown base preset {name!r}; known presets: {', '.join(LLAMA_PRESETS)}")
        return dataclasses.replace(LLAMA_PRESETS[name], **overrides)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], name: str = "meta", vocab_size: int | None = None) -> LlamaConfig:
        """Build from a Meta ``params.json`` (LLaMA 1/2/3 layout)."""
        if params.get("use_scaled_rope"):
            raise ValueError(
                "params.json asks for Llama 3.1's scaled RoPE, whose constants Meta's folder does not record: "
                "load the Hugging Face copy of this model (config.json + safetensors) instead"
            )
        dim = params["dim"]
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size; pass the tokenizer's vocabulary size")
            vocab = vocab_size
        return cls(
            name=name,
            vocab_size=vocab,
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            hidden_dim=meta_ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=params.get("max_seq_len") or meta_context(params),
        )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "hf") -> LlamaConfig:
        """Build from a transformers ``config.json`` of a Llama model (Llama 1, 2, 3, 3.1, 3.2 and
        the many models of that architecture). What this model would compute differently is refused."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"Only Llama-architecture models are supported, got model_type={hf.get('model_type')!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{flag}=true (biases on the base's linear layers) is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (Llama uses silu)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        if head_dim * n_heads != hf["hidden_size"]:
            raise ValueError("head_dim * num_attention_heads != hidden_size is not supported")
        context = hf.get("max_position_embeddings", 2048)
        scaling = hf_rope_scaling(rope, context)
        if scaling is not None and scaling.type in ("linear", "dynamic"):
            # The config's context is the one the positions were trained on; the scaling exists to
            # stretch it by ``factor`` (transformers itself sets no limit).
            context = int(context * scaling.factor)
        return cls(
            name=name,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            hidden_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=context,
            rope_scaling=scaling,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hf_rope_scaling(rope: dict[str, Any], max_position_embeddings: int) -> RopeScaling | None:
    """transformers' RoPE parameters → :class:`RopeScaling` (``None`` for plain RoPE)."""
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "default":
        return None
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"RoPE scaling {kind!r} is not supported (this library computes {', '.join(ROPE_SCALINGS)}); "
            "its outputs would differ from the model's"
        )
    if kind == "dynamic":
        original = max_position_embeddings  # what transformers' dynamic NTK measures lengths against
    else:
        original = rope.get("original_max_position_embeddings") or max_position_embeddings
    return RopeScaling(
        type=kind,
        factor=float(rope["factor"]),
        original_context=int(original),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
    )


def meta_context(params: dict[str, Any]) -> int:
    """The context of a Meta ``params.json``, which does not record it: LLaMA-1 (RMSNorm eps 1e-6)
    was trained on 2,048 tokens, Llama 3 (vocabulary 128,256) on 8,192, Llama 2 on 4,096."""
    if params.get("norm_eps", 1e-5) <= 1e-6:
        return 2048
    return 8192 if params.get("vocab_size") == 128256 else 4096


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """FFN width as Meta's reference code computes it (11008 for LLaMA-7B)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        LlamaConfig("llama-7b", 32000, 4096, 32, 32, 32, 11008, norm_eps=1e-6),
        LlamaConfig("llama-65b", 32000, 8192, 80, 64, 64, 22016, norm_eps=1e-5),
        LlamaConfig("llama-2-7b", 32000, 4096, 32, 32, 32, 11008, norm_eps=1e-5, max_seq_len=4096),
        LlamaConfig("llama-3-8b", 128256, 4096, 32, 32, 8, 14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
        LlamaConfig(
            "smollm2-135m",
            49152,
            576,
            30,
            9,
            3,
            1536,
            norm_eps=1e-5,
            rope_theta=100000.0,
            tie_embeddings=True,
            max_seq_len=8192,
        ),
        # Tiny random-init models for tests: GQA, and multi-head with tied embeddings. FFN widths
        # follow Meta's rule with multiple_of=32, so the same shapes can be written as params.json.
        LlamaConfig("tiny", 320, 64, 4, 4, 2, 192, max_seq_len=256),
        LlamaConfig("tiny-tied", 320, 48, 3, 4, 4, 128, tie_embeddings=True, max_seq_len=256),
        # LLaMA-1's config (RMSNorm eps 1e-6, context 2,048) at tiny size, with tiny's shapes: a base that
        # official-format adapters, trained on LLaMA-1, accept.
        LlamaConfig("tiny-llama1", 320, 64, 4, 4, 2, 192, norm_eps=1e-6, max_seq_len=2048),
    )
}
TINY_BASES = tuple(name for name in LLAMA_PRESETS if name.startswith("tiny"))
"""Presets that :func:`llama_adapter.tiny.random_base` fills with random weights (no download)."""


@dataclass(frozen=True)
class AdapterConfig:
    """LLaMA-Adapter V2 settings.

    ``wiring`` selects how visual tokens reach the language model:

    * ``"official"`` reproduces the released checkpoints: the visual prompt is added to the
      static adapter prompt of *every* adapter layer, and every layer carries a gate.
    * ``"paper"`` follows the paper's early fusion: the visual prompt goes only into the first
      ``visual_layers`` layers, static prompts only into the last ``adapter_layers``.

    ``prompt_norm`` passes the prompts through the layer's ``attention_norm`` before its frozen
    wk/wv, as token inputs are. The released code feeds them raw (``official`` keeps that); on
    SmolLM2 raw prompts give keys ~7x and values ~24x larger than the tokens' in layer 0, and
    training with early fusion diverged.

    ``visual_positions`` gives the encoder's tokens a learnable position embedding (as many as it
    has tokens; 0: none), so that the visual queries know where on the grid a feature lies: 49
    for EfficientNet-Lite0's 7×7 map. CLIP's tokens carry their own, so the official wiring has
    none (its checkpoints hold no such tensor), and an adapter saved before the setting existed
    reads as 0.
    """

    wiring: Wiring = "paper"
    prompt_len: int = 10
    adapter_layers: int = 31
    visual_layers: int = 1
    bias_targets: tuple[str, ...] = LINEAR_NAMES
    scale: bool = True
    lora_rank: int = 0
    new_gate: bool = False
    prompt_norm: bool = True
    image_encoder: str | None = "clip-vit-l-14"
    visual_dim: int = 768
    visual_depth: int = 8
    visual_heads: int = 16
    visual_mlp_ratio: float = 4.0
    visual_positions: int = 0
    channel_order: Literal["RGB", "BGR"] = "RGB"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.bias_targets) - set(LINEAR_NAMES)
        if unknown:
            raise ValueError(f"bias_targets {sorted(unknown)} are not LLaMA linears {LINEAR_NAMES}")
        if self.wiring not in ("official", "paper"):
            raise ValueError(f"wiring must be 'official' or 'paper', got {self.wiring!r}")
        if self.image_encoder is not None and self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"Unknown image encoder {self.image_encoder!r}; known: {', '.join(IMAGE_ENCODERS)}")
        if self.visual_dim % self.visual_heads:
            raise ValueError("visual_dim must be divisible by visual_heads")
        if self.visual_positions < 0:
            raise ValueError(f"visual_positions must be 0 or the encoder's token count, got {self.visual_positions}")

    @classmethod
    def official(cls, base: LlamaConfig, *, lora_rank: int = 0) -> AdapterConfig:
        """The released multimodal 7B wiring (BIAS-7B, LORA-BIAS-7B)."""
        return cls(
            wiring="official",
            prompt_len=10,
            adapter_layers=base.n_layers - 1,
            visual_layers=base.n_layers - 1,
            bias_targets=("wq", "wo", "w1", "w2", "w3"),
            scale=False,
            lora_rank=lora_rank,
            new_gate=lora_rank > 0,
            prompt_norm=False,
            image_encoder="clip-vit-l-14",
            channel_order="BGR",
        )

    @classmethod
    def paper(cls, base: LlamaConfig, **overrides: Any) -> AdapterConfig:
        """The paper's design: early fusion into the first layer, bias and scale on all seven linears."""
        return dataclasses.replace(cls(adapter_layers=base.n_layers - 1, visual_layers=1), **overrides)

    def check(self, base: LlamaConfig) -> None:
        if not 0 <= self.adapter_layers <= base.n_layers:
            raise ValueError(f"adapter_layers={self.adapter_layers} must be within 0..{base.n_layers}")
        if not 0 <= self.visual_layers <= base.n_layers:
            raise ValueError(f"visual_layers={self.visual_layers} must be within 0..{base.n_layers}")

    def prompt_layer_ids(self, n_layers: int) -> range:
        """Layers holding a static adapter prompt (the last ``adapter_layers``)."""
        return range(n_layers - self.adapter_layers, n_layers)

    def visual_layer_ids(self, n_layers: int) -> range:
        """Layers that receive the visual prompt."""
        if self.image_encoder is None:
            return range(0)
        if self.wiring == "official":
            return self.prompt_layer_ids(n_layers)
        return range(self.visual_layers)

    def gated_layer_ids(self, n_layers: int) -> range | list[int]:
        """Layers with an adapter gate. The released code builds a gate in every layer."""
        if self.wiring == "official":
            return range(n_layers)
        return sorted(set(self.prompt_layer_ids(n_layers)) | set(self.visual_layer_ids(n_layers)))

    @property
    def encoder_dim(self) -> int:
        return IMAGE_ENCODERS[self.image_encoder].feature_dim if self.image_encoder else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bias_targets"] = list(self.bias_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        d["bias_targets"] = tuple(d.get("bias_targets", LINEAR_NAMES))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown adapter config fields: {sorted(unknown)}")
        return cls(**d)


def plain_adapter_config() -> AdapterConfig:
    """No adapter at all: the model computes exactly the base LLaMA."""
    return AdapterConfig(adapter_layers=0, visual_layers=0, bias_targets=(), scale=False, image_encoder=None)


@dataclass(frozen=True)
class ImageEncoderSpec:
    name: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_tokens: int = 0
    """Feature tokens ahead of the spatial grid (CLIP's class token)."""


IMAGE_ENCODERS: dict[str, ImageEncoderSpec] = {
    "clip-vit-l-14": ImageEncoderSpec(
        "clip-vit-l-14",
        768,
        224,
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
        class_tokens=1,
    ),
    "efficientnet-lite0": ImageEncoderSpec("efficientnet-lite0", 1280, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
