"""Inside one answer: what it drew on, as numbers (:class:`Trace`) and pictures.

>>> trace = llama_adapter.explain(pipe, "What shape is this?", image="circle.png")   # answers, traced
>>> trace = llama_adapter.explain(pipe, messages, image, answer=earlier_answer)      # an answer given before
>>> trace.save("out/")            # trace.json and the pictures (matplotlib, imported only here)

Every adapter layer adds to the attention over the tokens a gated attention over its adapter
prompt, per head ``h``: ``A_h·V_h + tanh(g_h)·P_h·V^p_h``. A trace holds, for each answer token
(the position whose logits chose it) and each layer:

``adapter_share``
    ``‖tanh(g_h)·P_h·V^p_h‖ / (‖A_h·V_h‖ + ‖tanh(g_h)·P_h·V^p_h‖)`` averaged over heads: the share
    of the layer's attention output (before ``wo``) that came from the prompt. In [0, 1]; exactly 0
    where the layer has no prompt or zero gates. Not a share of attention *weights*: the prompt
    has its own softmax, which sums to 1, so that share would be ``|tanh g|/(1+|tanh g|)`` for
    every token alike.
``layer_kinds``
    what each layer's prompt held in this answer: ``"static"`` (the learned prompt), ``"visual"``
    (the image), ``"mixed"`` (their sum, added before the key/value projections, so the two
    cannot be told apart), or ``"none"``. ``paper`` wiring separates them by layer; ``official``
    wiring sums them in every adapter layer.
``gates``
    ``tanh(gate)`` per layer and head, times ``new_gate`` where a checkpoint has one (LoRA
    official checkpoints): the factor the prompt attention is scaled by. NaN for ungated layers.
``grid``
    where the visual queries looked on the image encoder's grid (7×7 for EfficientNet-Lite0,
    16×16 patches for CLIP ViT-L/14; CLIP's class token left out): the visual blocks' attention
    from the queries, averaged over heads and queries, followed back through the blocks by
    attention rollout (Abnar & Zuidema 2020), renormalised to sum to 1 over the grid. Rollout,
    because after the first block the grid tokens have attended to each other, so a key at one
    cell no longer holds that cell alone. ``grid_blocks`` holds each block's own map. One map per
    answer: the visual prompt is computed once per image, the same for every token.

Tracing is off unless asked for: the model's ``record`` argument is ``None`` on the normal path,
and a traced answer decodes eager, never through the compiled step.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .config import IMAGE_ENCODERS
from .errors import InputError
from .generate import TextStream, decode_tokens
from .images import ImageInput, encoder_view, open_image
from .prompts import Prompt, as_messages
from .tokenizer import Tokenizer

LayerKind = str  # "static", "visual", "mixed" or "none"


@dataclass
class Trace:
    """What one answer drew on; see the module docstring for the definitions."""

    prompt: str
    """The exact text the model read."""
    answer: str
    token_ids: list[int]
    tokens: list[str]
    """The answer's tokens as text pieces (they join to ``answer``, up to a stop string)."""
    layer_kinds: list[LayerKind]
    gates: torch.Tensor
    """[layers, heads]; NaN for layers without a gate."""
    adapter_share: torch.Tensor
    """[tokens, layers]."""
    grid: torch.Tensor | None
    """[h, w], sums to 1; ``None`` without an image."""
    grid_blocks: torch.Tensor | None
    """[visual blocks, h, w]: each block's own map."""
    image: Image.Image | None
    """The square the image encoder saw (resized, centre-cropped)."""
    context: str | None = None
    """Expert text (OCR, caption) that was in the prompt."""

    def context_spans(self) -> list[tuple[str, str | None]]:
        """The expert text cut where the answer repeats it, for ``gr.HighlightedText``."""
        return repeated_spans(self.context, self.answer) if self.context else []

    def to_dict(self) -> dict[str, Any]:
        def grid(m: torch.Tensor) -> list[list[float]]:
            return [[round(v, 6) for v in row] for row in m.tolist()]

        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "layer_kinds": self.layer_kinds,
            "gates": [None if math.isnan(row[0]) else [round(g, 6) for g in row] for row in self.gates.tolist()],
            "adapter_share": [[round(s, 6) for s in row] for row in self.adapter_share.tolist()],
            "grid": None
            if self.grid is None
            else {
                "shape": list(self.grid.shape),
                "values": grid(self.grid),
                "blocks": [grid(m) for m in self.grid_blocks],
            },
            "context": self.context,
            "context_spans": self.context_spans(),
        }

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``trace.json`` and the pictures as PNGs into ``directory``; returns the paths."""
        from . import pictures

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "trace.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        written = [path]
        for name, figure in pictures.draw(self).items():
            written.append(directory / f"{name}.png")
            figure.savefig(written[-1], dpi=120)
        return written


def explain(
    pipe: Any,
    prompt: Prompt,
    image: ImageInput | None = None,
    *,
    answer: str | Sequence[int] | None = None,
    **sampling: Any,
) -> Trace:
    """Trace the answer to ``prompt`` (a string or messages) about ``image``.

    Without ``answer`` the model writes it (decoding eager, with ``sampling`` as in
    ``Pipeline.generate``). With ``answer`` (text, tokenised on its own, or token ids as
    generated) it is traced in one forward pass over prompt and answer, for an answer given
    before: the normal answer paid nothing. ``pipe`` is a :class:`~llama_adapter.Pipeline`.
    """
    if answer is not None and sampling:
        raise InputError(f"Sampling options {sorted(sampling)} apply only when explain writes the answer")
    text = pipe.render(prompt)
    ids = pipe.encode(text)
    picture = open_image(image, max_pixels=pipe.max_image_pixels) if image is not None else None
    looking = Recording()
    visual = pipe.visual_prompt(picture, record=looking)
    if answer is None:
        answer_ids, shares, answer_text = _write_traced(pipe, ids, visual, sampling, looking)
    else:
        answer_ids = pipe.tokenizer.encode(answer, bos=False) if isinstance(answer, str) else list(answer)
        shares = _teacher_forced(pipe, ids, answer_ids, visual, looking)
        answer_text = answer if isinstance(answer, str) else pipe.tokenizer.decode(answer_ids)
    model = pipe.model
    grid, blocks = None, None
    if picture is not None:
        acfg = model.adapter_config
        grid, blocks = grid_attention(looking.visual, acfg.prompt_len, IMAGE_ENCODERS[acfg.image_encoder].class_tokens)
    return Trace(
        prompt=text,
        answer=answer_text,
        token_ids=answer_ids,
        tokens=token_pieces(pipe.tokenizer, answer_ids),
        layer_kinds=layer_kinds(model, image=picture is not None),
        gates=gate_values(model),
        adapter_share=shares,
        grid=grid,
        grid_blocks=blocks,
        image=encoder_view(picture, model.adapter_config.image_encoder) if picture is not None else None,
        context=_context(prompt),
    )


class Recording:
    """A :class:`~llama_adapter.model.Recorder` that keeps each layer's adapter share per position
    (of the last model call) and each visual block's head-averaged attention."""

    def __init__(self) -> None:
        self.shares: dict[int, torch.Tensor] = {}  # layer → [S], batch row 0
        self.visual: list[torch.Tensor] = []  # per block, [N, N]

    def adapter_attention(self, layer_id: int, tokens: torch.Tensor, prompt: torch.Tensor) -> None:
        self.shares[layer_id] = adapter_share(tokens, prompt)[0]

    def visual_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        scores = queries[0].float() @ keys[0].float().transpose(-1, -2) / math.sqrt(queries.shape[-1])
        self.visual.append(scores.softmax(-1).mean(0).cpu())

    def take(self, n_layers: int, last: int) -> torch.Tensor:
        """Shares [last, n_layers] of the last positions of the last call (0 for layers without a
        prompt), and forget them."""
        table = torch.zeros(last, n_layers)
        for layer, share in self.shares.items():
            table[:, layer] = share[len(share) - last :].cpu()
        self.shares = {}
        return table


