"""The settings dataclasses read from their source files, without importing them.

`--help` must answer in a moment, and the modules that define the settings import torch
(seconds to tens of seconds on a loaded machine). So help parses the source instead: each
field's name, annotation, literal default (nested dataclasses followed through the module's
imports) and meaning: the comment block right above the field (or one at the end of its
line); else the comment block or class-docstring sentence that names it. Help therefore
cannot drift from the code that defines a setting.
"""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any


@dataclass
class SourceField:
    """One field of a settings dataclass as its source writes it."""

    name: str
    annotation: str
    default: Any  # a literal value, or MISSING (required, or not a literal)
    meaning: str
    nested: SourceClass | None = None  # the dataclass of a nested settings section


@dataclass
class SourceClass:
    """A settings dataclass as its source writes it."""

    module: str
    name: str
    doc: str
    fields: list[SourceField] = field(default_factory=list)


def module_path(module: str) -> Path:
    """The source file of `module` (a.b.c), found without running any package's
    __init__: the package directory from its spec, then the file in it."""
    # Only the top two levels through find_spec (a.b: importing `a` alone); deeper packages
    # (a model family's folder, scaleforge.models.deepseek_v3) are folders below it, since
    # find_spec would run the __init__ of every package above the one it is asked for.
    parts = module.split(".")
    levels = min(2, len(parts) - 1)
    top, folders, name = ".".join(parts[:levels]), parts[levels:-1], parts[-1]
    spec = find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    for directory in spec.submodule_search_locations:
        package = Path(directory).joinpath(*folders)
        for candidate in (package / f"{name}.py", package / name / "__init__.py"):
            if candidate.is_file():
                return candidate
    raise ModuleNotFoundError(module)


@cache
def _module(module: str) -> tuple[ast.Module, list[str]]:
    text = module_path(module).read_text()
    return ast.parse(text), text.splitlines()


def read_class(module: str, name: str) -> SourceClass:
    """The dataclass `name` of `module`, nested settings sections included."""
    tree, lines = _module(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        imported = _imports(tree, module).get(name)
        if imported is None:
            raise LookupError(f"no class {name} in {module}")
        return read_class(*imported)
    doc = ast.get_docstring(node) or ""
    result = SourceClass(module, name, doc)
    imports = _imports(tree, module)
    for base in node.bases:  # a base dataclass's fields come first, as dataclasses order them
        if isinstance(base, ast.Name):
            found = _class_at(base.id, module, tree, imports)
            if found is not None:
                result.fields += read_class(*found).fields
    blocks = _comment_blocks(node, lines)
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target,
                                                                      ast.Name):
            continue
        field_name = statement.target.id
        annotation = ast.unparse(statement.annotation)
        nested_at = _dataclass_of(statement.value, annotation, module, tree, imports)
        nested = read_class(*nested_at) if nested_at else None
        default = MISSING if nested else _literal_default(statement.value)
        result.fields.append(SourceField(field_name, annotation, default,
                                         _meaning(field_name, statement, blocks, lines, doc),
                                         nested))
    return result


def defaults(cls: SourceClass) -> dict[str, Any]:
    """The nested dict of `cls`'s defaults, "???" for a required setting (OmegaConf's
    missing value)."""
    return {f.name: defaults(f.nested) if f.nested else ("???" if f.default is MISSING
                                                         else f.default)
            for f in cls.fields}


def _imports(tree: ast.Module, module: str) -> dict[str, tuple[str, str]]:
    """Name -> (module, name) of the `from X import Name` statements of a module."""
    names = {}
    package = module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            source = node.module if node.level == 0 else f"{package}.{node.module}"
            for alias in node.names:
                names[alias.asname or alias.name] = (source, alias.name)
    return names


def _dataclass_of(value: ast.expr | None, annotation: str, module: str, tree: ast.Module,
                  imports: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(module, class) of a nested settings dataclass field (`x: Cls = field(default_factory
    =Cls)`), else None."""
    if not (isinstance(value, ast.Call) and _called(value) == "field"):
        return None
    factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
    if not isinstance(factory, ast.Name) or factory.id != annotation:
        return None
    return _class_at(factory.id, module, tree, imports)


def _class_at(name: str, module: str, tree: ast.Module,
              imports: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(module, class) of the class `name` defined in or imported by `module`."""
    if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
        return module, name
    return imports.get(name)


def _called(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else ""


def _literal_default(value: ast.expr | None) -> Any:
    if value is None:
        return MISSING
    if isinstance(value, ast.Call) and _called(value) == "field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                return _literal(keyword.value)
            if keyword.arg == "default_factory":
                factory = keyword.value
                if isinstance(factory, ast.Lambda):
                    return _literal(factory.body)
                if isinstance(factory, ast.Name) and factory.id in ("list", "dict"):
                    return [] if factory.id == "list" else {}
        return MISSING
    return _literal(value)


def _literal(value: ast.expr) -> Any:
    try:
        return ast.literal_eval(value)
    except ValueError:
        return MISSING


def _comment_blocks(node: ast.ClassDef, lines: list[str]) -> list[tuple[int, str]]:
    """(line after the block, its text) of each run of comment lines in the class body."""
    blocks = []
    current: list[str] = []
    end = node.end_lineno or node.lineno
    for number in range(node.lineno, end + 1):
        stripped = lines[number - 1].strip()
        if stripped.startswith("#"):
            current.append(stripped.lstrip("#").strip())
        elif current:
            blocks.append((number, " ".join(current)))
            current = []
    return blocks


def _meaning(name: str, statement: ast.AnnAssign, blocks: list[tuple[int, str]],
             lines: list[str], doc: str) -> str:
    """The block right above the field and its trailing comment; else the comment block or
    the docstring sentence naming it; "(see above)" is replaced by that sentence."""
    above = next((text for after, text in blocks if after == statement.lineno), "")
    after = lines[(statement.end_lineno or statement.lineno) - 1][statement.end_col_offset or 0:]
    trailing = after.strip()[1:].strip() if after.strip().startswith("#") else ""
    meaning = " ".join(part for part in (above, trailing) if part)
    named = _sentence_naming(name, doc)
    if "(see above)" in meaning:
        meaning = meaning.replace("(see above)", f"({named})" if named else "").strip()
    if meaning:
        return meaning
    word = re.compile(rf"\b{re.escape(name)}\b")
    return named or next((text for _, text in blocks if word.search(text)), "")


def _sentence_naming(name: str, doc: str) -> str:
    """The first sentence of `doc` naming `name` in backticks, whole (split at full stops
    and semicolons only, so a sentence that lists options after a colon keeps them)."""
    sentences = re.split(r"(?<=[.;])\s+(?=[A-Z`-])", " ".join(doc.split()))
    return next((s for s in sentences if f"`{name}`" in s), "")
