"""Which stance a request means: the one home of the rules that turn ``model`` + ``stances`` into a :class:`Stance`.

The rules, each with the error it raises (HTTP status and ``param`` come with the error class, see
:mod:`app.errors`):

* ``model`` is the base model's name (or an alias): the base model, no adapter.
* ``model`` is a named blend (``/v1/stances``) and no ``stances`` are given: the blend's recipe, resolved by the
  rules below, labelled with the blend's name. A member no longer registered, or a recipe the rules now refuse
  (a lowered ``max_blend_weight``): :class:`~app.errors.BlendMemberMissingError` (``param="model"``).
* ``model`` is a registered adapter and no ``stances`` are given: that adapter at weight 1.
* anything else: :class:`~app.errors.AdapterNotFoundError` (``param="model"``).
* ``stances`` given: they define the routing, whatever ``model`` names; ``model`` must still name something
  that exists (a named blend counts). The blend:

  * is not empty and has at most :data:`~app.config.MAX_BLEND_ADAPTERS` terms
    (:class:`~app.errors.InvalidBlendError`, ``param="stances"``);
  * each weight is a finite number (not a boolean) with ``|w| <= max_blend_weight``
    (``InvalidBlendError``, ``param="stances.<name>"``); checked name by name, in the blend's order;
  * each name is a registered adapter (``InvalidBlendError``, ``param="stances.<name>"``);
  * zero weights are kept: a term of weight 0 is a member like any other (it must exist and counts towards
    the limit). :func:`without_zero_weights` is the one place that drops them, for callers that mean
    "weight 0 = absent" (evaluation sweeps, where the all-zero point is the base model);
  * names are unique (a mapping); two names that resolve to the same adapter version add their weights.

This module holds rules only: it reads adapters through the callables it is given, and knows nothing of
HTTP, the store's files or the catalog's locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from app.config import MAX_BLEND_ADAPTERS
from app.engine.request import Stance
from app.errors import AdapterNotFoundError, BlendMemberMissingError, InvalidBlendError
from app.registry.adapter import AdapterWeights


def blend_size_problem(n: int) -> str | None:
    """Why a blend of ``n`` terms is refused (``None``: it is not): empty, or more than the term limit."""
    if n < 1:
        return "stances must name at least one adapter"
    if n > MAX_BLEND_ADAPTERS:
        return f"a blend may combine at most {MAX_BLEND_ADAPTERS} adapters, got {n}"
    return None


def weight_problem(name: str, w: Any, max_weight: float) -> str | None:
    """Why weight ``w`` of member ``name`` is refused (``None``: it is not): not a finite number, or past the range."""
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
        return f"weight of {name!r} must be a finite number, got {w!r}"
    if abs(w) > max_weight:
        return f"weight of {name!r} is {w!r}; blend weights must lie in [-{max_weight:g}, {max_weight:g}]"
    return None


def without_zero_weights(stances: Mapping[str, float]) -> dict[str, float] | None:
    """``stances`` without its zero-weight terms; ``None`` (the base model) when nothing is left."""
    kept = {name: w for name, w in stances.items() if w != 0}
    return kept or None


class StanceResolver:
    """Turns a request's ``model`` and ``stances`` into a :class:`Stance` (rules: see the module docstring).

    Args:
        base_names: the base model's name and its aliases.
        adapter: the weights of a registered adapter by name; raises
            :class:`~app.errors.AdapterNotFoundError` for an unknown one. May block (a cold adapter is read).
        max_weight: the largest ``|weight|`` of a blend term (``max_blend_weight``).
        named_blend: the recipe ``{adapter: weight}`` of a named blend, or ``None`` when ``model`` is not one
            (default: there are none).
        registered: whether an adapter of that name is registered, without reading its weights (``model``
            beside ``stances``, a named blend's members; default: ``adapter`` does not raise for it).
    """

    def __init__(
        self,
        base_names: Collection[str],
        adapter: Callable[[str], AdapterWeights],
        *,
        max_weight: float,
        named_blend: Callable[[str], Mapping[str, float] | None] | None = None,
        registered: Callable[[str], bool] | None = None,
    ) -> None:
        self.base_names = frozenset(base_names)
        self.adapter = adapter
        self.max_weight = max_weight
        self.named_blend = named_blend or (lambda name: None)
        self.registered = registered or self._loads

    def is_base(self, model: str) -> bool:
        """Whether ``model`` names the base model."""
        return model in self.base_names

    def resolve(self, model: str, stances: Mapping[str, Any] | None = None) -> Stance:
        """The stance of a request: ``model`` alone, or the blend ``stances`` (which wins when given).

        Raises:
            AdapterNotFoundError: ``model`` names nothing (``param="model"``).
            InvalidBlendError: ``stances`` breaks a blend rule (``param`` names the field or the member).
            BlendMemberMissingError: ``model`` is a named blend that cannot be served now.
        """
        recipe = None if self.is_base(model) else self.named_blend(model)
        if stances is not None:
            if not self.is_base(model) and recipe is None and not self.registered(model):
                raise AdapterNotFoundError(model, param="model")  # model must still name something that exists
            return self.blend(stances)
        if self.is_base(model):
            return Stance.base()
        if recipe is not None:
            return self._named(model, recipe)
        return Stance.single(self._weights(model, param="model"))

    def blend(self, stances: Mapping[str, Any]) -> Stance:
        """The anonymous blend ``{adapter name: weight}``, labelled ``"blend"``.

        Raises:
            InvalidBlendError: empty, too many terms, a bad weight or an unknown adapter.
        """
        problem = blend_size_problem(len(stances))
        if problem:
            raise InvalidBlendError(problem, param="stances")
        terms: dict[AdapterWeights, float] = {}
        for name, w in stances.items():
            problem = weight_problem(name, w, self.max_weight)
            if problem:
                raise InvalidBlendError(problem, param=f"stances.{name}")
            try:
                weights = self._weights(name, param=f"stances.{name}")
            except AdapterNotFoundError as e:
                raise InvalidBlendError(f"blend names unknown adapter {name!r}", param=f"stances.{name}") from e
            terms[weights] = terms.get(weights, 0.0) + float(w)
        return Stance.blend(terms)

    def _named(self, name: str, recipe: Mapping[str, float]) -> Stance:
        missing = [a for a in recipe if not self.registered(a)]
        if missing:
            raise BlendMemberMissingError(
                f"named blend {name!r} uses adapter(s) {', '.join(map(repr, missing))} that are not registered; "
                "register them again or replace the blend", param="model")
        try:
            stance = self.blend(recipe)
        except InvalidBlendError as e:  # a member deleted meanwhile, or a weight past a lowered max_blend_weight
            raise BlendMemberMissingError(f"named blend {name!r} cannot be served: {e.message}", param="model") from e
        return Stance(name, stance.terms)

    def _weights(self, name: str, *, param: str) -> AdapterWeights:
        try:
            return self.adapter(name)
        except AdapterNotFoundError as e:
            raise AdapterNotFoundError(name, param=param) from e

    def _loads(self, name: str) -> bool:
        try:
            self.adapter(name)
        except AdapterNotFoundError:
            return False
        return True
