"""The one injection mechanism every method shares: find modules, swap them atomically, freeze, undo.

A method plugs in by subclassing :class:`Tuner`. Module-replacing methods (LoRA, bottleneck
adapters) subclass :class:`ModuleReplacementTuner` and only say which modules they target and
what to put there. Everything else — refusing a second injection, freezing the base, unfreezing
what the method declares, ``modules_to_save``, leaving the model untouched when anything fails,
the adapter state dict — lives here once.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.tuners.config import PeftConfig

__all__ = [
    "AdapterLayer",
    "AdapterModule",
    "Tuner",
    "ModuleReplacementTuner",
    "inject_adapter",
    "get_tuner",
    "remove_adapter",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "advance_dropout_rng",
    "match_module_names",
    "describe_available_modules",
    "register_forward_kwargs_hook",
    "remove_forward_kwargs_hook",
]

_TUNER_ATTR = "_lightning_peft_tuner"
_ADAPTED_BY_ATTR = "_lightning_peft_adapted_by"  # on every submodule of an adapted model: the method's peft_type
PEFT_PREFIX = "base_model.model."  # HF peft's key prefix: PeftModel.base_model (tuner).model
_TUNER_CLASSES: dict[str, type["Tuner"]] = {}
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")


class AdapterLayer(nn.Module):
    """A module a tuner puts in place of a base module.

    Subclasses declare, structurally rather than by name matching, which of their parameters
    and buffers belong to the adapter (``adapter_parameter_names`` / ``adapter_buffer_names``,
    relative to the layer), and how to give back the base module (:meth:`restore_base`).
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ()
    adapter_buffer_names: ClassVar[tuple[str, ...]] = ()

    def restore_base(self) -> nn.Module:
        """Return the base module to put back in this layer's place (with any merged weights)."""
        raise NotImplementedError


class AdapterModule(nn.Module):
    """A module a tuner adds *beside* the base modules instead of in place of one.

    For example the virtual-token tables of prefix and prompt tuning. Like :class:`AdapterLayer`
    it marks a model as adapted, so :func:`inject_adapter` refuses to stack a second method on it.
    """


def register_tuner(peft_type: str) -> Callable[[type["Tuner"]], type["Tuner"]]:
    """Class decorator: the tuner class that implements configs of ``peft_type``."""

    def wrap(cls: type["Tuner"]) -> type["Tuner"]:
        _TUNER_CLASSES[peft_type] = cls
        return cls

    return wrap


