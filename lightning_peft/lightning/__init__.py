"""Lightning glue: the PEFT callback and checkpoint IO plugins."""

from lightning_peft.lightning.callback import PEFTCallback, apply_peft
from lightning_peft.lightning.checkpoint_io import AdapterCheckpointIO, AtomicCheckpointIO

__all__ = ["PEFTCallback", "apply_peft", "AtomicCheckpointIO", "AdapterCheckpointIO"]
