"""pyreg's modules import in layers: no import cycle (lazy imports inside
functions included), and no module uses another module's private names
(``from x import _name`` or ``x._name``), only its public ones."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pyreg

ROOT = Path(pyreg.__file__).parent


def _modules() -> Dict[str, Path]:
    out = {"pyreg": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="pyreg."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            out[info.name] = Path(spec.origin)
    return out


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def _imports(name: str, path: Path) -> Tuple[Set[str], List[str]]:
    """(pyreg modules that `name` imports, its uses of other modules' private names)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    deps: Set[str] = set()
    bad: List[str] = []
    aliases: Dict[str, str] = {}  # local name -> pyreg module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(name, is_pkg, node.level, node.module) if node.level else (node.module or "")
            if not (src == "pyreg" or src.startswith("pyreg.")):
                continue
            for a in node.names:
                full = f"{src}.{a.name}"
                if _is_module(full):
                    deps.add(full)
                    aliases[a.asname or a.name] = full
                    continue
                deps.add(src)
                obj = getattr(importlib.import_module(src), a.name, None)
                if (a.name.startswith("_") and not a.name.startswith("__") and not inspect.ismodule(obj)
                        and src != name):
                    bad.append(f"{name}: from {src} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "pyreg" or a.name.startswith("pyreg."):
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            target = aliases[node.value.id]
            obj = getattr(importlib.import_module(target), node.attr, None)
            if not inspect.ismodule(obj) and target != name:
                bad.append(f"{name}: {node.value.id}.{node.attr}")
    deps.discard(name)
    return deps, bad


def _graph():
    mods = _modules()
    graph, bad = {}, []
    for name, path in mods.items():
        deps, b = _imports(name, path)
        # a package's own __init__ is not an edge from its submodules' point of view
        graph[name] = {d for d in deps if d in mods and not name.startswith(d + ".")}
        bad += b
    return graph, bad


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycle():
    graph, _ = _graph()
    assert "pyreg.ops" in graph and "pyreg.distributed" in graph  # the walk found the package
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_no_module_uses_another_modules_private_names():
    _, bad = _graph()
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    # The cycle finder on a known cycle, and the private-name rule on a snippet.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "snippet.py"
    f.write_text("from . import ops\nfrom ._validate import _overlap\nx = ops._eager\n")
    _, bad = _imports("pyreg.snippet", f)
    assert bad == ["pyreg.snippet: from pyreg._validate import _overlap", "pyreg.snippet: ops._eager"]


def test_layers():
    # Each layer imports only what is below it.
    graph, _ = _graph()
    below = {
        "pyreg._validate": {"pyreg._common"},
        "pyreg._ops": {"pyreg.backends", "pyreg._common"},
        "pyreg.distributed": {"pyreg._common", "pyreg._ops", "pyreg._validate"},
    }
    for mod, allowed in below.items():
        assert graph[mod] <= allowed, f"{mod} imports {sorted(graph[mod] - allowed)}"
    assert "pyreg.ops" not in graph["pyreg.distributed"]
