"""One rank of an FSDP2 test run (``ModelParallelStrategy`` on CPU with gloo), launched by :func:`launch`.

The tests start W copies of this script with the torchrun-style environment (``LOCAL_RANK`` set,
so Lightning does not launch processes itself) and a JSON list of runs; every rank writes what
it saw to ``<out>/rank<r>.json``, and the tests assert on those files and on the checkpoints.

A run (all keys but ``out`` optional)::

    {"out": dir, "method": "lora" | a key of test_methods.CONFIGS, "pattern": "init" | "configure" | "late",
     "epochs": 2, "ckpt_path": None, "sharded": False, "accumulate": 1, "bf16_mixed": False,
     "compile": False, "config": {LoraConfig kwargs}, "wide": False, "limit_train_batches": None,
     "save_last": False, "stage": "fit" | "validate", "save_after_fit": False}

``pattern``: "init" builds the model in ``__init__`` (the callback adapts it before
``configure_model`` shards it); "configure" builds and shards in ``configure_model`` with
``apply_peft(self)`` in between; "late" does the same without ``apply_peft`` (must be refused).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def _config(run: dict[str, Any]):
    from lightning_peft import LoraConfig

    if run.get("method", "lora") == "lora":
        return LoraConfig(**run.get("config", LORA))
    from test_methods import CONFIGS

    return CONFIGS[run["method"]]()


class MemoryProbe:
    """Between steps: local vs full bytes of the frozen weights, frozen params with grads or optimizer state."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback
        from torch.distributed.tensor import DTensor

        class _Probe(Callback):
            def __init__(self) -> None:
                self.report: dict[str, Any] = {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if trainer.global_step != 1 or self.report:
                    return  # one optimizer step done, the next not started: "between steps"
                frozen = [p for p in pl_module.parameters() if not p.requires_grad]
                local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in frozen)
                full = sum(p.numel() * p.element_size() for p in frozen)
                in_state = {id(p) for opt in trainer.optimizers for p in opt.state}
                self.report = {
                    "frozen_local_bytes": local, "frozen_full_bytes": full,
                    "frozen_all_dtensor": all(isinstance(p, DTensor) for p in frozen),
                    "frozen_with_grad": sum(p.grad is not None for p in frozen),
                    "frozen_with_optimizer_state": sum(id(p) in in_state for p in frozen),
                    "trainable_with_optimizer_state": sum(id(p) in in_state for p in pl_module.parameters() if p.requires_grad),
                    "trainable": sum(p.requires_grad for p in pl_module.parameters()),
                }

        return _Probe()