def adapter_share(tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """[B, S]: per head ``‖prompt‖ / (‖tokens‖ + ‖prompt‖)`` of per-head outputs [B, H, S, D],
    averaged over heads; 0 where the prompt term is 0."""
    t = tokens.float().norm(dim=-1)
    p = prompt.float().norm(dim=-1)
    return torch.where(p > 0, p / (t + p), torch.zeros_like(p)).mean(1)


def grid_attention(
    attentions: list[torch.Tensor], n_queries: int, class_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the first ``n_queries`` tokens looked over the grid tokens that follow them (after
    ``class_tokens``), from each visual block's head-averaged attention [N, N]: the rollout
    through all blocks (residual counted as half of each block, as Abnar & Zuidema) [h, w], and
    each block's own map [blocks, h, w]; every map averaged over the queries and summing to 1."""
    n = attentions[0].shape[0]
    cells = slice(n_queries + class_tokens, n)
    side = math.isqrt(n - cells.start)
    shape = (side, side) if side * side == n - cells.start else (1, n - cells.start)

    def looked(attention: torch.Tensor) -> torch.Tensor:
        weights = attention[:n_queries, cells].mean(0)
        return (weights / weights.sum()).view(shape)

    rollout = torch.eye(n)
    for attention in attentions:
        rollout = (0.5 * attention + 0.5 * torch.eye(n)) @ rollout
    return looked(rollout), torch.stack([looked(a) for a in attentions])


def layer_kinds(model: Any, *, image: bool) -> list[LayerKind]:
    """What each layer's adapter prompt holds in an answer with or without an image."""
    kinds = []
    for i, layer in enumerate(model.layers):
        static = i in model.prompt_layers
        visual = image and i in model.visual_layers
        gated = layer.attention.gate is not None
        if not gated or not (static or visual):
            kinds.append("none")
        else:
            kinds.append("mixed" if static and visual else "static" if static else "visual")
    return kinds


def gate_values(model: Any) -> torch.Tensor:
    """[layers, heads]: ``tanh(gate)`` (× ``new_gate``), NaN for ungated layers."""
    rows = torch.full((model.config.n_layers, model.config.n_heads), math.nan)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attention = layer.attention
            if attention.gate is not None:
                gate = attention.gate.float().tanh().flatten()
                if attention.new_gate is not None:
                    gate = gate * attention.new_gate.float().flatten()
                rows[i] = gate.cpu()
    return rows


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int], context: int = 4) -> list[str]:
    """Each token's text as it adds to the decoded answer (leading spaces kept): decoded after the
    ``context`` ids before it, which keep SentencePiece's word boundaries, less their own text."""
    pieces = []
    for i in range(len(ids)):
        before = list(ids[max(0, i - context) : i])
        head, text = tokenizer.decode(before), tokenizer.decode([*before, ids[i]])
        pieces.append(text[len(head) :] if text.startswith(head) else tokenizer.decode([ids[i]]))
    return pieces


