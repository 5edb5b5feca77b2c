"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning, speaking HF peft's API."""

from lightning_peft.optim import create_loraplus_optimizer
from lightning_peft.quantization import prepare_model_for_kbit_training
from lightning_peft.peft_model import PeftModel, count_parameters, format_trainable_parameters, get_peft_model
from lightning_peft.serialization import load_adapter, read_adapter_config, save_adapter
from lightning_peft.tuners import AdapterConfig, BitFitConfig, IA3Config, LoraConfig, LoraLinear, PeftConfig
from lightning_peft.tuners import PrefixTuningConfig, PromptTuningConfig, get_tuner, inject_adapter, remove_adapter
from lightning_peft.tuners import adapter_state_dict, advance_dropout_rng, load_adapter_state_dict

__version__ = "0.1.0"

__all__ = [
    # configs of the methods (HF peft's names)
    "PeftConfig", "LoraConfig", "IA3Config", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig", "BitFitConfig",
    # peft's model API
    "PeftModel", "get_peft_model", "count_parameters", "format_trainable_parameters",
    # adapters on any nn.Module, without the wrapper
    "inject_adapter", "remove_adapter", "get_tuner", "LoraLinear",
    "adapter_state_dict", "load_adapter_state_dict", "advance_dropout_rng",
    # quantized (bitsandbytes) base models: QLoRA; bitsandbytes is imported only when used
    "prepare_model_for_kbit_training",
    # LoRA+ (peft.optimizers)
    "create_loraplus_optimizer",
    # peft's adapter directory format
    "save_adapter", "load_adapter", "read_adapter_config",
]

# Lightning glue. PEFTCallback / AtomicCheckpointIO are imported on first access, so that
# `import lightning_peft` does not import Lightning (the core works without it).
from lightning_peft.checkpoint import load_peft_checkpoint  # noqa: E402

__all__ += ["PEFTCallback", "AtomicCheckpointIO", "apply_peft", "load_peft_checkpoint"]

_LAZY_EXPORTS = {
    "PEFTCallback": "lightning_peft.lightning.callback",
    "apply_peft": "lightning_peft.lightning.callback",
    "AtomicCheckpointIO": "lightning_peft.lightning.checkpoint_io",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
