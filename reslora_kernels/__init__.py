"""reslora_kernels: fused ResLoRA (residual LoRA) training, merging and export for PyTorch."""

from .apply import ResLoRASummary, apply_reslora, chain_key, reslora_blocks, reslora_summary
from .backend import FusedBackendFailure, backend_choices, backend_report
from .chain import ChainOrderError, ResLoRAChain, link_chain
from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, MODES, ResLoRAConfig
from .functional import fold_lora_, fold_report, reslora_linear, resolve_backend
from .io import export_peft_adapter, load_reslora, save_reslora
from .layer import FusedResLoRAConv1D, FusedResLoRALinear
from .merging import MERGE_METHODS, MergeReport, merge_and_unload, merge_report

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "MERGE_METHODS",
    "ResLoRAConfig",
    "FusedResLoRALinear",
    "FusedResLoRAConv1D",
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "ResLoRAChain",
    "ChainOrderError",
    "link_chain",
    "apply_reslora",
    "chain_key",
    "reslora_blocks",
    "reslora_summary",
    "ResLoRASummary",
    "merge_and_unload",
    "merge_report",
    "MergeReport",
    "export_peft_adapter",
    "fold_lora_",
    "fold_report",
    "save_reslora",
    "load_reslora",
    "reslora_linear",
    "resolve_backend",
    "backend_report",
    "backend_choices",
    "FusedBackendFailure",
]
