"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning, speaking HF peft's API."""

from lightning_peft.peft_model import PeftModel, count_parameters, format_trainable_parameters, get_peft_model
from lightning_peft.serialization import load_adapter, read_adapter_config, save_adapter
from lightning_peft.tuners import (
    AdapterConfig,
    BitFitConfig,
    LoraConfig,
    LoraLinear,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter_state_dict,
    advance_dropout_rng,
    get_tuner,
    inject_adapter,
    load_adapter_state_dict,
    remove_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BitFitConfig",
    "LoraConfig",
    "LoraLinear",
    "PeftConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PeftModel",
    "get_peft_model",
    "inject_adapter",
    "remove_adapter",
    "get_tuner",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "advance_dropout_rng",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "count_parameters",
    "format_trainable_parameters",
]
