"""The figures module and the views built on it, without a browser: what a saved notebook stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench import figures

PLOTLY = "application/vnd.plotly.v1+json"


def test_labels_are_escaped_and_numbered():
    assert figures.escape_label("<s>") == "&lt;s&gt;" and figures.escape_label("a&b") == "a&amp;b"
    assert figures.token_labels(["<s>", " the", " the"]) == ["0: &lt;s&gt;", "1:  the", "2:  the"]
    assert figures.token_labels(["x"], [41]) == ["41: x"]
    assert "color:" in figures.error_html(ValueError("<bad>")) and "&lt;bad&gt;" in figures.error_html(
        "<bad>"
    )


def test_one_height_rule_bounds_every_heatmap():
    assert figures.heatmap_height(1) == figures.MIN_HEIGHT
    assert figures.heatmap_height(10_000) == figures.MAX_HEIGHT
    assert figures.heatmap_height(10) == figures.CHROME_PX + 10 * figures.ROW_PX
    fig = figures.heatmap(np.zeros((10, 3)), x=["a", "b", "c"], y=list("abcdefghij"))
    assert fig.layout.height == figures.heatmap_height(10) and fig.layout.yaxis.autorange == "reversed"


def test_diverging_heatmaps_are_symmetric_and_sequential_ones_use_the_palette():
    fig = figures.heatmap(np.array([[-1.0, 3.0], [np.nan, 0.5]]), diverging=True)
    trace = fig.data[0]
    assert (trace.zmin, trace.zmax, trace.zmid) == (-3.0, 3.0, 0)
    assert trace.colorscale == figures.heatmap_trace([[0]], diverging=True).colorscale
    assert figures.heatmap([[0.1]]).data[0].colorscale != trace.colorscale


def test_a_figure_view_stores_data_as_plotly_json_not_the_library():
    fig = figures.heatmap(np.array([[0.5, np.nan], [0.25, 1.0]], dtype=np.float64), title="t <s>")
    view = figures.FigureView(fig)
    (output,) = view.outputs
    text = json.dumps(output, allow_nan=False)  # widget messages are strict JSON: NaN must not pass
    assert set(output["data"]) == {PLOTLY, "text/plain"}
    z = output["data"][PLOTLY]["data"][0]["z"]
    assert z["dtype"] == "f4"  # a typed array: 4 bytes a cell, base64
    assert len(text) < 5_000 and "Plotly.newPlot" not in text
    assert view.data[0].z.shape == (2, 2) and view.layout.title.text == "t <s>"
    fresh = figures.heatmap([[1.0]])
    view.show(fresh)
    assert view.figure is fresh and len(view.outputs) == 1


def test_a_slot_is_shown_with_a_display_id_and_redrawn_in_place(monkeypatch):
    """What a view sends: one display_data per slot with its id, then updates to that id (never a new
    output), and nothing at all before it is displayed."""
    sent = []
    monkeypatch.setattr(figures, "display", lambda *a, **k: sent.append(("display", a, k)))
    monkeypatch.setattr(figures, "update_display", lambda *a, **k: sent.append(("update", a, k)))
    view = figures.FigureView(figures.heatmap([[1.0]], title="first"))
    view.show(figures.heatmap([[2.0]], title="second"))
    assert sent == []  # not displayed yet: the first display will carry "second"
    view.add_class("wb-pattern")
    view._ipython_display_()
    (kind, (bundle,), options) = sent[-1]
    assert kind == "display" and options["display_id"] == view.display_id and options["raw"] is True
    assert bundle[PLOTLY]["layout"]["title"]["text"] == "second"
    assert options["metadata"] == {"workbench": {"classes": ["wb-pattern"]}}
    view.show(figures.heatmap([[3.0]], title="third"))
    (kind, (bundle,), options) = sent[-1]
    assert kind == "update" and options["display_id"] == view.display_id
    assert bundle[PLOTLY]["layout"]["title"]["text"] == "third"
    # Plain text first: JupyterLab then builds a fresh plotly renderer (the old one would not redraw).
    assert sent[-2][0] == "update" and sent[-2][1][0] == {"text/plain": "redrawing…"}

    panel = figures.HTMLView("<b>a</b> &amp; b")
    panel.add_class("wb-top-keys")
    assert panel.outputs[0]["data"] == {
        "text/html": '<div class="wb-output wb-top-keys"><b>a</b> &amp; b</div>',
        "text/plain": "a & b",
    }
    panel._ipython_display_()
    panel.value = "<i>new</i>"
    assert sent[-1][0] == "update" and "new" in sent[-1][1][0]["text/html"]
    assert panel.display_id != view.display_id


def test_a_layout_groups_controls_into_boxes_and_keeps_slots_as_outputs(monkeypatch):
    import ipywidgets as widgets

    shown = []
    monkeypatch.setattr(figures, "display", lambda obj, **k: shown.append(obj))
    a, b, c = widgets.HTML("a"), widgets.HTML("b"), widgets.HTML("c")
    fig, table = figures.FigureView(), figures.HTMLView("t")
    layout = figures.ViewLayout([a, b, fig, c, table], "wb-some-view")
    layout._ipython_display_()
    assert [type(x) for x in shown] == [widgets.VBox, figures.FigureView, widgets.VBox, figures.HTMLView]
    assert shown[0].children == (a, b) and shown[2].children == (c,)
    assert all("wb-some-view" in box._dom_classes for box in layout.boxes)
    assert layout.slots == [fig, table]


def test_a_view_changed_in_a_later_cell_redraws_its_saved_output(tmp_path):
    """Through a real kernel and nbclient (what the notebook tests and a user's save do): the explorer's
    figure is a cell output, and changing the layer in a later cell rewrites that output in place."""
    import nbformat
    from nbclient import NotebookClient

    cells = [
        "import workbench\nfrom workbench.widgets.attention import AttentionExplorer\n"
        "model = workbench.load()\nexplorer = AttentionExplorer(model, 'the cat sat on the mat', layer=0)\n"
        "explorer",
        "explorer.show(layer=1)\nprint(explorer.figure.layout.title.text)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    shown, changed = notebook.cells
    plots = [o for o in shown.outputs if PLOTLY in o.get("data", {})]
    assert len(plots) == 2  # the pattern and the head grid, outside any widget
    title = plots[0]["data"][PLOTLY]["layout"]["title"]["text"]
    assert title == changed.outputs[0]["text"].strip() and title.lower().startswith("layer 1")
    assert plots[0]["metadata"] == {"workbench": {"classes": ["wb-pattern"]}}
    assert not any(PLOTLY in o.get("data", {}) for o in changed.outputs)  # updated, not shown again
    assert any("wb-top-keys" in "".join(o.get("data", {}).get("text/html", "")) for o in shown.outputs)


def test_the_lens_and_xielu_explorers_draw_into_figure_views(random_model):
    from workbench.widgets.lens import LensExplorer
    from workbench.widgets.xielu import XIELUExplorer
    from workbench.xielu import xielu_statistics

    lens = LensExplorer(random_model, "w1 w2 w3 w1 w2", answer=" w3", wrong=" w4")
    for view in (lens.lens, lens.trajectory, lens.attribution):
        assert isinstance(view, figures.FigureView) and PLOTLY in view.outputs[0]["data"]
    assert lens.lens.data[0].z.shape[0] == random_model.cfg.n_layers + 1
    lens.run(answer="")
    assert "Type an answer" in lens.status.value
    lens.run(prompt="w1 w2", answer="not a token at all")
    assert "wb-error" in lens.status.value

    stats = xielu_statistics(random_model, ["w1 w2 w3", "w4 w5 w6 w7"], batch_size=2, progress=False)
    xielu = XIELUExplorer(random_model, stats, layer=0)
    title = xielu.curve.layout.title.text
    xielu.show(layer=2)
    assert xielu.curve.layout.title.text != title and xielu.curve.layout.title.text.startswith("Layer 2")
    xielu.share_kind.value = "output"
    assert "MLP output" in xielu.shares.layout.title.text
    assert PLOTLY in xielu.shares.outputs[0]["data"]


@pytest.mark.parametrize("n", [3, 40])
def test_head_grids_have_one_panel_per_head(n):
    fig = figures.heatmap_grid([np.eye(4)] * n, [f"H{i}" for i in range(n)])
    assert len(fig.data) == n and fig.layout.coloraxis.cmax == 1


def test_the_offline_export_draws_view_outputs_with_their_roles(tmp_path):
    """Without a browser: each figure output becomes one plotly div with the classes its view gave it."""
    import nbformat

    from workbench.notebook_html import main

    view = figures.FigureView(figures.heatmap([[1.0, 0.5]], title="pattern"))
    view.add_class("wb-pattern")
    table = figures.HTMLView("<table><tr><td>Where does it look?</td></tr></table>")
    cell = nbformat.v4.new_code_cell("explorer")
    cell.outputs = [nbformat.from_dict(o) for o in view.outputs + table.outputs]
    path = tmp_path / "executed.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    main([str(path)])
    text = (tmp_path / "executed.html").read_text()
    assert text.count("Plotly.newPlot(") == 1 and 'class="wb-plotly wb-pattern"' in text
    assert '<div class="wb-output"><table><tr><td>Where does it look?' in text
