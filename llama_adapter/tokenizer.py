"""Tokenizers behind one small interface: Meta's SentencePiece ``tokenizer.model`` and
Hugging Face tokenizers (``tokenizer.json``, GGUF-embedded) through transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError


class Tokenizer:
    """What generation needs: ``encode``, ``decode``, BOS, the ids that end an answer, and the
    model's own chat template when it has one."""

    bos_id: int | None
    eos_id: int
    stop_ids: set[int]
    vocab_size: int

    def encode(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str | None:
        """The conversation rendered with the model's own chat template, or ``None`` if it has none."""
        return None

    @property
    def pad_id(self) -> int:
        return self.eos_id


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{self.path} is not a SentencePiece model ({e}). Llama 3's tokenizer.model is a tiktoken "
                "file: use the Hugging Face-format checkpoint of that model instead."
            ) from e
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.stop_ids = {self.eos_id} if self.eos_id >= 0 else set()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([i for i in ids if i not in self.stop_ids and i != self.bos_id])


class HFTokenizer(Tokenizer):
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        stops = {self.eos_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>"):
            tid = hf_tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != hf_tokenizer.unk_token_id:
                stops.add(tid)
        self.stop_ids = {i for i in stops if i is not None}
        self.vocab_size = len(hf_tokenizer)
        # Chat templates (ChatML, Llama 3) write their own BOS / start tokens.
        self.template_adds_bos = bool(hf_tokenizer.chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> HFTokenizer:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path), **kwargs))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"Could not load the tokenizer from {path}: {e}") from e

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str | None:
        if not self.hf.chat_template:
            return None
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory: HF files first, then a SentencePiece model here
    or one level up (Meta's layout puts ``tokenizer.model`` beside the ``7B/`` folder)."""
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return HFTokenizer.from_pretrained(directory)
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            return SentencePieceTokenizer(candidate)
    raise CheckpointError(
        f"No tokenizer found for {directory}: expected tokenizer.json (Hugging Face) or tokenizer.model "
        "(Meta's SentencePiece file, in the checkpoint folder or its parent). Copy it from the model's download."
    )
