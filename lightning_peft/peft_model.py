"""``get_peft_model`` and ``PeftModel``: HF peft's user-facing API over the injection mechanism."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from lightning_peft.serialization import load_adapter, save_adapters
from lightning_peft.tuners.config import PeftConfig
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, Tuner, get_adapter_set, get_tuner, inject_adapter
from lightning_peft.tuners.named_adapters import (
    add_adapter,
    delete_adapter,
    merge_adapters,
    mixed_batch,
    remove_all_adapters,
    set_adapter,
    set_trainable_adapters,
)

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
    """A base model with one or more named adapters; passes through forward, generate and attributes.

    Build it with :func:`get_peft_model` (or :meth:`from_pretrained`). The wrapped model is
    ``peft_model.base_model``, so state dict keys are the base model's with a ``base_model.``
    prefix. ``peft_config`` maps adapter names to their configs, as in peft.
    """

    def __init__(self, model: nn.Module, peft_config: Optional[PeftConfig] = None) -> None:
        super().__init__()
        if get_tuner(model) is None:
            raise ValueError("PeftModel wraps a model that already has an adapter: use get_peft_model(model, config)")
        self.base_model = model

    @property
    def tuner(self) -> Tuner:
        """The active adapter's tuner."""
        tuner = get_tuner(self.base_model)
        if tuner is None:
            raise RuntimeError("the adapter was removed from this model (unload / merge_and_unload)")
        return tuner

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Every adapter's config, by name."""
        adapters = get_adapter_set(self.base_model)
        if adapters is None:
            raise RuntimeError("the adapters were removed from this model (unload / merge_and_unload)")
        return {name: tuner.config for name, tuner in adapters.tuners.items()}

    # ---- running

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapter; ``adapter_names`` (one per batch row, ``"__base__"``
        for none) runs each row through its own LoRA adapter, in eval and in training."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with mixed_batch(self.base_model, adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` (transformers models) with the active adapter, or per row with ``adapter_names``."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with mixed_batch(self.base_model, adapter_names):
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

    # ---- named adapters

    @property
    def active_adapter(self) -> str:
        """The adapter forward applies and training trains."""
        return self.tuner.adapter_name

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add an adapter of the same method under a new name (not made active; see :func:`~lightning_peft.tuners.named_adapters.add_adapter`)."""
        add_adapter(self.base_model, adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` active: forward applies it and it alone trains."""
        set_adapter(self.base_model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that is not the active one."""
        delete_adapter(self.base_model, adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """peft's name: make the adapters ``adapter_names`` trainable (all others frozen), e.g. for a mixed training batch;
        ``requires_grad=False`` freezes them instead."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if requires_grad:
            set_trainable_adapters(self.base_model, names)
        else:
            for name, param in self.named_parameters():
                if any(f".{n}." in name or name.endswith(f".{n}") for n in names):
                    param.requires_grad_(False)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **_: Any) -> None:
        """Add the adapter stored in ``model_id`` (ours or HF peft's) under ``adapter_name`` (not made active)."""
        load_adapter(self.base_model, model_id, is_trainable=is_trainable, adapter_name=adapter_name, add=True)

    # ---- merging and unloading

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold the adapter(s) (default: the active one) into the base weights (undo with :meth:`unmerge_adapter`)."""
        merge_adapters(self.base_model, list(adapter_names) if adapter_names is not None else [self.active_adapter])

    def unmerge_adapter(self) -> None:
        """Subtract merged adapters from the base weights again."""
        if not self.tuner.can_merge:
            self.tuner.unmerge(self.base_model)  # raises the method's TypeError
        self._unmerge_all()

    def _unmerge_all(self) -> None:
        adapters = get_adapter_set(self.base_model)
        assert adapters is not None
        for tuner in reversed(adapters.live()):
            if tuner.can_merge:
                tuner.unmerge(self.base_model)

    def merge_and_unload(self, adapter_names: Optional[Sequence[str]] = None, **_: Any) -> nn.Module:
        """Merge the adapter(s) (default: the active one), then return the base model with plain layers back in place
        and no adapter left."""
        self.merge_adapter(adapter_names)
        return remove_all_adapters(self.base_model)

    def unload(self) -> nn.Module:
        """Return the base model with its original layers and weights (every adapter discarded)."""
        self._unmerge_all()
        return remove_all_adapters(self.base_model)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes as the base model alone."""
        with self.tuner.disabled(self.base_model):
            yield

    # ---- saving and loading

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the active adapter's tensors, keyed relative to the base model."""
        from lightning_peft.tuners.injection import adapter_state_dict

        return adapter_state_dict(self.base_model)

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **_: Any) -> None:
        """Write each adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` in HF peft's format and layout:
        ``"default"`` in ``save_directory``, any other in ``save_directory/<name>``.

        ``selected_adapters``: which adapters (default: all). ``path_initial_model_for_weight_conversion``: save a PiSSA /
        OLoRA adapter as the equivalent plain LoRA of the original weights (see :func:`~lightning_peft.serialization.save_adapter`).
        """
        save_adapters(self.base_model, save_directory, selected_adapters,
                      path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                        **_: Any) -> "PeftModel":
        """Load an adapter directory (ours or HF peft's) onto a fresh base ``model``, named ``adapter_name``."""
        load_adapter(model, model_id, is_trainable=is_trainable, adapter_name=adapter_name)
        return cls(model)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> PeftModel:
    """Inject ``peft_config``'s adapter into ``model`` (in place), freeze the rest, and wrap it.

    Args:
        model: a transformers model or any ``nn.Module``.
        peft_config: e.g. ``LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])``.
        adapter_name: the adapter's name (more are added with :meth:`PeftModel.add_adapter`).

    Returns:
        The wrapped model. Errors leave ``model`` unchanged.
    """
    inject_adapter(model, peft_config, adapter_name=adapter_name)
    return PeftModel(model)
