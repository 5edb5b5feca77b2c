"""QLoRA: LoRA and DoRA on bitsandbytes 4-bit / 8-bit bases, against peft itself on the same quantized model.

Both sides load the same saved tiny Llama through transformers' ``BitsAndBytesConfig`` (quantization is
deterministic, so the two bases are bit-identical) and run their adapters with copied weights. Outputs
and gradients then agree to fp32 rounding: the quantized base is the same bitsandbytes computation on
both sides. Merging compares with peft's merge (dequantize, merge, requantize) and with a from-scratch
dequantize / requantize. bitsandbytes repacks 4-bit CPU weights at the first inference-mode forward
(lossy: bf16 scales) and peft's DoRA and merge do not read that layout, so comparisons of those run in
training mode (dropout 0), where bitsandbytes keeps the standard layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_peft import IA3Config, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from lightning_peft.quantization import dequantize_weight
from lightning_peft.tuners.lora_quantized import QuantizedDoraLinear, QuantizedLoraLinear
from models import VOCAB, assert_outputs_and_grads_match, peft_key, random_ids

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4_double_bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    """A tiny Llama on disk. Feature sizes are multiples of bitsandbytes' 64-block (its CPU repacking needs it)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path: str, quant: str, **kwargs) -> LlamaForCausalLM:
    """The saved model quantized by transformers as ``QUANT[quant]`` says, on the CPU."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                                device_map="cpu", **kwargs)


def twins(path: str, quant: str, *, copy_weights: bool = True, **settings):
    """Our and peft's PeftModel on two loads of the same quantized model; ours' adapter weights copied into peft's."""
    settings = dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **settings)
    ours = get_peft_model(load(path, quant), LoraConfig(**settings))
    theirs = peft.get_peft_model(load(path, quant), peft.LoraConfig(**settings))
    if copy_weights:
        their_params = dict(theirs.named_parameters())
        with torch.no_grad():
            for name, param in ours.base_model.named_parameters():
                if param.requires_grad:
                    their_params[peft_key(name)].copy_(param)
    return ours, theirs


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("quant", list(QUANT))
def test_lora_outputs_and_gradients_match_peft(saved_llama, quant):
    ours, theirs = twins(saved_llama, quant)
    layers = [m for m in ours.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(layers) == 2 * len(TARGETS)
    assert all(layer.lora_A["default"].weight.dtype == torch.float32 for layer in layers)  # peft's factor dtype on a quantized base
    ours.train(), theirs.train()
    ids = random_ids(1)
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: logits(m, ids), peft_key, rtol=1e-5, atol=1e-5)
    assert len(names) == 2 * 2 * len(TARGETS)
    ours.eval(), theirs.eval()
    with torch.no_grad():  # inference mode: bitsandbytes' other CPU kernels, on both sides
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dora_init_outputs_and_gradients_match_peft(saved_llama, quant):
    ours, theirs = twins(saved_llama, quant, copy_weights=False, use_dora=True, init_lora_weights=True)
    their_params = dict(theirs.named_parameters())
    magnitudes = [(n, p) for n, p in ours.base_model.named_parameters() if n.endswith("lora_magnitude_vector")]
    assert magnitudes and all(isinstance(m, QuantizedDoraLinear) for m in ours.modules() if hasattr(m, "row_norms"))
    for name, magnitude in magnitudes:  # B = 0: both start at the row norms of their dequantized weight
        torch.testing.assert_close(magnitude, their_params[peft_key(name)], rtol=1e-5, atol=1e-6)
    ours, theirs = twins(saved_llama, quant, use_dora=True)
    ours.train(), theirs.train()
    ids = random_ids(2)
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: logits(m, ids), peft_key, rtol=1e-5, atol=1e-5)
    assert any(n.endswith("lora_magnitude_vector") for n in names)


def quantized_mlp(quant: str) -> torch.nn.Sequential:
    """A biased MLP quantized by hand (bitsandbytes layers in place of nn.Linear), the same for every call."""
    torch.manual_seed(1)
    dense = [torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)]
    layers = []
    for lin in dense:
        if quant == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type=quant)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant)
        q.bias = torch.nn.Parameter(lin.bias.data.clone())
        layers.append(q.to("cpu"))  # bitsandbytes quantizes when the layer moves to a device
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    net.__dict__["is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit"] = True  # what peft looks for
    return net


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_biased_hand_quantized_layers_match_peft(quant, dora):
    settings = dict(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, use_dora=dora)
    ours = get_peft_model(quantized_mlp(quant), LoraConfig(**settings)).train()
    theirs = peft.get_peft_model(quantized_mlp(quant), peft.LoraConfig(**settings)).train()
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if param.requires_grad:
                their_params[peft_key(name)].copy_(param)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: m(x), peft_key, rtol=1e-5, atol=1e-5)
    assert len(names) == 2 * (3 if dora else 2)


