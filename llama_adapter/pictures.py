"""Pictures of a :class:`~llama_adapter.explain.Trace` as matplotlib figures (for ``gr.Plot``, or
``figure.savefig`` to PNG). Imported only when drawing, so ``llama_adapter`` does not need
matplotlib to answer. Figures are built without pyplot: no global state, safe in a server thread.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .explain import Trace, repeated_spans

KIND_COLOURS = {"visual": "#d95f02", "static": "#1b9e77", "mixed": "#7570b3", "none": "#bbbbbb"}


def draw(trace: Trace) -> dict[str, Figure]:
    """Every picture the trace has, by name: ``looked`` (with an image), ``gates``,
    ``adapter_share``, ``repeated`` (with expert text in the prompt)."""
    figures = {}
    if trace.grid is not None:
        figures["looked"] = where_it_looked(trace)
    figures["gates"] = gates(trace)
    figures["adapter_share"] = adapter_share(trace)
    if trace.context:
        figures["repeated"] = repeated_text(trace.context, trace.answer)
    return figures


def where_it_looked(trace: Trace) -> Figure:
    """The image the encoder saw, with the visual queries' attention over its grid on top: the
    rollout through the visual blocks, then each block's own map."""
    if trace.grid is None or trace.image is None:
        raise ValueError("This answer had no image: there is nowhere it looked")
    maps = [("all blocks (rollout)", trace.grid)] + [
        (f"block {i + 1} alone", m) for i, m in enumerate(trace.grid_blocks if len(trace.grid_blocks) > 1 else [])
    ]
    cols = min(len(maps) + 1, 5)
    rows = math.ceil((len(maps) + 1) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    size = trace.image.width
    axes[0].imshow(trace.image)
    axes[0].set_title("the image, as the encoder saw it", fontsize=9)
    top = max(float(m.max()) for _, m in maps)
    for ax, (title, grid) in zip(axes[1:], maps):
        ax.imshow(trace.image, alpha=0.6)
        shown = ax.imshow(
            grid.numpy(),
            extent=(0, size, size, 0),
            cmap="inferno",
            alpha=0.6,
            vmin=0,
            vmax=top,
            interpolation="nearest",
        )
        row, col = divmod(int(grid.argmax()), grid.shape[1])
        ax.set_title(f"{title}\nmax {float(grid.max()):.3f} at row {row + 1}, col {col + 1}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps) + 1 :]:
        ax.set_visible(False)
    fig.colorbar(shown, ax=axes[1 : len(maps) + 1].tolist(), shrink=0.8, label="share of the queries' attention")
    h, w = trace.grid.shape
    fig.suptitle(f"Where the visual queries looked ({h}×{w} grid, averaged over heads and queries)", fontsize=10)
    return fig


def gates(trace: Trace) -> Figure:
    """Each layer's gate: a bar at the mean over heads, a dot per head, coloured by what the
    layer's prompt held in this answer."""
    values = trace.gates.numpy()
    n_layers, n_heads = values.shape
    fig = Figure(figsize=(max(6.0, 0.28 * n_layers + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    layers = np.arange(n_layers)
    colours = [KIND_COLOURS[k] for k in trace.layer_kinds]
    gated = ~np.isnan(values[:, 0])
    ax.bar(layers[gated], values[gated].mean(1), color=[c for c, g in zip(colours, gated) if g], alpha=0.55)
    spread = np.linspace(-0.25, 0.25, n_heads) if n_heads > 1 else np.zeros(1)
    for i in layers[gated]:
        ax.scatter(i + spread, values[i], s=7, color=colours[i], edgecolors="black", linewidths=0.3, zorder=3)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlim(-0.7, n_layers - 0.3)
    ax.set_xlabel("layer")
    ax.set_ylabel("tanh(gate)")
    ax.set_title(f"Adapter gates per layer: bar = mean over {n_heads} heads, dots = each head", fontsize=10)
    used = [k for k in KIND_COLOURS if k in trace.layer_kinds]
    ax.legend(
        [Patch(color=KIND_COLOURS[k]) for k in used], [f"{k} prompt" for k in used], fontsize=8, loc="best", ncols=2
    )
    return fig


def adapter_share(trace: Trace) -> Figure:
    """Token × layer map of how much of each layer's attention output came from its adapter
    prompt, the answer's tokens as row labels."""
    shares = trace.adapter_share.numpy()
    n_tokens, n_layers = shares.shape
    height = min(max(2.5, 0.22 * n_tokens + 1.6), 30.0)
    fig = Figure(figsize=(max(6.0, 0.26 * n_layers + 2.5), height), layout="constrained")
    ax = fig.subplots()
    if not n_tokens:  # an empty answer: an empty row keeps the layout
        shares = np.zeros((1, n_layers))
    top = max(float(shares.max()), 0.01)
    shown = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
    every = max(1, math.ceil(n_tokens / 120))
    ax.set_yticks(range(0, n_tokens, every), [_label(t) for t in trace.tokens[::every]], fontsize=7)
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    for tick, kind in zip(ax.get_xticklabels(), trace.layer_kinds):
        tick.set_color(KIND_COLOURS[kind] if kind != "none" else "#888888")
    ax.set_xlabel("layer (label colour: what its prompt held — " + _kinds_legend(trace.layer_kinds) + ")", fontsize=8)
    ax.set_ylabel("answer token")
    fig.colorbar(shown, ax=ax, label="adapter share")
    ax.set_title("How much each answer token leaned on the adapter prompts", fontsize=10)
    return fig


def repeated_text(source: str, answer: str, width: int = 72) -> Figure:
    """``source`` (expert text) with the spans that ``answer`` repeats highlighted, and the answer below."""
    spans = repeated_spans(source, answer)
    blocks = [
        (
            "Expert text; highlighted: what the answer repeats",
            [(c, label is not None) for t, label in spans for c in t],
        ),
        ("Answer", [(c, False) for c in answer]),
    ]
    font, char_w, line_h, margin = 10.0, 6.02, 15.0, 12.0  # points; DejaVu Sans Mono is 0.602 em wide
    laid = [(title, _wrap(cells, width)) for title, cells in blocks]
    width_pt = 2 * margin + width * char_w
    height_pt = 2 * margin + sum(len(lines) + 2 for _, lines in laid) * line_h
    fig = Figure(figsize=(width_pt / 72, height_pt / 72))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_pt)
    ax.set_ylim(height_pt, 0)
    ax.axis("off")
    highlight = to_rgba("#ffd54f")
    row = 0
    for title, lines in laid:
        ax.text(margin, margin + row * line_h, title, fontsize=font, va="top", weight="bold")
        row += 1
        for line in lines:
            y, col = margin + row * line_h, 0
            for text, marked in _runs(line):
                if marked:
                    ax.add_patch(Rectangle((margin + col * char_w, y - 2), len(text) * char_w, line_h, color=highlight))
                ax.text(margin + col * char_w, y, text, fontsize=font, family="DejaVu Sans Mono", va="top")
                col += len(text)
            row += 1
        row += 1
    return fig


def _wrap(cells: list[tuple[str, bool]], width: int) -> list[list[tuple[str, bool]]]:
    """Lines of at most ``width`` characters, broken at spaces (or mid-word when a word is longer)."""
    lines: list[list[tuple[str, bool]]] = [[]]
    for c, marked in cells:
        if c == "\n":
            lines.append([])
            continue
        line = lines[-1]
        if len(line) == width:
            spaces = [i for i, (ch, _) in enumerate(line) if ch == " "]
            cut = spaces[-1] + 1 if spaces else width
            lines[-1], rest = line[:cut], line[cut:]
            lines.append(rest)
        lines[-1].append((c, marked))
    return lines


def _runs(line: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    for c, marked in line:
        if runs and runs[-1][1] == marked:
            runs[-1] = (runs[-1][0] + c, marked)
        else:
            runs.append((c, marked))
    return runs


def _label(token: str) -> str:
    return repr(token)[1:-1]  # a newline as \\n


def _kinds_legend(kinds: list[str]) -> str:
    names = {"visual": "orange visual", "static": "green static", "mixed": "purple both summed", "none": "grey none"}
    return ", ".join(names[k] for k in KIND_COLOURS if k in kinds)
