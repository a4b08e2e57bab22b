"""Hook points added to a model for a while: e.g. a spliced SAE's latents, reconstruction and error term.

`model.add_hook_point(name, point)` makes any TransformerLens `HookPoint` a hook point of the model: it is in
`model.hook_dict`, `run_with_cache` stores it (names filters find it), `run_with_hooks` and `hooks(...)` reach
it, and patching experiments can patch it. `model.remove_hook_point(name)` takes it out again, with every hook
on it; `with model.extra_hook_points({name: point, ...}):` does both around a block, also after an error.

The point fires wherever its owner calls it (an SAE calls its own points inside a hook on the model's
activation); the model only names it. Added points are not submodules of the model, so their owner's
parameters stay out of the model's `state_dict` and `parameters()`, and only added points can be removed:
the model's own hook points are part of its forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from transformer_lens.hook_points import HookPoint


class ExtraHookPoints:
    """The methods `HookedApertus` gets for adding and removing hook points (see the module docstring)."""

    hook_dict: dict[str, HookPoint]
    mod_dict: dict

    @property
    def added_hook_points(self) -> tuple[str, ...]:
        """The names of the hook points added by `add_hook_point` and not yet removed, in order."""
        return tuple(self.__dict__.get("_added_points", {}))

    def add_hook_point(self, name: str, point: HookPoint) -> HookPoint:
        """Make `point` a hook point of this model under `name` (until `remove_hook_point(name)`)."""
        self._check_new_point(name, point)
        point.name = name
        self.hook_dict[name] = point
        self.mod_dict[name] = point
        self.__dict__.setdefault("_added_points", {})[name] = point
        return point

    def remove_hook_point(self, name: str) -> HookPoint:
        """Remove a hook point added by `add_hook_point`, with every hook on it (permanent ones too)."""
        added = self.__dict__.get("_added_points", {})
        if name not in added:
            if name in self.hook_dict:
                raise ValueError(
                    f"{name!r} is one of the model's own hook points, not one added by add_hook_point: "
                    "it cannot be removed (remove the hooks on it with model.reset_hooks())."
                )
            raise KeyError(f"{name!r} is not a hook point added to this model: see model.added_hook_points.")
        point = self.hook_dict.pop(name)
        self.mod_dict.pop(name, None)
        del added[name]
        point.remove_hooks("both", including_permanent=True)
        return point

    @contextmanager
    def extra_hook_points(self, points: Mapping[str, HookPoint]) -> Iterator[None]:
        """Add `points` ({name: HookPoint}) for the `with` block and remove them on exit, also after an error.

        Every name is checked before any is added, so a bad one leaves the model as it was.
        """
        points = dict(points)
        for name, point in points.items():
            self._check_new_point(name, point)
        if len({id(p) for p in points.values()}) != len(points):
            raise ValueError("One HookPoint was given under two names: give each name its own HookPoint.")
        added: list[str] = []
        try:
            for name, point in points.items():
                self.add_hook_point(name, point)
                added.append(name)
            yield
        finally:
            for name in reversed(added):
                self.remove_hook_point(name)

    def _check_new_point(self, name: str, point: HookPoint) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A hook point's name is a non-empty string, not {name!r}.")
        if not isinstance(point, HookPoint):
            raise TypeError(
                f"{name!r}: a hook point is a transformer_lens HookPoint module, not {type(point).__name__}."
            )
        if name in self.hook_dict or name in self.mod_dict:
            raise ValueError(
                f"{name!r} is already a hook point or module of this model: choose another name, or "
                "remove the added one first (model.remove_hook_point)."
            )
        if any(point is p for p in self.hook_dict.values()):
            raise ValueError(
                f"This HookPoint is already in the model as {point.name!r}: one point has one name."
            )