class AdapterAtStart:
    """Each rank's view of the whole adapter when training starts (after a resume restored it): ``adapter_rank<r>.pt``."""

    def __new__(cls, out: str, peft_callback: Any):
        from lightning.pytorch.callbacks import Callback
        from torch.distributed.tensor import DTensor

        class _Dump(Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                own = pl_module.state_dict()
                local = {}
                for key in sorted(peft_callback._adapter_keys):
                    value = own[key]
                    # this rank's shard placed into a zero tensor of the full shape: no collective, so a
                    # rank holding another rank's shard (or a stale one) shows up as a difference
                    if isinstance(value, DTensor):
                        full = torch.zeros(value.shape, dtype=value.dtype)
                        chunk = value.to_local()
                        start = _shard_offset(value)
                        full[start:start + chunk.shape[0]] = chunk
                        local[key] = (full, start, chunk.shape[0])
                    else:
                        local[key] = (value.detach().clone(), 0, value.shape[0] if value.dim() else 1)
                torch.save(local, os.path.join(out, f"adapter_rank{trainer.global_rank}.pt"))

        return _Dump()


def _shard_offset(value: Any) -> int:
    """Row where this rank's dim-0 shard starts (FSDP2 shards dim 0 like torch.chunk)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    return int(offset[0]) if len(offset) else 0


def fit(run: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_fixtures import BuildAndShardLlamaModule, MicroBatchData, ShardedLlamaModule, wide_llama
    from test_bitfit import biased_llama

    from lightning_peft import PEFTCallback

    world = int(os.environ["WORLD_SIZE"])
    seed_everything(0)  # before the model is built and injected: FSDP does not sync module states
    build = biased_llama if run.get("method", "lora") != "lora" else (wide_llama if run.get("wide") else None)
    if build is not None:
        build = (lambda make: lambda: make().train())(build)  # the test models come in eval mode
    extra = dict(bf16_mixed=run.get("bf16_mixed", False), compile_layers=run.get("compile", False))
    pattern = run.get("pattern", "init")
    if pattern == "init":
        module = ShardedLlamaModule(model=build() if build else None, **extra)
    else:
        module = BuildAndShardLlamaModule(build_fn=build, call_apply_peft=pattern == "configure", **extra)
    probe = MemoryProbe()
    peft = PEFTCallback(_config(run), model_attr="model", verbose=False)
    extra_callbacks = [AdapterAtStart(run["out"], peft)] if run.get("ckpt_path") else []
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=run.get("sharded", False))
    trainer = Trainer(
        accelerator=run.get("accelerator", "cpu"), devices=world, strategy=strategy, max_epochs=run.get("epochs", 2),
        accumulate_grad_batches=run.get("accumulate", 1), use_distributed_sampler=False,
        default_root_dir=run["out"], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=run.get("limit_train_batches"),
        callbacks=[peft, probe, *extra_callbacks,
                   ModelCheckpoint(dirpath=os.path.join(run["out"], "ckpt"), filename="{epoch}", save_top_k=-1,
                                   save_last=run.get("save_last", False))],
    )
    if run.get("stage") == "validate":  # evaluation from a checkpoint: no optimizer to restore
        trainer.limit_val_batches = 1.0
        (metrics,) = trainer.validate(module, datamodule=MicroBatchData(), ckpt_path=run["ckpt_path"])
        return {"val_loss": float(metrics["val_loss"])}
    trainer.fit(module, datamodule=MicroBatchData(), ckpt_path=run.get("ckpt_path"))
    if run.get("save_after_fit"):
        trainer.save_checkpoint(os.path.join(run["out"], "after_fit.ckpt"))
    from torch._dynamo.utils import counters

    return {"micro_losses": module.micro_losses, "memory": probe.report, "global_step": trainer.global_step,
            "compiled_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def main(spec_path: str) -> None:
    rank = int(os.environ["RANK"])
    world = os.environ["WORLD_SIZE"]
    with open(spec_path) as f:
        runs = json.load(f)
    for run in runs:
        os.environ["WORLD_SIZE"] = world  # Lightning's environment forgets it at teardown
        os.makedirs(run["out"], exist_ok=True)
        try:
            result = fit(run)
        except Exception as err:  # the tests assert on the message
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        with open(os.path.join(run["out"], f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(runs: list[dict[str, Any]], world: int, workdir: str, timeout: float = 600) -> list[list[dict[str, Any]]]:
    """Run ``runs`` in sequence on ``world`` fresh processes; returns, per run, each rank's result dict."""
    spec = os.path.join(workdir, f"spec_{_free_port()}.json")
    with open(spec, "w") as f:
        json.dump(runs, f, default=os.fspath)
    port = _free_port()
    root = os.path.dirname(HERE)
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                   LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([HERE, root, os.environ.get("PYTHONPATH", "")]))
        log = open(os.path.join(workdir, f"log_{port}_rank{rank}.txt"), "w")
        procs.append((subprocess.Popen([sys.executable, __file__, spec], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(f"rank {rank}: {rc}\n" + open(log.name).read()[-4000:])
    assert not failed, "\n".join(failed)
    results = []
    for run in runs:
        per_rank = []
        for rank in range(world):
            with open(os.path.join(run["out"], f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
        results.append(per_rank)
    return results


if __name__ == "__main__":
    main(sys.argv[1])
