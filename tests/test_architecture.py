"""The package's shape: layers import only downwards, modules stay small, no import cycles."""

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "diffusers_helper"
# Lowest first: a package may import itself and any package of a lower rank, never a higher or an equal one.
RANKS = {"config": 0, "models": 1, "media": 2, "caches": 2, "accel": 3, "memory": 4, "vae": 5, "pipeline": 6,
         "parallel": 7, "app": 8}
ENTRY_RANK = 9  # generate, bench, parity, settings: the command-line entry points on top
MAX_LINES = 400
MAX_MODULES = 12


def _modules() -> dict[str, Path]:
    """Dotted name relative to the package ("pipeline.engine", "generate") -> file."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """Package-relative names of the diffusers_helper modules that `name` imports."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("diffusers_helper"):
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:
                target_names = [".".join(target + [a.name]) for a in node.names]
                found.update(t for t in target_names)
            else:
                found.add(".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffusers_helper."):
                    found.add(alias.name.split(".", 1)[1])
    return found


def _rank(name: str) -> int:
    head = name.split(".")[0]
    return RANKS.get(head, ENTRY_RANK if "." not in name else -1)


def test_layers_import_only_downwards():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "":  # the package's own __init__
            continue
        head = name.split(".")[0]
        for target in _imports(name, path):
            target_head = target.split(".")[0]
            if target_head in ("", "__version__") or target_head == head:
                continue
            if _rank(target) >= _rank(name) and _rank(name) != ENTRY_RANK or _rank(target) == ENTRY_RANK:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_modules_and_packages_stay_small():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    for package in RANKS:
        count = len([p for p in (PKG / package).glob("*.py") if p.name != "__init__.py"])
        assert 0 < count <= MAX_MODULES, (package, count)
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(RANKS)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t in _imports(name, path, top_level_only=True) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The layer check reads relative imports the way Python resolves them."""
    path = tmp_path / "placement.py"
    path.write_text("from ..pipeline.engine import Engine\nfrom .policy import x\nfrom ...diffusers_helper import y\n")
    found = _imports("memory.placement", path)
    assert "pipeline.engine" in found and "memory.policy" in found
    assert _rank("pipeline.engine") > _rank("memory.placement")
