"""PEFT methods, each a config + a tuner over the shared injection mechanism."""

from lightning_peft.tuners.config import LayerTargetsConfig, PeftConfig, config_from_dict
from lightning_peft.tuners.injection import (
    AdapterLayer,
    AdapterModule,
    ModuleReplacementTuner,
    Tuner,
    adapter_state_dict,
    advance_dropout_rng,
    get_tuner,
    inject_adapter,
    load_adapter_state_dict,
    remove_adapter,
)
from lightning_peft.tuners.layers import (
    BaseLayerAdapter,
    ConvAdapterLayer,
    EmbeddingAdapterLayer,
    LayerReplacementTuner,
    LinearAdapterLayer,
)
from lightning_peft.tuners.adapter import AdapterConfig, AdapterTuner, BottleneckAdapterLayer
from lightning_peft.tuners.bitfit import BitFitConfig, BitFitTuner
from lightning_peft.tuners.ia3 import IA3Config, IA3Linear, IA3Tuner
from lightning_peft.tuners.lora import LoraConfig, LoraLinear, LoraTuner
from lightning_peft.tuners.dora import DoraLinear
from lightning_peft.tuners.lora_conv import LoraConv
from lightning_peft.tuners.lora_quantized import QuantizedDoraLinear, QuantizedLoraLinear
from lightning_peft.tuners.lora_embedding import LoraEmbedding
from lightning_peft.tuners.prefix import PrefixEncoder, PrefixTuner, PrefixTuningConfig
from lightning_peft.tuners.prompt import PromptEmbedding, PromptTuner, PromptTuningConfig

__all__ = [
    "PeftConfig",
    "LayerTargetsConfig",
    "config_from_dict",
    "AdapterLayer",
    "AdapterModule",
    "Tuner",
    "ModuleReplacementTuner",
    "BaseLayerAdapter",
    "LinearAdapterLayer",
    "EmbeddingAdapterLayer",
    "ConvAdapterLayer",
    "LayerReplacementTuner",
    "inject_adapter",
    "remove_adapter",
    "get_tuner",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "advance_dropout_rng",
    "IA3Config",
    "IA3Linear",
    "IA3Tuner",
    "LoraConfig",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "DoraLinear",
    "QuantizedLoraLinear",
    "QuantizedDoraLinear",
    "LoraTuner",
    "AdapterConfig",
    "BottleneckAdapterLayer",
    "AdapterTuner",
    "BitFitConfig",
    "BitFitTuner",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "PrefixTuner",
    "PromptTuningConfig",
    "PromptEmbedding",
    "PromptTuner",
]
