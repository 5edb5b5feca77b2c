"""The one injection mechanism every method shares: find modules, swap them atomically, freeze, undo.

A method plugs in by subclassing :class:`Tuner` (layer-replacing methods through
:class:`~lightning_peft.tuners.layers.LayerReplacementTuner`). Everything else — refusing a second
injection, freezing the base, unfreezing what the method declares, ``modules_to_save``, leaving the
model untouched when anything fails, the adapter state dict, the dropout RNG offsets — lives here once.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.tuners.config import PeftConfig
from lightning_peft.tuners.targets import match_module_names

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
    "is_sharded",
    "AdapterSet",
    "get_adapter_set",
    "DEFAULT_ADAPTER",
]

_TUNER_ATTR = "_lightning_peft_tuner"
_ADAPTED_BY_ATTR = "_lightning_peft_adapted_by"  # on every submodule of an adapted model: the method's peft_type
PEFT_PREFIX = "base_model.model."  # HF peft's key prefix: PeftModel.base_model (tuner).model
DEFAULT_ADAPTER = "default"  # peft's name for an adapter that was not given one
_ADAPTERS_ATTR = "_lightning_peft_adapters"  # on the root: the AdapterSet of a model with several named adapters
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
    #: Those of ``adapter_buffer_names`` that are ``int64 [2]`` (seed, offset) dropout keys.
    dropout_rng_buffer_names: ClassVar[tuple[str, ...]] = ()

    def restore_base(self) -> nn.Module:
        """Return the base module to put back in this layer's place (with any merged weights)."""
        raise NotImplementedError

    # Layers holding several named adapters (LoRA) name their tensors per adapter; single-adapter
    # layers have the fixed names above.
    def adapter_parameter_names_of(self, adapter: str) -> list[str]:
        """Names (relative to the layer) of adapter ``adapter``'s parameters."""
        return list(self.adapter_parameter_names)

    def adapter_buffer_names_of(self, adapter: str) -> list[str]:
        """Names (relative to the layer) of adapter ``adapter``'s buffers."""
        return list(self.adapter_buffer_names)

    def dropout_rng_buffers_of(self, adapter: str) -> list[torch.Tensor]:
        """Adapter ``adapter``'s ``int64 [2]`` (seed, offset) dropout keys."""
        return [getattr(self, b) for b in self.dropout_rng_buffer_names]


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

    Contract: :meth:`inject` either adapts the model's structure completely or raises and leaves
    it exactly as it was; :meth:`unload` undoes it. Freezing, ``modules_to_save``, the RNG hook
    and the bookkeeping are done by :meth:`attach` / :meth:`detach`, the same for every method.
    Parameter names are relative to the root module passed to :func:`inject_adapter`.
    """

    can_merge: ClassVar[bool] = False  # whether merge()/unmerge() are implemented
    #: Whether the method's layers hold several named adapters at once (LoRA); else inactive ones are parked.
    holds_several_adapters: ClassVar[bool] = False

    def __init__(self, config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        self.config = config
        #: The adapter's name (peft's ``adapter_name``); a model can carry several adapters of one method.
        self.adapter_name = adapter_name
        #: ``requires_grad`` of every parameter before injection (``remove_adapter(restore_requires_grad=True)``).
        self.requires_grad_before: dict[str, bool] = {}
        #: The root's forward pre-hook that advances the dropout RNG, when the tuner advances it itself.
        self.rng_hook: Optional[RemovableHandle] = None

    # ---- what a method implements

    @abstractmethod
    def inject(self, model: nn.Module) -> None:
        """Adapt ``model``'s structure in place (atomically)."""

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

    def set_active(self, model: nn.Module, active: bool) -> None:
        """Methods with :attr:`holds_several_adapters`: make this adapter the one its layers apply (``active``), or not."""
        raise TypeError(f"{self.config.peft_type} layers hold one adapter; switching parks the others")

    def fit_to_peft_state(self, model: nn.Module, peft_state: dict[str, torch.Tensor]) -> None:
        """Before loading a peft file's tensors: adjust the adapter's structure to what the file holds.

        Default: nothing. Called once by :func:`~lightning_peft.serialization.load_adapter`.
        """

    def to_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our adapter state dict -> HF peft's file keys (``base_model.model.`` prefix). Keys only."""
        return {PEFT_PREFIX + k: v for k, v in state.items()}

    def from_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_peft_state_dict`. Keys only."""
        return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}

    # ---- shared by every method

    def saved_parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter the adapter trains and saves: the adapter's, its extra trainables, ``modules_to_save``."""
        names = set(self.adapter_parameter_names(model)) | set(self.extra_trainable_parameter_names(model))
        return sorted(names | set(_modules_to_save_parameter_names(model, self.config)))

    def attach(self, model: nn.Module, *, advance_rng_on_forward: bool) -> None:
        """Inject, freeze all but :meth:`saved_parameter_names`, and record the tuner on ``model``.

        Either all of it happens or ``model`` is left exactly as it was.
        """
        self.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        _modules_to_save_parameter_names(model, self.config)  # raises before inject, which may change base weights
        self.inject(model)
        try:
            trainable = set() if self.config.inference_mode else set(self.saved_parameter_names(model))
            for name, param in model.named_parameters():
                param.requires_grad_(name in trainable)
            self.set_rng_advance_on_forward(model, advance_rng_on_forward)
            model.__dict__[_TUNER_ATTR] = self
            # Mark every submodule too: the tuner lives on the root, so without the mark a second method
            # injected into a *submodule* (e.g. the HF model inside an adapted LightningModule) would not
            # see that an enclosing module is already adapted by a method that adds no layers (BitFit).
            for module in model.modules():
                module.__dict__[_ADAPTED_BY_ATTR] = self.config.peft_type
        except BaseException:
            self.detach(model, restore_requires_grad=True)
            raise

    def detach(self, model: nn.Module, *, restore_requires_grad: bool) -> None:
        """Undo :meth:`attach`: base modules back, hook and marks removed (merged weights stay merged)."""
        self.unload(model)
        if restore_requires_grad:
            for name, param in model.named_parameters():
                param.requires_grad_(self.requires_grad_before.get(name, param.requires_grad))
        self.set_rng_advance_on_forward(model, False)
        model.__dict__.pop(_TUNER_ATTR, None)
        model.__dict__.pop(_ADAPTERS_ATTR, None)
        for module in model.modules():
            module.__dict__.pop(_ADAPTED_BY_ATTR, None)

    def set_rng_advance_on_forward(self, model: nn.Module, enabled: bool) -> None:
        """Advance the dropout RNG at each training-mode forward of ``model`` (a pre-hook on it), or stop.

        A training loop that advances it itself once per step (the Lightning callback) turns this off.
        """
        if self.rng_hook is not None:
            self.rng_hook.remove()
            self.rng_hook = None
        if enabled:
            self.rng_hook = model.register_forward_pre_hook(_advance_rng_hook)


class ModuleReplacementTuner(Tuner):
    """A tuner that swaps target modules for :class:`AdapterLayer` instances."""

    def __init__(self, config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(config, adapter_name)
        self.layer_names: list[str] = []  # where the adapter layers are, set by inject()

    @abstractmethod
    def build_replacements(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """Validate targets and build their replacement layers, without touching ``model``.

        Raises:
            ValueError: no target matched, or a target has a type the method cannot adapt.
        """

    def inject(self, model: nn.Module) -> None:
        replacements = self.build_replacements(model)  # may raise: nothing changed yet
        self.inject_replacements(model, replacements)
        self.layer_names = sorted(replacements)

    @staticmethod
    def inject_replacements(model: nn.Module, replacements: dict[str, AdapterLayer]) -> None:
        """Put each layer in place of the module of its name (plain setattr swaps: these do not fail)."""
        for name, layer in replacements.items():
            layer.train(model.get_submodule(name).training)  # an eval-mode model stays dropout-free
            _set_submodule(model, name, layer)

    def unload(self, model: nn.Module) -> None:
        for name in self.layer_names:
            layer = model.get_submodule(name)
            if isinstance(layer, AdapterLayer):
                _set_submodule(model, name, layer.restore_base())

    def layers(self, model: nn.Module) -> list[tuple[str, AdapterLayer]]:
        """The injected layers, by name."""
        return [(name, model.get_submodule(name)) for name in self.layer_names]

    def adapter_parameter_names(self, model: nn.Module) -> list[str]:
        return [f"{name}.{p}" for name, layer in self.layers(model) for p in layer.adapter_parameter_names_of(self.adapter_name)]

    def adapter_buffer_names(self, model: nn.Module) -> list[str]:
        return [f"{name}.{b}" for name, layer in self.layers(model) for b in layer.adapter_buffer_names_of(self.adapter_name)]

    def dropout_rng_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        return [buf for _, layer in self.layers(model) for buf in layer.dropout_rng_buffers_of(self.adapter_name)]

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


def get_tuner(model: nn.Module) -> Optional[Tuner]:
    """The tuner of ``model``'s active adapter, or None."""
    return model.__dict__.get(_TUNER_ATTR)


class AdapterSet:
    """The named adapters of one model (kept on its root), one tuner each; which one is active.

    LoRA adapters all live in the model at once (their layers hold one branch per adapter). Methods
    whose layers hold a single adapter keep only the active one in the model; the others are
    *parked*: their tensors are kept here and put back when they become active.
    """

    def __init__(self, tuners: dict[str, Tuner]) -> None:
        self.tuners = tuners
        #: Adapter state (``adapter_state_dict``) of parked adapters, by name.
        self.parked: dict[str, dict[str, torch.Tensor]] = {}
        #: ``modules_to_save`` parameters of inactive adapters, by name (each adapter trains its own copy).
        self.saved_modules: dict[str, dict[str, torch.Tensor]] = {}

    def live(self) -> list[Tuner]:
        """The tuners whose adapters are in the model now."""
        return [t for name, t in self.tuners.items() if name not in self.parked]


def get_adapter_set(model: nn.Module) -> Optional[AdapterSet]:
    """The named adapters of ``model`` (one, ``"default"`` or the given name, unless more were added), or None."""
    tuner = get_tuner(model)
    if tuner is None:
        return None
    adapters = model.__dict__.get(_ADAPTERS_ATTR)
    if adapters is None or tuner.adapter_name not in adapters.tuners:
        adapters = model.__dict__[_ADAPTERS_ATTR] = AdapterSet({tuner.adapter_name: tuner})
    return adapters


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


def inject_adapter(model: nn.Module, config: PeftConfig, *, adapter_name: str = DEFAULT_ADAPTER, advance_rng_on_forward: bool = True) -> Tuner:
    """Adapt ``model`` in place with the method ``config`` describes and freeze everything else.

    Afterwards exactly the adapter parameters, ``modules_to_save`` and the method's extra
    trainables (e.g. LoRA biases) require grad (none with ``config.inference_mode``).

    Args:
        model: any ``nn.Module`` (a transformers model, a plain module, a LightningModule's net).
        config: a method config, e.g. ``LoraConfig``.
        adapter_name: the adapter's name (more can be added with
            :func:`~lightning_peft.tuners.named_adapters.add_adapter`).
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
    if is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is already sharded (fully_shard / DTensor parameters): an adapter injected now would "
            "mix plain and sharded tensors. Inject before sharding: in a LightningModule call "
            "lightning_peft.lightning.apply_peft(self) in configure_model before fully_shard (or build the model in "
            "__init__ and let PEFTCallback inject it), or call get_peft_model / inject_adapter before fully_shard"
        )
    check_adapter_name(adapter_name)
    tuner = tuner_class(config)(config, adapter_name)
    tuner.attach(model, advance_rng_on_forward=advance_rng_on_forward)
    return tuner


def tuner_class(config: PeftConfig) -> type[Tuner]:
    """The tuner class of ``config``'s method."""
    if config.peft_type not in _TUNER_CLASSES:
        raise ValueError(f"no tuner registered for peft_type {config.peft_type!r}")
    return _TUNER_CLASSES[config.peft_type]


def check_adapter_name(name: object) -> None:
    """Raise ValueError unless ``name`` can name an adapter (it becomes part of parameter names)."""
    if not isinstance(name, str) or not name or "." in name or name == "__base__" or not name.isprintable() or " " in name:
        raise ValueError(
            f"adapter name {name!r} cannot be used: it must be a non-empty string without '.' or spaces (it becomes part "
            "of parameter names), and '__base__' is reserved for rows without an adapter in adapter_names"
        )


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (or tensor parallelism) already sharded ``module`` or a submodule of it."""
    from torch.distributed.tensor import DTensor

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        FSDPModule = ()  # type: ignore[assignment,misc]
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(isinstance(p, DTensor) for p in module.parameters())


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
    _require_tuner(model).detach(model, restore_requires_grad=restore_requires_grad)
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
    adapters = get_adapter_set(model)
    if adapters is None:
        return
    for tuner in adapters.live():  # every adapter: a mixed batch trains several at once
        for buf in tuner.dropout_rng_buffers(model):
            buf[1:].add_(1)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what the adapter adds or trains: adapter params, modules_to_save, trained biases, RNG buffers.

    Keys are the model's own state-dict keys (relative to the root passed to ``inject_adapter``).
    """
    tuner = _require_tuner(model)
    wanted = set(tuner.saved_parameter_names(model)) | set(tuner.adapter_buffer_names(model))
    return {k: v for k, v in model.state_dict().items() if k in wanted}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into an adapted model, checking keys and shapes first.

    Raises:
        ValueError: naming missing / unexpected keys or mismatching shapes; nothing is copied then.
    """
    tuner = _require_tuner(model)
    own = model.state_dict()
    expected = set(tuner.saved_parameter_names(model)) | set(tuner.adapter_buffer_names(model))
    optional = set(tuner.adapter_buffer_names(model))  # RNG state may be absent (e.g. peft files)
    state = with_adapter_names(state, expected)
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


#: Per-adapter containers of LoRA layers: ``<layer>.<container>.<adapter>...`` since layers hold several adapters.
_PER_ADAPTER = r"lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_rng"


def with_adapter_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with keys of checkpoints written before layers held named adapters (``q_proj.lora_A.weight``)
    renamed to the ``expected`` keys they stand for (``q_proj.lora_A.default.weight``); other keys unchanged."""
    legacy = {re.sub(rf"\.({_PER_ADAPTER})\.[^.]+(?=\.|$)", r".\1", k): k for k in expected}
    return {legacy[k] if k not in expected and k in legacy and legacy[k] not in state else k: v for k, v in state.items()}


def _few(items: list[str], limit: int = 6) -> str:
    return "[" + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") + "]"
