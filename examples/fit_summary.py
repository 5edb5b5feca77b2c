"""``FitSummary`` (the example's end-of-run report): after ``fit``, print the validation metric, the time, and the adapter checkpoint size vs the full model."""

from __future__ import annotations

import os
import time
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

__all__ = ["FitSummary"]


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


class FitSummary(Callback):
    """Report, on rank zero at the end of ``fit``: ``monitor`` (last and best), wall time, checkpoint sizes.

    "Full model" is the byte size of every tensor in the LightningModule's full state dict, i.e.
    what a checkpoint without ``PEFTCallback`` would hold for the weights.

    Args:
        monitor: the logged metric to report, e.g. ``"val_acc"``.
    """

    def __init__(self, monitor: str = "val_acc") -> None:
        self.monitor = monitor
        self._start: Optional[float] = None
        self.summary: dict[str, float] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        minutes = (time.perf_counter() - (self._start or time.perf_counter())) / 60
        full_bytes = sum(t.numel() * t.element_size() for t in pl_module.state_dict().values())
        lines = [f"fit summary ({trainer.current_epoch} epochs, {trainer.global_step} steps, {minutes:.2f} min)"]
        summary = {"minutes": minutes, "full_model_bytes": float(full_bytes)}
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            summary[self.monitor] = float(value)
            lines.append(f"  {self.monitor} (last validation): {float(value):.4f}")
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        if best is not None and getattr(ckpt, "monitor", None) == self.monitor:
            summary[f"best_{self.monitor}"] = float(best)
            lines.append(f"  {self.monitor} (best): {float(best):.4f}  {ckpt.best_model_path}")
        path = (getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")) if ckpt else ""
        lines.append(f"  full model weights: {_mb(full_bytes)}")
        if path and os.path.isfile(path):
            size = os.path.getsize(path)
            summary["checkpoint_bytes"] = float(size)
            lines.append(f"  checkpoint: {_mb(size)} ({100 * size / full_bytes:.2f}% of the full model)  {path}")
        self.summary = summary
        rank_zero_info("\n".join(lines))
