"""Evaluate an adapter checkpoint on SST-2 dev without a Trainer: base model + adapter-only checkpoint.

    python examples/evaluate_sst2.py runs/sst2_lora/checkpoints/last.ckpt

Rebuilds ``TextClassifier`` (the base model, from its recorded ``model_name_or_path``), puts the
adapter on it with :func:`lightning_peft.load_peft_checkpoint`, and prints the dev accuracy and
the adapter checkpoint size next to the full model size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: `examples` importable

from examples.text_classification import TextClassifier, load_tokenizer, read_tsv  # noqa: E402
from lightning_peft import load_peft_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt written by a Trainer with PEFTCallback")
    parser.add_argument("--dev", default=os.path.join(os.path.dirname(__file__), "data", "sst2", "dev.tsv"))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    start = time.perf_counter()
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    max_length = checkpoint.get("datamodule_hyper_parameters", {}).get("max_length", 128)  # as in training
    module = TextClassifier(hparams["model_name_or_path"], num_labels=hparams["num_labels"])
    load_peft_checkpoint(module, args.checkpoint)  # builds the base model (configure_model), adds the adapter
    tokenizer = load_tokenizer(hparams["model_name_or_path"])

    texts, labels = read_tsv(args.dev, hparams["num_labels"])
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(texts), args.batch_size):
            batch = tokenizer(texts[i:i + args.batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            predicted = module(**batch).logits.argmax(-1)
            correct += int((predicted == torch.tensor(labels[i:i + args.batch_size])).sum())

    full_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    ckpt_bytes = os.path.getsize(args.checkpoint)
    print(f"SST-2 dev accuracy (adapter loaded without a Trainer): {correct / len(texts):.4f} ({correct}/{len(texts)})")
    print(f"adapter checkpoint: {ckpt_bytes / 2**20:.2f} MiB vs full model weights {full_bytes / 2**20:.2f} MiB "
          f"({100 * ckpt_bytes / full_bytes:.2f}%)  [{args.checkpoint}]")
    print(f"evaluation time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
