"""The package's structure: no import cycle, no import of the package root from inside it, small files and rooms,
few wide internal signatures, tooling outside the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import relpos_ref

ROOT = Path(relpos_ref.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import in the file, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
    return [(t, line) for t, line in out if t == "relpos_ref" or t.startswith("relpos_ref.")]


GRAPH = {name: {t for t, _ in _imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


def test_no_import_of_the_package_root_from_inside():
    offenders = [
        f"{name}:{line}"
        for name, path in MODULES.items()
        if name != "relpos_ref"
        for target, line in _imports(name, path)
        if target == "relpos_ref"
    ]
    assert offenders == []


def test_oracle_is_independent_of_the_library():
    for name in MODULES:
        if name.startswith("relpos_ref.oracle"):
            assert all(t.startswith("relpos_ref.oracle") for t in GRAPH[name]), (name, GRAPH[name])


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_file_over_1000_lines():
    sizes = {name: _lines(path) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > 1000} == {}


def test_largest_room_at_most_30_percent():
    rooms: dict[str, int] = {}
    for name, path in MODULES.items():
        parts = name.split(".")
        room = parts[1] if len(parts) > 1 else "__init__"
        rooms[room] = rooms.get(room, 0) + _lines(path)
    total = sum(rooms.values())
    largest = max(rooms, key=rooms.__getitem__)
    assert rooms[largest] <= 0.30 * total, (largest, rooms[largest], total)


def _wide_internal() -> list[str]:
    out = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        scopes = [(None, tree), *((n, n) for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]
        for cls, scope in scopes:
            for fn in scope.body:
                if not isinstance(fn, ast.FunctionDef):
                    continue
                a = fn.args
                params = [p for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
                count = len(params) + (a.vararg is not None) + (a.kwarg is not None)
                private = fn.name.startswith("_") and not fn.name.startswith("__")
                internal = private or (cls is not None and cls.name.startswith("_"))
                if internal and count >= 12:
                    out.append(f"{name}.{cls.name + '.' if cls else ''}{fn.name} ({count})")
    return out


def test_at_most_two_wide_internal_functions():
    assert len(_wide_internal()) <= 2, _wide_internal()


def test_every_module_states_its_role():
    missing = [n for n, p in MODULES.items() if ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) is None]
    assert missing == []


@pytest.mark.parametrize("name", ["tools", "tests"])
def test_tooling_is_outside_the_package(name):
    assert not (ROOT / name).exists()
    assert "peers" not in {n.rsplit(".", 1)[-1] for n in MODULES}


@pytest.mark.meta
def test_cycle_detector_finds_a_planted_cycle(monkeypatch):
    # attention imports softmax; planting softmax -> attention must be reported as a cycle.
    assert "relpos_ref.softmax" in GRAPH["relpos_ref.attention"]
    monkeypatch.setitem(GRAPH, "relpos_ref.softmax", GRAPH["relpos_ref.softmax"] | {"relpos_ref.attention"})
    assert ["relpos_ref.attention", "relpos_ref.softmax"] in _cycles()
