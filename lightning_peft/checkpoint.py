"""Adapter-only Lightning checkpoints: what they record, and loading one without a Trainer.

A checkpoint written with :class:`~lightning_peft.PEFTCallback` holds, in ``checkpoint["state_dict"]``,
only the adapter's tensors (adapter weights, ``modules_to_save``, trained biases, dropout-RNG
buffers), keyed as in the LightningModule's own state dict. Next to it, under
``checkpoint["lightning_peft"]`` (also in weights-only checkpoints), it records what is needed to
rebuild the adapter on a fresh base model::

    {"format_version": 1,
     "peft_config": {...},        # config.to_dict(): plain types (torch>=2.6 loads weights_only)
     "model_attr": "model",       # where the adapted model sits in the LightningModule (None: all of it)
     "adapter_keys": [...]}       # the LightningModule state-dict keys of the adapter

Under FSDP2 (``ModelParallelStrategy``) the same checkpoint can also be a sharded directory
(``save_distributed_checkpoint=True``): ``torch.distributed.checkpoint`` shard files holding
``{"state_dict": <adapter>, "optimizer_0": <its optimizer state>}``, ``.metadata``, and
``meta.pt`` with everything else, the record included. :func:`read_sharded_checkpoint` reads
such a directory into the one-dict form without a process group.

:func:`load_peft_checkpoint` turns either form plus a freshly built base model (or the
LightningModule that holds one) into the adapted model.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Optional, TypeVar, Union

from pathlib import Path

import torch
from torch import nn

from lightning_peft.tuners.config import PeftConfig, config_from_dict
from lightning_peft.serialization import adapter_made_active
from lightning_peft.tuners.injection import (
    DEFAULT_ADAPTER,
    get_adapter_set,
    get_tuner,
    inject_adapter,
    load_adapter_state_dict,
    remove_adapter,
)
from lightning_peft.tuners.named_adapters import add_adapter, delete_adapter

__all__ = [
    "CHECKPOINT_METADATA_KEY",
    "CHECKPOINT_FORMAT_VERSION",
    "build_checkpoint_metadata",
    "read_checkpoint_metadata",
    "resolve_model_attr",
    "same_config",
    "load_peft_checkpoint",
    "is_sharded_checkpoint",
    "read_sharded_checkpoint",
    "check_sharded_checkpoint_complete",
    "saved_state_metadata",
    "SHARDED_METADATA_FILENAME",
]

CHECKPOINT_METADATA_KEY = "lightning_peft"
CHECKPOINT_FORMAT_VERSION = 1

ModuleT = TypeVar("ModuleT", bound=nn.Module)
SHARDED_METADATA_FILENAME = "meta.pt"  # what Lightning's ModelParallelStrategy writes next to the DCP shards
_DCP_METADATA = ".metadata"
_STATE_PREFIX = "state_dict."  # DCP flattens {"state_dict": {key: tensor}} to "state_dict.<key>"


def build_checkpoint_metadata(config: PeftConfig, model_attr: Optional[str], adapter_keys: list[str],
                              adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Any]:
    """The plain-dict record stored under ``checkpoint["lightning_peft"]``."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "peft_config": config.to_dict(),
        "model_attr": model_attr,
        "adapter_keys": sorted(adapter_keys),
        "adapter_name": adapter_name,
    }