def _write_traced(
    pipe: Any, ids: list[int], visual: torch.Tensor | None, sampling: dict[str, Any], looking: Recording
) -> tuple[list[int], torch.Tensor, str]:
    """Generate as ``Pipeline.generate`` does, keeping the shares of the call that chose each token."""
    params = pipe.fit_to_context(len(ids), pipe.sampling_params(**sampling))
    stream = TextStream(pipe.tokenizer, params.stop)
    stop_ids = pipe.tokenizer.stop_ids
    n_layers = pipe.model.config.n_layers
    rows = []
    tokens = decode_tokens(
        pipe.model, [ids], params, stop_ids, visual_prompt=visual, pad_id=pipe.tokenizer.pad_id, record=looking
    )
    with closing(tokens):
        for (token,) in tokens:
            shares = looking.take(n_layers, 1)  # from the call that chose this token
            if token is None or token in stop_ids:
                break
            stream.push(token)
            rows.append(shares)
            if stream.stopped:
                break
        stream.finish()
    kept = _tokens_covering(token_pieces(pipe.tokenizer, stream.ids), stream.text)
    table = torch.cat(rows)[:kept] if rows else torch.zeros(0, n_layers)
    return stream.ids[:kept], table, stream.text


def _teacher_forced(
    pipe: Any, ids: list[int], answer_ids: list[int], visual: torch.Tensor | None, looking: Recording
) -> torch.Tensor:
    """Shares of the positions that predict each answer token (the last ones of prompt + answer
    without its last token), from one forward pass."""
    n_layers = pipe.model.config.n_layers
    if not answer_ids:
        return torch.zeros(0, n_layers)
    full = ids + answer_ids[:-1]
    if len(full) > pipe.context_length:
        raise InputError(
            f"Prompt and answer are {len(full):,} tokens; this model reads at most {pipe.context_length:,}."
        )
    with torch.inference_mode():
        pipe.model(torch.tensor([full], device=pipe.device), visual_prompt=visual, last_only=True, record=looking)
    return looking.take(n_layers, len(answer_ids))


