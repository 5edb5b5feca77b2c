"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``): adapter-only checkpoints in both of its forms.

Lightning's ``ModelParallelStrategy`` does not route its checkpoints through a CheckpointIO: it
builds the state dict with ``get_model_state_dict`` (the whole model, gathered on rank zero for
``save_distributed_checkpoint=False``), writes a ``torch.distributed.checkpoint`` (DCP) directory
itself for ``save_distributed_checkpoint=True``, and loads both forms with its own reader, which
fails on a partial sharded checkpoint. :class:`FSDP2AdapterCheckpoints` therefore replaces four
methods *on the strategy instance* (not on its class, and only while PEFTCallback is attached):

* ``lightning_module_state_dict``: only the adapter's tensors. Full form: each sharded adapter
  tensor is gathered (``DTensor.full_tensor``, a collective in the same key order on every
  rank) and kept on rank zero; the frozen base is never gathered. Sharded form: the adapter's
  DTensors as they are (each rank writes its shard).
* ``optimizer_state``: keyed by parameter name (FQN) in both forms, so it loads on any world size.
* ``save_checkpoint``: adds the ``lightning_peft`` record (config, model_attr, adapter keys); a
  sharded directory is written beside its destination and then swapped in.
* ``load_checkpoint``: checks the file or directory first (record, config, keys, shapes, missing
  shard files; one clear error, nothing loaded), reads into fresh tensors, and only then copies
  into the model and optimizer. DCP reshards on read, and full tensors are re-split locally
  (``distribute_tensor(..., src_data_rank=None)``), so a checkpoint resumes on another world size.

:func:`~lightning_peft.checkpoint.read_sharded_checkpoint` reads a sharded checkpoint directory
without any process group, for :func:`~lightning_peft.load_peft_checkpoint` into a plain model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from lightning_peft.tuners.injection import is_sharded
from lightning_peft.checkpoint import (
    SHARDED_METADATA_FILENAME,
    check_sharded_checkpoint_complete,
    saved_state_metadata,
)

__all__ = ["FSDP2AdapterCheckpoints", "is_sharded", "replace_directory"]

_PATCHED = ("lightning_module_state_dict", "optimizer_state", "save_checkpoint", "load_checkpoint")


