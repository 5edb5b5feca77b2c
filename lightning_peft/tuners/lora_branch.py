"""The LoRA branches every LoRA layer kind shares: one ``lora_A`` / ``lora_B`` pair per named adapter.

A layer adapted by several LoRA adapters holds one branch per adapter, keyed by the adapter's
name like peft's (``lora_A.<adapter>.weight``), with that adapter's rank, scaling, dropout
probability and dropout key (``lora_rng.<adapter>``, ``int64 [2]`` = (seed, offset)). Forward adds
the *active* adapter's branch, or, inside a mixed batch, each row's own adapter's branch.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["LoraBranch", "AdapterBuffers", "MixedBatch"]


class AdapterBuffers(nn.Module):
    """Buffers of one kind, one per adapter, registered under the adapter's name.

    So a layer's dropout key of adapter ``"a"`` has the state-dict key ``<layer>.lora_rng.a``.
    """

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]  # type: ignore[return-value]

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._buffers

    def add(self, adapter: str, value: torch.Tensor) -> None:
        self.register_buffer(adapter, value)

    def remove(self, adapter: str) -> None:
        del self._buffers[adapter]


class MixedBatch:
    """Which adapter each batch row uses, for the duration of one mixed-batch forward.

    Args:
        adapter_names: one name per batch row; ``"__base__"`` for the base model alone.

    A layer reads :meth:`index_for` with its own adapter names, giving an ``int64 [B]`` tensor of
    positions in that list (-1 for rows whose adapter does not adapt the layer, or ``__base__``).
    """

    BASE = "__base__"

    def __init__(self, adapter_names: Sequence[str]) -> None:
        self.adapter_names = list(adapter_names)
        self._cache: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.adapter_names)

    def index_for(self, layer_adapters: Sequence[str], device: torch.device) -> torch.Tensor:
        """``int64 [B]`` (CPU): each row's position in ``layer_adapters``, -1 where it has none."""
        # On the CPU whatever the layer's device: the grouped op's CUDA kernels read a host index without a sync.
        key = (tuple(layer_adapters), torch.device("cpu"))
        if key not in self._cache:  # the same for every layer with the same adapters: computed once
            position = {name: i for i, name in enumerate(layer_adapters)}
            self._cache[key] = torch.tensor([position.get(n, -1) for n in self.adapter_names], dtype=torch.int64)
        return self._cache[key]

    def rows_per_sample(self, leading_rows: int) -> int:
        """How many leading rows each named row covers (beam search / sampling repeat rows), or raise."""
        if leading_rows % len(self.adapter_names):
            raise ValueError(
                f"adapter_names has {len(self.adapter_names)} entries but a layer saw a batch of {leading_rows} rows; "
                "give one adapter name per row of the batch"
            )
        return leading_rows // len(self.adapter_names)


