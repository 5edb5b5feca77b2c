"""Several named adapters in one model: add, switch, delete, train some, serve a mixed batch.

A model adapted once carries one adapter (named ``"default"`` unless given a name). More of the
same method can be added; one is *active* (applied by forward, and the one that trains). LoRA
adapters all live in the model at once — each LoRA layer holds one branch per adapter — so a
batch can mix them row by row (:func:`mixed_batch`). Methods whose layers hold a single adapter
(bottleneck adapters, IA3, prefix / prompt tuning, BitFit) keep the inactive ones *parked*:
their tensors are set aside and put back, as new Parameter objects, when they become active.

Each adapter has its own copy of its ``modules_to_save`` (e.g. a classification head): the model
holds the active adapter's; switching swaps the values in place.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from lightning_peft.tuners.config import PeftConfig
from lightning_peft.tuners.injection import (
    _ADAPTED_BY_ATTR,
    _ADAPTERS_ATTR,
    _TUNER_ATTR,
    AdapterSet,
    ModuleReplacementTuner,
    Tuner,
    _modules_to_save_parameter_names,
    adapter_state_dict,
    check_adapter_name,
    get_adapter_set,
    load_adapter_state_dict,
    tuner_class,
)
from lightning_peft.tuners.lora_branch import LoraBranch, MixedBatch

__all__ = [
    "adapter_names",
    "active_adapter",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "set_trainable_adapters",
    "mixed_batch",
    "merge_adapters",
    "remove_all_adapters",
]


def _require_set(model: nn.Module) -> AdapterSet:
    adapters = get_adapter_set(model)
    if adapters is None:
        raise ValueError(f"{type(model).__name__} has no adapter yet; create the first with get_peft_model() / inject_adapter()")
    return adapters


def _require_name(adapters: AdapterSet, name: str) -> Tuner:
    if name not in adapters.tuners:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapters.tuners)}")
    return adapters.tuners[name]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s adapters, in the order they were added."""
    return list(_require_set(model).tuners)


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter forward applies and training trains."""
    _require_set(model)
    return model.__dict__[_TUNER_ATTR].adapter_name


def _apply_trainable(model: nn.Module, adapters: AdapterSet, trainable: Sequence[str]) -> None:
    """Exactly the tensors of the adapters ``trainable`` require grad (those not in inference mode)."""
    names: set[str] = set()
    for name in trainable:
        tuner = adapters.tuners[name]
        if name not in adapters.parked and not tuner.config.inference_mode:
            names |= set(tuner.saved_parameter_names(model))
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name in names)


def _modules_to_save_state(model: nn.Module, tuner: Tuner) -> dict[str, torch.Tensor]:
    names = set(_modules_to_save_parameter_names(model, tuner.config))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def _write_parameters(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _park(model: nn.Module, adapters: AdapterSet, tuner: Tuner) -> None:
    """Take the active single-live-adapter method's adapter out of the model, keeping its tensors."""
    state = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    if tuner.can_merge and getattr(tuner, "merged", False):  # BitFit: the model holds the trained biases; give back the originals
        tuner.unmerge(model)
    tuner.detach(model, restore_requires_grad=False)
    adapters.parked[tuner.adapter_name] = state


def _unpark(model: nn.Module, adapters: AdapterSet, name: str, advance_rng_on_forward: bool) -> None:
    tuner = adapters.tuners[name]
    tuner.attach(model, advance_rng_on_forward=advance_rng_on_forward)
    load_adapter_state_dict(model, adapters.parked.pop(name))
    model.__dict__[_ADAPTERS_ATTR] = adapters


