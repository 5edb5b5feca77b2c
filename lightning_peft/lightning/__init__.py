"""Lightning glue: the PEFT callback, checkpoint IO plugins, and a reusable text-classification task.

``text_classification`` (TextClassifier, TextClassificationData) is not imported here, so that
importing the callback does not import transformers' model classes.
"""

from lightning_peft.lightning.callback import PEFTCallback, apply_peft
from lightning_peft.lightning.checkpoint_io import AdapterCheckpointIO, AtomicCheckpointIO

__all__ = ["PEFTCallback", "apply_peft", "AtomicCheckpointIO", "AdapterCheckpointIO"]
