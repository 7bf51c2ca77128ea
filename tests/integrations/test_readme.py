"""The README's usage example runs as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    usage = text[text.index("## Usage") :]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    import torch.nn as nn

    from reslora_kernels import FusedResLoRALinear

    model = namespace["model"]
    assert not any(isinstance(m, FusedResLoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (tmp_path / "my_adapter" / "reslora_config.json").is_file()


def quick_start_commands() -> list[str]:
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_matches_ci():
    """.ci/run runs the README's two quick-start commands, as written: the benchmarks and the tests."""
    commands = quick_start_commands()
    assert any(c.endswith("pytest benchmarks/") for c in commands)
    assert any(c.endswith("pytest tests/") for c in commands)
    ci = (README.parent / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, command


def test_install_extras_exist():
    """Every ``pip install -e ".[extra]"`` in the README names an extra pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r'pip install [^\n]*?"\.\[([\w,-]+)\]"', README.read_text())
    assert named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs .[{extra}], which pyproject.toml does not define"
