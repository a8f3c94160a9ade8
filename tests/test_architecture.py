"""The import graph, computed from the sources (function-level imports included): no cycles, doors one way.

Rules (docs/architecture.md):
- ``lmforge_common`` imports nothing of lmforge's;
- ``data_prep`` imports neither ``pretrain``, ``launch`` nor ``lmforge``;
- ``pretrain`` imports neither ``launch`` nor ``lmforge``;
- ``launch`` imports neither ``data_prep``, ``pretrain`` nor ``lmforge``;
- nothing outside ``lmforge`` (the CLI) imports the CLI's modules;
- no cycle among the modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pretrain", "launch", "lmforge")
COMMON = "lmforge_common"
FORBIDDEN = {
    COMMON: {"data_prep", "pretrain", "launch", "lmforge"},
    "data_prep": {"pretrain", "launch", "lmforge"},
    "pretrain": {"launch", "lmforge"},
    "launch": {"data_prep", "pretrain", "lmforge"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every lmforge module: name -> file."""
    files = [root / f"{COMMON}.py"] + [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    return {module_name(p, root): p for p in files}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The lmforge modules ``name`` imports, at any depth of its code (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # `import a.b.c` of a function / class: its module
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = source_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def wrong_doors(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            if top(dst) in FORBIDDEN.get(top(src), set()) or (top(dst) == "lmforge" and top(src) != "lmforge"):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_doors_go_one_way():
    assert wrong_doors(import_graph()) == []


def test_each_package_init_says_what_it_owns_and_may_import():
    for pkg in ("data_prep", "data_prep/tokenizer", "pretrain", "pretrain/export", "launch"):
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and "Owns" in doc and "May import" in doc, pkg


@pytest.mark.parametrize("files, expected", [
    ({"data_prep/a.py": "from pretrain import b\n", "pretrain/b.py": ""}, (["data_prep.a -> pretrain.b"], [])),
    ({"launch/a.py": "def f():\n    import data_prep.c\n", "data_prep/c.py": ""}, (["launch.a -> data_prep.c"], [])),
    ({"pretrain/a.py": "def f():\n    from pretrain.b import g\n", "pretrain/b.py": "from pretrain import a\n"},
     ([], [["pretrain.a", "pretrain.b"]])),
    ({"pretrain/a.py": "from lmforge.cli import main\n", "lmforge/cli.py": ""}, (["pretrain.a -> lmforge.cli"], [])),
    ({"data_prep/x/a.py": "from . import b\nfrom ..c import d\n", "data_prep/x/b.py": "", "data_prep/c.py": "from ..pretrain import e\n",
      "pretrain/e.py": ""}, (["data_prep.c -> pretrain.e"], [])),
])
def test_checker_catches_what_it_must(tmp_path, files, expected):
    (tmp_path / f"{COMMON}.py").write_text("")
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path)
    assert (wrong_doors(graph), cycles(graph)) == expected


SHARED = {"IGNORE_INDEX": "pretrain.inputs", "SPLITS": "data_prep.encode", "TRAIN": "data_prep.encode",
          "VAL": "data_prep.encode", "free_port": "lmforge_common", "ENV_SCHEMES": "lmforge_common",
          "VERSION": "lmforge_common", "EXIT_PREEMPTED": "lmforge_common", "write_json_atomic": "lmforge_common"}
"""Names shared across modules (docs/architecture.md, "each constant defined once") -> the one module defining them."""


def definitions_and_imports(root: Path = ROOT) -> tuple[dict[str, list[str]], dict[tuple[str, str], str]]:
    """``({name: [defining modules]}, {(module, name): module it imports the name from})`` for the :data:`SHARED`
    names, at any depth of the code (assignments, tuple targets and defs; absolute imports, as lmforge writes them)."""
    defined: dict[str, list[str]] = {name: [] for name in SHARED}
    imported: dict[tuple[str, str], str] = {}
    for module, path in source_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED:
                defined[node.name].append(module)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                defined.update({n: [*defined[n], module] for n in names if n in SHARED})
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.update({(module, a.name): node.module or "" for a in node.names if a.name in SHARED})
    return defined, imported


def test_shared_constants_are_defined_once_and_imported_from_there():
    """IGNORE_INDEX, the split names, the free-port helper and the other shared names: one definition each, in the
    module :data:`SHARED` names, and every import of them leads there (directly or through a re-export)."""
    defined, imported = definitions_and_imports()
    assert {name: modules for name, modules in defined.items()} == {name: [home] for name, home in SHARED.items()}
    for (module, name), source in imported.items():
        seen = [module]
        while source != SHARED[name]:
            assert (source, name) in imported and source not in seen, f"{module} imports {name} from {source}"
            seen.append(source)
            source = imported[(source, name)]
    minus_100 = [module for module, path in source_modules().items()
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                 and isinstance(node.operand, ast.Constant) and node.operand.value == 100]
    assert minus_100 == ["pretrain.inputs"], "write IGNORE_INDEX, not -100"
