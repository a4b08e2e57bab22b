"""Saved notebooks travel: reopened in JupyterLab, with a kernel or with none, and exported to HTML, an
executed notebook still shows every figure, in headless Chromium with every request off the page's origin
refused.

Why the views keep their figures and results out of widgets: JupyterLab 4 with jupyterlab_widgets 3.0.x draws
a widget only through a kernel. Its widget manager's `restoreWidgets()` awaits the session context, then
`_loadFromKernel()`, then `_loadFromNotebook()` in one try block; with no kernel `_loadFromKernel()` throws
"Kernel not set" and the saved widget state is never read (ipywidgets issue 3773), so every widget output
stays at "Loading widget...". When the figures lived in `Output` widgets, a notebook reopened without a kernel
showed none of them. They are now plain cell outputs (plotly's mime type, HTML) redrawn in place through
display ids (`workbench.figures.OutputSlot`): without a kernel every figure and result table is drawn and
only the controls wait for one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from browser import browser_output_dir, jupyter_lab, static_page
from executed import NOTEBOOKS, execute, figures_in, load

NOTEBOOK = next(p for p in NOTEBOOKS if p.stem == "01_attention")
# Every cell in the page (JupyterLab 4 otherwise renders only the cells in view).
ALL_CELLS = {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Notebook 01 executed and saved with outputs and widget state, as a user would share it."""
    return execute(NOTEBOOK, tmp_path_factory.mktemp("saved"))


def trusted_copy(saved, tmp_path):
    """The saved notebook alone in a fresh root folder, trusted (a notebook from someone else is untrusted:
    JupyterLab then draws no widget view; trusting it is the recipient's one step, README)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(saved, root / saved.name)
    subprocess.run([sys.executable, "-m", "jupyter", "trust", str(root / saved.name)], check=True)
    return root


def count_figures(page, selector: str, expected: int, timeout_s: float = 90) -> int:
    """Wait until `expected` figures (`selector`, one element per figure) are drawn; how many are."""
    figures = page.locator(selector)
    waited = 0
    while waited < timeout_s * 1000 and figures.count() < expected:
        page.wait_for_timeout(500)
        waited += 500
    return figures.count()


def check_explorer(lab) -> None:
    """The first attention explorer's outputs, drawn from the saved notebook: the pattern (with its
    outside-mass column) and the head grid (the cell's first two plots), and the top-keys table."""
    page = lab.page
    cell = page.locator(".jp-CodeCell", has=page.locator(".wb-top-keys")).first
    plots = cell.locator(".jp-RenderedPlotly.js-plotly-plot")
    pattern, grid = plots.nth(0), plots.nth(1)
    assert pattern.locator("g.hm image").count() >= 1, "the pattern heatmap has no cells"
    assert "outside" in pattern.text_content()
    assert grid.locator("g.hm image").count() >= 1
    assert cell.locator(".wb-top-keys table").count() >= 1
    lab.screenshot("explorer.png", cell)


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_a_saved_notebook_reopened_draws_every_figure_from_its_saved_state(saved, tmp_path, request):
    in_cells, in_widgets = figures_in(load(saved))
    expected = len(in_cells) + len(in_widgets)
    root = trusted_copy(saved, tmp_path)
    output_dir = browser_output_dir(request)
    with jupyter_lab(tmp_path, output_dir=output_dir, root_dir=root, user_settings=ALL_CELLS) as lab:
        # A fresh kernel starts but runs nothing: it holds no widget, so all that is drawn is the saved state.
        # (With no kernel at all nothing is drawn: see the module docstring and the next test.)
        lab.open_notebook(saved.name)
        drawn = count_figures(lab.page, ".jp-RenderedPlotly", expected)
        lab.page.wait_for_timeout(1000)
        lab.screenshot("reopened.png")
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        assert lab.page.locator(".jp-RenderedPlotly .main-svg").count() >= expected
        check_explorer(lab)
        assert lab.cell_state()["errors"] == []


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_a_saved_notebook_reopened_with_no_kernel_draws_every_figure(saved, tmp_path, request):
    notebook = load(saved)
    in_cells, in_widgets = figures_in(notebook)
    expected = len(in_cells) + len(in_widgets)
    assert in_widgets == [], "a figure inside a widget: it would not be drawn without a kernel"
    root = trusted_copy(saved, tmp_path)
    output_dir = browser_output_dir(request)
    with jupyter_lab(tmp_path, output_dir=output_dir, root_dir=root, user_settings=ALL_CELLS) as lab:
        lab.open_notebook_without_kernel(saved.name)
        assert lab.kernel_status() == "No Kernel | Unknown", lab.kernel_status()
        assert lab.toolbar_kernel_name() == "No Kernel"
        assert lab.api("sessions") == [] and lab.api("kernels") == []
        drawn = count_figures(lab.page, ".jp-RenderedPlotly", expected, timeout_s=60)
        lab.page.wait_for_timeout(1000)
        lab.screenshot("reopened-no-kernel.png")
        assert lab.api("sessions") == [] and lab.api("kernels") == [], "a kernel was started"
        assert lab.kernel_status() == "No Kernel | Unknown", lab.kernel_status()
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        assert lab.page.locator(".jp-RenderedPlotly .main-svg").count() >= expected
        check_explorer(lab)


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_the_html_export_shows_every_figure_with_no_network_request(saved, tmp_path, request):
    notebook = load(saved)
    in_cells, in_widgets = figures_in(notebook)
    expected = len(in_cells) + len(in_widgets)
    # The command a user types (the exporter is registered with nbconvert under this name, pyproject.toml).
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "workbench_html", "--output-dir"]
    subprocess.run([*command, str(tmp_path / "export"), str(saved)], check=True, capture_output=True)
    html_file = tmp_path / "export" / "01_attention.html"
    text = html_file.read_text()
    assert text.count("Plotly.newPlot(") == expected
    assert "cdn" not in text.split("<script")[0].lower()  # nothing fetched before plotly.js is inlined
    output_dir = browser_output_dir(request)
    with static_page(tmp_path, html_file) as page:
        drawn = count_figures(page, ".wb-plotly.js-plotly-plot", expected)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(output_dir / "export.png"), full_page=False)
        assert drawn == expected, f"{drawn} of {expected} figures drawn"
        # The first explorer's pattern and top-keys table (its figures and results are cell outputs, tagged
        # with their roles), and its controls as a static snapshot.
        assert page.locator(".wb-plotly.wb-pattern").first.locator("g.hm image").count() >= 1
        assert "Where does" in page.locator(".wb-top-keys").first.text_content()
        explorer = page.locator(".wb-attention-explorer").first
        assert explorer.locator(".wb-static-control", has_text="layer").count() >= 1