def test_named_adapters_and_mixed_batches_on_a_quantized_base_match_peft(saved_llama):
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False)
    ours, theirs = twins(saved_llama, "nf4")
    ours.add_adapter("b", LoraConfig(target_modules=["q_proj", "k_proj"], **settings))
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "k_proj"], **settings))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if ".b." in name:
                their_params[peft_key(name)].copy_(param)
    ours.eval(), theirs.eval()  # peft serves mixed batches in eval mode only
    ids = random_ids(10, (3, 6))
    rows = ["b", "__base__", "default"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, adapter_names=rows).logits, theirs(input_ids=ids, adapter_names=rows).logits,
                                   rtol=1e-5, atol=1e-5)
        ours.set_adapter("b"), theirs.set_adapter("b")
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


def _merge(model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("quant, dora", [("nf4", False), ("fp4_double_bf16", False), ("int8", False), ("nf4", True)])
def test_merge_requantizes_like_peft_and_reports_the_error(saved_llama, quant, dora):
    ours, theirs = twins(saved_llama, quant, use_dora=dora)
    ours.train(), theirs.train()  # the standard 4-bit layout (see the module docstring)
    ids = random_ids(3)
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        adapted = logits(ours, ids)
        # from scratch: the dense weight merging should store, in fp32
        dense = dequantize_weight(layer.restore_base()).float()
        if dora:
            full = dense + layer.delta_weight()
            expected = (layer.lora_magnitude_vector / torch.linalg.norm(full, dim=1))[:, None] * full
        else:
            expected = dense + layer.delta_weight()
    messages = _merge(ours)
    _merge(theirs)
    assert layer.merged
    their_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    # the same stored weight as peft's merge, but for fp32 rounding: in the block scales (tiny), and where
    # it moves a value across a quantization boundary (one code step, rare)
    mine, peft_w = dequantize_weight(layer.restore_base()), dequantize_weight(their_layer)
    assert ((mine - peft_w).abs() > 1e-5).float().mean() < 0.01
    error = (mine.float() - expected).abs().max().item()
    reported = [m for m in messages if "requantized" in m and "in_features=64, out_features=64" in m]
    assert reported and all("max abs error" in m for m in messages)
    assert f"max abs error {error:.3g}" in reported[0]
    with torch.no_grad():
        merged = logits(ours, ids)
        torch.testing.assert_close(merged, logits(theirs, ids), rtol=0, atol=1e-3)
        # the merged model computes the adapted one up to the requantisation
        assert (merged - adapted).abs().max() < (0.05 if quant == "int8" else 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.unmerge_adapter(), theirs.unmerge_adapter()
    assert not layer.merged
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-3)


def test_merge_and_unload_gives_back_bitsandbytes_layers_with_the_merged_weight(saved_llama):
    ours, theirs = twins(saved_llama, "nf4")
    ours.train(), theirs.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, their_plain = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    assert not any(isinstance(m, QuantizedLoraLinear) for m in plain.modules())
    assert plain.state_dict().keys() == their_plain.state_dict().keys()  # the quantized model's own keys
    ids = random_ids(4)
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, ids), logits(their_plain, ids), rtol=0, atol=1e-3)


def test_dequantize_reads_the_cpu_repacked_4bit_layout(saved_llama):
    model = load(saved_llama, "nf4").eval()
    layer = model.model.layers[0].self_attn.q_proj
    before = dequantize_weight(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x)  # may repack the weight for the AVX512-BF16 kernel (bf16 scales)
    from bitsandbytes.nn.modules import has_avx512bf16

    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == has_avx512bf16()
    after = dequantize_weight(layer)
    torch.testing.assert_close(after.float(), before.float(), rtol=1e-2, atol=1e-3)  # bf16 scales
    torch.testing.assert_close(y, x @ after.float().t(), rtol=1e-2, atol=1e-2)  # what the layer computes


def test_merging_after_an_inference_forward_reads_the_repacked_weight(saved_llama):
    ours, _ = twins(saved_llama, "nf4")
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        dense = dequantize_weight(layer.restore_base()).float() + layer.delta_weight()
        ours.eval()
        logits(ours, random_ids(9))  # bitsandbytes may repack the CPU weights now
        direct = bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(dense, quant_type="nf4")).float()
    _merge(ours)
    merged = dequantize_weight(layer.restore_base()).float()
    # as close to the dense merge as quantizing it directly is, but for the bf16 scales of the repacked layout
    assert (merged - dense).abs().max() < 1.1 * (direct - dense).abs().max() + 1e-3


def test_state_dict_keeps_the_quantized_models_keys_and_values(saved_llama):
    base = load(saved_llama, "nf4_double")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(load(saved_llama, "nf4_double"), LoraConfig(r=4, target_modules=TARGETS))
    state = model.base_model.state_dict()
    adapter = set(model.adapter_state_dict())
    assert set(state) - adapter == set(base_state)
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key


