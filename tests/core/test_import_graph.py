"""Who imports whom, read from the source with ``ast`` (nothing is imported; tests/support/import_graph.py): no
package of the project has an import circle (also none through imports inside functions or under TYPE_CHECKING),
``withanyone_core`` imports neither ComfyUI, the nodes nor the trainer, the node pack imports its own modules
relatively, and nothing outside the tests edits ``sys.path``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support.import_graph import find_cycle, import_graph

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


def _circle(graph: dict[str, set[str]]) -> str:
    cycle = find_cycle(graph)
    return "" if cycle is None else " -> ".join(cycle)


@pytest.mark.parametrize("package", ["withanyone_core", "nodes", "train", "tools", "dev"])
def test_no_import_circle(package):
    graph = import_graph(ROOT / package)
    assert len(graph) > 1  # the walk saw the package's modules
    assert not _circle(graph), f"import circle in {package}/: {_circle(graph)}"


def test_the_walk_sees_what_it_checks():
    nodes, train = import_graph(ROOT / "nodes"), import_graph(ROOT / "train")
    assert {f"nodes.{m}" for m in ("layout", "routes", "types", "patch", "sampling", "kontext")} <= set(nodes)
    assert "nodes.layout" not in nodes["nodes.routes"] and "nodes.routes" not in nodes["nodes.layout"]
    assert "train.data.sources" in train and train["train.prepare"]


def test_the_circle_finder_finds_circles(tmp_path):
    """The check above can fail: the circle nodes/layout.py <-> nodes/routes.py had (one side importing inside a
    function) is found."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "__init__.py").write_text("")
    (nodes / "layout.py").write_text("def draw():\n    from .routes import box_colors\n")
    (nodes / "routes.py").write_text("from .layout import parse_boxes\n")
    (nodes / "types.py").write_text("import json\n")
    graph = import_graph(nodes)
    assert graph == {
        "nodes": set(),
        "nodes.layout": {"nodes.routes"},
        "nodes.routes": {"nodes.layout"},
        "nodes.types": set(),
    }
    assert find_cycle(graph) == ["nodes.layout", "nodes.routes", "nodes.layout"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_a_package_importing_its_own_parts_is_no_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .low import x\n")
    (pkg / "sub" / "low.py").write_text("x = 1\n")
    (pkg / "a.py").write_text("from pkg.sub.low import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    assert find_cycle(import_graph(pkg)) is None  # a package importing its own parts is no circle
    (pkg / "sub" / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import b\n")
    (pkg / "a.py").write_text("from .sub.low import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.low", "pkg.b", "pkg.a"]


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
