"""End-to-end LoRA fine-tuning throughput and peak memory: lightning_peft vs peft, same Trainer.

A Llama with 7B widths (hidden 4096, intermediate 11008, 32 heads; 2 layers by default),
random init, the frozen base in bf16, fp32 adapters, ``precision="bf16-mixed"``, LoRA r=16
(alpha 32) with dropout 0.1 on every linear projection of the blocks, AdamW on the adapters,
random token batches. One implementation per process, so peak memory is its own.

Usage::

    python benchmarks/e2e_gpu.py --impl ours --json ours.json
    python benchmarks/e2e_gpu.py --impl peft --json peft.json
    python benchmarks/e2e_gpu.py --impl ours --tiny --cpu        # dry run: tiny widths on the CPU

Prints one line and writes (``--json``): tokens/s (median step time after warm-up), peak
memory (``torch.cuda.max_memory_allocated``; process peak RSS on the CPU) and the setup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "peft", "frozen"], required=True,
                   help="ours = lightning_peft; peft = HF peft; frozen = no adapter (base fwd+bwd to the inputs, for reference)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (dry run)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (dry run)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (2 if tiny else 4)
    args.seq = args.seq or (64 if tiny else 2048)
    args.steps = args.steps or (3 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    return args


def build_model(args, device: torch.device):
    """Random-init Llama (bf16 base weights) with the chosen adapter; returns (model, trainable count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=args.layers, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512, max_position_embeddings=max(128, args.seq))
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=max(4096, args.seq))
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model.config.use_cache = False
    if args.impl == "peft":
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules=TARGETS)
        model = peft.get_peft_model(model, cfg)
    elif args.impl == "ours":
        import lightning_peft

        cfg = lightning_peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules=TARGETS)
        model = lightning_peft.get_peft_model(model, cfg)
    else:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # something to differentiate, like the floor in the guide
    for param in model.parameters():  # fp32 adapters (peft does this by default: autocast_adapter_dtype)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable


def main(argv=None) -> dict:
    args = parse_args(argv)
    import lightning as L

    use_cuda = not args.cpu
    if use_cuda and not torch.cuda.is_available():
        sys.exit("e2e_gpu: no CUDA device (use --cpu --tiny for a dry run)")
    device = torch.device("cuda" if use_cuda else "cpu")
    model, trainable = build_model(args, device)

    class LitLM(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if args.impl == "ours":  # a fresh dropout mask per step, as lightning_peft's callback does
                from lightning_peft import advance_dropout_rng

                advance_dropout_rng(self.model)

        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-4, fused=use_cuda)

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def _sync(self):
            if use_cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            self.times.append(time.perf_counter() - self._t0)

    total_steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    data = torch.randint(0, vocab, (total_steps * args.batch, args.seq), generator=gen)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if use_cuda else "cpu", devices=1, precision=args.precision, max_steps=total_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer],
    )
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(LitLM(model), loader)

    timed = timer.times[args.warmup:]
    step_s = statistics.median(timed)
    tokens = args.batch * args.seq
    result = {
        "impl": args.impl,
        "device": torch.cuda.get_device_name() if use_cuda else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "tiny": args.tiny,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "rank": args.rank,
        "dropout": args.dropout,
        "precision": args.precision,
        "trainable_params": trainable,
        "steps_timed": len(timed),
        "step_ms_median": 1e3 * step_s,
        "step_ms_spread": 1e3 * (max(timed) - min(timed)),
        "tokens_per_s": tokens / step_s,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if use_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_mem_kind": "cuda max_memory_allocated" if use_cuda else "process peak RSS",
    }
    if args.impl == "ours":
        from lightning_peft.ops import cuda_backend

        result["kernels"] = cuda_backend.status()
    print(
        f"e2e {args.impl:>6}: {result['tokens_per_s']:,.0f} tokens/s  step {result['step_ms_median']:.1f} ms  "
        f"peak {result['peak_mem_bytes'] / 2**30:.2f} GiB  ({result['device']}, {args.layers} layers, {tokens} tokens/step)",
        flush=True,
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
