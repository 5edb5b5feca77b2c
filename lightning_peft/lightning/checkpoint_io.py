"""CheckpointIO plugins: crash-safe checkpoint files, and adapter-only state dicts.

Why a CheckpointIO and not a checkpoint hook: with ``ModelCheckpoint(save_weights_only=True)``
Lightning does not call ``Callback.on_save_checkpoint``, yet every file a strategy writes through
its CheckpointIO (single device, DDP from rank zero, FSDP with ``state_dict_type="full"``, and
``trainer.save_checkpoint`` after ``fit``) passes through ``save_checkpoint`` here. NeMo's PEFT
callback takes the same route.

Why atomic: Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction whose temporary file lives in the system temp directory; committing it is a
``shutil.move``, which across filesystems is a copy onto the destination (a crash mid-copy leaves a
truncated checkpoint where the good one was) and is never fsynced. :class:`AtomicCheckpointIO`
writes next to the destination, fsyncs, then ``os.replace``-s it into place.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lightning_peft.serialization import atomic_write

__all__ = ["AtomicCheckpointIO", "AdapterCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable.

    The checkpoint is written to a temporary file in the destination directory, fsynced, and moved
    over the destination with ``os.replace``: if the process dies at any point, the previous file
    at that path is intact (a stray ``.<name>.*.tmp`` may remain after a hard kill). Remote paths
    (``s3://`` ...) fall back to Lightning's fsspec transaction.

    Example::

        trainer = Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}; "
                "implement a custom CheckpointIO to use storage_options"
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(os.fspath(path), lambda tmp: torch.save(checkpoint, tmp))


def _is_local(path: _PATH) -> bool:
    return "file" in get_filesystem(path).protocol


class AdapterCheckpointIO(CheckpointIO):
    """Wraps the strategy's CheckpointIO so Lightning checkpoints keep only the adapter.

    On save, a Lightning checkpoint dict (one with a ``"state_dict"``) gets its state dict
    reduced by ``filter_checkpoint`` (which also adds the ``lightning_peft`` record); anything else
    (e.g. ``ddp_spawn``'s temporary weight transfer) passes through untouched. On load,
    ``check_checkpoint`` validates a Lightning checkpoint before Lightning restores anything from it.

    Args:
        checkpoint_io: the CheckpointIO that actually reads and writes files.
        filter_checkpoint: ``checkpoint -> checkpoint`` to write (must not modify its argument).
        check_checkpoint: raises with a clear message when a loaded checkpoint does not fit.
    """

    def __init__(
        self,
        checkpoint_io: CheckpointIO,
        filter_checkpoint: Callable[[dict[str, Any]], dict[str, Any]],
        check_checkpoint: Callable[[dict[str, Any], str], None],
    ) -> None:
        self.checkpoint_io = checkpoint_io
        self.filter_checkpoint = filter_checkpoint
        self.check_checkpoint = check_checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            checkpoint = self.filter_checkpoint(checkpoint)
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        checkpoint = self.checkpoint_io.load_checkpoint(path, **kwargs)
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            self.check_checkpoint(checkpoint, os.fspath(path))
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()