def read_checkpoint_metadata(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``lightning_peft`` record of a loaded checkpoint dict, or None if it has none.

    Looks at the top-level key first (every checkpoint the callback writes has it), then at the
    callback's own state (``checkpoint["callbacks"]["PEFTCallback..."]``).
    """
    meta = checkpoint.get(CHECKPOINT_METADATA_KEY)
    if isinstance(meta, dict):
        return meta
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("PEFTCallback") and isinstance(state, dict) and "peft_config" in state:
            return state
    return None


def resolve_model_attr(root: nn.Module, model_attr: Optional[str]) -> Optional[nn.Module]:
    """``root.<model_attr>`` for a dotted path (``root`` itself for None); None while it is unset.

    Raises:
        TypeError: the attribute exists but is not an ``nn.Module``.
    """
    if not model_attr:
        return root
    obj: Any = root
    for part in model_attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"{type(root).__name__}.{model_attr} is a {type(obj).__name__}, not an nn.Module: "
            "model_attr must name the model to adapt (e.g. 'model' for self.model)"
        )
    return obj


def same_config(a: PeftConfig, b: PeftConfig) -> bool:
    """Whether two configs describe the same adapter (``inference_mode`` aside)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("inference_mode", None)
    db.pop("inference_mode", None)
    return da == db


def load_peft_checkpoint(
    model: ModuleT,
    checkpoint_path: Union[str, os.PathLike],
    *,
    is_trainable: bool = False,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> ModuleT:
    """Put the adapter of a PEFTCallback checkpoint onto a fresh base model, without a Trainer.

    Example::

        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = load_peft_checkpoint(base, "runs/sst2_lora/checkpoints/last.ckpt")
        # or the LightningModule that holds the base model (model_attr recorded in the checkpoint):
        module = load_peft_checkpoint(TextClassifier(path), "runs/sst2_lora/checkpoints/last.ckpt")

    Args:
        model: the base model the adapter was trained on (a transformers model or any
            ``nn.Module``), or a LightningModule holding it. For a LightningModule the adapter
            goes where the callback put it (its recorded ``model_attr``); a LightningModule that
            builds its model in ``configure_model`` gets that called first.
        checkpoint_path: a ``.ckpt`` written by a Trainer with ``PEFTCallback`` (full or weights-only),
            or the directory of a sharded one (FSDP2's ``ModelParallelStrategy`` with
            ``save_distributed_checkpoint=True``), gathered into full tensors here.
        is_trainable: keep the adapter trainable; by default nothing requires grad and the model
            is put in eval mode.
        map_location: passed to ``torch.load``; tensors are copied onto the model's devices anyway.
        weights_only: passed to ``torch.load`` (our checkpoints are plain data; set False only for
            trusted checkpoints whose hyper-parameters hold arbitrary objects).

    Returns:
        ``model`` itself, adapted in place.

    Raises:
        ValueError: the file has no lightning_peft record, a sharded directory lacks files, or its adapter does not fit the model
            (the message names the missing / unexpected keys and mismatching shapes). The model is
            left as it was.
    """
    path = os.fspath(checkpoint_path)
    if os.path.isdir(path):  # a sharded checkpoint (FSDP2, save_distributed_checkpoint=True)
        checkpoint = read_sharded_checkpoint(path, weights_only=weights_only)
    else:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    meta = read_checkpoint_metadata(checkpoint)
    if meta is None:
        raise ValueError(
            f"{path} has no '{CHECKPOINT_METADATA_KEY}' record: it was not written by a Trainer with "
            "PEFTCallback. Train with `Trainer(callbacks=[PEFTCallback(config)])`, or load a peft adapter "
            "directory with lightning_peft.load_adapter()"
        )
    config = config_from_dict(meta["peft_config"])
    config.inference_mode = not is_trainable
    model_attr = meta.get("model_attr")
    target, prefix = _locate_target(model, model_attr)
    state = checkpoint.get("state_dict", {})
    outside = sorted(k for k in state if not k.startswith(prefix))
    if outside:
        raise ValueError(
            f"{path} holds keys outside '{prefix}' (where the adapter was trained: model_attr={model_attr!r}): "
            f"{outside[:6]}. Pass the LightningModule the checkpoint was trained with, or the model it holds at "
            f"'{model_attr}'"
        )
    adapter_state = {k[len(prefix):]: v for k, v in state.items()}

    name = meta.get("adapter_name", DEFAULT_ADAPTER)
    adapters = get_adapter_set(target)
    existing = adapters.tuners.get(name) if adapters is not None else None
    if existing is not None and not same_config(existing.config, config):
        raise ValueError(
            f"{type(target).__name__} already carries a different adapter named {name!r} ({existing.config}); the "
            f"checkpoint's is {config}. Pass a fresh base model, or delete_adapter({name!r}) first"
        )
    if adapters is None:
        inject_adapter(target, copy.deepcopy(config), adapter_name=name, advance_rng_on_forward=is_trainable)
    elif existing is None:  # beside the adapters the model carries, not made active
        add_adapter(target, name, copy.deepcopy(config))
    try:
        with adapter_made_active(target, name if adapters is not None else None):
            load_adapter_state_dict(target, adapter_state)
    except ValueError as err:
        if adapters is None:
            remove_adapter(target, restore_requires_grad=True)
        elif existing is None:
            delete_adapter(target, name)
        raise ValueError(f"{path}: {err}") from err
    if not is_trainable:
        model.eval()
    return model


def is_sharded_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """A directory a ModelParallelStrategy wrote with ``save_distributed_checkpoint=True`` (possibly incomplete)."""
    path = Path(path)
    return path.is_dir() and ((path / _DCP_METADATA).exists() or (path / SHARDED_METADATA_FILENAME).exists())


def check_sharded_checkpoint_complete(path: Path) -> Any:
    """The DCP metadata of the directory ``path``, after checking that every shard file it names is there.

    Raises:
        ValueError: ``.metadata`` / ``meta.pt`` or shard files are missing.
    """
    from torch.distributed.checkpoint import FileSystemReader

    absent = [name for name in (_DCP_METADATA, SHARDED_METADATA_FILENAME) if not (path / name).exists()]
    if absent:
        raise ValueError(
            f"{path} is not a complete sharded checkpoint: {', '.join(absent)} missing (a save that did not "
            "finish, or a partial copy). Resume from another checkpoint"
        )
    metadata = FileSystemReader(os.fspath(path)).read_metadata()
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"sharded checkpoint {path} is missing shard files {missing} (of {files}): it was not completely "
            "written or copied. Nothing was loaded; resume from another checkpoint or copy the whole directory"
        )
    return metadata


def saved_state_metadata(dcp_metadata: Any) -> dict[str, Any]:
    """``{state-dict key: TensorStorageMetadata}`` of the model entries of a DCP checkpoint."""
    return {k[len(_STATE_PREFIX):]: v for k, v in dcp_metadata.state_dict_metadata.items() if k.startswith(_STATE_PREFIX)}


def read_sharded_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = True) -> dict[str, Any]:
    """A sharded (DCP directory) PEFTCallback checkpoint as one plain dict, without a process group.

    Returns:
        the Lightning metadata (``meta.pt``: loops, callbacks, the ``lightning_peft`` record, ...)
        with ``"state_dict"``: the full adapter tensors on the CPU (optimizer state is not read).

    Raises:
        ValueError: the directory is incomplete (missing metadata or shard files).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    metadata = check_sharded_checkpoint_complete(path)
    checkpoint = torch.load(path / SHARDED_METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
    state = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in saved_state_metadata(metadata).items()
        if isinstance(md, TensorStorageMetadata)
    }
    if state:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"state_dict": state}, checkpoint_id=os.fspath(path), no_dist=True)
    return {**checkpoint, "state_dict": state}


def _locate_target(model: nn.Module, model_attr: Optional[str]) -> tuple[nn.Module, str]:
    """The module to adapt, and the prefix its keys carry in the checkpoint's state dict."""
    prefix = f"{model_attr}." if model_attr else ""
    if not _is_lightning_module(model):
        return model, prefix  # the base model itself: checkpoint keys lose the prefix
    target = resolve_model_attr(model, model_attr)
    if target is None and callable(getattr(model, "configure_model", None)):
        model.configure_model()  # the model is built there, not in __init__
        target = resolve_model_attr(model, model_attr)
    if target is None:
        raise ValueError(
            f"{type(model).__name__} has no model at '{model_attr}' (where the checkpoint's adapter was trained), "
            "even after configure_model(); pass the LightningModule class the checkpoint came from"
        )
    return target, prefix


def _is_lightning_module(model: nn.Module) -> bool:
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # Lightning is optional for inference
        return False
    return isinstance(model, LightningModule)

