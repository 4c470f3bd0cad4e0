"""Random-init tiny bases (``tiny``, ``tiny-tied`` presets) with a byte tokenizer: the whole
training stack runs on them in seconds, for tests and the CPU example, with no download."""

from __future__ import annotations

import torch

from llama_adapter.config import LLAMA_PRESETS, LlamaConfig
from llama_adapter.model import LlamaAdapter
from llama_adapter.pipeline import plain_adapter_config
from llama_adapter.tokenizer import Tokenizer
from llama_adapter.weights import BaseWeights, base_fingerprint

TINY_BASES = tuple(name for name in LLAMA_PRESETS if name.startswith("tiny"))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 3: 0 = pad, 1 = BOS, 2 = EOS (259 ids, within the tiny vocab of 320)."""

    offset = 3

    def __init__(self) -> None:
        self.bos_id = 1
        self.eos_id = 2
        self.stop_ids = {2}
        self.vocab_size = 256 + self.offset

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


def random_base(name: str, seed: int = 0) -> BaseWeights:
    """A base model of preset ``name`` with weights drawn from ``seed`` (independent of the global RNG)."""
    cfg = LlamaConfig.from_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaAdapter(cfg, plain_adapter_config())
    # The plain adapter config still builds an empty prompt table; a base file has none.
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("adapter_query")}
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    weights = BaseWeights(cfg, sd, ByteTokenizer(), source=f"random:{name}:{seed}")
    weights.fingerprint = base_fingerprint(sd)
    return weights
