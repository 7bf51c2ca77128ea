import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config):
    if DEVICE == "cuda":
        return f"reslora benchmarks on {torch.cuda.get_device_name()}"
    return "reslora benchmarks on CPU (no CUDA device): small shapes, reference path"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
