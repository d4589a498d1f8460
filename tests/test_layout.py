"""The package's shape: imports that never run in a circle, and docstrings whose ``Args:``
name real arguments (LightningCLI shows them as the help of YAML keys)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "swin_lightning"


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in the file, functions included);
    re-exporting ``__init__`` files are left out, as they would tie everything together."""
    files = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    faces = {m for m, p in files.items() if p.name == "__init__.py"}
    graph = {}
    for name, path in files.items():
        if name in faces:
            continue
        package = name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in faces:
                    found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """A module's floor: 1 + the highest floor it imports (ground: imports nothing)."""
    floor: dict[str, int] = {}

    def of(module: str) -> int:
        if module not in floor:
            floor[module] = 1 + max((of(m) for m in graph[module]), default=0)
        return floor[module]

    for module in graph:
        of(module)
    return floor


def test_no_import_circle_and_at_most_six_floors():
    graph = import_graph()
    assert cycles(graph) == []
    floor = floors(graph)
    # The names that cross a process boundary, the checked writes and the event reader are
    # ground floor: everyone may import them.
    for ground in ("protocol", "storage", "events"):
        assert floor[f"swin_lightning.{ground}"] == 1, ground
    assert max(floor.values()) <= 6, sorted(floor.items(), key=lambda kv: -kv[1])[:5]


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def documented_but_missing(path: Path) -> list[str]:
    """``name (function or class)`` for each name an ``Args:`` section documents that the
    signature does not take."""
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.ClassDef):
            continue
        doc = ast.get_docstring(node) or ""
        if "Args:" not in doc:
            continue
        section = re.split(r"\n\S", doc.split("Args:", 1)[1], maxsplit=1)[0]
        documented = re.findall(r"^ {4}\**(\w+):", section, re.MULTILINE)
        fn = node
        if isinstance(node, ast.ClassDef):
            fn = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                       and n.name == "__init__"), None)  # fmt: skip
            if fn is None:  # a dataclass: its fields
                names = {t.target.id for t in node.body if isinstance(t, ast.AnnAssign)
                         and isinstance(t.target, ast.Name)}  # fmt: skip
                wrong += [f"{d} ({node.name})" for d in documented if d not in names]
                continue
        args = fn.args
        names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        wrong += [f"{d} ({node.name})" for d in documented if d not in names]
    return wrong


def test_docstrings_document_only_real_arguments():
    wrong = {str(p.relative_to(REPO)): documented_but_missing(p) for p in PACKAGE.rglob("*.py")}
    assert {p: w for p, w in wrong.items() if w} == {}


def test_moved_modules_keep_their_old_import_paths():
    # Users' imports and configs of the classifier and the packed data module keep working.
    from swin_lightning.classifier import SwinClassifier
    from swin_lightning.data.pack_format import META, PackError
    from swin_lightning.data.packed import META as PACKED_META
    from swin_lightning.data.packed import PackError as PackedError
    from swin_lightning.module import SwinClassifier as OldPath
    from swin_lightning.module import weight_decay_groups
    from swin_lightning.optimization import weight_decay_groups as moved

    assert OldPath is SwinClassifier and weight_decay_groups is moved
    assert (PACKED_META, PackedError) == (META, PackError)
