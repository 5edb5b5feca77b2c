"""``get_peft_model`` and ``PeftModel``: HF peft's user-facing API over the injection mechanism."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lightning_peft.serialization import load_adapter, save_adapter
from lightning_peft.tuners.config import PeftConfig
from lightning_peft.tuners.injection import Tuner, get_tuner, inject_adapter, remove_adapter

__all__ = ["PeftModel", "get_peft_model", "count_parameters", "format_trainable_parameters"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, shared parameters counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """peft's exact line: ``trainable params: 65,536 || all params: 16,912,896 || trainable%: 0.3875``."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


class PeftModel(nn.Module):
    """A base model with an adapter injected; passes through forward, generate and attributes.

    Build it with :func:`get_peft_model`. The wrapped model is ``peft_model.base_model``, so state
    dict keys are the base model's with a ``base_model.`` prefix.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig) -> None:
        super().__init__()
        if get_tuner(model) is None:
            raise ValueError("PeftModel wraps a model that already has an adapter: use get_peft_model(model, config)")
        self.base_model = model
        self.peft_config = peft_config

    @property
    def tuner(self) -> Tuner:
        tuner = get_tuner(self.base_model)
        if tuner is None:
            raise RuntimeError("the adapter was removed from this model (unload / merge_and_unload)")
        return tuner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` (transformers models), with the adapter active."""
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` like peft's."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: ... || all params: ... || trainable%: ...``."""
        print(format_trainable_parameters(self))

    def merge_adapter(self) -> None:
        """Fold the adapter into the base weights (still undoable with :meth:`unmerge_adapter`)."""
        self.tuner.merge(self.base_model)

    def unmerge_adapter(self) -> None:
        """Subtract a merged adapter from the base weights again."""
        self.tuner.unmerge(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """Merge, then return the base model with plain layers back in place (no adapter left)."""
        self.merge_adapter()
        return remove_adapter(self.base_model)

    def unload(self) -> nn.Module:
        """Return the base model with its original layers and weights (adapter discarded)."""
        if self.tuner.can_merge:
            self.tuner.unmerge(self.base_model)
        return remove_adapter(self.base_model)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes as the base model alone."""
        with self.tuner.disabled(self.base_model):
            yield

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, keyed relative to the base model."""
        from lightning_peft.tuners.injection import adapter_state_dict

        return adapter_state_dict(self.base_model)

    def save_pretrained(self, save_directory: str, path_initial_model_for_weight_conversion: Optional[str] = None, **_: Any) -> None:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in HF peft's format.

        ``path_initial_model_for_weight_conversion``: save a PiSSA / OLoRA adapter as the equivalent plain
        LoRA of the original weights (see :func:`~lightning_peft.serialization.save_adapter`).
        """
        save_adapter(self.base_model, save_directory, self.peft_config,
                     path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, is_trainable: bool = False, **_: Any) -> "PeftModel":
        """Load an adapter directory (ours or HF peft's) onto a fresh base ``model``."""
        config = load_adapter(model, model_id, is_trainable=is_trainable)
        return cls(model, config)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: Optional[str] = None) -> PeftModel:
    """Inject ``peft_config``'s adapter into ``model`` (in place), freeze the rest, and wrap it.

    Args:
        model: a transformers model or any ``nn.Module``.
        peft_config: e.g. ``LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])``.
        adapter_name: accepted for peft compatibility; one adapter per model is supported.

    Returns:
        The wrapped model. Errors leave ``model`` unchanged.
    """
    if adapter_name not in (None, "default"):
        raise ValueError(f"only one adapter per model is supported; adapter_name must be 'default', got {adapter_name!r}")
    inject_adapter(model, peft_config)
    return PeftModel(model, peft_config)
