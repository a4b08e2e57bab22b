"""Notebook 04 in a real JupyterLab and Chromium: it runs, renders offline, and the layer control redraws the
regime plot (the layer's curve over its input histogram)."""

from __future__ import annotations

import pytest
from browser import browser_output_dir, jupyter_lab, wait_for_change

NOTEBOOK = "04_xielu.ipynb"


def run_xielu_notebook_and_change_layer(lab) -> None:
    lab.open_notebook(NOTEBOOK)
    lab.run_all(timeout_s=180)

    explorer = lab.page.locator(".wb-xielu-explorer").first
    # The figures are the cell's own outputs: the regime shares first, then the layer's curve.
    cell = lab.page.locator(".jp-CodeCell", has=explorer).first
    plot = cell.locator(".jp-RenderedPlotly.js-plotly-plot").nth(1)
    curve = plot.locator("g.scatterlayer path.js-line").first  # the learned curve's first regime
    curve.wait_for(timeout=60_000)
    plot.scroll_into_view_if_needed()
    lab.screenshot("notebook-after-run-all.png")
    before_png = lab.screenshot("regimes-before.png", plot).read_bytes()
    title_before = plot.locator(".gtitle").text_content()
    path_before = curve.get_attribute("d")
    bars_before = plot.locator("g.barlayer path").count()

    layer = cell.locator(".wb-layer select")  # in the second box of controls, below the regime shares
    labels = layer.locator("option").all_inner_texts()  # ipywidgets writes "layer\xa00"
    options = {" ".join(label.split()): label for label in labels}
    assert len(options) > 1, labels
    current = " ".join(layer.evaluate("s => s.options[s.selectedIndex].text").split())
    new = next(o for o in options if o != current)
    layer.select_option(label=options[new])

    title_after = wait_for_change(lambda: plot.locator(".gtitle").text_content(), title_before)
    lab.page.wait_for_timeout(500)  # let plotly finish the redraw before the screenshot
    after_png = lab.screenshot("regimes-after.png", plot).read_bytes()
    lab.screenshot("notebook-after-layer-change.png")

    assert title_after.lower().startswith(new), (title_after, new)
    assert title_before.lower().startswith(current), (title_before, current)
    assert bars_before > 0, "the input histogram was missing before the change"
    assert plot.locator("g.scatterlayer path.js-line").first.get_attribute("d") != path_before
    assert plot.locator("g.barlayer path").count() > 0, "the input histogram is missing"
    assert after_png != before_png
    assert lab.cell_state()["errors"] == []


@pytest.mark.browser
def test_xielu_notebook_runs_and_the_layer_control_redraws_the_regime_plot(tmp_path, request):
    with jupyter_lab(tmp_path, output_dir=browser_output_dir(request)) as lab:
        run_xielu_notebook_and_change_layer(lab)
