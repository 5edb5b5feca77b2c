"""bitsandbytes-quantized base models (QLoRA): recognising their layers, dequantizing and requantizing
their weights, and peft's ``prepare_model_for_kbit_training``.

bitsandbytes is optional (``pip install lightning_peft[qlora]``). Nothing here imports it at module
import time: a model can only hold bitsandbytes layers if bitsandbytes is already imported, so
recognising them needs just ``sys.modules``; the functions that need it say what to install.

Weights: a 4-bit ``Linear4bit`` stores a ``Params4bit`` (packed ``uint8 [out·in/2, 1]`` plus a
``quant_state``), an 8-bit ``Linear8bitLt`` an ``Int8Params`` (``int8 [out, in]``, per-row scales
``SCB [out]`` on the weight or, after the first forward, on the layer's ``state``).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "QLORA_INSTALL_HINT",
    "require_bitsandbytes",
    "bnb_kind",
    "is_quantized_linear",
    "dequantize_weight",
    "requantize_weight",
    "prepare_model_for_kbit_training",
]

QLORA_INSTALL_HINT = "pip install lightning_peft[qlora]"


def require_bitsandbytes(what: str) -> ModuleType:
    """``bitsandbytes``, imported; ImportError naming ``what`` needs it and how to install it otherwise."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: {QLORA_INSTALL_HINT}") from exc
    return bitsandbytes


def _loaded_bnb() -> Optional[ModuleType]:
    """bitsandbytes if something already imported it (it must have, for a model to hold its layers)."""
    return sys.modules.get("bitsandbytes")


def bnb_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for a ``Linear8bitLt``, else None."""
    bnb = _loaded_bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` holds a non-floating-point (quantized, packed) weight, of any library."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    """The per-row scales ``[out]`` of a ``Linear8bitLt``: on the weight until its first forward, then on its state."""
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    if scb is None:
        raise ValueError(f"{type(layer).__name__} has an int8 weight but no scales (SCB): was it quantized (moved to a device)?")
    return scb


@torch.no_grad()
def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of the bitsandbytes layer ``layer`` as a float ``[out, in]`` tensor (a new tensor; the layer is unchanged).

    4-bit: in the dtype it was quantized from (``quant_state.dtype``); 8-bit: fp32.
    """
    bnb = require_bitsandbytes("dequantizing a quantized layer")
    kind = bnb_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU weight for its AVX512-BF16 kernel at the first inference-mode
            # forward; dequantize_4bit does not read that layout, its matmul does: W = (I Wᵀ)ᵀ.
            eye = torch.eye(layer.in_features, dtype=state.dtype, device=weight.device)
            return bnb.matmul_4bit(eye, weight, quant_state=state).t().contiguous()
        return bnb.functional.dequantize_4bit(weight.data, state)
    if kind == "8bit":
        return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(layer).to(weight.device)).float()
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt layer")


@torch.no_grad()
def requantize_weight(layer: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """A new quantized weight for ``layer`` from ``dense [out, in]``, with the settings of its current one.

    4-bit keeps quant type, block size, double quantisation, storage type and the float dtype it
    dequantizes to; 8-bit keeps ``has_fp16_weights``. The layer itself is not changed.
    """
    bnb = require_bitsandbytes("requantizing a quantized layer")
    kind = bnb_kind(layer)
    weight = layer.weight
    if kind == "4bit":
        state = weight.quant_state
        dtype = getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) else state.dtype
        settings: dict[str, Any] = dict(quant_type=weight.quant_type, blocksize=weight.blocksize,
                                        compress_statistics=weight.compress_statistics, quant_storage=weight.quant_storage,
                                        module=getattr(weight, "module", None))
        # quantization happens in .to(device) (bitsandbytes' own path), from a CPU copy like peft's merge
        return bnb.nn.Params4bit(dense.to(dtype or dense.dtype).cpu(), requires_grad=False, **settings).to(weight.device)
    if kind == "8bit":
        return bnb.nn.Int8Params(dense.cpu(), requires_grad=False, has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt layer")


def _loaded_in_kbit(model: nn.Module) -> bool:
    """transformers' flags for a bitsandbytes-quantized model, or (for hand-built models) any bitsandbytes layer."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    return any(bnb_kind(m) is not None for m in model.modules())


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None
) -> nn.Module:
    """Get a quantized base model ready for adapter training, as peft's function of the same name does.

    * freezes every parameter (the adapter injected afterwards is what trains);
    * casts every fp16 / bf16 parameter that is not a 4-bit weight (norms, embeddings, the head) to fp32;
    * for a quantized model with ``use_gradient_checkpointing``: unless ``use_reentrant=False`` is
      asked for, makes the input embeddings' output require grad (reentrant checkpointing only
      backpropagates into segments whose input requires grad, and the frozen embeddings' does not),
      then turns on the model's gradient checkpointing with ``gradient_checkpointing_kwargs``.

    Args:
        model: a transformers model (or any ``nn.Module``; checkpointing needs a transformers model).
        use_gradient_checkpointing: enable activation checkpointing (quantized models only, as in peft).
        gradient_checkpointing_kwargs: passed on, e.g. ``{"use_reentrant": False}``.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: checkpointing asked of a model without ``gradient_checkpointing_enable``
            (nothing is changed then).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    checkpoint = use_gradient_checkpointing and _loaded_in_kbit(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if checkpoint and enable is None:
        raise TypeError(
            f"use_gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable), but "
            f"{type(model).__name__} has none: pass use_gradient_checkpointing=False and checkpoint it yourself"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if checkpoint:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if getattr(model, "activation_checkpointing_enable", None) is not None:
            # transformers 5's name (gradient_checkpointing_enable is its deprecated alias)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