def add_adapter(model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Add a named adapter of the same method as ``model``'s; the active adapter stays active (and the only trainable one).

    Raises:
        ValueError: a name in use or unusable, a method other than the model's, a config that does not fit the
            model. The model is left as it was.
    """
    adapters = _require_set(model)
    check_adapter_name(adapter_name)
    if adapter_name in adapters.tuners:
        raise ValueError(f"this model already has an adapter named {adapter_name!r}; delete_adapter({adapter_name!r}) first, or choose another name")
    config.validate()
    active = model.__dict__[_TUNER_ATTR]
    if config.peft_type != active.config.peft_type:
        raise ValueError(
            f"cannot add a {config.peft_type} adapter to a model whose adapters are {active.config.peft_type}: the adapters of "
            "one model share a method (as in peft). Adapt a separate copy of the base model for the other method"
        )
    tuner = tuner_class(config)(config, adapter_name)
    if tuner.holds_several_adapters:
        _modules_to_save_parameter_names(model, config)  # raises before anything changes
        tuner.requires_grad_before = active.requires_grad_before
        tuner.inject(model)
        tuner.set_active(model, False)
        for module in model.modules():
            module.__dict__.setdefault(_ADAPTED_BY_ATTR, config.peft_type)
        adapters.tuners[adapter_name] = tuner
        adapters.saved_modules[adapter_name] = _modules_to_save_state(model, tuner)
    else:
        advance = active.rng_hook is not None
        _park(model, adapters, active)
        try:
            tuner.attach(model, advance_rng_on_forward=False)
            state = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
            if tuner.can_merge and getattr(tuner, "merged", False):
                tuner.unmerge(model)
            tuner.detach(model, restore_requires_grad=False)
        finally:
            _unpark(model, adapters, active.adapter_name, advance)
        adapters.tuners[adapter_name] = tuner
        adapters.parked[adapter_name] = state
        adapters.saved_modules[adapter_name] = _modules_to_save_state(model, tuner)
    _apply_trainable(model, adapters, [active.adapter_name])


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter: forward applies it, and it alone requires grad.

    A merged adapter is unmerged first (with a warning), as in peft.
    """
    adapters = _require_set(model)
    new = _require_name(adapters, adapter_name)
    old = model.__dict__[_TUNER_ATTR]
    if new is not old:
        if old.can_merge and _is_merged(model, old):
            warnings.warn(f"adapter {old.adapter_name!r} is merged into the base weights; unmerging it before switching adapters")
            old.unmerge(model)
        adapters.saved_modules[old.adapter_name] = _modules_to_save_state(model, old)
        if adapter_name in adapters.parked:
            advance = old.rng_hook is not None
            _park(model, adapters, old)
            _unpark(model, adapters, adapter_name, advance)
        else:
            old.set_active(model, False)
            new.set_active(model, True)
            new.rng_hook, old.rng_hook = old.rng_hook, None  # the root's hook advances every adapter
            model.__dict__[_TUNER_ATTR] = new
        _write_parameters(model, adapters.saved_modules.pop(adapter_name, {}))
    _apply_trainable(model, adapters, [adapter_name])


def _is_merged(model: nn.Module, tuner: Tuner) -> bool:
    if isinstance(tuner, ModuleReplacementTuner):
        return any(tuner.adapter_name in getattr(layer, "merged_adapters", ()) for _, layer in tuner.layers(model))
    return False


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an inactive adapter (its layers give their base back where no other adapter is left).

    Raises:
        ValueError: an unknown name, or the active adapter (switch with :func:`set_adapter` first).
    """
    adapters = _require_set(model)
    tuner = _require_name(adapters, adapter_name)
    if tuner is model.__dict__[_TUNER_ATTR]:
        others = [n for n in adapters.tuners if n != adapter_name]
        hint = f"set_adapter({others[0]!r}) first" if others else "use unload() to remove the last adapter"
        raise ValueError(f"cannot delete the active adapter {adapter_name!r}: {hint}")
    if adapter_name not in adapters.parked:
        tuner.unload(model)
    adapters.parked.pop(adapter_name, None)
    adapters.saved_modules.pop(adapter_name, None)
    del adapters.tuners[adapter_name]


def set_trainable_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly the adapters ``names`` trainable (e.g. all that a mixed training batch uses); peft's
    ``set_requires_grad``. Adapters that are not in the model now (parked) cannot train."""
    adapters = _require_set(model)
    for name in names:
        _require_name(adapters, name)
        if name in adapters.parked:
            raise ValueError(f"adapter {name!r} ({adapters.tuners[name].config.peft_type}) is not active; only the active adapter "
                             "of this method can train: set_adapter() it")
    _apply_trainable(model, adapters, list(names))


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the context, row ``i`` of every batch goes through adapter ``names[i]`` (``"__base__"``: none).

    Rows need not be sorted. Works in training too: each row's loss reaches only its adapter (make the
    adapters trainable with :func:`set_trainable_adapters`).

    Raises:
        ValueError: an unknown name, a method whose layers cannot mix adapters, merged adapters, an adapter
            with its own ``modules_to_save`` (rows would need different copies of the module).
    """
    adapters = _require_set(model)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name per batch row, got {names!r}")
    unknown = sorted({n for n in names if n != MixedBatch.BASE and n not in adapters.tuners})
    if unknown:
        raise ValueError(f"adapter_names names unknown adapters {unknown}; this model has {sorted(adapters.tuners)} (and '__base__' for none)")
    active = model.__dict__[_TUNER_ATTR]
    if not active.holds_several_adapters:
        raise ValueError(
            f"mixed batches (adapter_names=...) need LoRA adapters, whose layers hold several adapters at once; "
            f"{active.config.peft_type} adapters run one at a time: set_adapter() between batches"
        )
    own_modules = sorted({n for n in names if n != MixedBatch.BASE and adapters.tuners[n].config.modules_to_save})
    if own_modules:
        raise ValueError(
            f"adapter(s) {own_modules} train their own modules_to_save, which rows of one batch cannot share; run their "
            "rows in separate batches with set_adapter()"
        )
    merged = [t.adapter_name for t in adapters.live() if _is_merged(model, t)]
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the base weights; unmerge_adapter() before a mixed batch")
    layers = [m for m in model.modules() if isinstance(m, LoraBranch)]
    mixed = MixedBatch(list(names))
    for layer in layers:
        layer.mixed_batch = mixed
    try:
        yield
    finally:
        for layer in layers:
            layer.mixed_batch = None


def merge_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Fold the adapters ``names`` into the base weights (all checked before any weight changes).

    Raises:
        ValueError / TypeError: unknown names, parked adapters or a method that cannot merge; nothing is merged then.
    """
    adapters = _require_set(model)
    tuners = [_require_name(adapters, n) for n in names]
    parked = [t.adapter_name for t in tuners if t.adapter_name in adapters.parked]
    if parked:
        raise ValueError(f"only LoRA adapters merge several at once; set_adapter() the {tuners[0].config.peft_type} adapter "
                         f"{parked[0]!r} and merge it alone")
    if len(tuners) > 1 and any(isinstance(layer, _dora_types()) for t in tuners for _, layer in t.layers(model)):  # type: ignore[attr-defined]
        raise ValueError("DoRA adapters merge one at a time (their magnitude rescales the whole weight): merge one adapter")
    for tuner in tuners:
        if not tuner.can_merge:
            tuner.merge(model)  # raises the method's TypeError
    if len(tuners) > 1:  # a bad adapter (NaN / inf) refuses before any weight changes (one tuner checks its own)
        for layer_tuner in tuners:
            for _, layer in layer_tuner.layers(model):  # type: ignore[attr-defined]
                if layer_tuner.adapter_name not in layer.merged_adapters:
                    layer.check_mergeable(layer_tuner.adapter_name)
    for tuner in tuners:
        tuner.merge(model)


def _dora_types() -> tuple[type, ...]:
    from lightning_peft.tuners.dora import DoraLinear

    return (DoraLinear,)


def remove_all_adapters(model: nn.Module, *, restore_requires_grad: bool = False) -> nn.Module:
    """Take every adapter out of ``model`` (merged weights stay merged); the base layers come back. Returns ``model``."""
    adapters = _require_set(model)
    active = model.__dict__[_TUNER_ATTR]
    for tuner in adapters.live():
        if tuner is not active:
            tuner.unload(model)
    active.detach(model, restore_requires_grad=restore_requires_grad)
    return model
