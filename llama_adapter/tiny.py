"""Random-init tiny bases (``tiny``, ``tiny-tied`` presets) with a byte tokenizer, for tests and
quick tries: ``llama_adapter.load("tiny")`` and the whole training stack run on them in seconds,
with no download."""

from __future__ import annotations

import torch

from .config import LlamaConfig, plain_adapter_config
from .model import LlamaAdapter
from .tokenizer import Tokenizer
from .weights import BaseWeights, base_fingerprint


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 3: 0 = pad, 1 = BOS, 2 = EOS (259 ids, within the tiny vocab of 320;
    a random model's ids beyond them decode to nothing)."""

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
        return bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size).decode(
            "utf-8", errors="replace"
        )


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