def test_disabled_adapter_computes_the_quantized_base(saved_llama):
    ours, _ = twins(saved_llama, "nf4")
    base = load(saved_llama, "nf4").train()
    ours.train()
    ids = random_ids(5)
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(base, ids), rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_files_load_both_ways_on_the_quantized_base(saved_llama, tmp_path, dora):
    ours, theirs = twins(saved_llama, "nf4", use_dora=dora)
    ours.train(), theirs.train()
    ids = random_ids(6)
    with torch.no_grad():
        expected = logits(ours, ids)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    in_peft = peft.PeftModel.from_pretrained(load(saved_llama, "nf4"), str(tmp_path / "ours")).train()
    here = PeftModel.from_pretrained(load(saved_llama, "nf4"), str(tmp_path / "theirs")).train()
    with torch.no_grad():
        torch.testing.assert_close(logits(in_peft, ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(here, ids), expected, rtol=1e-5, atol=1e-5)


def _flags(model) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kwargs", [{}, {"use_gradient_checkpointing": False}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}])
def test_prepare_model_for_kbit_training_matches_peft(saved_llama, kwargs):
    ours = prepare_model_for_kbit_training(load(saved_llama, "nf4", dtype=torch.bfloat16), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of gradient_checkpointing_enable, called by peft
        theirs = peft.prepare_model_for_kbit_training(load(saved_llama, "nf4", dtype=torch.bfloat16), **kwargs)
    flags = _flags(ours)
    assert flags == _flags(theirs)
    assert flags["model.norm.weight"] == (torch.float32, False)  # was bf16
    assert ours.is_activation_checkpointing == theirs.is_activation_checkpointing == kwargs.get("use_gradient_checkpointing", True)
    ids = random_ids(7)
    seen: dict[str, bool] = {}
    for side, model in (("ours", ours), ("theirs", theirs)):  # whether the embeddings' output requires grad
        model.train()
        handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out, side=side: seen.update({side: out.requires_grad}))
        model(input_ids=ids)
        handle.remove()
    # (with checkpointing on, transformers itself also hooks the embeddings, whatever use_reentrant says)
    assert seen["ours"] == seen["theirs"] == kwargs.get("use_gradient_checkpointing", True)


def test_prepare_refuses_checkpointing_without_transformers_and_changes_nothing():
    net = torch.nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False), torch.nn.LayerNorm(8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="use_gradient_checkpointing=True needs a transformers model.*use_gradient_checkpointing=False"):
        prepare_model_for_kbit_training(net)
    assert net[1].weight.dtype == torch.bfloat16 and net[1].weight.requires_grad
    prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    assert net[1].weight.dtype == torch.float32 and not net[1].weight.requires_grad


def test_training_steps_change_only_the_adapter(saved_llama):
    model = prepare_model_for_kbit_training(load(saved_llama, "nf4"))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(8, (4, 16))
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.base_model.state_dict()
    for key, value in frozen.items():  # the quantized weights, their quantization state, norms, embeddings
        assert torch.equal(after[key], value), key
    changed = [k for k, v in model.adapter_state_dict().items() if k.endswith("lora_B.default.weight") and not torch.equal(v, adapter_before[k])]
    assert len(changed) == 2 * len(TARGETS)


def test_the_lightning_callback_trains_an_adapter_on_a_quantized_model(saved_llama, tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    from lightning_fixtures import LlamaModule, TokensData, trainer_kwargs
    from lightning_peft import PEFTCallback

    seed_everything(0)
    module = LlamaModule(model=load(saved_llama, "nf4").train())
    frozen = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = PEFTCallback(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), model_attr="model")
    Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[callback])).fit(module, datamodule=TokensData())
    assert sum(isinstance(m, QuantizedLoraLinear) for m in module.model.modules()) == 2 * len(TARGETS)
    assert module.losses[-1] < module.losses[0]
    after = module.model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key


def test_methods_other_than_lora_and_principal_init_are_refused_on_quantized_layers(saved_llama):
    model = load(saved_llama, "nf4")
    with pytest.raises(TypeError, match=r"q_proj is a bitsandbytes Linear4bit \(4bit\), which .* cannot adapt: use LoRA"):
        get_peft_model(model, IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' initialises from the weight .* Linear4bit with torch.uint8"):
        get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    assert type(model.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    assert all(p.requires_grad for n, p in model.named_parameters() if "norm" in n)


_WITHOUT_BNB = r"""
import sys
sys.modules["bitsandbytes"] = None  # any import of it now raises ImportError
import torch
import lightning_peft
from lightning_peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from lightning_peft.quantization import dequantize_weight
from models import tiny_llama, random_ids

model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
model(input_ids=random_ids())
prepare_model_for_kbit_training(tiny_llama(), use_gradient_checkpointing=False)
try:
    dequantize_weight(torch.nn.Linear(2, 2))
except ImportError as exc:
    print("ERROR:", exc)
"""


def test_everything_but_qlora_works_without_bitsandbytes():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)]))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_BNB], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR: dequantizing a quantized layer needs bitsandbytes, which is not installed: pip install lightning_peft[qlora]" in out.stdout
