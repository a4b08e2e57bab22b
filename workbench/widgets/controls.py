"""Controls that refuse a bad value with the values they accept, instead of clamping it or a bare TraitError.

Setting ``view.sentence.value = 10_000`` in a notebook should say which sentences exist; ipywidgets'
``BoundedIntText`` and sliders silently clamp to their bounds, ``IntSlider`` casts 2.7 to 2, a ``Dropdown``
answers "Invalid selection: value not found" and a ``Text`` a TraitError that names no control. Every
control of the workbench's views is one of these subclasses: each validates a value set from code first and
raises, naming the control (``what``, else its description) and the accepted range or choices:

- ``TypeError`` for a value of the wrong kind (text for a number, a number for text, 1 for True);
- ``IndexError`` for an index out of range (``IndexText``: a sentence, a neuron, a feature), as indexing does;
- ``ValueError`` for a number outside a slider's range or a value that is not one of the choices.

Text controls check only the type: a box is synced at every keystroke, so a half-typed word must not raise
(the view checks the text when it runs, and shows the problem in its status line).
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real
from typing import Any as AnyType

import ipywidgets as widgets
import numpy as np
from traitlets import Any, validate

MOST_LISTED = 12  # a longer list of choices is cut in the middle (a patching view offers 200 cells)


def listing(values: Iterable) -> str:
    """Accepted values for a message: a run of six or more whole numbers as ``a..b``, a long list cut."""
    values = list(values)
    if not values:
        return "there are none yet"
    whole = all(_is_whole(v) for v in values)
    if whole and len(values) > 5 and values == list(range(values[0], values[0] + len(values))):
        return f"{values[0]}..{values[-1]}"
    shown = [repr(v) for v in values]
    if len(shown) <= MOST_LISTED:
        return ", ".join(shown)
    return ", ".join([*shown[: MOST_LISTED - 3], "…", *shown[-2:]]) + f" ({len(values)} in all: see .options)"


def _is_whole(value: AnyType) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: AnyType) -> bool:
    return isinstance(value, (Real, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def checked_value(default: AnyType, *, sync: bool = True) -> Any:
    """A value trait that casts nothing, so that the control's validator sees (and names) what was given.

    The widgets' own traits cast (``IntSlider``: 2.7 -> 2) or fail with a TraitError naming no control;
    ``Any`` lets ``None`` through without calling validators unless it is told not to.
    """
    trait = Any(default)
    trait.allow_none = False  # Any(allow_none=False) keeps the class's True
    return trait.tag(sync=True) if sync else trait


class CheckedControl:
    """The base of every control here: ``what``, the name its messages use (the attribute a notebook sets,
    e.g. "window"; else the description), and ``hint``, said after the accepted values. A view's settable
    control that is not a ``CheckedControl`` answers a bad value with a bare TraitError or clamps it."""

    def __init__(self, *, what: str | None = None, hint: str = "", **kwargs: AnyType) -> None:
        self.what, self.hint = what, hint
        super().__init__(**kwargs)

    @property
    def control_name(self) -> str:
        return self.what or getattr(self, "description", "") or "value"


class IndexText(CheckedControl, widgets.IntText):
    """An integer box for an index in ``0..size-1``; anything else (out of range, not a whole number) raises,
    naming the range."""

    value = checked_value(0)

    def __init__(self, size: int, *, what: str, **kwargs: AnyType) -> None:
        self.size = int(size)
        super().__init__(what=what, **kwargs)

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> int:
        value, last = proposal["value"], self.size - 1
        if not _is_whole(value):
            raise TypeError(f"{self.control_name} {value!r} is not a whole number: choose one in 0..{last}.")
        if not 0 <= value < self.size:
            raise IndexError(
                f"{self.control_name} {value!r} is out of range: "
                f"choose a whole number in 0..{last}{self.hint}."
            )
        return int(value)


class _OneOf(CheckedControl):
    """A single choice among ``options``: ipywidgets' own check, with an error that lists the choices."""

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> AnyType:  # replaces ipywidgets' check (a bare error)
        value = proposal["value"]
        # Checked here: ipywidgets' own lookup fails with a TypeError on a tuple value (a patching cell).
        if value is None or any(self.equals(option, value) for option in self._options_values):
            return super()._validate_value(proposal)
        raise ValueError(
            f"{self.control_name} {value!r} is not one of the choices: "
            f"{listing(self._options_values)}{self.hint}."
        )


