"""Bounded YAML: what a recipe may be before it is typed.

``yaml.safe_load`` runs no code, but it will happily build a value no recipe needs: a few hundred
bytes of nested aliases (the "billion laughs") stand for billions of list items once anything walks
them, and a few thousand nested brackets exhaust the composer's recursion. A recipe is small and
shallow, so this loader bounds the text, the nesting depth and the alias-expanded size before any
value is constructed, and every refusal is one :class:`RecipeError` line.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from mimscale.config.typed import MAX_NUMBER, RecipeError, short

MAX_BYTES = 1 << 20  # the largest shipped recipe is ~2 KB
MAX_DEPTH = 32  # a recipe nests 3-4 levels (section, key, list, view mapping)
MAX_NODES = 100_000  # values after alias expansion (aliases counted as often as they are used)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses to nest deeper than :data:`MAX_DEPTH`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"line {line}: nested deeper than {MAX_DEPTH} levels (a recipe is shallow)")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Count the values ``root`` stands for with every alias expanded, stopping at the bound."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise RecipeError(
                f"more than {MAX_NODES} values once YAML aliases (*name) are expanded; "
                "a recipe is small: write the values out"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((k, v))


def load(text: str) -> Any:
    """Parse one YAML document within the bounds above (``None`` for an empty document).

    Raises:
        RecipeError: the text is too large, too deep or expands too far (no source prefix: the
            caller names the file or the override).
        yaml.YAMLError: the text is not YAML.
    """
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{len(text)} characters; a recipe is at most {MAX_BYTES} (a few KB in practice)")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_numbers(value: Any, where: str = "") -> None:
    """Every number in a raw recipe must be finite and at most :data:`MAX_NUMBER` in magnitude.

    Runs on the merged mapping before typing, so it covers every float and int field of every
    section (methods and plug-ins included) without a list of keys. The walk is bounded: the data
    came through :func:`load` (or from code).
    """
    if isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{where}: {value} is not a finite number")
        if abs(value) > MAX_NUMBER:
            raise RecipeError(f"{where}: {short(value)} is out of range (|value| <= 2**53)")