def _tokens_covering(pieces: list[str], text: str) -> int:
    """How many tokens' ``pieces`` it takes to write ``text`` (a stop string may have cut it short)."""
    written = 0
    for k, piece in enumerate(pieces):
        if written >= len(text):
            return k
        written += len(piece)
    return len(pieces)


def _context(prompt: Prompt) -> str | None:
    users = [m for m in as_messages(prompt) if m.get("role") == "user"]
    return users[-1].get("context") if users else None


# -- expert text the answer repeats ----------------------------------------------------------------

_WORD = re.compile(r"[$€£¥]?\w+(?:[.,'’:/-]\w+)*%?")  # a word, a number, a price, a percentage
_COMMON = frozenset(
    "the and for are but not you your with this that these those there what which who how was were "
    "has have had its from into onto over under they them their then than can will would should".split()
)


def repeated_spans(source: str, answer: str, label: str = "repeated") -> list[tuple[str, str | None]]:
    """``source`` cut into ``(text, label)`` pieces where ``answer`` repeats it and ``(text, None)``
    elsewhere, as ``gr.HighlightedText`` takes them; the pieces join to ``source``.

    A repeat is a run of words (case-insensitive, punctuation between words ignored) that the
    answer has in the same order: two words or more, or one word with a digit or of three letters
    or more that is not a common word."""
    words = list(_WORD.finditer(source))
    said = [m.group().lower() for m in _WORD.finditer(answer)]
    heard = [m.group().lower() for m in words]
    # run[i][j]: how many words match from source word i and answer word j on.
    run = [[0] * (len(said) + 1) for _ in range(len(heard) + 1)]
    for i in range(len(heard) - 1, -1, -1):
        for j in range(len(said) - 1, -1, -1):
            if heard[i] == said[j]:
                run[i][j] = run[i + 1][j + 1] + 1
    marked: list[tuple[int, int]] = []
    i = 0
    while i < len(heard):
        length = max(run[i], default=0)
        if length >= 2 or length == 1 and _telling(heard[i]):
            marked.append((words[i].start(), words[i + length - 1].end()))
            i += length
        else:
            i += 1
    pieces: list[tuple[str, str | None]] = []
    at = 0
    for start, end in marked:
        if start > at:
            pieces.append((source[at:start], None))
        pieces.append((source[start:end], label))
        at = end
    if at < len(source):
        pieces.append((source[at:], None))
    return pieces


def _telling(word: str) -> bool:
    return any(c.isdigit() for c in word) or len(word) >= 3 and word not in _COMMON
