"""Text coloured token by token: the shared way every view shows a prompt with a value per token."""

from __future__ import annotations

import html
from collections.abc import Sequence


def colored_tokens_html(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    vmax: float | None = None,
    selected: int | None = None,
    titles: Sequence[str] | None = None,
    marked: Sequence[bool] | None = None,
) -> str:
    """HTML spans, one per token, shaded blue for positive and red for negative values (|value|/vmax).

    `selected` outlines one token; `titles` become hover text; `marked` tokens are struck through in red
    (e.g. a probe's errors). Self-contained inline styles: it renders offline anywhere HTML does.
    """
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values: give one value per token.")
    top = vmax if vmax is not None else max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        alpha = min(abs(float(value)) / top, 1.0)
        rgb = "33,102,172" if value >= 0 else "178,24,43"
        style = [
            f"background:rgba({rgb},{alpha:.3f})",
            "padding:1px 2px",
            "margin:1px",
            "border-radius:3px",
            "font-family:monospace",
            "white-space:pre",
        ]
        if alpha > 0.6:
            style.append("color:white")
        if i == selected:
            style.append("outline:2px solid #222")
        if marked is not None and marked[i]:
            style.append(
                "text-decoration:line-through;text-decoration-color:#c00;border-bottom:2px solid #c00"
            )
        title = titles[i] if titles is not None else f"{i}: {float(value):.3f}"
        spans.append(
            f'<span title="{html.escape(title)}" style="{";".join(style)}">{html.escape(token)}</span>'
        )
    return '<div style="line-height:1.9">' + "".join(spans) + "</div>"
