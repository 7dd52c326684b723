"""Typed parsing: a raw YAML mapping -> a dataclass, checking every value against its hint.

Errors are :class:`RecipeError` naming the dotted key path; unknown keys get a "did you mean".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from typing import Any, Literal

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# The largest magnitude a recipe number may have: 2**53, the largest integer a float holds exactly.
# Every count, size, rate and seed in a real recipe is far below it; anything above is a typo or an
# attack, and some (`train.epochs: 1e308`) overflow when a step count is derived from them.
MAX_NUMBER = float(2**53)


class RecipeError(ValueError):
    """A recipe problem, always naming the file and the key path."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 60
_short.maxlist = _short.maxdict = _short.maxtuple = _short.maxset = 4
_short.maxlevel = 2


def short(value: Any) -> str:
    """A bounded repr for error messages: never the whole of a value a recipe may make unbounded."""
    return _short.repr(value)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce_scalar(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matched, value) for the scalar types; ints widen to floats, YAML-1.1 `2e-4` strings too."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
            return math.isfinite(number) and abs(number) <= MAX_NUMBER, number
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(tp, type) and isinstance(value, tp), value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except RecipeError:
                continue
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, where)
    else:
        ok, out = _coerce_scalar(value, tp)
        if ok:
            return out
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) and "float" in _describe(tp):
        raise RecipeError(f"{where}: {short(value)} is out of range (a finite number, |value| <= 2**53)")
    raise RecipeError(f"{where}: expected {_describe(tp)}, got {type(value).__name__} {short(value)}")


def unknown_key(where: str, key: str, known: list[str]) -> RecipeError:
    """The error for an unknown key, with the nearest known key when one is close."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {f'{where}.{near[0]}'.lstrip('.')}? " if near else ""
    listing = ", ".join(sorted(known))
    return RecipeError(
        f"{where}.{key}: unknown key ({hint}known keys of {where.lstrip('.') or 'the recipe'}: {listing})"
    )


def settable_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` a recipe may set (internal fields are filled by the loader)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``; unknown keys are errors naming ``where.key``."""
    hints = typing.get_type_hints(cls)
    names = settable_fields(cls)
    for key in raw:
        if key not in names:
            raise unknown_key(where, str(key), names)
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def build_section(cls: type, raw: Any, where: str) -> Any:
    """Validate a raw mapping (or ``None`` for all defaults) into dataclass ``cls``."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping ({cls.__name__}), got {short(raw)}")
    return build(cls, raw, where)
