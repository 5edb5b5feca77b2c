"""Custom ops: the only place where math dispatches between the CUDA kernels and the PyTorch fallback."""

from lightning_peft.ops import cpu_backend  # noqa: F401  (registers the CPU kernels of the LoRA op)
from lightning_peft.ops import cuda_backend  # noqa: F401  (registers the CUDA kernels of the ops)
from lightning_peft.ops import lora_grouped_cpu  # noqa: F401  (registers the grouped op's CPU kernels)
from lightning_peft.ops import lora_grouped_cuda  # noqa: F401  (registers the grouped op's CUDA kernels)
from lightning_peft.ops.lora_grouped import lora_grouped_backward, lora_grouped_forward, lora_linear_grouped
from lightning_peft.ops.lora_linear import lora_linear, lora_linear_backward, lora_linear_forward

__all__ = [
    "lora_linear",
    "lora_linear_forward",
    "lora_linear_backward",
    "lora_linear_grouped",
    "lora_grouped_forward",
    "lora_grouped_backward",
    "cpu_backend",
    "cuda_backend",
]
