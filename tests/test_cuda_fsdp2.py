"""FSDP2 on CUDA with bf16 mixed precision (``fully_shard(..., mp_policy=MixedPrecisionPolicy(bf16, fp32 reduce))``
under ``ModelParallelStrategy``): LoRA with dropout trains, both checkpoint forms hold only the fp32 adapter, and
a resume from either reproduces the uninterrupted run.

One GPU runs one process (NCCL refuses two ranks on one device, and Lightning gives each rank its own
device); with two or more GPUs a 2-process run resumes on 1 process as well. Everything runs in fresh
processes through ``fsdp2_worker.launch`` and is checked on the files they leave, like tests/test_fsdp2.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from fsdp2_worker import launch
from lightning_fixtures import load_ckpt

from lightning_peft import LoraConfig, adapter_state_dict, inject_adapter
from lightning_peft.checkpoint import read_sharded_checkpoint
from models import tiny_llama

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA devices")

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
MICRO = 16  # 2 epochs x 8 micro-batches of 4
SAME_WORLD_ATOL = 2e-3  # the same bf16 run twice on one GPU; kernels with atomics may reorder sums
OTHER_WORLD_ATOL = 3e-2  # bf16 logits (8 bits of mantissa) summed in another order: loss ~5 moves by ~1e-2


def _expected_keys() -> set[str]:
    reference = tiny_llama(0)
    inject_adapter(reference, LoraConfig(**LORA))
    return {"model." + k for k in adapter_state_dict(reference)}


def _result(per_rank) -> dict[int, float]:
    losses: dict[int, float] = {}
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"rank {rank}: {result.get('traceback')}"
        losses.update({int(k): v for k, v in result["micro_losses"].items()})
    return losses


def _adapter(path) -> dict[str, torch.Tensor]:
    return read_sharded_checkpoint(path)["state_dict"] if path.is_dir() else load_ckpt(path)["state_dict"]


def _check(straight, resumed, straight_losses, resumed_losses, atol):
    keys = _expected_keys()
    first, last = _adapter(straight / "ckpt/epoch=0.ckpt"), _adapter(straight / "ckpt/epoch=1.ckpt")
    again = _adapter(resumed / "ckpt/epoch=1.ckpt")
    for state in (first, last, again):
        assert set(state) == keys  # only the adapter + its dropout RNG keys
        assert {v.dtype for k, v in state.items() if not k.endswith("lora_rng.default")} == {torch.float32}  # fp32 master weights
    assert any(not torch.equal(first[k], last[k]) for k in keys if "lora_B" in k)
    assert sorted(straight_losses) == list(range(MICRO)) and all(torch.isfinite(torch.tensor(list(straight_losses.values()))))
    assert sorted(resumed_losses) == list(range(MICRO // 2, MICRO))
    for micro in resumed_losses:
        assert abs(resumed_losses[micro] - straight_losses[micro]) < atol, micro
    for key in keys:
        torch.testing.assert_close(again[key].float(), last[key].float(), rtol=0, atol=atol, msg=key)


@requires_cuda
@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_fsdp2_bf16_mixed_one_gpu_adapter_only_checkpoints_and_resume(tmp_path, sharded):
    base = dict(accelerator="cuda", bf16_mixed=True, accumulate=2, sharded=sharded)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runs = [dict(out=straight, **base), dict(out=resumed, ckpt_path=straight / "ckpt/epoch=0.ckpt", pattern="configure", **base)]
    results = launch(runs, 1, os.fspath(tmp_path))
    memory = results[0][0]["memory"]
    assert memory["frozen_all_dtensor"] and memory["frozen_with_grad"] == 0 and memory["frozen_with_optimizer_state"] == 0
    _check(straight, resumed, _result(results[0]), _result(results[1]), SAME_WORLD_ATOL)


@requires_two_gpus
def test_fsdp2_bf16_mixed_two_gpus_resumes_on_one(tmp_path):
    base = dict(accelerator="cuda", bf16_mixed=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    (two,) = launch([dict(out=straight, **base)], 2, os.fspath(tmp_path))
    (one,) = launch([dict(out=resumed, accumulate=2, ckpt_path=straight / "ckpt/epoch=0.ckpt", **base)], 1, os.fspath(tmp_path))
    _check(straight, resumed, _result(two), _result(one), OTHER_WORLD_ATOL)
