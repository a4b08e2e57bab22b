"""Controls that refuse a bad value with the values they accept, instead of clamping it or a bare TraitError.

Setting ``view.sentence.value = 10_000`` in a notebook should say which sentences exist; ipywidgets'
``BoundedIntText`` silently clamps to its bounds and a ``Dropdown`` answers "Invalid selection: value not
found". These subclasses validate the value first and raise ``IndexError`` / ``ValueError`` naming the
accepted range or choices.
"""

from __future__ import annotations

from typing import Any as AnyType

import ipywidgets as widgets
import numpy as np
from traitlets import Any, TraitError, validate


def _choices(options: AnyType) -> list:
    return [option[1] if isinstance(option, tuple) else option for option in options]


class IndexText(widgets.IntText):
    """An integer box for an index in ``0..size-1``; anything else (out of range, not a whole number) raises,
    naming the range."""

    value = Any(0).tag(sync=True)  # checked below, so a float or text is refused rather than cast

    def __init__(self, size: int, *, what: str, **kwargs: AnyType) -> None:
        self.size, self.what = int(size), what
        super().__init__(**kwargs)

    @validate("value")
    def _check_index(self, proposal: AnyType) -> int:
        value = proposal["value"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{self.what} {value!r} is not a whole number: choose one in 0..{self.size - 1}.")
        if not 0 <= value < self.size:
            raise IndexError(
                f"{self.what} {value!r} is out of range: choose a whole number in 0..{self.size - 1}."
            )
        return int(value)


class Choice(widgets.Dropdown):
    """A dropdown whose programmatic ``value`` must be one of its choices; anything else raises, listing
    them."""

    @validate("value")
    def _validate_value(
        self, proposal: AnyType
    ) -> AnyType:  # replaces ipywidgets' check, whose error is bare
        try:
            return super()._validate_value(proposal)
        except TraitError:
            raise ValueError(
                f"{self.description or 'value'} {proposal['value']!r} is not one of the choices: "
                f"{', '.join(map(repr, _choices(self.options)))}."
            ) from None


class ChoiceButtons(widgets.ToggleButtons):
    """Toggle buttons whose programmatic ``value`` must be one of their choices (listed when it is not)."""

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> AnyType:
        try:
            return super()._validate_value(proposal)
        except TraitError:
            raise ValueError(
                f"{proposal['value']!r} is not one of the choices: "
                f"{', '.join(map(repr, _choices(self.options)))}."
            ) from None
