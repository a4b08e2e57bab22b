"""Regenerate the README gallery: one PNG of each notebook's main view, in docs/gallery/.

    python scripts/gallery.py                  # all pictures, embedded checkpoint
    python scripts/gallery.py xielu lens       # only some (names: attention patching probing xielu lens)
    python scripts/gallery.py --out somewhere/ --checkpoint path/to/apertus

Each picture is drawn by the same engine and figure calls as its notebook, on the embedded model
(`workbench.load()`), and written as PNG: with plotly's `write_image` when kaleido (>= 1.0) is installed,
which drives a local Chrome/Chromium; otherwise by rendering the figure's HTML (plotly.js inlined, nothing
fetched) in headless Chromium through Playwright and screenshotting it. A picture whose module or
function is missing is skipped with the reason printed; the script fails only if no picture was written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT, SCALE = 1000, 560, 2


# ------------------------------------------------------------------------------------------ pictures
def attention(model) -> go.Figure:
    """Notebook 01: the attention explorer on a repeated random sequence, at the strongest induction head."""
    from workbench.attention import head_scores
    from workbench.data.corpus import repeated_sequences, repeated_token_ids
    from workbench.widgets.attention import AttentionExplorer

    scores = head_scores(model, repeated_token_ids(model.tokenizer, n=4, length=20), progress=False)
    layer, head = scores["induction"].idxmax()
    explorer = AttentionExplorer(
        model, " ".join(repeated_sequences(1, length=15)[0]), layer=int(layer), head=int(head)
    )
    return go.Figure(explorer.figure)


def patching(model) -> go.Figure:
    """Notebook 02: activation patching of the residual stream on IOI (layer x position heatmap)."""
    from workbench.data.corpus import ioi_prompts
    from workbench.patching import patch

    prompts = ioi_prompts(8, templates=[0])
    result = patch(
        model,
        [p.clean for p in prompts],
        [p.corrupted for p in prompts],
        "logit_diff",
        answers=[(p.answer, p.wrong) for p in prompts],
        component="resid_pre",
        progress=False,
    )
    return result.figure()


def probing(model) -> go.Figure:
    """Notebook 03: part-of-speech probe accuracy by layer."""
    from workbench.data.alignment import TokenLabelledDataset
    from workbench.data.corpus import EVAL_SEED, tagged_sentences
    from workbench.probing import harvest, train_probes

    tokens = TokenLabelledDataset.from_tagged(tagged_sentences(300, seed=EVAL_SEED), "pos").encode(
        model.tokenizer
    )
    with tempfile.TemporaryDirectory(prefix="gallery-probing-") as folder:
        probes = train_probes(harvest(model, tokens, Path(folder) / "pos", progress=False), progress=False)
    return probes.figure("Part of speech: linear probe accuracy by layer")


def xielu(model) -> go.Figure:
    """Notebook 04: the last layer's xIELU curve over its pre-activation distribution, split into regimes."""
    from workbench.data.corpus import EVAL_SEED, training_corpus
    from workbench.xielu import xielu_figure, xielu_statistics

    texts = sorted(training_corpus(200, seed=EVAL_SEED), key=len)
    stats = xielu_statistics(model, texts, batch_size=32, progress=False)
    return xielu_figure(model, model.cfg.n_layers - 1, stats)


def lens(model) -> go.Figure:
    """Notebook 05: the logit lens on an indirect-object prompt."""
    from workbench.data.corpus import ioi_prompts
    from workbench.lens import logit_lens_figure

    return logit_lens_figure(model, ioi_prompts(1)[0].clean)


PICTURES: dict[str, tuple[str, Callable]] = {
    "attention": ("01_attention.png", attention),
    "patching": ("02_patching.png", patching),
    "probing": ("03_probing.png", probing),
    "xielu": ("04_xielu.png", xielu),
    "lens": ("05_logit_lens.png", lens),
}


# ------------------------------------------------------------------------------------------- writing
def write_png(fig: go.Figure, path: Path) -> str:
    """Write `fig` to `path` (atomically: a temporary name, then a rename). Returns the renderer used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = go.Figure(fig)
    height = int(fig.layout.height or HEIGHT)
    fig.update_layout(width=WIDTH, height=height)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        try:
            import kaleido  # noqa: F401

            fig.write_image(tmp, format="png", width=WIDTH, height=height, scale=SCALE)
            renderer = "kaleido"
        except ImportError:
            _screenshot(fig, tmp, height)
            renderer = "chromium (playwright)"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return renderer


def _screenshot(fig: go.Figure, path: Path, height: int) -> None:
    from playwright.sync_api import sync_playwright

    html = fig.to_html(
        include_plotlyjs=True, full_html=True, config={"staticPlot": True, "displayModeBar": False}
    )
    with tempfile.TemporaryDirectory(prefix="gallery-") as folder:
        page_file = Path(folder) / "figure.html"
        page_file.write_text(html)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                page = browser.new_page(
                    viewport={"width": WIDTH, "height": height}, device_scale_factor=SCALE
                )
                # The page is self-contained: refuse anything that is not the file itself.
                page.route(
                    "**/*",
                    lambda route: (
                        route.continue_() if route.request.url.startswith("file:") else route.abort()
                    ),
                )
                page.goto(page_file.as_uri())
                page.wait_for_selector(".js-plotly-plot .main-svg")
                page.locator(".js-plotly-plot").first.screenshot(path=str(path))
            finally:
                browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"pictures to make: {', '.join(PICTURES)} (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gallery", help="output folder")
    parser.add_argument(
        "--checkpoint", default=None, help="model folder or hub id (default: the embedded one)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in PICTURES]
    if unknown:
        parser.error(f"unknown picture(s) {', '.join(unknown)}: choose from {', '.join(PICTURES)}.")

    import torch

    import workbench

    torch.manual_seed(0)
    model = workbench.load(args.checkpoint)
    written, skipped = [], []
    for name in args.names or list(PICTURES):
        filename, draw = PICTURES[name]
        start = time.monotonic()
        try:
            fig = draw(model)
        except (ImportError, AttributeError, TypeError) as error:
            # Another room of the workbench is missing or has changed its calls: skip this picture.
            print(f"skip {filename}: {type(error).__name__}: {error}", file=sys.stderr)
            skipped.append(name)
            continue
        except Exception:
            print(f"skip {filename}: drawing failed:\n{traceback.format_exc()}", file=sys.stderr)
            skipped.append(name)
            continue
        renderer = write_png(fig, args.out / filename)
        print(f"wrote {args.out / filename} ({renderer}, {time.monotonic() - start:.1f} s)")
        written.append(name)
    if skipped:
        print(f"skipped: {', '.join(skipped)}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
