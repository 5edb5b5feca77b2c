"""LoRA on an ``nn.Embedding`` (peft's ``lora_embedding_A`` / ``lora_embedding_B``).

``E[ids] -> E[ids] + scaling · A[:, ids]ᵀ Bᵀ`` with ``lora_embedding_A [r, num_embeddings]`` and
``lora_embedding_B [embedding_dim, r]``: a low-rank update of the embedding table, looked up the
way the base looks up its rows (padding index and all). A starts at zero and B normal, as in peft,
so the adapted model starts equal to the base. No dropout (an id has no features to drop; peft's
embedding LoRA ignores ``lora_dropout`` too). The table stays the base's Parameter, so an output
layer tied to it stays tied (merging changes both, as it does in peft).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.injection import DEFAULT_ADAPTER
from lightning_peft.tuners.layers import EmbeddingAdapterLayer
from lightning_peft.tuners.lora_branch import LoraBranch

__all__ = ["LoraEmbedding"]


class LoraEmbedding(LoraBranch, EmbeddingAdapterLayer):
    """An ``nn.Embedding`` with LoRA updates of its table, one per named adapter.

    Args:
        base: the embedding being adapted.
        adapter: the first adapter's name; further ones come with :meth:`add_adapter`.
        r, scaling: rank and multiplier of the update.
        init: ``True`` / ``"gaussian"`` (A zero, B normal: starts as the base) or ``False`` (both random, for tests).

    Ids ``[*]`` -> ``[*, embedding_dim]``. ``lora_embedding_A[adapter] [r, num_embeddings]``,
    ``lora_embedding_B[adapter] [embedding_dim, r]`` (peft's parameter dicts).
    """

    branch_modules = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base: nn.Embedding, *, adapter: str = DEFAULT_ADAPTER, r: int, scaling: float, init: Union[bool, str]) -> None:
        super().__init__(base)
        self.init_branches()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.add_adapter(adapter, r=r, scaling=scaling, init=init)

    def add_adapter(self, adapter: str, *, r: int, scaling: float, init: Union[bool, str], **_: object) -> None:
        """Add adapter ``adapter``'s update (``dropout_p`` / ``seed`` are accepted and unused: no dropout here)."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A[adapter] = nn.Parameter(torch.randn(r, self.num_embeddings, **factory))
        self.lora_embedding_B[adapter] = nn.Parameter(torch.randn(self.embedding_dim, r, **factory))
        if init is not False:
            with torch.no_grad():
                self.lora_embedding_A[adapter].zero_()
        self.add_adapter_state(adapter, r=r, scaling=scaling, dropout_p=0.0, seed=0, device=self.weight.device)

    def remove_adapter(self, adapter: str) -> bool:
        super().remove_adapter(adapter)
        self.delete_branch(adapter)
        return not self.r

    def branch_forward(self, ids: torch.Tensor, adapter: str) -> torch.Tensor:
        """Adapter ``adapter``'s term ``scaling · A[:, ids]ᵀ Bᵀ``, ``[*, dim]``."""
        hidden = self.embed(ids, self.lora_embedding_A[adapter].t())  # [*, r]
        return (hidden @ self.lora_embedding_B[adapter].t()) * self.scaling[adapter]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.add_branch_terms(self.base_forward(ids), ids)  # [*, dim]

    @torch.no_grad()
    def delta_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """``scaling · (B A)ᵀ`` of adapter ``adapter`` (None: the active one), ``[num_embeddings, dim]`` (fp32 math for
        half precision on CPU)."""
        adapter = adapter or self.active_adapter
        a, b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        dtype = torch.float32 if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return (b.to(dtype) @ a.to(dtype)).t() * self.scaling[adapter]

    def adapter_repr(self) -> str:
        return ", ".join(f"{a}: r={self.r[a]}, scaling={self.scaling[a]:g}" for a in self.r)