def replace_directory(source: Path, destination: Path) -> None:
    """Move the directory ``source`` to ``destination``, replacing what is there.

    ``destination`` is renamed aside first and deleted only once ``source`` took its place: at any
    crash point a complete checkpoint exists, at ``destination`` or at ``.<name>.old`` beside it.
    """
    aside = destination.with_name(f".{destination.name}.old")
    _remove(aside)
    if destination.exists() or destination.is_symlink():
        os.replace(destination, aside)
    os.replace(source, destination)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clone_tensors(tree: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


class FSDP2AdapterCheckpoints:
    """Makes a ``ModelParallelStrategy``'s checkpoints adapter-only (see the module docstring).

    Args:
        strategy: the trainer's ``ModelParallelStrategy``.
        adapter_keys: returns the LightningModule state-dict keys of the adapter (known after injection).
        metadata: returns the ``lightning_peft`` record to store.
        check_checkpoint: ``(checkpoint, path)``; raises when a loaded checkpoint does not fit the
            model (PEFTCallback's own check: record, config, keys, weights-only in fit).
        record_key: the checkpoint key of the record.
    """

    def __init__(
        self,
        strategy: Any,
        adapter_keys: Callable[[], frozenset[str]],
        metadata: Callable[[], dict[str, Any]],
        check_checkpoint: Callable[[dict[str, Any], str], None],
        record_key: str,
    ) -> None:
        self.strategy = strategy
        self.adapter_keys = adapter_keys
        self.metadata = metadata
        self.check_checkpoint = check_checkpoint
        self.record_key = record_key
        self._original = {name: getattr(type(strategy), name) for name in _PATCHED}

    # ------------------------------------------------------------------ install

    def install(self) -> None:
        """Replace the strategy instance's checkpoint methods (idempotent: a previous installation is replaced)."""
        for name in _PATCHED:
            self.strategy.__dict__[name] = getattr(self, name)

    def uninstall(self) -> None:
        for name in _PATCHED:
            self.strategy.__dict__.pop(name, None)

    @property
    def _full(self) -> bool:
        return not self.strategy._save_distributed_checkpoint

    def _module(self) -> nn.Module:
        return self.strategy.lightning_module

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters and buffers by state-dict key (DTensor shards for sharded ones)."""
        own = self._module().state_dict(keep_vars=True)  # FSDP2: sharded DTensors, no communication
        missing = sorted(self.adapter_keys() - set(own))
        if missing:
            raise RuntimeError(
                f"PEFTCallback: the LightningModule's state dict no longer has the adapter keys {missing[:4]}: the "
                "model was wrapped after injection (e.g. self.model = torch.compile(self.model)). Compile in place "
                "instead (self.model.compile() or layer.compile() for each block), which keeps the parameter names"
            )
        return {k: own[k] for k in sorted(self.adapter_keys())}

    # ------------------------------------------------------------------ save

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self.adapter_keys():
            return self._original["lightning_module_state_dict"](self.strategy)
        from torch.distributed.tensor import DTensor

        state = {}
        for key, tensor in self._named_tensors().items():  # sorted: the same collective order on every rank
            tensor = tensor.detach()
            if not self._full:
                state[key] = tensor
                continue
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            state[key] = full.cpu().clone()
        return state if (not self._full or self.strategy.global_rank == 0) else {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=self._full, cpu_offload=True)
        return get_optimizer_state_dict(self._module(), optimizer, options=options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if self.adapter_keys():
            checkpoint[self.record_key] = self.metadata()
        save = self._original["save_checkpoint"]
        if self._full:  # one file, written by the CheckpointIO (atomic with PEFTCallback's default)
            save(self.strategy, checkpoint, filepath, storage_options)
            return
        # A directory cannot be replaced in one step: write it next to the destination, then swap it
        # in, so a save that dies half-way leaves the previous checkpoint at this path intact.
        final = Path(self.strategy.broadcast(filepath))
        staging = final.with_name(f".{final.name}.tmp")
        if self.strategy.global_rank == 0:
            _remove(staging)
        self.strategy.barrier()
        save(self.strategy, checkpoint, staging, storage_options)
        self.strategy.barrier()  # every shard, .metadata and meta.pt are written
        if self.strategy.global_rank == 0:
            replace_directory(staging, final)
        self.strategy.barrier()

    # ------------------------------------------------------------------ load

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.strategy.broadcast(checkpoint_path))
        if not self.adapter_keys():
            return self._original["load_checkpoint"](self.strategy, checkpoint_path, weights_only)
        if path.is_dir():
            return self._load_sharded(path, weights_only)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return self._load_full(path, weights_only)

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
        own = self._named_tensors()
        wrong = [f"{k}: checkpoint {tuple(s)} vs model {tuple(own[k].shape)}" for k, s in shapes.items()
                 if k in own and tuple(s) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(
                f"checkpoint {path} does not fit this model + adapter: shape mismatches {wrong[:6]}. Resume with the "
                "same model and PEFT config it was trained with"
            )

    def _load_full(self, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
        kwargs = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = torch.load(path, map_location="cpu", **kwargs)
        self.check_checkpoint(checkpoint, os.fspath(path))  # record, config, keys; raises before anything is loaded
        self._check_shapes({k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}, path)
        state = {k: checkpoint["state_dict"][k] for k in self.adapter_keys()}
        optimizer_states = checkpoint.get("optimizer_states", [])
        self._copy_into_model(state, full=True)
        self._load_optimizers(optimizer_states, full=True)
        return checkpoint

    def _load_sharded(self, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        dcp_metadata = check_sharded_checkpoint_complete(path)
        kwargs = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = torch.load(path / SHARDED_METADATA_FILENAME, map_location="cpu", **kwargs)
        saved = saved_state_metadata(dcp_metadata)
        optimizers = self.strategy.optimizers
        has_optimizer = any(k.startswith("optimizer_0.") for k in dcp_metadata.state_dict_metadata)
        view = {**checkpoint, "state_dict": dict.fromkeys(saved)}
        if has_optimizer:
            view["optimizer_states"] = [None]
        self.check_checkpoint(view, os.fspath(path))
        self._check_shapes({k: tuple(getattr(md, "size", ())) for k, md in saved.items()}, path)
        # read into fresh tensors: a failing read leaves the model and optimizer untouched
        target: dict[str, Any] = {"state_dict": {k: torch.empty_like(t.detach()) for k, t in self._named_tensors().items()}}
        if has_optimizer:
            target.update({f"optimizer_{i}": _clone_tensors(self._optimizer_state_dict(opt)) for i, opt in enumerate(optimizers)})
        dcp.load(target, checkpoint_id=os.fspath(path))
        self._copy_into_model(target["state_dict"], full=False)
        self._load_optimizers([target[f"optimizer_{i}"] for i in range(len(optimizers))] if has_optimizer else [], full=False)
        return checkpoint

    def _optimizer_state_dict(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self._module(), optimizer)

    @torch.no_grad()
    def _copy_into_model(self, state: dict[str, torch.Tensor], *, full: bool) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for key, dest in self._named_tensors().items():
            value = state[key]
            if isinstance(dest, DTensor):
                if full:  # every rank read the whole tensor: each takes its own shard, no communication
                    value = distribute_tensor(value.to(dest.device, dest.dtype), dest.device_mesh, dest.placements, src_data_rank=None)
                dest.to_local().copy_(value.to_local())
            else:
                dest.copy_(value.to_local() if isinstance(value, DTensor) else value)

    def _load_optimizers(self, states: list[dict[str, Any]], *, full: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for optimizer, state in zip(self.strategy.optimizers, states):
            set_optimizer_state_dict(self._module(), optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=full))
