"""reslora_kernels: fused ResLoRA (residual LoRA) training, merging and export for PyTorch."""

from .apply import apply_reslora, unload
from .autotune import AutotuneCacheWarning, FusedBackendFailure
from .backend import backend_choices, backend_report, resolve_backend, set_backend, use_backend
from .chain import ResLoRAChain, link_chain
from .chaining import chain_key
from .config import MODES, TASK_TYPES, BlockSettings, ResLoRAConfig
from .disable import AdapterDisabled, disable_adapter
from .fold import fold_lora_, fold_report
from .functional import reslora_linear
from .io import load_reslora, save_reslora
from .peft_export import export_peft_adapter
from .layer import FusedResLoRALinear
from .merge_methods import MERGE_METHODS
from .merging import MergeReport, merge_and_unload, merge_report
from .model_utils import reslora_blocks
from .module_to_save import ModuleToSave
from .optim import loraplus_param_groups
from .passes import ChainOrderError
from .statistics import NormStatistics
from .summary import ResLoRASummary, reslora_summary
from .targets import ALL_LINEAR, DEFAULT_TARGET_MODULES
from .trainer import ResLoRATrainerMixin

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "TASK_TYPES",
    "MERGE_METHODS",
    "BlockSettings",
    "ResLoRAConfig",
    "FusedResLoRALinear",
    "ModuleToSave",
    "NormStatistics",
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "ResLoRAChain",
    "ChainOrderError",
    "link_chain",
    "apply_reslora",
    "disable_adapter",
    "AdapterDisabled",
    "unload",
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
    "ResLoRATrainerMixin",
    "loraplus_param_groups",
    "reslora_linear",
    "resolve_backend",
    "set_backend",
    "use_backend",
    "backend_report",
    "backend_choices",
    "FusedBackendFailure",
    "AutotuneCacheWarning",
]
