"""The official checkpoints computed as released: their float32 adapter tensors stay float32 over a
float16 base file (upstream casts every trainable tensor to float32), and images are preprocessed
with CLIP's own transform. Oracles: the adapter file's tensors, the same model built from a float32
base file, torchvision's and open_clip's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import random_hf_model, write_meta_dir
from PIL import Image
from test_weights import TINY, official_tensors, write_official
from torch import nn

import llama_adapter
from llama_adapter import build
from llama_adapter.build import build_model
from llama_adapter.config import IMAGE_ENCODERS, AdapterConfig
from llama_adapter.images import image_to_tensor
from llama_adapter.model import parameter_group
from llama_adapter.weights import load_base, official_to_ours


@pytest.fixture(scope="module")
def meta_bases(tiny_spm, tmp_path_factory):
    """The same tiny LLaMA in Meta's layout twice: float16 tensors (as Meta ships LLaMA-7B), and
    the same values in float32."""
    root = tmp_path_factory.mktemp("meta")
    half = random_hf_model("tiny-llama1").half()  # LLaMA-1's config: what the official adapters accept
    write_meta_dir(half, root / "fp16" / "7B", tiny_spm)
    write_meta_dir(half.float(), root / "fp32" / "7B", tiny_spm)
    shard = torch.load(root / "fp16" / "7B" / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in shard.values()} == {torch.float16}
    return root / "fp16", root / "fp32"


@pytest.fixture()
def no_clip(monkeypatch):
    """CLIP ViT-L/14 takes a minute to build at random on a small CPU; these tests give the visual
    branch CLIP features directly, so the encoder is a stand-in."""
    monkeypatch.setattr(build, "build_image_encoder", lambda *args, **kwargs: nn.Identity())


def official_adapter(lora: bool) -> dict[str, torch.Tensor]:
    """A BIAS-7B / LORA-BIAS-7B-shaped adapter whose norms, like trained ones, sit around 1 and
    are not float16 numbers (rounding them would show)."""
    sd = official_tensors(lora)
    g = torch.Generator().manual_seed(1)
    for key in sd:
        if key.endswith("norm.weight") and key.startswith("llama."):
            sd[key] = torch.empty(sd[key].shape).uniform_(0.5, 1.5, generator=g)
    assert all(t.dtype == torch.float32 for t in sd.values())
    return sd


def logits(model, ids: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced logits without and with an image, and those of cached one-token decoding."""
    with torch.no_grad():
        visual = model.encode_image(features=features)
        cache = model.new_cache(1)
        model(ids[:, :8], visual_prompt=visual, cache=cache)
        decoded = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(8, ids.shape[1])], 1)
        return [model(ids), model(ids, visual_prompt=visual), decoded]


@pytest.mark.parametrize("lora", [False, True], ids=["BIAS-7B", "LORA-BIAS-7B"])
def test_a_float16_base_keeps_the_adapter_exact(lora, meta_bases, no_clip, tmp_path):
    sd = official_adapter(lora)
    path = write_official(tmp_path / "adapter.pth", sd, lora)
    fp16_base, fp32_base = meta_bases
    from_fp16 = llama_adapter.load(base=fp16_base, adapter=path, dtype="fp32")
    from_fp32 = llama_adapter.load(base=fp32_base, adapter=path, dtype="fp32")

    params = dict(from_fp16.model.named_parameters())
    for key, tensor in sd.items():
        ours = official_to_ours(key)
        if ours in params:  # the fused BIAS-7B model merged wq's bias into wqkv
            assert params[ours].dtype == torch.float32 and torch.equal(params[ours], tensor), key
    assert torch.equal(params["layers.2.attention_norm.weight"], sd["llama.layers.2.attention_norm.weight"])
    assert from_fp16.info["dtypes"]["adapter"] == "float32"

    ids = torch.randint(3, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, 257, 768, generator=torch.Generator().manual_seed(0))
    for got, expected in zip(logits(from_fp16.model, ids, features), logits(from_fp32.model, ids, features)):
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("wiring", ["official", "paper"])
def test_only_the_frozen_base_takes_the_base_dtype(wiring, meta_bases, no_clip):
    base = load_base(meta_bases[0])
    acfg = AdapterConfig.official(TINY, lora_rank=2) if wiring == "official" else AdapterConfig.paper(TINY, lora_rank=2)
    model = build_model(base, None, adapter_config=acfg, dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        frozen = parameter_group(model, name) is None
        assert param.dtype == (torch.bfloat16 if frozen else torch.float32), name
    # The base file's own float16 norms come in as float32 holding the same numbers.
    assert torch.equal(model.norm.weight, base.state_dict["norm.weight"].float())
    pipe = llama_adapter.load(base=meta_bases[0], dtype="bf16")
    assert pipe.info["dtypes"] == {"base": "bfloat16", "adapter": "float32", "image_encoder": None}


def clip_transform(img: Image.Image) -> torch.Tensor:
    """CLIP's preprocessing as open_clip builds it for OpenAI's ViT-L/14 (= ``clip.load``'s)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return open_clip.image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)(img)


@pytest.mark.parametrize("size", [(640, 480), (479, 641), (225, 1000), (224, 224)], ids=str)
def test_images_are_cropped_as_clips_transform_does(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    spec = IMAGE_ENCODERS["clip-vit-l-14"]
    cropped = T.CenterCrop(224)(T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(img))
    pixels = (T.ToTensor()(cropped) - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    assert torch.equal(image_to_tensor(img, "clip-vit-l-14", "RGB"), pixels)
    # The official checkpoints read their images with OpenCV: CLIP's transform of the BGR image.
    bgr = Image.fromarray(np.asarray(img)[:, :, ::-1].copy())
    assert torch.allclose(image_to_tensor(img, "clip-vit-l-14", "BGR"), clip_transform(bgr), atol=1e-6, rtol=0)
    # EfficientNet (our own models) takes the same resize and crop, with its own normalisation.
    assert torch.allclose(image_to_tensor(img, "efficientnet-lite0", "RGB"), T.ToTensor()(cropped) * 2 - 1, atol=1e-6)