class Choice(_OneOf, widgets.Dropdown):
    """A dropdown whose programmatic ``value`` must be one of its choices; anything else raises, listing
    them."""


class ChoiceButtons(_OneOf, widgets.ToggleButtons):
    """Toggle buttons whose programmatic ``value`` must be one of their choices (listed when it is not)."""


class Choices(CheckedControl, widgets.SelectMultiple):
    """A multiple selection whose programmatic ``value`` must be a collection of its choices."""

    value = checked_value((), sync=False)  # (ipywidgets syncs the selected indices)

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> tuple:
        value, accepted = proposal["value"], listing(self._options_values)
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(
                f"{self.control_name} {value!r} is not a collection of choices: give a tuple of some of "
                f"{accepted}."
            )
        value = tuple(value)
        unknown = [v for v in value if not any(v == option for option in self._options_values)]
        if unknown:
            raise ValueError(
                f"{self.control_name}: {', '.join(map(repr, unknown))} not among the choices: {accepted}."
            )
        return value


class _InRange(CheckedControl):
    """A number between the control's ``min`` and ``max``: refused outside them (ipywidgets would clamp)."""

    kind = "a number"

    def __init__(self, *, value: AnyType = None, **kwargs: AnyType) -> None:
        super().__init__(**kwargs)
        if value is not None:  # checked against the final bounds: given with them, ipywidgets would clamp it
            self.value = value

    def _bounds(self) -> str:
        return f"{self.min}..{self.max}"

    def _accepts(self, value: AnyType) -> bool:
        return _is_number(value)

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> AnyType:  # replaces ipywidgets' clamping
        value = proposal["value"]
        if not self._accepts(value):
            raise TypeError(
                f"{self.control_name} {value!r} is not {self.kind}: choose one in {self._bounds()}."
            )
        if not self.min <= value <= self.max:  # NaN fails this too
            raise ValueError(
                f"{self.control_name} {value!r} is out of range: choose {self.kind} in "
                f"{self._bounds()}{self.hint}."
            )
        return type(self.min)(value)


class IntSlider(_InRange, widgets.IntSlider):
    """An integer slider that refuses, with its range, a value outside ``min..max`` or not a whole number."""

    value = checked_value(0)
    kind = "a whole number"

    def _accepts(self, value: AnyType) -> bool:
        return _is_whole(value)


class FloatSlider(_InRange, widgets.FloatSlider):
    """A float slider that refuses, with its range, a value outside ``min..max`` or not a number."""

    value = checked_value(0.0)

    def _bounds(self) -> str:
        return f"{self.min:g}..{self.max:g}"


class _Typed(CheckedControl):
    """A control whose value must be of one kind (checked, not cast, so the message can name the control)."""

    accepted: tuple[type, ...] = ()
    kind = ""

    @validate("value")
    def _validate_value(self, proposal: AnyType) -> AnyType:
        value = proposal["value"]
        if not isinstance(value, self.accepted):
            raise TypeError(f"{self.control_name} {value!r} is not {self.kind}{self.hint}.")
        return self.accepted[0](value)


class TextBox(_Typed, widgets.Text):
    """A one-line text box whose value must be a str."""

    value = checked_value("")
    accepted, kind = (str,), "text: give a str"


class TextArea(_Typed, widgets.Textarea):
    """A multi-line text box whose value must be a str."""

    value = checked_value("")
    accepted, kind = (str,), "text: give a str"


class Switch(_Typed, widgets.Checkbox):
    """A checkbox whose value must be True or False (1 and "yes" are refused, not read as True)."""

    value = checked_value(False)
    accepted, kind = (bool, np.bool_), "True or False"
