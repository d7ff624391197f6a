"""Every private torch name the package touches goes through scaleforge.torch_compat and is
listed there with the versions it was checked on (so a torch upgrade is a one-file change).

The source is scanned, not the imports a test happens to trigger: a private name is a
dotted-name component that starts with one underscore, reached from torch (imports from a
torch module, `torch.x._y`, and `obj._y` on objects whose `_y` the package does not define
itself), plus private methods a package class overrides on a torch base class.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scaleforge import torch_compat

REPO = Path(__file__).resolve().parent.parent
COMPAT = REPO / "torch_compat" / "__init__.py"
PACKAGES = sorted(
    path.parent.name for path in REPO.glob("*/__init__.py") if path.parent.name != "tests"
)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> list[Path]:
    return [source for package in PACKAGES for source in sorted((REPO / package).rglob("*.py"))]


def _own_names(sources: list[Path]) -> set[str]:
    """Names the package defines itself: functions, classes and `self._x` attributes (those
    of torch_compat left out, where torch's private methods are overridden)."""
    own: set[str] = set()
    for source in sources:
        if source == COMPAT:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
    return own


def _other_libraries(tree: ast.AST) -> set[str]:
    """Names a module binds by importing from anything but torch (`os`, `np`, ...): their
    private attributes (`os._exit`) are not torch's."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                      if alias.name.split(".")[0] != "torch"}
        elif isinstance(node, ast.ImportFrom) and (node.level or not (
                node.module or "").startswith("torch")):
            if not (node.module or "").startswith("scaleforge"):
                bound |= {alias.asname or alias.name for alias in node.names}
    return bound


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_torch_names(source: Path, own: set[str]) -> Iterator[tuple[str, int]]:
    """(private name component, line) for each private torch name `source` touches."""
    tree = ast.parse(source.read_text())
    other_libraries = _other_libraries(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "torch":
                for part in [*parts, *(alias.name for alias in node.names)]:
                    if _private(part):
                        yield part, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torch":
                    yield from ((part, node.lineno) for part in parts if _private(part))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            target = node.value
            if isinstance(target, ast.Name) and target.id in ("self", "cls"):
                continue
            if _root(target) in other_libraries:
                continue
            if node.attr not in own:
                yield node.attr, node.lineno


def _listed_components() -> set[str]:
    return {part for entry in torch_compat.PRIVATE_NAMES for part in entry.path.split(".")
            if _private(part)}


def test_no_module_but_torch_compat_touches_a_private_torch_name():
    sources = _sources()
    own = _own_names(sources)
    outside = [f"{source.relative_to(REPO)}:{line} {name}" for source in sources
               if source != COMPAT for name, line in private_torch_names(source, own)]
    assert not outside, ("private torch names outside scaleforge.torch_compat (move them "
                         "there and list them in PRIVATE_NAMES): " + ", ".join(outside))


def test_torch_compat_lists_every_private_name_it_touches_and_no_other():
    touched = {name for name, _ in private_torch_names(COMPAT, _own_names(_sources()))}
    # torch_compat's classes define only the private methods of torch they override.
    touched |= {node.name for node in ast.walk(ast.parse(COMPAT.read_text()))
                if isinstance(node, ast.ClassDef) for node in ast.walk(node)
                if isinstance(node, ast.FunctionDef) and _private(node.name)}
    listed = _listed_components()
    assert touched - listed == set(), "touched in torch_compat but not in PRIVATE_NAMES"
    assert listed - touched == set(), "in PRIVATE_NAMES but no longer touched"


def _classes_with_private_methods() -> Iterator[tuple[type, str]]:
    """(class, private method name) for each private method a package class with a base
    class defines (the modules holding such classes are imported to read their bases)."""
    for source in _sources():
        tree = ast.parse(source.read_text())
        found = {(node.name, item.name) for node in ast.walk(tree)
                 if isinstance(node, ast.ClassDef) and node.bases for item in node.body
                 if isinstance(item, ast.FunctionDef) and _private(item.name)}
        if not found:
            continue
        parts = [part for part in source.relative_to(REPO).with_suffix("").parts
                 if part != "__init__"]
        module = importlib.import_module(".".join(["scaleforge", *parts]))
        for class_name, method in sorted(found):
            cls = getattr(module, class_name, None)
            if inspect.isclass(cls) and method in vars(cls):
                yield cls, method


def test_only_torch_compat_overrides_private_methods_of_torch_classes():
    overrides = []
    for cls, name in _classes_with_private_methods():
        torch_bases = [base for base in cls.__mro__[1:]
                       if base.__module__.split(".")[0] == "torch"]
        if any(name in vars(base) for base in torch_bases):
            overrides.append((cls, name))
    outside = [f"{cls.__module__}.{cls.__qualname__}.{name}" for cls, name in overrides
               if cls.__module__ != "scaleforge.torch_compat"]
    assert not outside, f"override torch's private methods in torch_compat only: {outside}"
    assert {name for _, name in overrides} <= _listed_components()


def _resolve(path: str) -> object:
    """The object at dotted `path` under the installed torch (AttributeError/ImportError)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            found = getattr(found, part)
        return found
    raise ImportError(path)


@pytest.mark.parametrize("entry", torch_compat.PRIVATE_NAMES, ids=lambda entry: entry.path)
def test_each_private_name_is_where_torch_compat_says_on_the_installed_torch(entry):
    release = torch_compat.torch_release()
    assert set(entry.absent) <= set(entry.checked)
    assert entry.fallback != torch_compat.EVERYWHERE or not entry.absent
    if release not in entry.checked:
        pytest.skip(f"torch {release} is not among the versions checked: {entry.checked}")
    try:
        _resolve(entry.path)
        present = True
    except (AttributeError, ImportError):
        present = False
    assert present == (release not in entry.absent), (
        f"torch {release}: {entry.path} is {'present' if present else 'absent'}, but "
        f"torch_compat says otherwise; check it and update PRIVATE_NAMES")


def test_the_scan_finds_private_names_in_each_form(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "import torch\n"
        "from torch.distributed._tools.mem_tracker import MemTracker\n"
        "from torch.distributed.pipelining.stage import _StageForwardMeta\n"
        "x = torch._grouped_mm\n"
        "mesh._flatten('a')\n"
        "self._mine = 1\n"
        "obj._mine\n"
        "import os\n"
        "os._exit(0)\n")
    assert list(private_torch_names(source, own={"_mine"})) == [
        ("_tools", 2), ("_StageForwardMeta", 3), ("_grouped_mm", 4), ("_flatten", 5)]


def test_shape_inference_hook_wraps_the_method_the_installed_torch_calls():
    method = torch_compat.SHAPE_INFERENCE
    assert method in vars(torch_compat.PipelineStage)
    stage_class = torch.distributed.pipelining.PipelineStage
    assert callable(getattr(stage_class, method))
