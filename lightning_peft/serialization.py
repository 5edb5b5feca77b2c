"""Reading and writing adapters in HF peft's directory format, and crash-safe file writes.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys look like ``base_model.model.<module path>.lora_A.weight``. Files are written to a temporary
name in the same directory and moved into place with ``os.replace``, so a crash mid-write never
leaves a truncated file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.tuners.config import PeftConfig, config_from_dict
from lightning_peft.tuners.injection import (
    DEFAULT_ADAPTER,
    adapter_state_dict,
    get_adapter_set,
    get_tuner,
    inject_adapter,
    load_adapter_state_dict,
)
from lightning_peft.tuners.layers import EmbeddingAdapterLayer

__all__ = ["save_adapter", "save_adapters", "load_adapter", "adapter_made_active", "read_adapter_config", "atomic_write", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    The previous file at ``path`` stays intact until the new one is complete and flushed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600 files; give it the mode a plain open() would
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_file_mode() -> int:
    """``0o666`` minus the process umask: the permissions ``open(path, "w")`` gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_adapter(
    model: nn.Module,
    directory: str,
    config: PeftConfig | None = None,
    *,
    path_initial_model_for_weight_conversion: Optional[str] = None,
) -> None:
    """Write the adapter of an adapted ``model`` as a peft adapter directory.

    Args:
        model: the module passed to ``inject_adapter`` (or a ``PeftModel``'s ``base_model``).
        directory: created if needed.
        config: defaults to the config the model was adapted with.
        path_initial_model_for_weight_conversion: peft's switch for PiSSA / OLoRA adapters (which
            changed the base weights): when given, the file holds the equivalent ordinary LoRA of the
            *original* weights (rank 2r). The starting factors are kept in memory, so unlike peft
            nothing needs to have been saved at that path (it is not read or written).

    Raises:
        ValueError: a ``pissa_niter_<k>`` adapter saved without conversion (its randomized
            initialisation cannot be repeated by whoever loads it), or conversion asked of another adapter.
    """
    tuner = get_tuner(model)
    if tuner is None:
        raise ValueError(f"{type(model).__name__} has no adapter to save; adapt it with get_peft_model() first")
    config = config or tuner.config
    state = {k: v for k, v in adapter_state_dict(model).items() if k not in set(tuner.adapter_buffer_names(model))}
    init = getattr(config, "init_lora_weights", None)
    if path_initial_model_for_weight_conversion is not None:
        convert = getattr(tuner, "as_plain_lora", None)
        if convert is None:
            raise ValueError(f"path_initial_model_for_weight_conversion converts PiSSA / OLoRA LoRA adapters, not {config.peft_type}")
        state, config = convert(model, state)
    elif isinstance(init, str) and init.startswith("pissa_niter_"):
        raise ValueError(
            f"an adapter with init_lora_weights={init!r} only fits the residual weights its randomized SVD left in this "
            "model, which a loader cannot recompute: save it with path_initial_model_for_weight_conversion=<any path> "
            "(a plain LoRA of the original weights), or train with init_lora_weights='pissa'"
        )
    peft_state = {k: v.detach().contiguous().cpu() for k, v in tuner.to_peft_state_dict(model, state).items()}
    config_dict: dict[str, Any] = dict(config.to_dict(), inference_mode=True)
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS_NAME), lambda p: save_file(peft_state, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, ADAPTER_CONFIG_NAME), lambda p: _write_json(p, config_dict))


@contextmanager
def adapter_made_active(model: nn.Module, adapter_name: Optional[str]) -> Iterator[None]:
    """Within the context ``adapter_name`` is ``model``'s active adapter; afterwards the previous one is again,
    with the same parameters requiring grad."""
    from lightning_peft.tuners.named_adapters import set_adapter

    tuner = get_tuner(model)
    if adapter_name is None or tuner is None or tuner.adapter_name == adapter_name:
        yield
        return
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = tuner.adapter_name
    set_adapter(model, adapter_name)
    try:
        yield
    finally:
        set_adapter(model, previous)
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))


