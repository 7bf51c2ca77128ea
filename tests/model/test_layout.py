"""The model-level modules import downwards only, in the order docs/design.md section 13 lists
them, each under 450 lines, each ``__all__`` naming what the module defines."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "reslora_kernels"


def listed_modules() -> list[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## 13. The model-level modules") :]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def sibling_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from .x import``, ``from . import x``), type-only
    imports included: a circle through them is still a circle."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names


MODULES = listed_modules()


def test_the_list_is_whole_and_ends_at_the_leaf():
    assert MODULES[0] == "__init__" and MODULES[-1] == "config" and len(set(MODULES)) == len(MODULES)
    assert {"apply", "targets", "chaining", "layer", "chain", "passes", "merging", "io"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_only_modules_listed_below_it(name):
    path = PACKAGE / f"{name}.py"
    above = set(MODULES[: MODULES.index(name) + 1])
    wrong = sibling_imports(path) & above
    assert not wrong, f"{name}.py imports {sorted(wrong)}, listed above it (or itself)"
    assert len(path.read_text().splitlines()) <= 450, f"{name}.py is over 450 lines"


@pytest.mark.parametrize("name", MODULES)
def test_all_names_what_the_module_defines(name):
    module = importlib.import_module("reslora_kernels" if name == "__init__" else f"reslora_kernels.{name}")
    assert all(hasattr(module, public) for public in module.__all__), name
    assert not [public for public in module.__all__ if public.startswith("_")], name
