"""The import graph of ``mimscale/`` is acyclic and ``import mimscale.config`` stays light.

Every import counts, module-level or inside a function (function-level imports hide cycles
just as well); only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mimscale"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """mimscale modules imported anywhere in ``tree`` except under ``if TYPE_CHECKING``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mimscale"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mimscale"):
            for a in node.names:  # `from mimscale.x import y` may import the submodule x.y
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the mimscale modules it imports (a package counts as its ``__init__``)."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps = _imports(ast.parse(path.read_text()), set(paths))
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        expanded = set()
        for d in deps:
            parts = d.split(".")
            expanded.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {d for d in expanded if d in paths and d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def test_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_is_acyclic() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_config_is_at_the_bottom() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("mimscale.config"):
            above = {d for d in deps if not d.startswith("mimscale.config") and d != "mimscale"}
            assert not above, f"{name} imports {above}: config must know nothing above it"


def test_light_imports() -> None:
    code = (
        "import sys, mimscale, mimscale.config; "
        "heavy = ('deepspeed', 'wandb', 'open_clip', 'webdataset', 'torch'); "
        "heavy = [m for m in heavy if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
