"""Token colouring (the paper's Figure 9): text with each token's background the colour of its first-choice
expert, one panel per chosen layer, in one self-contained HTML page (no scripts, no external files).

Hovering a token shows its id, position and both choices with their gate weights.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

# Eight colours that stay apart for readers with common colour-vision deficiencies (Okabe & Ito 2008), then
# more for larger expert counts; text is drawn dark on all of them.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999",
           "#8DD3C7", "#FFFFB3", "#BEBADA", "#FB8072", "#80B1D3", "#FDB462", "#B3DE69", "#FCCDE5"]


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds when `ids` is decoded left to right (a token in the middle of a multi-byte
    character adds nothing; the one that completes it carries the character)."""
    decoder = tokenizer.stream()
    pieces = [decoder.push(int(t)) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


def colour(expert: int) -> str:
    return PALETTE[expert % len(PALETTE)]


def text_colour(background: str) -> str:
    """Dark text on light backgrounds, white on dark ones (luma below 0.4)."""
    r, g, b = (int(background[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#fff" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.4 else "#111"


def routes_html(pieces: Sequence[str], experts: np.ndarray, weights: np.ndarray, layers: Sequence[int],
                title: str, groups: Sequence[tuple[str, Sequence[int]]] | None = None,
                token_ids: Sequence[int] | None = None, positions: Sequence[int] | None = None) -> str:
    """The page. `pieces` [N] the tokens' text, `experts`/`weights` [layers, N, k] (all layers), `layers` the
    columns to draw, `groups` the rows: (heading, token indices) each (default: one row of every token)."""
    n_experts = int(experts.max()) + 1 if experts.size else 0
    groups = groups if groups is not None else [("", range(len(pieces)))]
    style = f"""
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.25em; }} h2 {{ font-size: 1em; margin: 1.2em 0 0.4em; }}
.row {{ display: grid; grid-template-columns: repeat({len(layers)}, 1fr); gap: 0.8em; }}
.col h3 {{ font-size: 0.85em; margin: 0 0 0.3em; color: #555; }}
.text {{ font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; line-height: 1.65;
         white-space: pre-wrap; word-break: break-all; border: 1px solid #ddd; padding: 0.6em; border-radius: 4px; }}
.t {{ border-radius: 2px; }}
.legend span {{ display: inline-block; padding: 0.1em 0.6em; margin-right: 0.3em; border-radius: 3px;
                font-family: ui-monospace, monospace; font-size: 12px; }}
"""

    def span(e: int) -> str:
        return f"background:{colour(e)};color:{text_colour(colour(e))}"

    legend = "".join(f'<span style="{span(e)}">expert {e}</span>' for e in range(n_experts))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             "<p>Each token is coloured by the expert its router chose first at that layer (hover for both "
             "choices and their gate weights).</p>", f'<p class="legend">{legend}</p>']
    for heading, indices in groups:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append('<div class="row">')
        for layer in layers:
            parts.append(f'<div class="col"><h3>layer {layer}</h3><div class="text">')
            for t in indices:
                if not pieces[t]:
                    continue
                choices = ", ".join(f"{int(e)} ({w:.2f})" for e, w in zip(experts[layer, t], weights[layer, t]))
                tip = f"layer {layer}: experts {choices}"
                if token_ids is not None:
                    where = f" at {int(positions[t])}" if positions is not None else ""
                    tip = f"token {int(token_ids[t])}{where}; {tip}"
                parts.append(f'<span class="t" style="{span(int(experts[layer, t, 0]))}" '
                             f'title="{html.escape(tip)}">{html.escape(pieces[t])}</span>')
            parts.append("</div></div>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
