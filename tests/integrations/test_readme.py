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


def test_quick_start_matches_ci():
    """.ci/run must call the README's test command."""
    text = README.read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    ci = (README.parent / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, command
