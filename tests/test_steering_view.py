"""The steering view without a browser: controls set from Python, outputs read back."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.data.corpus import IOI_TEMPLATES, OBJECTS, PLACES
from workbench.interventions import SteeringVector
from workbench.widgets.steering import SteeringView


def name_swapped_pairs(n: int = 12) -> tuple[list[str], list[str]]:
    """Prompts answered " John" (S2 is Mary) and the same prompts with S2 swapped, answered " Mary"."""

    def fill(i, s2):
        return IOI_TEMPLATES[i % 6].format(A="Mary", B="John", S=s2, place=PLACES[i], object=OBJECTS[i])

    return [fill(i, "Mary") for i in range(n)], [fill(i, "John") for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return workbench.load()


def test_the_view_steers_the_answer_and_draws_the_logit_difference_sweep(tiny):
    prompt = IOI_TEMPLATES[6].format(A="Mary", B="John", S="John", place="castle", object="rope")
    view = SteeringView(tiny, prompt, {"names": name_swapped_pairs()}, (" John", " Mary"), layer=2,
                        coefficient=0.0, coefficients=[-1, 0, 1, 2])  # fmt: skip
    assert view.plain_text == view.steered_text == " Mary."
    sweep = view.figure.data[0]
    assert list(sweep.x) == [-1, 0, 1, 2] and len(sweep.y) == 4
    assert sweep.y[1] < 0 and sweep.y[1] < sweep.y[2] < sweep.y[3]  # steering towards John raises his logit
    view.coefficient.value = 2.0  # as a user moving the slider
    assert view.steered_text.startswith(" John") and view.plain_text == " Mary."
    assert "John" in view.steered.value and view.figure.data[1].x == (2.0,)
    assert "vector norm" in view.status.value
    view.layer.value = (
        0  # the vector is rebuilt at layer 0: names there differ only at S2, not the last token
    )
    assert view.steered_text == " Mary."
    view.source.options = ["names", "zero"]
    view.sources["zero"] = SteeringVector(torch.zeros(tiny.cfg.d_model), 0, "zeros")
    view.source.value = "zero"
    assert set(view.logit_diffs) == {view.logit_diffs[0]}  # a zero vector: the same at every coefficient