class LoraBranch:
    """Mixin of a LoRA layer: per-adapter modules ``lora_A[adapter]`` (in -> r) and ``lora_B[adapter]`` (r -> out).

    Use before the layer kind: ``class LoraLinear(LoraBranch, LinearAdapterLayer)``; call
    :meth:`init_branches` in ``__init__`` before adding the first branch. ``r``, ``scaling`` and
    ``dropout_p`` are dicts by adapter name, like peft's.
    """

    can_merge = True
    #: Per-adapter modules / parameter dicts of this layer kind (``<name>.<adapter>...`` in the state dict).
    branch_modules: tuple[str, ...] = ("lora_A", "lora_B")

    def init_branches(self) -> None:
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_rng = AdapterBuffers()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        #: The adapter forward applies (None: none of this layer's adapters is active).
        self.active_adapter: Optional[str] = None
        #: Set by the model for the duration of a mixed-batch forward.
        self.mixed_batch: Optional[MixedBatch] = None

    # ---- the branches

    @property
    def adapter_names(self) -> list[str]:
        """The adapters with a branch on this layer, in the order they were added."""
        return list(self.r)

    def add_branch(self, adapter: str, lora_A: nn.Module, lora_B: nn.Module, *, r: int, scaling: float, dropout_p: float,
                   init: Union[bool, str], seed: int) -> None:
        """Attach adapter ``adapter``'s branch; ``init``: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal
        with std 1/r, B zero) or ``False`` (both keep their random default init); ``seed`` keys the dropout masks."""
        if init is not False:
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(lora_A.weight, std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(lora_B.weight)
        self.lora_A[adapter], self.lora_B[adapter] = lora_A, lora_B
        self.add_adapter_state(adapter, r=r, scaling=scaling, dropout_p=dropout_p, seed=seed, device=lora_A.weight.device)

    def add_adapter_state(self, adapter: str, *, r: int, scaling: float, dropout_p: float, seed: int, device: torch.device) -> None:
        """Record adapter ``adapter``'s settings and dropout key (its parameters are added by the caller)."""
        self.r[adapter], self.scaling[adapter], self.dropout_p[adapter] = r, scaling, dropout_p
        self.lora_rng.add(adapter, torch.tensor([seed, 0], dtype=torch.int64, device=device))
        if self.active_adapter is None:
            self.active_adapter = adapter

    def delete_branch(self, adapter: str) -> None:
        """Remove adapter ``adapter``'s branch (it must not be merged)."""
        for name in self.branch_modules:
            del getattr(self, name)[adapter]
        self.lora_rng.remove(adapter)
        del self.r[adapter], self.scaling[adapter], self.dropout_p[adapter]
        if self.active_adapter == adapter:
            self.active_adapter = None

    def set_active_adapter(self, adapter: str) -> None:
        """Make ``adapter`` the one forward applies (a name without a branch here: this layer computes as its base)."""
        self.active_adapter = adapter

    def adapter_parameter_names_of(self, adapter: str) -> list[str]:
        names = []
        for name in self.branch_modules:
            item = getattr(self, name)[adapter]
            names += [f"{name}.{adapter}"] if isinstance(item, nn.Parameter) else [f"{name}.{adapter}.{p}" for p, _ in item.named_parameters()]
        return names

    def adapter_buffer_names_of(self, adapter: str) -> list[str]:
        return [f"lora_rng.{adapter}"]

    def dropout_rng_buffers_of(self, adapter: str) -> list[torch.Tensor]:
        return [self.lora_rng[adapter]]

    def branch_to_apply(self) -> Optional[str]:
        """The adapter whose branch forward adds (None: compute as the base layer)."""
        if not self.adapter_enabled or self.active_adapter not in self.r or self.active_adapter in self.merged_adapters:
            return None
        return self.active_adapter

    def adapter_repr(self) -> str:
        return ", ".join(f"{a}: r={self.r[a]}, scaling={self.scaling[a]:g}, dropout_p={self.dropout_p[a]:g}" for a in self.r)

    # ---- mixed batches

    def mixed_rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """For a mixed-batch forward: ``int64 [x.shape[0]]``, each leading row's position in :attr:`adapter_names`
        (-1: base only); None outside one."""
        mixed = self.mixed_batch
        if mixed is None:
            return None
        if self.merged_adapters:
            raise ValueError(
                f"a mixed-batch forward needs unmerged adapters, but {', '.join(self.merged_adapters)} is merged into this "
                "layer's weight; call unmerge_adapter() first"
            )
        index = mixed.index_for(self.adapter_names, x.device)
        repeat = mixed.rows_per_sample(x.shape[0])
        return index if repeat == 1 else index.repeat_interleave(repeat)

    def iter_branch_rows(self, index: torch.Tensor, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """``(adapter, rows)`` for each of this layer's adapters that some row uses (rows: ``int64`` positions on ``device``)."""
        for position, adapter in enumerate(self.adapter_names):
            rows = (index == position).nonzero().flatten()
            if rows.numel():
                yield adapter, rows.to(device)

    def add_branch_terms(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output for ``x``) plus the branch term of the active adapter, or in a mixed batch each
        row's own adapter's (layer kinds without a grouped op: one ``branch_forward`` per adapter on its rows)."""
        rows = self.mixed_rows(x)
        if rows is not None:
            for adapter, picked in self.iter_branch_rows(rows, out.device):
                out = out.index_add(0, picked, self.branch_forward(x[picked], adapter).to(out.dtype))
            return out
        adapter = self.branch_to_apply()
        return out if adapter is None else out + self.branch_forward(x, adapter).to(out.dtype)
