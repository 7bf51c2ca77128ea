"""The real launch path without a GPU: tests/ops/real_launch/ on the fake GPU
(``tools.fake_gpu``), in processes of their own.

Everything a GPU run does except the launch itself runs there: Triton's autotuner with the package's
pruning, real builds for sm_90a and sm_80 with the bundled ptxas, the loading of each binary, and
Triton's launcher binding the arguments (host tensor descriptors included) for a driver that checks
what CUDA would check. This suite builds its kernels for Triton's interpreter, which launches nothing
of that, so the fake-GPU tests run in subprocesses with ``TRITON_INTERPRET=0``: one per target group,
side by side (the builds dominate).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reslora_kernels.ops import _target
from reslora_kernels.ops._target import H100

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
#: The inner runs: the layer chains split by target (the builds dominate), the rest together.
GROUPS = {
    "sm_90a chains": ["tests/ops/real_launch/test_layer_launch.py", "-k", "sm_90a"],
    "sm_80 chains": ["tests/ops/real_launch/test_layer_launch.py", "-k", "sm_80"],
    "driver and tuning": [
        "tests/ops/real_launch/test_fake_driver.py",
        "tests/ops/real_launch/test_tuning.py",
        "tests/ops/real_launch/test_dequant_launch.py",
    ],
}


@pytest.mark.skipif(not _target.INTERPRETED, reason="kernels built for a GPU: pytest collects tests/ops/real_launch")
def test_fake_gpu_suites(tmp_path):
    """Every group passes, with no test skipped or deselected by accident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESLORA_")}
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs = {}
    for name, args in GROUPS.items():
        report = tmp_path / f"{name.replace(' ', '-')}.xml"
        command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        runs[name] = (
            report,
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        )
    failures = []
    for name, (report, process) in runs.items():
        output, _ = process.communicate(timeout=1800)
        if process.returncode != 0 or not report.exists():
            failures.append(f"--- {name} (exit {process.returncode}):\n{output[-6000:]}")
            continue
        suite = ET.parse(report).getroot().find("testsuite")
        tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        if tests < 5 or skipped:
            failures.append(f"--- {name}: {tests} tests, {skipped} skipped")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not _target.INTERPRETED, reason="this run builds the kernels for a GPU")
def test_fake_gpu_refuses_interpreter_builds():
    """This process builds for the interpreter: a fake GPU here would launch nothing real."""
    from tools.fake_gpu import fake_gpu

    assert _target.INTERPRETED
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"), fake_gpu(H100):
        pass


@pytest.mark.parametrize(
    "value, mode", [(None, "autotune"), ("", "autotune"), (" Pinned ", "pinned"), ("autotune", "autotune")]
)
def test_tune_mode(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("RESLORA_TUNE", raising=False)
    else:
        monkeypatch.setenv("RESLORA_TUNE", value)
    assert _target.tune_mode() == mode


def test_unknown_tune_mode(monkeypatch):
    monkeypatch.setenv("RESLORA_TUNE", "fast")
    with pytest.raises(ValueError, match="RESLORA_TUNE='fast' is not one of autotune, pinned"):
        _target.tune_mode()