def save_adapters(
    model: nn.Module,
    directory: str,
    selected_adapters: Optional[Sequence[str]] = None,
    *,
    path_initial_model_for_weight_conversion: Optional[str] = None,
) -> None:
    """Write ``model``'s adapters in peft's layout: ``"default"`` in ``directory``, any other in ``directory/<name>``.

    Args:
        selected_adapters: which adapters (default: all of them).
        path_initial_model_for_weight_conversion: see :func:`save_adapter`.

    Raises:
        ValueError: an unknown adapter name (nothing is written then).
    """
    adapters = get_adapter_set(model)
    if adapters is None:
        raise ValueError(f"{type(model).__name__} has no adapter to save; adapt it with get_peft_model() first")
    names = list(adapters.tuners) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in adapters.tuners]
    if unknown:
        raise ValueError(f"selected_adapters names unknown adapters {unknown}; this model has {list(adapters.tuners)}")
    for name in names:
        target = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
        with adapter_made_active(model, name):
            save_adapter(model, target, path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


def read_adapter_config(directory: str) -> PeftConfig:
    """The config of a peft adapter directory (written by us or by HF peft)."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: not an adapter directory (expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    with open(path, encoding="utf-8") as fh:
        return config_from_dict(json.load(fh))


def load_adapter(model: nn.Module, directory: str, *, is_trainable: bool = False, adapter_name: str = DEFAULT_ADAPTER,
                 add: bool = False) -> PeftConfig:
    """Inject the adapter stored in ``directory`` into ``model`` and load its weights.

    Args:
        model: a fresh base model (no adapter yet), or with ``add`` one that has adapters of the same method.
        directory: a peft adapter directory.
        is_trainable: keep the adapter trainable (default: inference only, nothing requires grad).
        adapter_name: the name it gets in ``model``.
        add: add it beside ``model``'s adapters (not made active) instead of adapting a fresh model.

    Returns:
        The config that was injected. If the weights do not fit, the model is left as it was.
    """
    from lightning_peft.tuners.injection import check_adapter_name, remove_adapter
    from lightning_peft.tuners.named_adapters import add_adapter, delete_adapter

    check_adapter_name(adapter_name)
    config = read_adapter_config(directory)
    config.inference_mode = not is_trainable
    raw = load_file(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    if add:
        add_adapter(model, adapter_name, config)  # raises for a name in use, another method, a misfit: model unchanged
        try:
            with adapter_made_active(model, adapter_name):
                _load_weights(model, raw)
        except BaseException:
            delete_adapter(model, adapter_name)
            raise
        return config
    tuner = inject_adapter(model, config, adapter_name=adapter_name)
    try:
        _load_weights(model, raw)
    except BaseException:
        remove_adapter(model, restore_requires_grad=True)
        raise
    return config


def _load_weights(model: nn.Module, raw: dict[str, torch.Tensor]) -> None:
    """A peft file's tensors into the active adapter (and the base embedding tables peft saves beside it)."""
    tuner = get_tuner(model)
    assert tuner is not None
    tuner.fit_to_peft_state(model, raw)
    state = {k: v.to(_param_device(model)) for k, v in tuner.from_peft_state_dict(model, raw).items()}
    embeddings = _embedding_weights_saved_with_adapter(model, state)
    load_adapter_state_dict(model, {k: v for k, v in state.items() if k not in embeddings})
    with torch.no_grad():
        own = model.state_dict()
        for key, value in embeddings.items():
            own[key].copy_(value)


def _embedding_weights_saved_with_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base embedding / output-layer weights in a peft file (peft saves them beside the adapter when the
    vocabulary was resized, ``save_embedding_layers``): loaded into the base as they are."""
    tuner = get_tuner(model)
    assert tuner is not None
    adapter_keys = set(tuner.saved_parameter_names(model)) | set(tuner.adapter_buffer_names(model))
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    tables = {name for name, m in model.named_modules() if isinstance(m, (nn.Embedding, EmbeddingAdapterLayer)) or m is output}
    own = model.state_dict()
    return {k: v for k, v in state.items()
            if k not in adapter_keys and k.rpartition(".")[0] in tables and k in own and own[k].shape == v.shape}


def _param_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
