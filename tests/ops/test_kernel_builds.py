"""Properties of the real GPU builds that numerics cannot show: built for sm_90a on this machine
(the compile matrix's machinery, in a subprocess: the rest of the suite imports the kernels for
Triton's interpreter, which builds nothing).

- The cross-program reductions (``dB``, ``dA``) add with relaxed atomics: the default acq_rel
  ordering costs a fence (``MEMBAR.GPU``) per atomic.
- With one rank tile the Hopper GEMMs have no loop nest left: the forward's persistent loop is
  flattened by the compiler, the input gradient's is one loop by construction, so the next
  tile's first loads are issued ahead of the epilogue (and of the next tile's LoRA term).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Builds config 0 of each named launch for sm_90a in bfloat16 and prints what the checks need.
SCRIPT = r"""
import json, re, sys
import torch, triton
from reslora_kernels.ops import _target
from tools import compile_matrix as cm

def loop_nested(ttir):
    # MLIR prints one region level per two spaces: a scf.for opened while another is open.
    open_loops, nested = [], False
    for line in ttir.splitlines():
        indent = len(line) - len(line.lstrip())
        while open_loops and line.lstrip().startswith("}") and indent <= open_loops[-1]:
            open_loops.pop()
        if " scf.for " in f" {line.strip()} ":
            nested = nested or bool(open_loops)
            open_loops.append(indent)
    return nested

triton.runtime.driver.set_active(cm._SimulatedDriver(cm.H100))
out = {}
for op, flags, shape in json.loads(sys.argv[1]):
    (scenario,) = [s for s in cm._scenarios() if s.op == op and s.flags == flags]
    torch.use_deterministic_algorithms(scenario.deterministic)
    with _target.simulate(cm.H100), _target.capture() as launches:
        scenario.run(cm.SHAPES[shape], torch.bfloat16)
    launch = launches[0]
    config = launch.kernel.configs[0]
    args = {**launch.kwargs, **config.all_kwargs()}
    if config.pre_hook is not None:
        config.pre_hook(args)
    compiled = launch.kernel.fn.warmup(grid=(1,), **args)
    ptx = compiled.asm["ptx"]
    out[f"{op} {flags} {shape}"] = {
        "kernel": launch.kernel.fn.__name__,
        "atomics": re.findall(r"\b(?:atom|red)\.global\.[\w.]+", ptx),
        "loop_nest": loop_nested(compiled.asm["ttgir"]),
    }
print(json.dumps(out))
"""

LAUNCHES = [
    ("lora_grad_out", "deterministic=0", "aligned"),
    ("lora_grad_A", "prev=1 dropout=1 deterministic=0", "aligned"),
    ("linear_lora_fwd", "bias=1", "aligned"),
    ("linear_lora_fwd", "bias=1", "rank64"),
    ("linear_lora_dx", "dropout=1 store_prev=1", "aligned"),
    ("linear_lora_dx", "dropout=0 store_prev=0", "rank64"),
]


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(LAUNCHES)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reductions_use_relaxed_atomics(builds):
    for name in ("lora_grad_out deterministic=0 aligned", "lora_grad_A prev=1 dropout=1 deterministic=0 aligned"):
        atomics = builds[name]["atomics"]
        assert atomics, f"{name}: no atomic in the PTX"
        assert all(".relaxed." in a for a in atomics), f"{name}: {sorted(set(atomics))}"


def test_hopper_gemms_have_no_loop_nest_with_one_rank_tile(builds):
    """r = 16 and r = 64 (one rank tile of 64): a single loop, no loop inside another."""
    for name, build in builds.items():
        if name.startswith(("linear_lora_fwd", "linear_lora_dx")):
            assert build["kernel"].endswith("_tma_kernel"), name
            assert not build["loop_nest"], f"{name}: a loop nest is left (not flattened)"