class Tuner(ABC):
    """One method's way of adapting a model. Built from a config; stored on the model it adapted.

    Contract: :meth:`inject` either adapts the model completely or raises and leaves it exactly as
    it was; :meth:`unload` undoes :meth:`inject`. Parameter names are relative to the root
    module passed to :func:`inject_adapter`.
    """

    can_merge: ClassVar[bool] = False  # whether merge()/unmerge() are implemented

    def __init__(self, config: PeftConfig) -> None:
        self.config = config

    @abstractmethod
    def inject(self, model: nn.Module) -> None:
        """Adapt ``model`` in place (atomically)."""

    @abstractmethod
    def unload(self, model: nn.Module) -> None:
        """Undo :meth:`inject`, keeping whatever was merged into base weights."""

    @abstractmethod
    def adapter_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters this method trains (the adapter itself)."""

    def adapter_buffer_names(self, model: nn.Module) -> list[str]:
        """Names of buffers that belong to the adapter (saved with it), e.g. dropout RNG state."""
        return []

    def extra_trainable_parameter_names(self, model: nn.Module) -> list[str]:
        """Base parameters the method also trains (e.g. LoRA's ``bias="all"``)."""
        return []

    def dropout_rng_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        """``int64 [2]`` (seed, offset) buffers whose offset advances once per training step."""
        return []

    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights (methods that can)."""
        raise TypeError(f"{self.config.peft_type} adapters cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`."""
        raise TypeError(f"{self.config.peft_type} adapters cannot be merged into the base weights")

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the context the model computes as the base model alone."""
        raise TypeError(f"{self.config.peft_type} adapters cannot be disabled")
        yield

    def to_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our adapter state dict -> HF peft's file keys (``base_model.model.`` prefix)."""
        return {PEFT_PREFIX + k: v for k, v in state.items()}

    def from_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_peft_state_dict`."""
        return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}


class ModuleReplacementTuner(Tuner):
    """A tuner that swaps target modules for :class:`AdapterLayer` instances."""

    @abstractmethod
    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """Validate targets and build their replacement layers, without touching ``model``.

        Raises:
            ValueError: no target matched, or a target has a type the method cannot adapt.
        """

    def inject(self, model: nn.Module) -> None:
        replacements = self.build_replacements(model)  # may raise: nothing changed yet
        for name, layer in replacements.items():  # plain setattr swaps: these do not fail
            layer.train(model.get_submodule(name).training)  # an eval-mode model stays dropout-free
            _set_submodule(model, name, layer)
        self.layer_names = sorted(replacements)

    def unload(self, model: nn.Module) -> None:
        for name in self.layer_names:
            layer = model.get_submodule(name)
            if isinstance(layer, AdapterLayer):
                _set_submodule(model, name, layer.restore_base())

    def layers(self, model: nn.Module) -> list[tuple[str, AdapterLayer]]:
        """The injected layers, by name."""
        return [(name, model.get_submodule(name)) for name in self.layer_names]

    def adapter_parameter_names(self, model: nn.Module) -> list[str]:
        return [f"{name}.{p}" for name, layer in self.layers(model) for p in layer.adapter_parameter_names]

    def adapter_buffer_names(self, model: nn.Module) -> list[str]:
        return [f"{name}.{b}" for name, layer in self.layers(model) for b in layer.adapter_buffer_names]

    def to_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # peft wraps the base layer ("<layer>.base_layer.bias"); our layers own weight/bias directly.
        owned = {f"{name}.{p}": f"{name}.base_layer.{p}" for name in self.layer_names for p in ("weight", "bias")}
        return super().to_peft_state_dict(model, {owned.get(k, k): v for k, v in state.items()})

    def from_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = super().from_peft_state_dict(model, state)
        return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def match_module_names(
    names: Iterable[str], targets: Union[str, list[str], None]
) -> list[str]:
    """peft's target semantics: a string is a regex that must match the whole name; a list holds
    names or suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if targets is None:
        return []
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def describe_available_modules(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,), limit: int = 12) -> str:
    """A short list of module names a user could target, for error messages."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return shown or "(none)"


def get_tuner(model: nn.Module) -> Optional[Tuner]:
    """The tuner that adapted ``model``, or None."""
    return model.__dict__.get(_TUNER_ATTR)


def _modules_to_save_parameter_names(model: nn.Module, config: PeftConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    module_names = [n for n, _ in model.named_modules() if n]
    matched = match_module_names(module_names, list(config.modules_to_save))
    missing = [t for t in config.modules_to_save if not match_module_names(module_names, [t])]
    if matched:
        # peft writes modules_to_save=["classifier", "score"] for every SEQ_CLS adapter (one of the two
        # names exists in any given model), so the other one missing is expected in its files.
        missing = [t for t in missing if t not in _PEFT_CLASSIFIER_NAMES]
    if missing:
        raise ValueError(
            f"modules_to_save {missing} match no module of {type(model).__name__}; "
            f"top-level modules are: {', '.join(n for n, _ in model.named_children())}"
        )
    prefixes = tuple(m + "." for m in matched)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def inject_adapter(model: nn.Module, config: PeftConfig, *, advance_rng_on_forward: bool = True) -> Tuner:
    """Adapt ``model`` in place with the method ``config`` describes and freeze everything else.

    Afterwards exactly the adapter parameters, ``modules_to_save`` and the method's extra
    trainables (e.g. LoRA biases) require grad (none with ``config.inference_mode``).

    Args:
        model: any ``nn.Module`` (a transformers model, a plain module, a LightningModule's net).
        config: a method config, e.g. ``LoraConfig``.
        advance_rng_on_forward: advance the adapters' dropout RNG offset at each training-mode
            forward of ``model`` (a pre-hook on the root). Pass False when the caller advances
            it itself once per step (the Lightning callback does).

    Returns:
        The tuner, also reachable as ``get_tuner(model)``.

    Raises:
        ValueError / TypeError: bad config, no target, unsupported target, already adapted. The
            model is left exactly as it was.
    """
    config.validate()
    existing = _existing_adaptation(model)
    if existing is not None:
        raise ValueError(
            f"{type(model).__name__} already has adapter layers injected ({existing}); lightning_peft adapts a "
            f"model with one method at a time and does not combine {config.peft_type} with it. Call unload() or "
            "merge_and_unload() on it first, or start from a fresh base model"
        )
    if config.peft_type not in _TUNER_CLASSES:
        raise ValueError(f"no tuner registered for peft_type {config.peft_type!r}")
    tuner = _TUNER_CLASSES[config.peft_type](config)
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    tuner.inject(model)
    try:
        saved = set(tuner.adapter_parameter_names(model))
        saved |= set(tuner.extra_trainable_parameter_names(model))
        saved |= set(_modules_to_save_parameter_names(model, config))
        for name, param in model.named_parameters():
            param.requires_grad_(name in saved and not config.inference_mode)
        tuner.saved_parameter_names = sorted(saved)
        tuner.requires_grad_before = requires_grad_before
        if advance_rng_on_forward:
            tuner.rng_hook = model.register_forward_pre_hook(_advance_rng_hook)
        model.__dict__[_TUNER_ATTR] = tuner
        # Mark every submodule too: the tuner lives on the root, so without the mark a second method
        # injected into a *submodule* (e.g. the HF model inside an adapted LightningModule) would not
        # see that an enclosing module is already adapted by a method that adds no layers (BitFit).
        for module in model.modules():
            module.__dict__[_ADAPTED_BY_ATTR] = config.peft_type
    except BaseException:
        tuner.unload(model)
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad_before.get(name, param.requires_grad))
        raise
    return tuner


def _existing_adaptation(model: nn.Module) -> Optional[str]:
    """What already adapts ``model`` or one of its submodules (a tuner, adapter layers), or None."""
    for name, module in model.named_modules():
        tuner = get_tuner(module)
        if tuner is not None:
            return f"{tuner.config.peft_type} on {name or 'the model itself'}"
    if _ADAPTED_BY_ATTR in model.__dict__:
        return f"{model.__dict__[_ADAPTED_BY_ATTR]} on a module that encloses it"
    for name, module in model.named_modules():
        if isinstance(module, (AdapterLayer, AdapterModule)):
            return f"{type(module).__name__} at {name}"
    return None


def remove_adapter(model: nn.Module, *, restore_requires_grad: bool = False) -> nn.Module:
    """Undo :func:`inject_adapter`: base modules back in place, the tuner forgotten.

    Merged weights stay merged. Base parameters stay frozen unless ``restore_requires_grad``,
    which puts back the flags they had before injection. Returns ``model``.
    """
    tuner = _require_tuner(model)
    tuner.unload(model)
    if restore_requires_grad:
        for name, param in model.named_parameters():
            param.requires_grad_(tuner.requires_grad_before.get(name, param.requires_grad))
    hook = getattr(tuner, "rng_hook", None)
    if hook is not None:
        hook.remove()
    del model.__dict__[_TUNER_ATTR]
    for module in model.modules():
        module.__dict__.pop(_ADAPTED_BY_ATTR, None)
    return model


def _require_tuner(model: nn.Module) -> Tuner:
    tuner = get_tuner(model)
    if tuner is None:
        raise ValueError(f"{type(model).__name__} has no adapter injected; call get_peft_model() or inject_adapter() first")
    return tuner


def _advance_rng_hook(model: nn.Module, _args) -> None:
    if model.training:
        advance_dropout_rng(model)


@torch.no_grad()
def advance_dropout_rng(model: nn.Module) -> None:
    """Move every adapter dropout RNG to its next offset (call once per training step).

    Masks are a pure function of (per-layer seed, offset), and the buffers travel in adapter
    checkpoints, so a resumed run draws exactly the masks the uninterrupted run would have.
    Recomputation under activation checkpointing does not advance them, so it replays the mask.
    """
    tuner = get_tuner(model)
    if tuner is None:
        return
    for buf in tuner.dropout_rng_buffers(model):
        buf[1:].add_(1)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what the adapter adds or trains: adapter params, modules_to_save, trained biases, RNG buffers.

    Keys are the model's own state-dict keys (relative to the root passed to ``inject_adapter``).
    """
    tuner = _require_tuner(model)
    wanted = set(tuner.saved_parameter_names) | set(tuner.adapter_buffer_names(model))
    return {k: v for k, v in model.state_dict().items() if k in wanted}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into an adapted model, checking keys and shapes first.

    Raises:
        ValueError: naming missing / unexpected keys or mismatching shapes; nothing is copied then.
    """
    tuner = _require_tuner(model)
    own = model.state_dict()
    expected = set(tuner.saved_parameter_names) | set(tuner.adapter_buffer_names(model))
    optional = set(tuner.adapter_buffer_names(model))  # RNG state may be absent (e.g. peft files)
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(set(state) & expected) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append("shape mismatches " + _few(shapes))
    if problems:
        raise ValueError(
            "the adapter state does not fit this model: " + "; ".join(problems)
            + ". Inject the same config (method, target_modules, r) into the same base model the adapter was trained on."
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def _few(items: list[str], limit: int = 6) -> str:
    return "[" + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") + "]"


_KWARGS_HOOK_ATTR = "_lightning_peft_rewrite"


def register_forward_kwargs_hook(
    module: nn.Module, rewrite: Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
) -> RemovableHandle:
    """Let ``rewrite(module, kwargs) -> kwargs`` edit every call's arguments before ``module.forward``.

    For methods that change a model's *inputs* rather than its layers (prompt tuning prepends
    virtual-token embeddings, prefix tuning passes a pre-filled KV cache), so that they work the
    same whether the model is called through ``PeftModel``, directly after in-place injection
    (the Lightning callback), or from ``generate()``. Positional arguments are bound to their
    parameter names first, so ``rewrite`` always sees one dict (``input_ids``, ``attention_mask``, ...).

    ``rewrite`` should be a module-level function that reads its state from ``module`` (not a
    closure over a tuner): a ``copy.deepcopy`` of the model keeps the hook function but copies the
    modules, so state read from ``module`` stays the copy's own.

    Args:
        module: the module whose calls are rewritten.
        rewrite: ``(module, kwargs) -> kwargs``; may return the dict it was given, edited.

    Returns:
        The hook handle; :func:`remove_forward_kwargs_hook` also removes it without the handle.
    """
    params = inspect.signature(module.forward).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) > len(positional):
            raise TypeError(f"{type(mod).__name__}.forward() takes {len(positional)} positional arguments but {len(args)} were given")
        bound = dict(zip(positional, args))
        clash = sorted(set(bound) & set(kwargs))
        if clash:
            raise TypeError(f"{type(mod).__name__}.forward() got multiple values for {clash}")
        bound.update(kwargs)
        return (), rewrite(mod, bound)

    setattr(hook, _KWARGS_HOOK_ATTR, rewrite)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def remove_forward_kwargs_hook(module: nn.Module, rewrite: Callable[..., Any]) -> None:
    """Remove the hooks :func:`register_forward_kwargs_hook` registered on ``module`` with ``rewrite``."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, _KWARGS_HOOK_ATTR, None) is rewrite:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
