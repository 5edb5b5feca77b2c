"""LoRA+ (Hayou et al., 2024): a larger learning rate for LoRA's B matrices than for A, as HF peft builds it.

``create_loraplus_optimizer`` has peft's name, arguments and parameter groups, so code that
imported it from ``peft.optimizers`` only changes the import. The groups are found
structurally (the ``lora_B`` of each :class:`~lightning_peft.tuners.lora.LoraLinear`), not by
name matching; every other trainable parameter follows peft's rule (one-dimensional ones with B,
the rest with A).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters weight decay leaves alone (peft's rule): biases and everything inside a LayerNorm."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def loraplus_param_groups(
    model: nn.Module, *, lr: float, loraplus_lr_ratio: float, loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """The optimizer parameter groups of LoRA+: ``[A and the rest, embedding LoRA, B with decay, B without decay]``.

    Args:
        model: a model with LoRA injected (a ``PeftModel`` or an adapted module); only parameters
            that require grad are grouped.
        lr: learning rate of A (and of 2-D parameters that are not B, e.g. a trained head's weight).
        loraplus_lr_ratio: B's learning rate is ``lr * loraplus_lr_ratio`` (> 0; the paper uses 2-16,
            peft's docs suggest >= 1).
        loraplus_weight_decay: weight decay of every group except "B without decay".
        loraplus_lr_embedding: learning rate of LoRA on embedding layers.

    Raises:
        ValueError: a ratio <= 0, or no trainable LoRA B matrix in ``model``.
    """
    from lightning_peft.tuners.lora import LoraLinear  # the optimizer helper sits above the tuners

    if not (isinstance(loraplus_lr_ratio, (int, float)) and loraplus_lr_ratio > 0):
        raise ValueError(f"loraplus_lr_ratio must be > 0 (B's learning rate over A's; 16 is common), got {loraplus_lr_ratio!r}")
    b_params = {id(p) for m in model.modules() if isinstance(m, LoraLinear) for p in m.lora_B.parameters()}  # every adapter's B
    embedding_params: set[int] = set()  # LoRA on embeddings keeps peft's separate group (none yet)
    no_decay = _no_decay_names(model)
    a_group, embedding, b_decay, b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params:
            embedding.append(param)
        elif id(param) in b_params or param.ndim == 1:
            (b_no_decay if name in no_decay else b_decay).append(param)
        else:
            a_group.append(param)
    if not any(id(p) in b_params for p in b_decay + b_no_decay):
        raise ValueError(
            f"{type(model).__name__} has no trainable LoRA B matrices, so LoRA+ has nothing to speed up: inject LoRA first "
            "(get_peft_model(model, LoraConfig(...))), or build a plain optimizer"
        )
    return [
        {"params": a_group, "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": embedding, "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": b_decay, "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """peft's LoRA+ optimizer: ``optimizer_cls`` over :func:`loraplus_param_groups`.

    Example::

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)

    Args:
        model: a model with LoRA injected.
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: A's learning rate; loraplus_lr_ratio: B's over A's (> 0).
        kwargs: ``loraplus_weight_decay`` (default 0), ``loraplus_lr_embedding`` (default 1e-6), and
            the optimizer's own keyword arguments.
    """
    groups = loraplus_param_groups(
        model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=kwargs.pop("loraplus_weight_decay", 0.0),
        loraplus_lr_embedding=kwargs.pop("loraplus_lr_embedding", 1e-6),
    )
    return optimizer_cls(groups, lr=lr, **kwargs)
