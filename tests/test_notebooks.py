"""Every notebook in notebooks/ runs from top to bottom without an error (nbclient, a real kernel), and saved
with its outputs and widget state it travels: at most 2 MB, every figure stored as plotly's mime type (data,
not the library), no widget carrying its own JavaScript."""

from __future__ import annotations

import json

import nbformat
import pytest
from executed import MAX_BYTES, NOTEBOOKS, REPO, WIDGET_VIEW, execute, figures_in, load, widget_state

#: Figures each notebook must show (in cells or inside widgets): a figure lost on the way fails the test.
MIN_FIGURES = {
    "01_attention": 7,  # 3 explorers x (pattern + head grid) + the head summary
    "02_activation_patching": 6,
    "03_probing": 3,
    "04_xielu": 3,
    "05_residual_stream": 6,
    "06_steering_and_ablation": 3,  # induction accuracy bars, the steering sweep, the steering view
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_saved_it_travels(path, tmp_path):
    committed = nbformat.read(path, as_version=4)
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.get("execution_count") is None, (
                f"{path.name} is committed with outputs"
            )
    saved = execute(path, tmp_path)
    notebook = load(saved)
    errors = [
        o
        for c in notebook["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
        if o["output_type"] == "error"
    ]
    assert not errors

    size = saved.stat().st_size
    _record_size(path.stem, size)
    assert size <= MAX_BYTES, f"{path.name} saved with outputs weighs {size / 1e6:.2f} MB (limit 2 MB)"

    in_cells, in_widgets = figures_in(notebook)
    assert len(in_cells) + len(in_widgets) >= MIN_FIGURES.get(path.stem, 1), (len(in_cells), len(in_widgets))
    for fig in in_cells + in_widgets:
        assert fig["data"], "an empty figure"
    state = widget_state(notebook)
    # Every widget view in a cell output has its saved state: reopened without a kernel, it is drawn.
    views = [
        o["data"][WIDGET_VIEW]["model_id"]
        for c in notebook["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
        if WIDGET_VIEW in o.get("data", {})
    ]
    assert all(v in state for v in views), "a widget view without saved state"
    for model_id, model in state.items():
        # anywidget (FigureWidget) stores its JavaScript bundle in `_esm`: ~4.7 MB of plotly.js per widget.
        assert "_esm" not in model["state"], f"widget {model_id} ({model['model_name']}) carries JavaScript"
        assert len(json.dumps(model["state"])) < 500_000, f"widget {model_id} state is oversized"


def _record_size(name: str, size: int) -> None:
    """test-output/notebook-sizes/<name>.json: the measured size, for the README (one file per notebook, so
    that the suite's parallel workers never overwrite each other's figures)."""
    out = REPO / "test-output" / "notebook-sizes" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"notebook": name, "bytes": size}))
