"""Every widget control set from code to a bad value says which values it accepts: one row per case (the
call, the exception, a phrase of its message), as in ``test_bad_input.py``.

A row's callable takes the shared context ``c``: one view of each kind on the shipped model, built once (a
refused value changes nothing, so the rows can share them). Rows that build a view with a bad argument build
their own. ProbeView's and the xIELU explorer's rows are in ``test_bad_input.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import ipywidgets as widgets
import numpy as np
import pytest
import torch

import workbench
from workbench import xielu as X
from workbench.circuits import Graph, edge_attribution
from workbench.interventions import SteeringVector
from workbench.patching import PatchingExperiment
from workbench.sae import SAEConfig, SparseAutoencoder, feature_statistics
from workbench.widgets.attention import AttentionExplorer, HeadSummary
from workbench.widgets.circuits import CircuitView
from workbench.widgets.controls import CheckedControl
from workbench.widgets.lens import LensExplorer
from workbench.widgets.patching import PatchingView
from workbench.widgets.sae import FeatureView
from workbench.widgets.steering import SteeringView
from workbench.widgets.xielu import XIELUExplorer

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
HOOK = "blocks.1.hook_resid_post"
D_SAE = 64


def random_sae(model) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, k=4, hook_name=HOOK, hook_layer=1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.1)
    return sae


@pytest.fixture(scope="module")
def c():
    model = workbench.load()
    experiment = PatchingExperiment(model, CLEAN, CORRUPT, answers=(" Mary", " John"))
    edges = edge_attribution(experiment)
    graph = Graph(model.cfg)
    sae = random_sae(model)
    stats = feature_statistics(model, sae, [CLEAN, CORRUPT], top_k=2, progress=False)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    vector = SteeringVector(direction, 1, "random")
    steering_args = (model, CLEAN, {"random": vector}, (" John", " Mary"))
    return SimpleNamespace(
        model=model,
        ex=experiment,
        edges=edges,
        graph=graph,
        sae=sae,
        stats=stats,
        steering_args=steering_args,
        # A 15-token prompt in windows of 8: the window sliders run 0..7.
        attention=AttentionExplorer(model, CLEAN, window_size=8),
        summary=HeadSummary(model, CLEAN),
        patching=PatchingView(experiment),
        circuit=CircuitView(edges, graph, count=5),
        lens=LensExplorer(model, CLEAN, answer=" Mary", wrong=" John"),
        feature=FeatureView(model, sae, stats),
        steering=SteeringView(*steering_args, coefficients=[-4, 0, 4], max_new_tokens=2),
        xielu=XIELUExplorer(model, X.xielu_statistics(model, [CLEAN], progress=False)),
    )


def set_value(control, value):
    control.value = value


def n_edges(c) -> int:
    return len(c.edges.rows)


# fmt: off
CASES = [
    # ---------------------------------------------------------------------------------- attention explorer
    ("attention/prompt-box-number", lambda c: set_value(c.attention.prompt_box, 3), TypeError,
     "prompt_box 3 is not text: give a str"),
    ("attention/layer-out-of-range", lambda c: set_value(c.attention.layer, 3), ValueError,
     "layer 3 is not one of the choices: 0, 1, 2"),
    ("attention/layer-text", lambda c: set_value(c.attention.layer, "1"), ValueError,
     "layer '1' is not one of the choices: 0, 1, 2"),
    ("attention/head-out-of-range", lambda c: set_value(c.attention.head, 4), ValueError,
     "head 4 is not one of the choices: 0, 1, 2, 3"),
    ("attention/window-out-of-range", lambda c: set_value(c.attention.window, 8), ValueError,
     "window 8 is out of range: choose a whole number in 0..7"),
    ("attention/window-negative", lambda c: set_value(c.attention.window, -1), ValueError,
     "0..7 (the first query position shown"),
    ("attention/window-float", lambda c: set_value(c.attention.window, 2.5), TypeError,
     "window 2.5 is not a whole number: choose one in 0..7"),
    ("attention/key-window-out-of-range", lambda c: set_value(c.attention.key_window, 100), ValueError,
     "key_window 100 is out of range: choose a whole number in 0..7"),
    ("attention/key-window-text", lambda c: set_value(c.attention.key_window, "3"), TypeError,
     "key_window '3' is not a whole number"),
    ("attention/follow-one", lambda c: set_value(c.attention.follow, 1), TypeError,
     "follow 1 is not True or False"),
    ("attention/follow-text", lambda c: set_value(c.attention.follow, "yes"), TypeError,
     "follow 'yes' is not True or False"),
    ("attention/token-off-screen", lambda c: set_value(c.attention.token, 12), ValueError,
     "token 12 is not one of the choices: 0..7 (the query positions on screen"),
    ("attention/show-keys-outside", lambda c: c.attention.show_keys(15), IndexError,
     "key position 15 is outside the prompt: choose one in 0..14"),
    ("attention/layer-argument", lambda c: AttentionExplorer(c.model, CLEAN, layer=5), IndexError, "0..2"),
    # ---------------------------------------------------------------------------------- head summary
    ("head-summary/score", lambda c: set_value(c.summary.score, "inductive"), ValueError,
     "score 'inductive' is not one of the choices: 'previous_token', 'duplicate_token', 'induction'"),
    ("head-summary/head", lambda c: set_value(c.summary.head, (3, 0)), ValueError,
     "head (3, 0) is not one of the choices: ("),
    ("head-summary/head-not-a-pair", lambda c: set_value(c.summary.head, 2), ValueError,
     "((layer, head) pairs, ranked by the score)"),
    # ---------------------------------------------------------------------------------- patching view
    ("patching-view/component", lambda c: set_value(c.patching.component, "resid_pr"), ValueError,
     "component 'resid_pr' is not one of the choices: 'resid_pre'"),
    ("patching-view/metric", lambda c: set_value(c.patching.metric, "logit_dif"), ValueError,
     "metric 'logit_dif' is not one of the choices: 'logit_diff', 'answer_prob', 'kl'"),
    ("patching-view/direction", lambda c: set_value(c.patching.direction, "sideways"), ValueError,
     "direction 'sideways' is not one of the choices: 'denoise', 'noise'"),
    ("patching-view/method", lambda c: set_value(c.patching.method, "approximate"), ValueError,
     "method 'approximate' is not one of the choices: 'exact', 'attribution'"),
    ("patching-view/layer", lambda c: set_value(c.patching.layer, 3), ValueError,
     "layer 3 is not one of the choices: 0, 1, 2"),
    ("patching-view/cell", lambda c: set_value(c.patching.cell, (9, 99)), ValueError,
     "in all: see .options) (the strongest cells; view.select(cell)"),
    ("patching-view/component-argument", lambda c: PatchingView(c.ex, component="head"), ValueError,
     "component 'head' is not one of the choices"),
    # ---------------------------------------------------------------------------------- circuit view
    ("circuit-view/count-zero", lambda c: set_value(c.circuit.count, 0), ValueError,
     "count 0 is out of range: choose a whole number in 1.."),
    ("circuit-view/count-too-many", lambda c: set_value(c.circuit.count, n_edges(c) + 1), ValueError,
     "out of range: choose a whole number in 1.."),
    ("circuit-view/count-float", lambda c: set_value(c.circuit.count, 7.5), TypeError,
     "count 7.5 is not a whole number"),
    ("circuit-view/inputs-string", lambda c: set_value(c.circuit.inputs, "q"), TypeError,
     "inputs 'q' is not a collection of choices: give a tuple of some of 'q', 'k', 'v', 'mlp', 'logits'"),
    ("circuit-view/inputs-unknown", lambda c: set_value(c.circuit.inputs, ("q", "attn")), ValueError,
     "inputs: 'attn' not among the choices"),
    ("circuit-view/count-argument", lambda c: CircuitView(c.edges, c.graph, count=n_edges(c) + 5),
     ValueError, "is out of range: choose a whole number in 1.."),
    # ---------------------------------------------------------------------------------- lens explorer
    ("lens-explorer/prompt-box", lambda c: set_value(c.lens.prompt_box, None), TypeError,
     "prompt_box None is not text"),
    ("lens-explorer/answer-box", lambda c: set_value(c.lens.answer_box, 5), TypeError,
     "answer_box 5 is not text: give a str (one token"),
    ("lens-explorer/wrong-box", lambda c: set_value(c.lens.wrong_box, [" John"]), TypeError,
     "wrong_box [' John'] is not text"),
    # ---------------------------------------------------------------------------------- SAE feature view
    ("feature-view/out-of-range", lambda c: set_value(c.feature.feature, D_SAE), IndexError,
     "feature 64 is out of range: choose a whole number in 0..63"),
    ("feature-view/negative", lambda c: set_value(c.feature.feature, -1), IndexError, "0..63"),
    ("feature-view/text", lambda c: set_value(c.feature.feature, "7"), TypeError,
     "feature '7' is not a whole number: choose one in 0..63"),
    ("feature-view/show", lambda c: c.feature.show(100), IndexError, "feature 100 is out of range"),
    ("feature-view/argument", lambda c: FeatureView(c.model, c.sae, c.stats, feature=D_SAE), IndexError,
     "0..63"),
    # ---------------------------------------------------------------------------------- steering view
    ("steering-view/prompt", lambda c: set_value(c.steering.prompt, 42), TypeError,
     "prompt 42 is not text"),
    ("steering-view/layer", lambda c: set_value(c.steering.layer, 7), ValueError,
     "layer 7 is not one of the choices: 0, 1, 2"),
    ("steering-view/source", lambda c: set_value(c.steering.source, "names"), ValueError,
     "source 'names' is not one of the choices: 'random'"),
    ("steering-view/coefficient-out-of-range", lambda c: set_value(c.steering.coefficient, 9), ValueError,
     "coefficient 9 is out of range: choose a number in -4..4 (the range of the coefficients swept)"),
    ("steering-view/coefficient-nan", lambda c: set_value(c.steering.coefficient, math.nan), ValueError,
     "coefficient nan is out of range"),
    ("steering-view/coefficient-text", lambda c: set_value(c.steering.coefficient, "2"), TypeError,
     "coefficient '2' is not a number"),
    ("steering-view/coefficient-argument", lambda c: SteeringView(*c.steering_args, coefficient=5.0,
     coefficients=[-1, 1], max_new_tokens=2), ValueError, "coefficient 5.0 is out of range"),
    # ---------------------------------------------------------------------------------- xIELU explorer
    ("xielu-explorer/share-kind-named", lambda c: set_value(c.xielu.share_kind, "both"), ValueError,
     "share_kind 'both' is not one of the choices"),
    ("xielu-explorer/layer-named", lambda c: set_value(c.xielu.layer, 9), ValueError,
     "(the layers these statistics gathered)"),
]
# fmt: on


def test_the_table_is_unique_and_covers_every_view():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    views = {i.split("/")[0] for i in ids}
    assert {"attention", "head-summary", "patching-view", "circuit-view", "lens-explorer"} <= views
    assert {"feature-view", "steering-view"} <= views


@pytest.mark.parametrize(("case", "call", "error", "phrase"), CASES, ids=[case[0] for case in CASES])
def test_a_bad_control_value_names_what_is_accepted(c, case, call, error, phrase):
    with pytest.raises(error) as raised:
        call(c)
    assert phrase in str(raised.value), f"{case}: {raised.value}"


SETTABLE = (
    widgets.Dropdown,
    widgets.ToggleButtons,
    widgets.SelectMultiple,
    widgets.IntSlider,
    widgets.FloatSlider,
    widgets.IntText,
    widgets.BoundedIntText,
    widgets.Text,
    widgets.Textarea,
    widgets.Checkbox,
)


@pytest.mark.parametrize(
    "view", ["attention", "summary", "patching", "circuit", "lens", "feature", "steering", "xielu"]
)
def test_every_settable_control_of_a_view_checks_its_value(c, view):
    """A control added later as a plain ipywidget would clamp or answer with a bare TraitError."""
    controls = {name: w for name, w in vars(getattr(c, view)).items() if isinstance(w, SETTABLE)}
    assert controls, f"{view} has no settable control"
    plain = [name for name, w in controls.items() if not isinstance(w, CheckedControl)]
    assert not plain, f"{view}: {plain} are plain ipywidgets"


def test_a_refused_value_changes_nothing_and_good_values_still_work(c):
    explorer = c.attention
    before = explorer.state
    for control, bad in [
        (explorer.window, 8),
        (explorer.key_window, -2),
        (explorer.layer, 3),
        (explorer.follow, 1),
        (explorer.token, 12),
    ]:
        kept = control.value
        with pytest.raises((ValueError, TypeError)):
            control.value = bad
        assert control.value == kept
    assert explorer.state == before
    explorer.window.value = np.int64(7)  # numpy integers (from a DataFrame) are whole numbers too
    assert explorer.queries == range(7, 15) and type(explorer.window.value) is int
    explorer.show_keys(np.int64(2))
    assert explorer.key_window.value == 2 and not explorer.follow.value
    explorer.show_keys(12)  # a position inside the last window draws that window
    assert explorer.key_window.value == 7 and explorer.keys == [0, *range(7, 15)]  # BOS pinned
    explorer.window.value, explorer.follow.value = 0, True
    assert explorer.keys == list(range(8))

    steering = c.steering
    steering.coefficient.value = 2  # an int is a number: stored as a float, the steered text recomputed
    assert steering.coefficient.value == 2.0 and type(steering.coefficient.value) is float
    with pytest.raises(ValueError):
        steering.coefficient.value = 4.5
    assert steering.coefficient.value == 2.0 and steering.figure.data[1].x == (2.0,)

    circuit = c.circuit
    circuit.inputs.value = ["k", "v"]  # any collection of choices: kept as a tuple
    assert circuit.inputs.value == ("k", "v") and circuit.inputs.index == (1, 2)
    circuit.count.value = n_edges(c)  # the largest count is accepted, not refused
    assert circuit.count.value == n_edges(c)
