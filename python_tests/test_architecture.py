"""The package's layout keeps its promises: no import cycle, imports at module level, small
modules, and public signatures that a type checker can follow."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import unlock_fast

PACKAGE = Path(unlock_fast.__file__).parent
MAX_LINES = 450
# The evaluation package in all: measuring a key should not outgrow making one.
EVALUATION_MAX_LINES = 2600
# Loaded on first use so that a missing or broken build says how to rebuild.
LAZY_ALLOWED = {("unlock_fast.ops.core", "unlock_fast._core")}


def _modules() -> dict[str, Path]:
    out = {}
    # A .pyi stub stands for a compiled module (the C++ core).
    for path in sorted([*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")]):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the package modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    names = [f"{prefix}.{a.name}" for a in node.names]
    found = [n for n in names if n in MODULES]
    return found or ([prefix] if prefix in MODULES else [])


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported package module, imported inside a function) for every import statement."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    local = {id(n) for f in functions for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, is_package, node)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name in MODULES]
        else:
            continue
        out += [(t, id(node) in local) for t in targets if t != module]
    return out


def test_the_import_graph_has_no_cycle():
    graph = {m: sorted({t for t, _ in _imports(m)}) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d] if d in stack else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_package_modules_are_imported_at_module_level():
    lazy = [(m, t) for m in MODULES for t, inside in _imports(m) if inside]
    assert sorted(set(lazy) - LAZY_ALLOWED) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_the_evaluation_package_stays_small():
    files = sorted((PACKAGE / "evaluation").glob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in files)
    assert lines <= EVALUATION_MAX_LINES, f"unlock_fast/evaluation has {lines} lines"


def _public_callables():
    for name in unlock_fast.__all__:
        obj = getattr(unlock_fast, name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                own = getattr(fn, "__module__", "").startswith("unlock_fast")
                if own and callable(fn) and (not attr.startswith("_") or attr == "__init__"):
                    yield f"{name}.{attr}", fn
        elif callable(obj):
            yield name, obj


@pytest.mark.parametrize(("name", "fn"), list(_public_callables()), ids=lambda x: str(x))
def test_public_signatures_name_real_types(name, fn):
    """Every parameter and return of the public API is annotated, and not with ``Any``
    (a tokenizer is the one exception: transformers has no common tokenizer type)."""
    sig = inspect.signature(fn)
    for p in sig.parameters.values():
        if p.name in ("self", "cls") or p.kind is p.VAR_KEYWORD:
            continue
        assert p.annotation is not p.empty, f"{name}({p.name}) is not annotated"
        if "tokenizer" not in p.name:
            assert "Any" not in str(p.annotation), f"{name}({p.name}: {p.annotation})"
    if fn.__name__ != "__init__":
        assert sig.return_annotation is not sig.empty, f"{name} has no return annotation"
        assert "Any" not in str(sig.return_annotation), f"{name} -> {sig.return_annotation}"
