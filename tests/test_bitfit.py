"""BitFit: exactly the bias terms (and modules_to_save) train; disable / unload / merge; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import BitFitConfig, PeftModel, get_peft_model


def biased_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=VOCAB, max_position_embeddings=64, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


FACTORIES = {"llama_bias": biased_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def ids(seed: int = 0, shape=(4, 8)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def all_bias_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_one_optimizer_step_changes_exactly_the_biases_and_modules_to_save(kind):
    head = ["classifier"] if kind == "bert" else None
    model = get_peft_model(FACTORIES[kind](), BitFitConfig(modules_to_save=head)).train()
    inner = model.base_model
    head_params = {"classifier.weight", "classifier.bias"} if head else set()
    expected = all_bias_names(inner) | head_params
    assert {n for n, p in inner.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    x = ids()
    labels = torch.tensor([0, 1, 2, 1]) if kind == "bert" else x
    loss = model(input_ids=x, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in inner.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in inner.named_parameters() if not torch.equal(p, before[n])}
    # a parameter moves iff it is trainable and got a non-zero gradient (key biases get ~none: softmax
    # is invariant to adding the same number to every score of a query)
    assert changed == {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    assert changed <= expected
    assert len(changed) >= 0.7 * len(expected)
    assert all(p.grad is None for n, p in inner.named_parameters() if n not in expected)


def test_target_modules_select_biases():
    model = get_peft_model(tiny_bert(), BitFitConfig(target_modules=["query", "value"]))
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert trainable == {f"bert.encoder.layer.{i}.attention.self.{m}.bias" for i in range(2) for m in ("query", "value")}
    model = get_peft_model(tiny_bert(), BitFitConfig(target_modules=r".*\.intermediate\.dense"))
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert trainable == {f"bert.encoder.layer.{i}.intermediate.dense.bias" for i in range(2)}


def test_trainable_count_is_the_bias_count():
    base = tiny_gpt2()
    n_bias = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    model = get_peft_model(base, BitFitConfig())
    assert model.get_nb_trainable_parameters()[0] == n_bias


def test_disable_unload_and_merge_and_unload():
    base = tiny_gpt2()
    x = ids()
    with torch.no_grad():
        plain = base(input_ids=x).logits

    def trained():
        model = get_peft_model(copy.deepcopy(base), BitFitConfig())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        return model

    model = trained()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        assert not torch.allclose(adapted, plain)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=0, atol=0)
        unloaded = model.unload()  # original biases back
        torch.testing.assert_close(unloaded(input_ids=x).logits, plain, rtol=0, atol=0)
        merged = trained().merge_and_unload()  # trained biases kept, no adapter left
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=0)
    # the unloaded model takes a new adapter again
    get_peft_model(merged, BitFitConfig())


def test_adapter_file_holds_only_biases_and_loads(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.endswith(".bias") or k.endswith("classifier.weight") for k in saved)
    assert len(saved) == len(all_bias_names(base)) + 1
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
        with loaded.disable_adapter():  # the fresh base's biases were kept aside at load
            assert all(torch.equal(dict(loaded.base_model.named_parameters())[n], p)
                       for n, p in base.named_parameters() if n.endswith(".bias"))


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (tiny_llama, {}, r"LlamaForCausalLM has no bias parameters, so BitFit has nothing to train"),
        (tiny_bert, {"target_modules": ["nope"]}, r"matched no module with a bias in BertForSequenceClassification; modules with biases: .*query"),
    ],
)
def test_bad_input_clear_error_and_model_untouched(factory, kwargs, message):
    model = factory()
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, BitFitConfig(**kwargs))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
