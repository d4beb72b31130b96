"""Who imports whom, read from the source with ``ast`` (nothing is imported): the node modules form no import
circle (also none through imports inside functions), and ``withanyone_core`` imports neither ComfyUI, the nodes
nor the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_NAMES = (
    "comfy",
    "comfy_api",
    "comfy_extras",
    "folder_paths",
    "server",
    "nodes",
    "execution",
    "train",
    "withanyone_pack",
)


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names (relative ones resolved
    against ``package``); ``from x import y`` gives both ``x`` and ``x.y`` (y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def node_graph(folder: Path) -> dict[str, set[str]]:
    """``nodes/*.py`` module name -> the sibling modules it imports."""
    modules = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = _imports(path, "nodes")
        graph[name] = {m for m in modules if f"nodes.{m}" in found and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name], _ = 1, path.append(name)
        for nxt in sorted(graph.get(name, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[name], _ = 2, path.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_node_modules_have_no_import_circle():
    graph = node_graph(ROOT / "nodes")
    assert {"layout", "routes", "types", "patch", "sampling", "kontext"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle in nodes/: {' -> '.join(find_cycle(graph))}"
    assert "layout" not in graph["routes"] and "routes" not in graph["layout"]  # the route and the node stand apart


def test_the_cycle_finder_finds_circles(tmp_path):
    """The check above can fail: the circle nodes/layout.py <-> nodes/routes.py had (one side importing inside a
    function) is found."""
    (tmp_path / "layout.py").write_text("def draw():\n    from .routes import box_colors\n")
    (tmp_path / "routes.py").write_text("from .layout import parse_boxes\n")
    (tmp_path / "types.py").write_text("import json\n")
    graph = node_graph(tmp_path)
    assert graph == {"layout": {"routes"}, "routes": {"layout"}, "types": set()}
    assert find_cycle(graph) == ["layout", "routes", "layout"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_core_imports_neither_comfyui_nor_nodes_nor_train():
    offenders = []
    for path in sorted((ROOT / "withanyone_core").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for name in _imports(path, package):
            if name.split(".")[0] in COMFY_NAMES:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


PACK_TOP_NAMES = ("withanyone_core", "train", "tools", "tests", "support", "dev")


def _absolute_pack_imports(path: Path) -> list[str]:
    """Where ``path`` imports one of the pack's own folders by its top-level name (``import withanyone_core``,
    ``from train.x import y``), anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in PACK_TOP_NAMES]
    return found


def test_node_pack_imports_its_own_modules_relatively():
    """Inside ComfyUI the pack is a package named after its folder and nothing of it is importable by name (unless
    a user pip-installed it), so the entry point and the nodes reach the core as ``..withanyone_core``; imports
    inside functions count too (they run only when a node executes)."""
    files = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]
    offenders = [hit for path in files for hit in _absolute_pack_imports(path)]
    assert not offenders, offenders
    assert _absolute_pack_imports(ROOT / "nodes" / "sampling.py") == []  # the check reads real node modules


def test_the_absolute_import_check_finds_them(tmp_path):
    module = tmp_path / "kontext.py"
    module.write_text(
        "from ..withanyone_core import recipe\n\ndef run():\n    from withanyone_core.faces import edit\n"
    )
    assert _absolute_pack_imports(module) == ["kontext.py:4 imports withanyone_core.faces"]


def test_no_sys_path_edit_outside_tests():
    """The library, the trainer, the nodes and the tools are packages; only the tests' bootstrap edits sys.path."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or any(
            part.startswith(".") or part == "node_modules" for part in rel.parts
        ):
            continue  # the tests' own bootstrap; environments, caches and build output
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
