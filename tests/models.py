"""Tiny transformers models built from configs (no hub), shared by the tests."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def tiny_llama(seed: int = 0, kv_heads: int = 4) -> LlamaForCausalLM:
    """2-layer Llama; ``kv_heads < 4`` gives grouped-query attention."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def reference_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama of GUIDE section 6 (the README's numbers)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def random_ids(seed: int = 0, shape: tuple[int, ...] = (2, 6)) -> torch.Tensor:
    """Token ids ``[*shape]`` in the tiny models' vocabulary, from their own generator."""
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_alone_and_right_padded(model: torch.nn.Module, x: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``x [1, T]`` with an all-ones mask, and of ``x`` followed by ``pad`` masked-out tokens."""
    padded = torch.cat((x, torch.zeros(1, pad, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones_like(x), torch.zeros(1, pad, dtype=torch.long)), dim=1)
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits, model(input_ids=padded, attention_mask=mask).logits


def assert_outputs_and_grads_match(ours, theirs, run, their_key, *, rtol: float, atol: float) -> list[str]:
    """Run ``run(model) -> output`` on our PeftModel and on peft's, compare the outputs, backpropagate one
    random gradient through both and compare the gradient of every trainable parameter of ours with peft's
    ``their_key(name)``. Returns the names compared (callers check it is not empty)."""
    y_ours, y_theirs = run(ours), run(theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    their_params = dict(theirs.named_parameters())
    names = [n for n, p in ours.base_model.named_parameters() if p.requires_grad]
    for name, param in ours.base_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, their_params[their_key(name)].grad, rtol=rtol, atol=atol)
    return names


@torch.no_grad()
def assert_merge_round_trip(model, ids: torch.Tensor, *, rtol: float, atol: float, weight_tol: float) -> torch.Tensor:
    """merge_adapter() keeps the outputs, unmerge_adapter() gives back every non-adapter tensor (within
    ``weight_tol``), merge_and_unload() on a copy keeps the outputs. Returns the adapted logits."""
    adapter = set(model.adapter_state_dict())
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if k not in adapter}
    adapted = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=rtol, atol=atol)
    model.unmerge_adapter()
    for key, value in before.items():
        torch.testing.assert_close(model.base_model.state_dict()[key], value, rtol=weight_tol, atol=weight_tol)
    merged = copy.deepcopy(model).merge_and_unload()
    from lightning_peft.tuners import AdapterLayer

    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())  # plain layers back in place
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=rtol, atol=atol)
    return adapted


def peft_key(name: str) -> str:
    """peft's parameter name for our ``name`` (the same, but DoRA's magnitude, which a DoRA layer holds once, is per adapter there)."""
    return "base_model.model." + name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")


MODEL_FACTORIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "llama_gqa": (lambda seed=0: tiny_llama(seed, kv_heads=2), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
    "bert": (tiny_bert, ["query", "value", "dense"]),
}
