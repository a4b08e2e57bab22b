"""Saved notebooks travel: reopened in JupyterLab without a kernel, and exported with nbconvert to HTML, an
executed notebook still shows every figure, in headless Chromium with every request off the page's own origin
refused."""

from __future__ import annotations

import json

import pytest
from browser import browser_output_dir, jupyter_lab, static_page
from executed import NOTEBOOKS, execute, figures_in, load

from workbench.notebook_html import export_html

NOTEBOOK = next(p for p in NOTEBOOKS if p.stem == "01_attention")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Notebook 01 executed and saved with outputs and widget state, as a user would share it."""
    return execute(NOTEBOOK, tmp_path_factory.mktemp("saved"))


def count_figures(page, expected: int, timeout_s: float = 60) -> int:
    """Wait until `expected` plotly figures are drawn (each one's main SVG), then return how many are."""
    plots = page.locator(".js-plotly-plot .main-svg")
    deadline = timeout_s * 1000
    waited = 0
    while waited < deadline and page.locator(".js-plotly-plot").count() < expected:
        page.wait_for_timeout(500)
        waited += 500
    assert plots.count() > 0
    return page.locator(".js-plotly-plot").count()


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_a_saved_notebook_reopened_without_a_kernel_shows_every_figure(saved, tmp_path, request):
    notebook = load(saved)
    in_cells, in_widgets = figures_in(notebook)
    expected = len(in_cells) + len(in_widgets)
    # A kernel name no server knows: JupyterLab asks which kernel to start, and the test answers "No Kernel".
    notebook["metadata"]["kernelspec"] = {"name": "none-here", "display_name": "none", "language": "none"}
    root = tmp_path / "root"
    root.mkdir()
    (root / saved.name).write_text(json.dumps(notebook))
    with jupyter_lab(tmp_path, output_dir=browser_output_dir(request), root_dir=root) as lab:
        lab.open_notebook(saved.name, kernel=False)
        drawn = count_figures(lab.page, expected)
        lab.page.wait_for_timeout(1000)
        lab.screenshot("reopened-without-kernel.png")
        assert lab.kernel_status().startswith("No Kernel"), lab.kernel_status()
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        explorer = lab.page.locator(".wb-attention-explorer").first
        pattern = explorer.locator(".wb-pattern .js-plotly-plot").first
        assert pattern.locator("g.hm image").count() >= 1, "the pattern heatmap has no cells"
        assert "outside" in pattern.text_content()
        assert explorer.locator(".wb-head-grid .js-plotly-plot g.hm image").count() >= 1
        assert lab.page.locator(".wb-top-keys table").count() >= 1
        lab.screenshot("explorer.png", explorer)


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_the_html_export_shows_every_figure_with_no_network_request(saved, tmp_path, request):
    notebook = load(saved)
    in_cells, in_widgets = figures_in(notebook)
    expected = len(in_cells) + len(in_widgets)
    html_file = export_html(saved, tmp_path / "01_attention.html")
    text = html_file.read_text()
    assert text.count("Plotly.newPlot(") == expected
    assert "cdn" not in text.split("<script")[0].lower()  # nothing fetched before plotly.js is inlined
    output_dir = browser_output_dir(request)
    with static_page(tmp_path, html_file) as page:
        drawn = count_figures(page, expected)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(output_dir / "export.png"), full_page=False)
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        explorer = page.locator(".wb-attention-explorer").first
        assert explorer.locator(".wb-pattern .js-plotly-plot g.hm image").count() >= 1
        assert "Where does" in explorer.text_content()
        assert page.locator(".wb-static-control", has_text="layer").count() >= 1
