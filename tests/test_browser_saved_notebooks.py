"""Saved notebooks travel: reopened in JupyterLab (its kernel runs nothing), and exported to HTML, an executed
notebook still shows every figure, in headless Chromium with every request off the page's origin refused."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from browser import browser_output_dir, jupyter_lab, static_page
from executed import NOTEBOOKS, execute, figures_in, load

from workbench.notebook_html import export_html

NOTEBOOK = next(p for p in NOTEBOOKS if p.stem == "01_attention")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Notebook 01 executed and saved with outputs and widget state, as a user would share it."""
    return execute(NOTEBOOK, tmp_path_factory.mktemp("saved"))


def count_figures(page, selector: str, expected: int, timeout_s: float = 90) -> int:
    """Wait until `expected` figures (`selector`, one element per figure) are drawn; how many are."""
    figures = page.locator(selector)
    waited = 0
    while waited < timeout_s * 1000 and figures.count() < expected:
        page.wait_for_timeout(500)
        waited += 500
    return figures.count()


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_a_saved_notebook_reopened_draws_every_figure_from_its_saved_state(saved, tmp_path, request):
    in_cells, in_widgets = figures_in(load(saved))
    expected = len(in_cells) + len(in_widgets)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(saved, root / saved.name)
    # A notebook from someone else is untrusted: JupyterLab then draws no widget view (plotly's mime type it
    # draws anyway). Trusting it is the recipient's one step (README).
    subprocess.run([sys.executable, "-m", "jupyter", "trust", str(root / saved.name)], check=True)
    # Every cell in the page (JupyterLab 4 otherwise renders only the cells in view).
    settings = {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}
    output_dir = browser_output_dir(request)
    with jupyter_lab(tmp_path, output_dir=output_dir, root_dir=root, user_settings=settings) as lab:
        # The kernel starts but runs nothing: it holds no widget, so all that is drawn is the saved state.
        lab.open_notebook(saved.name)
        drawn = count_figures(lab.page, ".jp-RenderedPlotly", expected)
        lab.page.wait_for_timeout(1000)
        lab.screenshot("reopened.png")
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        assert lab.page.locator(".jp-RenderedPlotly .main-svg").count() >= expected
        explorer = lab.page.locator(".wb-attention-explorer").first
        pattern = explorer.locator(".wb-pattern .js-plotly-plot").first
        assert pattern.locator("g.hm image").count() >= 1, "the pattern heatmap has no cells"
        assert "outside" in pattern.text_content()
        assert explorer.locator(".wb-head-grid .js-plotly-plot g.hm image").count() >= 1
        assert lab.page.locator(".wb-top-keys table").count() >= 1
        assert lab.cell_state()["errors"] == []
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
        drawn = count_figures(page, ".wb-plotly.js-plotly-plot", expected)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(output_dir / "export.png"), full_page=False)
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        explorer = page.locator(".wb-attention-explorer").first
        assert explorer.locator(".wb-pattern .js-plotly-plot g.hm image").count() >= 1
        assert "Where does" in explorer.text_content()
        assert page.locator(".wb-static-control", has_text="layer").count() >= 1
