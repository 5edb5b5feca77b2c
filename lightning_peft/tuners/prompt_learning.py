"""What prefix tuning and prompt tuning share: config fields, finding the model, hooks, peft's file keys.

Both methods change a model's *inputs* instead of its layers. A virtual-token table (an
:class:`~lightning_peft.tuners.injection.AdapterModule`) is attached to the transformers model and
a forward pre-hook (:func:`register_forward_kwargs_hook` with :func:`rewrite_call`) rewrites
each call's arguments, so the adapter works identically through ``PeftModel``, after in-place
injection into a LightningModule (the Lightning callback), and inside ``generate()``. The hook
reads everything it needs from the module it is registered on, so deep copies stay independent.

HF peft saves these methods as one tensor, ``prompt_embeddings`` (the virtual tokens as the model
consumes them), plus ``base_model.<name>`` for ``modules_to_save``.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.tuners.config import PeftConfig
from lightning_peft.tuners.injection import DEFAULT_ADAPTER, AdapterModule, Tuner
from lightning_peft.tuners.model_arch import find_transformers_model

__all__ = [
    "PromptLearningConfig",
    "PromptLearningTuner",
    "VirtualTokens",
    "ENCODER_ATTR",
    "extend_attention_mask",
    "batch_size_of",
    "pop_cache",
    "cache_length",
    "rewrite_call",
    "register_forward_kwargs_hook",
    "remove_forward_kwargs_hook",
]

#: Attribute name of the virtual-token module on the hooked model (peft's name for it).
ENCODER_ATTR = "prompt_encoder"
_PEFT_EMBEDDINGS_KEY = "prompt_embeddings"  # the one tensor peft saves for prompt-learning methods
_PEFT_BASE_PREFIX = "base_model."  # peft's prefix for modules_to_save of prompt-learning methods


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of peft's ``PromptLearningConfig``; the model-shape ones default to the model's.

    Args:
        num_virtual_tokens: how many virtual tokens (> 0).
        token_dim: width of one virtual token (prompt tuning: the embedding size; prefix tuning:
            the key/value width ``head_dim * num_key_value_heads``). None: taken from the model.
        num_transformer_submodules: 1 (decoder-only or encoder-only models; encoder-decoder
            models are not supported).
        num_attention_heads: attention (prefix tuning: key/value) heads. None: from the model.
        num_layers: transformer layers. None: from the model.
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(
                f"{name}.num_virtual_tokens must be a positive integer (how many virtual tokens to learn), "
                f"got {n!r}; typical values are 10-30"
            )
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules!r}: only decoder-only and "
                "encoder-only models (1 submodule) are supported; leave it unset"
            )

    def resolve(self, field_name: str, value: int, what: str) -> int:
        """The model's ``value`` for a model-shape field, checked against a user-set one.

        The config itself is left as the user wrote it (None stays None, as peft reads None as
        "from the model"), so a config compares equal before and after injection and can be reused.
        """
        current = getattr(self, field_name)
        if current is not None and current != value:
            raise ValueError(
                f"{type(self).__name__}.{field_name}={current} does not fit this model, whose {what} is {value}; "
                f"leave {field_name}=None to take it from the model"
            )
        return value


class VirtualTokens(AdapterModule):
    """Base of the virtual-token tables attached to the model as ``prompt_encoder``.

    Holds, besides its parameters, what the forward hook needs: ``num_virtual_tokens``, ``active``
    and ``cache_kwarg`` (``"cache"`` / ``"past_key_values"`` / None: how the hooked module takes a KV cache).
    """

    def __init__(self, num_virtual_tokens: int, cache_kwarg: Optional[str]) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.cache_kwarg = cache_kwarg
        self.active = True  # False inside disable_adapter(): the hook passes calls through unchanged

    @abstractmethod
    def peft_embeddings(self) -> torch.Tensor:
        """peft's ``prompt_embeddings``: the virtual tokens as the model consumes them, ``[P, width]``."""

    @abstractmethod
    def load_peft_embeddings_key(self) -> str:
        """Our key (relative to this module) that peft's ``prompt_embeddings`` loads into."""

    @abstractmethod
    def rewrite_inputs(self, module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
        """The method's part of a call's rewrite (see :func:`rewrite_call`).

        Args:
            module: the hooked module; kwargs: its call's arguments, the attention mask already
                extended and the KV cache popped; cache: that cache (None when the call had none).
        """


def extend_attention_mask(mask: Optional[torch.Tensor], num_virtual: int, model_name: str) -> Optional[torch.Tensor]:
    """Prepend ``num_virtual`` attended positions to the key axis of an attention mask.

    Args:
        mask: None, ``[B, L]`` (1 = attend; padding masks), or ``[B, 1, Q, L]`` (bool: True = attend;
            float: additive, 0 = attend).
        num_virtual: positions to prepend.
        model_name: for the error message.

    Returns:
        ``[B, P + L]`` or ``[B, 1, Q, P + L]`` (None stays None: everything is attended anyway).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        raise TypeError(
            f"attention_mask for {model_name} with virtual tokens must be a [batch, seq] (or [batch, 1, q, k]) tensor, "
            f"got {type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}; pass the tokenizer's 2-D mask"
        )
    shape = (*mask.shape[:-1], num_virtual)
    if mask.dtype == torch.bool:
        fill = torch.ones(shape, dtype=torch.bool, device=mask.device)
    elif mask.dim() == 4 and mask.is_floating_point():
        fill = torch.zeros(shape, dtype=mask.dtype, device=mask.device)  # additive mask: 0 = attend
    else:
        fill = torch.ones(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat((fill, mask), dim=-1)


def batch_size_of(kwargs: dict[str, Any], model_name: str) -> int:
    """The batch size of a call, from ``input_ids [B, T]`` or ``inputs_embeds [B, T, D]``."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"{model_name} was called without input_ids or inputs_embeds; virtual tokens need one of them")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the KV cache from ``kwargs`` whichever name the caller used (``cache`` / ``past_key_values``)."""
    cache = None
    for key in ("cache", "past_key_values"):
        value = kwargs.pop(key, None)
        if value is not None:
            cache = value
    return cache


def cache_length(cache: Any) -> int:
    """Tokens already in ``cache`` (0 for None / an empty Cache)."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    raise TypeError(
        f"virtual-token methods need a transformers Cache object (e.g. DynamicCache) as the KV cache, got "
        f"{type(cache).__name__}; legacy tuple caches are not supported"
    )


def rewrite_call(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward pre-hook body of both methods: what they share, then the table's own part.

    Reads everything from ``module`` (its ``prompt_encoder``), so deep copies of a model stay independent.
    """
    encoder: VirtualTokens = getattr(module, ENCODER_ATTR)
    if not encoder.active:
        return kwargs
    cache = pop_cache(kwargs)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = extend_attention_mask(kwargs["attention_mask"], encoder.num_virtual_tokens, type(module).__name__)
    return encoder.rewrite_inputs(module, kwargs, cache)


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


class PromptLearningTuner(Tuner):
    """Attach a :class:`VirtualTokens` module and a kwargs hook; undo both on unload.

    Subclasses say which module to hook (:meth:`hook_target`) and build the table
    (:meth:`build_encoder`), whose ``rewrite_inputs`` does the method's part of each call.
    """

    config: PromptLearningConfig

    def __init__(self, config: PromptLearningConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(config, adapter_name)
        self.target_name = ""  # the hooked module (owner of the virtual-token table), relative to the root

    @abstractmethod
    def hook_target(self, hf_model: nn.Module) -> nn.Module:
        """The module whose calls are rewritten (and which owns ``prompt_encoder``). Raises TypeError
        naming the model class when the method cannot hook it."""

    @abstractmethod
    def build_encoder(self, hf_model: nn.Module, target: nn.Module) -> VirtualTokens:
        """Validate against the model and build the table, without touching the model."""

    def _locate(self, model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
        """``(transformers model, hooked module, hooked module's name relative to the root)``."""
        hf_name, hf_model = find_transformers_model(model, self.config.method_name)
        if getattr(hf_model.config, "is_encoder_decoder", False):
            raise TypeError(
                f"{self.config.method_name} supports decoder-only and encoder-only models; {type(hf_model).__name__} is an "
                "encoder-decoder model. Use LoRA or bottleneck adapters for it"
            )
        target = self.hook_target(hf_model)
        target_name = next(n for n, m in hf_model.named_modules() if m is target)
        return hf_model, target, ".".join(p for p in (hf_name, target_name) if p)

    def inject(self, model: nn.Module) -> None:
        hf_model, target, name = self._locate(model)  # may raise: nothing changed yet
        if ENCODER_ATTR in target._modules or hasattr(target, ENCODER_ATTR):
            raise ValueError(f"{type(target).__name__} already has an attribute {ENCODER_ATTR!r}; cannot attach {self.config.method_name}")
        encoder = self.build_encoder(hf_model, target)  # may raise: nothing changed yet
        target.add_module(ENCODER_ATTR, encoder)  # from here on nothing fails
        register_forward_kwargs_hook(target, rewrite_call)
        self.target_name = name

    def _target(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.target_name) if self.target_name else model

    def encoder(self, model: nn.Module) -> VirtualTokens:
        return getattr(self._target(model), ENCODER_ATTR)

    def _encoder_prefix(self) -> str:
        return f"{self.target_name}.{ENCODER_ATTR}." if self.target_name else f"{ENCODER_ATTR}."

    def unload(self, model: nn.Module) -> None:
        target = self._target(model)
        remove_forward_kwargs_hook(target, rewrite_call)
        if ENCODER_ATTR in target._modules:
            del target._modules[ENCODER_ATTR]

    def adapter_parameter_names(self, model: nn.Module) -> list[str]:
        return [self._encoder_prefix() + n for n, _ in self.encoder(model).named_parameters()]

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Inside the context calls reach the base model unchanged (no virtual tokens)."""
        encoder = self.encoder(model)
        try:
            encoder.active = False
            yield
        finally:
            encoder.active = True

    # ---- peft's file format: one tensor "prompt_embeddings" + "base_model.<key>" for modules_to_save ----

    def _hf_prefix(self, model: nn.Module) -> str:
        hf_name, _ = find_transformers_model(model, self.config.method_name)
        return hf_name + "." if hf_name else ""

    def to_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder_prefix, hf_prefix = self._encoder_prefix(), self._hf_prefix(model)
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith(encoder_prefix):
                continue
            out[_PEFT_BASE_PREFIX + key[len(hf_prefix):] if key.startswith(hf_prefix) else _PEFT_BASE_PREFIX + key] = value
        with torch.no_grad():
            out[_PEFT_EMBEDDINGS_KEY] = self.encoder(model).peft_embeddings().detach()
        return out

    def from_peft_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf_prefix = self._hf_prefix(model)
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == _PEFT_EMBEDDINGS_KEY:
                out[self._encoder_prefix() + self.encoder(model).load_peft_embeddings_key()] = value
            elif key.startswith("base_model.model."):  # tolerate the LoRA-style prefix too
                out[hf_prefix + key[len("base_model.model."):]] = value
            elif key.startswith(_PEFT_BASE_PREFIX):
                out[hf_prefix + key[len(_PEFT_BASE_PREFIX):]] = value
            else:
                out[key] = value
        return out

