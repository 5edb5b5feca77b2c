"""Named adapters and mixed batches on a GPU: the same results as on the CPU (runs in benchmarks/gpu_check.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import random_ids, tiny_llama

from lightning_peft import LoraConfig, get_peft_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@requires_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_mixed_batch_on_cuda_equals_each_adapter_alone(dropout):
    """Forward and backward of a mixed batch (grouped kernels) against each adapter run alone on its rows, fp32."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.cuda().train()
    model.set_requires_grad(["a", "b"])
    rows = ["b", "a", "__base__", "b", "a"]
    ids = random_ids(1, (len(rows), 6)).cuda()
    rng = {k: v.clone() for k, v in model.state_dict().items() if ".lora_rng." in k}
    out = model(input_ids=ids, adapter_names=rows).logits
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(params, torch.autograd.grad(out.square().sum(), list(params.values()))))
    for name in ("a", "b"):
        picked = [i for i, n in enumerate(rows) if n == name]
        model.load_state_dict(rng, strict=False)
        model.set_adapter(name)
        alone = model(input_ids=ids[picked]).logits
        torch.testing.assert_close(out[picked], alone, rtol=2e-4, atol=2e-4)
        own = {n: p for n, p in params.items() if f".{name}." in n}
        for key, grad in zip(own, torch.autograd.grad(alone.square().sum(), list(own.values()))):
            torch.testing.assert_close(grads[key], grad, rtol=2e-3, atol=2e-4)


@requires_cuda
def test_mixed_batch_on_cuda_matches_the_cpu():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    model.eval()
    ids, rows = random_ids(2, (3, 5)), ["b", "__base__", "a"]
    with torch.no_grad():
        cpu = model(input_ids=ids, adapter_names=rows).logits
        gpu = copy.deepcopy(model).cuda()(input_ids=ids.cuda(), adapter_names=rows).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-4, atol=2e-4)
