"""The package's modules import downwards only, in the order docs/design.md section 13 lists them
(the model level, then the kernel side, ``ops/`` a package of its own), each under 450 lines, each
``__all__`` naming what the module defines."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "reslora_kernels"


def listed_modules() -> list[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## 13. The modules") :]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line.split()[0].rstrip("/") for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def files_of(name: str) -> list[Path]:
    """The files of package module ``name`` (a subpackage: every file in it)."""
    folder = PACKAGE / name
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{name}.py"]


def sibling_imports(name: str) -> set[str]:
    """The package modules ``name`` imports (``from .x import``, ``from . import x``; from inside a
    subpackage ``from ..x import``), type-only imports included: a circle through them is still a
    circle. A subpackage's imports of its own files are not counted."""
    level = 2 if (PACKAGE / name).is_dir() else 1
    names = set()
    for path in files_of(name):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == level:
                if node.module:
                    names.add(node.module.split(".")[0])
                else:
                    names.update(alias.name for alias in node.names)
    return names


MODULES = listed_modules()


def test_the_list_is_whole_and_ends_at_a_leaf():
    """Every module of the package is listed, once; the last imports nothing of the package."""
    present = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert MODULES[0] == "__init__" and set(MODULES) == present and len(set(MODULES)) == len(MODULES)
    assert not sibling_imports(MODULES[-1])


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_only_modules_listed_below_it(name):
    above = set(MODULES[: MODULES.index(name) + 1])
    wrong = sibling_imports(name) & above
    assert not wrong, f"{name} imports {sorted(wrong)}, listed above it (or itself)"
    for path in files_of(name):
        assert len(path.read_text().splitlines()) <= 450, f"{path.name} is over 450 lines"


@pytest.mark.parametrize("name", MODULES)
def test_all_names_what_the_module_defines(name):
    module = importlib.import_module("reslora_kernels" if name == "__init__" else f"reslora_kernels.{name}")
    assert all(hasattr(module, public) for public in module.__all__), name
    assert not [public for public in module.__all__ if public.startswith("_")], name
