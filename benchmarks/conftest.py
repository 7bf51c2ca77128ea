"""Benchmark run plumbing: one Results object per pytest run, written as JSON and printed as
tables at the end. ``RESLORA_BENCH_OUT`` overrides the output folder (default
benchmarks/results/); every run writes a new file, none is overwritten."""

import os
from pathlib import Path

import pytest
import reslora_kernels
import torch
from bench_lib import DEVICE, IS_CUDA, PlainBenchmark, Results

# RESLORA_BENCH_THREADS pins torch's CPU thread count (default: torch's own choice). On a shared
# machine one thread per process is far less disturbed by other processes than an OpenMP team
# whose members get descheduled at every barrier.
if os.environ.get("RESLORA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["RESLORA_BENCH_THREADS"]))

RESULTS = Results()


def pytest_report_header(config):
    if IS_CUDA:
        return f"reslora benchmarks on {torch.cuda.get_device_name()}: LLaMA-7B projection shapes, bf16"
    return (
        f"reslora benchmarks on CPU (no CUDA device, {torch.get_num_threads()} threads): composed, reference and PEFT; "
        "fused, auto-on-CUDA and torch.compile variants are GPU only"
    )


@pytest.fixture(autouse=True)
def _isolate():
    torch.manual_seed(0)
    # The variants set their backend themselves; the default (RESLORA_BACKEND at import) comes back afterwards.
    yield
    reslora_kernels.set_backend(None)
    if IS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def results():
    return RESULTS


class _PlainBenchmarkPlugin:
    @pytest.fixture
    def benchmark(self):
        return PlainBenchmark()


def pytest_configure(config):
    # Without pytest-benchmark (not installed, or -p no:benchmark) the suites still run and write
    # their results file: every number in it is the interleaved runner's, not the plugin's.
    if not config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_PlainBenchmarkPlugin(), "reslora-plain-benchmark")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS.rows:
        return
    from report import chart, tables

    out_dir = Path(os.environ.get("RESLORA_BENCH_OUT", Path(__file__).parent / "results"))
    path = RESULTS.write(out_dir)
    data = __import__("json").loads(path.read_text())
    terminalreporter.write_sep("=", f"reslora benchmark results ({DEVICE})")
    terminalreporter.write_line(tables(data))
    png = path.with_suffix(".png")
    if chart(data, png):
        terminalreporter.write_line(f"\nchart: {png}")
    terminalreporter.write_line(f"results: {path}")
