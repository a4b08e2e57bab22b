"""Notebook 01 in a real JupyterLab and Chromium: it runs, renders offline, and the layer control redraws."""

from __future__ import annotations

import browser
import pytest
from browser import _check_url, browser_output_dir, jupyter_lab, wait_for_change


@pytest.mark.browser
@pytest.mark.timeout(300)  # the harness's own waits end sooner; this bounds anything they miss
def test_attention_notebook_runs_and_the_layer_control_redraws_the_heatmap(tmp_path, request):
    with jupyter_lab(tmp_path, output_dir=browser_output_dir(request)) as lab:
        lab.open_notebook("01_attention.ipynb")
        lab.run_all()

        explorer = lab.page.locator(".wb-attention-explorer").first
        # The figures are the cell's own outputs below the controls: the pattern is the cell's first plot.
        cell = lab.page.locator(".jp-CodeCell", has=explorer).first
        heatmap = cell.locator(".jp-RenderedPlotly.js-plotly-plot").first
        cells = heatmap.locator("g.hm image").first  # plotly draws a heatmap's cells as one image
        cells.wait_for(timeout=60_000)
        heatmap.scroll_into_view_if_needed()
        lab.screenshot("notebook-after-run-all.png")
        before_png = lab.screenshot("heatmap-before.png", heatmap).read_bytes()
        before = cells.get_attribute("href")
        title_before = heatmap.locator(".gtitle").text_content()

        layer = explorer.locator(".wb-layer select")
        labels = layer.locator("option").all_inner_texts()  # ipywidgets writes "layer\xa00"
        options = {" ".join(label.split()): label for label in labels}
        assert len(options) > 1, labels
        new = next(o for o in options if not title_before.lower().startswith(o))
        layer.select_option(label=options[new])

        wait_for_change(lambda: cells.get_attribute("href"), before)
        title_after = wait_for_change(lambda: heatmap.locator(".gtitle").text_content(), title_before)
        lab.page.wait_for_timeout(500)  # let plotly finish the redraw before the screenshot
        after_png = lab.screenshot("heatmap-after.png", heatmap).read_bytes()
        lab.screenshot("notebook-after-layer-change.png")

        assert title_after.lower().startswith(new), (title_after, new)
        assert after_png != before_png
        assert lab.cell_state()["errors"] == []


def test_the_harness_lets_only_the_lab_origin_data_and_blob_through():
    base, offsite = "http://127.0.0.1:8123", []
    allowed = [
        "http://127.0.0.1:8123/lab/tree/01_attention.ipynb",
        "ws://127.0.0.1:8123/api/kernels/abc/channels",
        "data:image/png;base64,AAAA",
        "blob:http://127.0.0.1:8123/5f0c",
    ]
    refused = [
        "https://cdn.jsdelivr.net/npm/plotly.js/dist/plotly.min.js",
        "http://127.0.0.1:9999/other-server",
        "http://localhost:8123/lab",
        "https://fonts.googleapis.com/css",
    ]
    assert all(_check_url(url, base, offsite) for url in allowed)
    assert not any(_check_url(url, base, offsite) for url in refused)
    assert offsite == refused


def test_a_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/chromium"):
        browser.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        browser.require_chromium()
