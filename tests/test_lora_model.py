"""LoRA model behaviour: init modes, merging, disabling, base keys, errors, peft-format files, compile."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft import LoraConfig, LoraLinear, PeftModel, get_peft_model
from lightning_peft.serialization import ADAPTER_WEIGHTS_NAME


def ids(batch=2, seq=8, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


# ---- initialisation -------------------------------------------------------------------------

def test_default_init_is_identity_kaiming_a_zero_b():
    base = tiny_llama()
    expected = base(ids()).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=0)
    for layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B.default.weight) == 0
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        assert layer.lora_A.default.weight.abs().max() <= bound
        assert layer.lora_A.default.weight.abs().max() > 0.5 * bound  # really drawn from the full range


def test_gaussian_init_std_one_over_r():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    a = torch.cat([layer.lora_A.default.weight.flatten() for layer in lora_layers(model)])
    assert abs(a.std().item() - 1 / 4) < 0.02
    assert all(torch.count_nonzero(layer.lora_B.default.weight) == 0 for layer in lora_layers(model))


def test_init_false_changes_the_output():
    base = tiny_llama()
    expected = base(ids()).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert not torch.allclose(model(ids()).logits, expected)


def test_scaling_alpha_over_r_and_rslora():
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["x"]).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=["x"]).scaling == 8.0


# ---- merge / unmerge / disable --------------------------------------------------------------

@pytest.mark.parametrize("factory,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_unmerge_round_trip_and_outputs(factory, targets):
    model = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged_out = model(ids()).logits
    model.merge_adapter()
    assert all(layer.merged for layer in lora_layers(model))
    torch.testing.assert_close(model(ids()).logits, unmerged_out, rtol=1e-5, atol=1e-5)
    model.merge_adapter()  # merging twice is a no-op
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_merged_weight_is_w_plus_scaled_ba_in_float64():
    model = get_peft_model(tiny_gpt2().double(), LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], init_lora_weights=False))
    layer = lora_layers(model)[0]
    w0 = layer.weight.detach().clone()  # Conv1D: [in, out]
    model.merge_adapter()
    expected = w0 + (5 / 3) * (layer.lora_B.default.weight @ layer.lora_A.default.weight).t()
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-12, atol=1e-12)


def test_merge_and_unload_gives_plain_layers_and_same_outputs():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    expected = model(ids()).logits
    plain = model.merge_and_unload()
    assert not lora_layers(plain)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(plain(ids()).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(k.endswith(("lora_A.default.weight", "lora_rng.default")) for k in plain.state_dict())


def test_unload_restores_the_original_weights():
    base = tiny_llama()
    expected = base(ids()).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    torch.testing.assert_close(plain(ids()).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_context(merged):
    base = tiny_llama()
    base_out = base(ids()).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    adapted_out = model(ids()).logits
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids()).logits, base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids()).logits, adapted_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(model(ids()).logits, adapted_out, rtol=1e-5, atol=1e-5)
    assert all(layer.merged == merged for layer in lora_layers(model))


def test_merge_refuses_nan_and_changes_nothing():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        lora_layers(model)[-1].lora_B.default.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or (torch.isnan(p).any() and torch.equal(torch.isnan(p), torch.isnan(before[n])))
    assert not any(layer.merged for layer in lora_layers(model))


# ---- base keys, wrapper pass-through --------------------------------------------------------

def test_base_state_dict_keys_unchanged_and_base_checkpoint_loads():
    base = tiny_llama()
    base_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(tiny_llama(seed=1), LoraConfig(r=4, target_modules="all-linear"))
    result = model.base_model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith(("lora_A.default.weight", "lora_B.default.weight", "lora_rng.default")) for k in result.missing_keys)
    for k, v in base_state.items():
        assert torch.equal(model.base_model.state_dict()[k], v)


def test_wrapper_passes_through_attributes_modes_and_generate():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert model.config is base.config
    model.train()
    assert base.training and all(layer.training for layer in lora_layers(model))
    model.eval()
    assert not base.training
    prompt = ids(1, 5)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    from test_lora_vs_peft import copy_lora_weights

    copy_lora_weights(model, theirs)
    theirs.eval()
    assert torch.equal(out, theirs.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))


def test_plain_module_with_all_linear_skips_the_head():
    net = nn.Sequential()
    net.add_module("encoder", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)))
    net.add_module("head", nn.Linear(16, 2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules="all-linear"))
    assert len(lora_layers(model)) == 2 and type(net.head) is nn.Linear
    assert model(torch.randn(3, 8)).shape == (3, 2)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
        ({"target_modules": ["nonexistent"]}, r"matched no module .* could be adapted \(nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d\): .*q_proj"),
        ({"target_modules": None}, "target_modules is not set"),
        ({"target_modules": ["self_attn"]}, r"can adapt nn.Linear.*self_attn \(LlamaAttention\)"),
        ({"target_modules": ["norm"]}, r"can adapt nn.Linear.*norm \(LlamaRMSNorm\)"),
    ],
)
def test_bad_input_clear_error_and_model_untouched(kwargs, message):
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config_kwargs = {"r": 4, "target_modules": ["q_proj"], **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        get_peft_model(model, LoraConfig(**config_kwargs))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_double_injection_is_refused():
    model = tiny_llama()
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has adapter layers"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj"]))


# ---- peft's file format, both ways -------------------------------------------------------------

def test_save_pretrained_loads_in_peft(tmp_path):
    ours = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                                  bias="lora_only", init_lora_weights=False))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ours.eval()
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    theirs.eval()
    torch.testing.assert_close(theirs(ids()).logits, ours(ids()).logits, rtol=1e-5, atol=1e-5)


def test_peft_files_load_here(tmp_path):
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    ours.eval()
    torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters()[0] == 0  # inference mode by default, like peft


def test_load_mismatching_adapter_names_the_problem_and_leaves_model(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = torch.zeros(3, 64)  # wrong rank
    save_file(weights, str(tmp_path / ADAPTER_WEIGHTS_NAME))
    model = tiny_llama()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"shape mismatches .*lora_A.default.weight: checkpoint \(3, 64\) vs model \(4, 64\)"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())


def test_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    good = (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes()
    import lightning_peft.serialization as ser

    def failing_save(state, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path))
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS_NAME]


# ---- torch.compile ---------------------------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    model = get_peft_model(net, LoraConfig(r=4, lora_dropout=0.2, target_modules=["0", "2"], init_lora_weights=False))
    model.train()
    eager_model = copy.deepcopy(model)
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)
    y_compiled = compiled(x)
    y_eager = eager_model(x)  # same seeds and offsets: same dropout masks
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    y_compiled.square().sum().backward()
    y_eager.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), eager_model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_injected_layers_follow_the_models_mode():
    """Injecting into a model in eval mode must not switch LoRA dropout on."""
    model = get_peft_model(tiny_llama().eval(), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False))
    assert all(not layer.training for layer in lora_layers(model))
    torch.testing.assert_close(model(ids()).logits, model(ids()).logits, rtol=0, atol=0)
