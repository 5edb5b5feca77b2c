"""LoRA on an ``nn.Embedding`` (peft's ``lora_embedding_A`` / ``lora_embedding_B``).

``E[ids] -> E[ids] + scaling · A[:, ids]ᵀ Bᵀ`` with ``lora_embedding_A [r, num_embeddings]`` and
``lora_embedding_B [embedding_dim, r]``: a low-rank update of the embedding table, looked up the
way the base looks up its rows (padding index and all). A starts at zero and B normal, as in peft,
so the adapted model starts equal to the base. No dropout (an id has no features to drop; peft's
embedding LoRA ignores ``lora_dropout`` too). The table stays the base's Parameter, so an output
layer tied to it stays tied (merging changes both, as it does in peft).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from lightning_peft.tuners.layers import EmbeddingAdapterLayer

__all__ = ["LoraEmbedding"]


class LoraEmbedding(EmbeddingAdapterLayer):
    """An ``nn.Embedding`` with a LoRA update of its table.

    Args:
        base: the embedding being adapted.
        r, scaling: rank and multiplier of the update.
        init: ``True`` / ``"gaussian"`` (A zero, B normal: starts as the base) or ``False`` (both random, for tests).

    Ids ``[*]`` -> ``[*, embedding_dim]``.
    """

    adapter_parameter_names = ("lora_embedding_A", "lora_embedding_B")
    can_merge = True

    def __init__(self, base: nn.Embedding, *, r: int, scaling: float, init: Union[bool, str]) -> None:
        super().__init__(base)
        self.r, self.scaling = r, scaling
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.randn(r, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, r, **factory))
        if init is not False:
            with torch.no_grad():
                self.lora_embedding_A.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(ids)  # [*, dim]
        if not self.adapter_active():
            return out
        hidden = self.embed(ids, self.lora_embedding_A.t())  # [*, r]
        return out + (hidden @ self.lora_embedding_B.t()) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling · (B A)ᵀ`` ``[num_embeddings, dim]`` (fp32 math for half precision on CPU)."""
        a, b = self.lora_embedding_A, self.lora_embedding_B
        dtype = torch.float32 if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return (b.to(dtype) @ a.to(dtype)).t() * self.scaling

    def adapter_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
