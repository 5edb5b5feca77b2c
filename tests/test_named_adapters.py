"""Several named adapters in one model, against peft's multi-adapter API with the same weights, and mixed batches
against each adapter run alone on its own rows (fp64, dropout on, outputs and gradients)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import MODEL_FACTORIES, random_ids, tiny_gpt2, tiny_llama

from lightning_peft import LoraConfig, PeftModel, get_peft_model
from lightning_peft.tuners.adapter import AdapterConfig
from lightning_peft.tuners.lora_branch import LoraBranch
from lightning_peft import BitFitConfig, IA3Config, PrefixTuningConfig
from lightning_peft.tuners.prompt import PromptTuningConfig

# Adapters that differ in rank, alpha, dropout and targets: "b" leaves some of "a"'s layers plain.
SETTINGS = {
    "llama_gqa": {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                  "b": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]),
                  "c": dict(r=3, lora_alpha=3, target_modules=["k_proj", "down_proj"])},
    "gpt2": {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
             "b": dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"]),
             "c": dict(r=3, lora_alpha=3, target_modules=["c_proj"])},
    "bert": {"a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
             "b": dict(r=2, lora_alpha=6, target_modules=["query", "key", "dense"]),
             "c": dict(r=3, lora_alpha=3, target_modules=["value"])},
}


def twins(kind: str, names=("a", "b", "c"), dropout: float = 0.0):
    """Our PeftModel and peft's with the same base and the same (random) adapter weights, adapters ``names``."""
    factory, _ = MODEL_FACTORIES[kind]
    base = factory()
    settings = SETTINGS[kind]
    cfg = lambda cls, n: cls(init_lora_weights=False, lora_dropout=dropout, **settings[n])  # noqa: E731
    ours = get_peft_model(copy.deepcopy(base), cfg(LoraConfig, names[0]), adapter_name=names[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg(peft.LoraConfig, names[0]), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, cfg(LoraConfig, name))
        theirs.add_adapter(name, cfg(peft.LoraConfig, name))
    their_params = dict(theirs.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, param in ours.base_model.named_parameters():
            if ".lora_" in key:
                their_params["base_model.model." + key].copy_(param)
                copied += 1
    assert copied == sum(1 for k in their_params if ".lora_" in k)
    return base, ours, theirs


def inputs(kind: str, rows: int, seed: int = 0) -> dict:
    return {"input_ids": random_ids(seed, (rows, 5))}


def logits(model, **kwargs):
    return model(**kwargs).logits


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2", "bert"])
def test_each_adapter_and_a_mixed_batch_match_peft(kind):
    _, ours, theirs = twins(kind)
    ours.eval(), theirs.eval()
    x = inputs(kind, 6)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            assert ours.active_adapter == name
            torch.testing.assert_close(logits(ours, **x), logits(theirs, **x), rtol=1e-5, atol=1e-5)
        rows = ["b", "__base__", "a", "c", "b", "a"]  # unsorted, with a base row
        torch.testing.assert_close(logits(ours, adapter_names=rows, **x), logits(theirs, adapter_names=rows, **x), rtol=1e-5, atol=1e-5)
    assert sorted(ours.peft_config) == ["a", "b", "c"] and ours.peft_config["b"].r == 2


def test_mixed_batch_over_embedding_lora_matches_peft():
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False), "e")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False), "e")
    ours.add_adapter("f", LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens"], init_lora_weights=False))
    theirs.add_adapter("f", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens"], init_lora_weights=False))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, param in ours.base_model.named_parameters():
            if ".lora_" in key:
                their_params["base_model.model." + key].copy_(param)
    ours.eval(), theirs.eval()
    ids, names = random_ids(2, (3, 5)), ["f", "__base__", "e"]
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, input_ids=ids, adapter_names=names), logits(theirs, input_ids=ids, adapter_names=names),
                                   rtol=1e-5, atol=1e-5)


def test_generate_with_a_mixed_batch_matches_peft():
    _, ours, theirs = twins("llama_gqa")
    ours.eval(), theirs.eval()
    ids = random_ids(3, (4, 4))
    names = ["c", "a", "__base__", "b"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(ours.generate(input_ids=ids, adapter_names=names, **kwargs),
                                   theirs.generate(input_ids=ids, adapter_names=names, **kwargs))
        beams = dict(kwargs, num_beams=2)  # beam search repeats each row: the names follow their rows
        torch.testing.assert_close(ours.generate(input_ids=ids, adapter_names=names, **beams),
                                   theirs.generate(input_ids=ids, adapter_names=names, **beams))


def _rng_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_rng." in k}


def test_mixed_training_batch_equals_each_adapter_alone_on_its_rows_fp64_with_dropout():
    """Row by row, a mixed batch computes what each adapter computes alone on its own rows (same dropout masks),
    and each adapter's gradient comes from its rows only."""
    _, model, _ = twins("llama_gqa", dropout=0.3)
    model.double().train()
    model.set_requires_grad(["a", "b", "c"])
    rows = ["b", "a", "__base__", "b", "c", "a", "b"]
    ids = random_ids(5, (len(rows), 6))
    grad_out = torch.randn(len(rows), 6, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rng = _rng_state(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = logits(model, input_ids=ids, adapter_names=rows)
    mixed_grads = dict(zip(params, torch.autograd.grad((out * grad_out).sum(), list(params.values()), allow_unused=True)))

    for name in ("a", "b", "c"):
        picked = [i for i, n in enumerate(rows) if n == name]
        model.load_state_dict(rng, strict=False)  # the same dropout keys as the mixed forward saw
        model.set_adapter(name)
        alone = logits(model, input_ids=ids[picked])
        torch.testing.assert_close(out[picked], alone, rtol=1e-10, atol=1e-10)
        own = {n: p for n, p in params.items() if f".{name}." in n}
        grads = torch.autograd.grad((alone * grad_out[picked]).sum(), list(own.values()))
        for (key, _), grad in zip(own.items(), grads):
            torch.testing.assert_close(mixed_grads[key], grad, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        model.set_adapter("a")
        with model.disable_adapter():
            torch.testing.assert_close(out[2], logits(model, input_ids=ids[2:3])[0], rtol=1e-10, atol=1e-10)


def test_training_a_mixed_batch_changes_only_the_adapters_present():
    _, model, _ = twins("llama_gqa", dropout=0.1)
    model.train()
    model.set_requires_grad(["a", "b", "c"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits(model, input_ids=random_ids(2, (3, 5)), adapter_names=["a", "__base__", "a"]).square().mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A.a." in k or ".lora_B.a." in k or ".lora_rng." in k for k in changed)


def test_several_adapters_save_in_peft_layout_and_load_both_ways(tmp_path):
    base, ours, theirs = twins("gpt2")
    ours.eval(), theirs.eval()
    x = inputs("gpt2", 3)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert (tmp_path / "ours" / "b" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()  # no adapter is called "default"
    for name in ("a", "b", "c"):
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours" / name), adapter_name=name).eval()
        here = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs" / name), adapter_name=name).eval()
        ours.set_adapter(name)
        with torch.no_grad():
            expected = logits(ours, **x)
            torch.testing.assert_close(logits(in_peft, **x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits(here, **x), expected, rtol=1e-5, atol=1e-5)
    # one model that loads the others' directories beside its first adapter, and serves a mixed batch
    here = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs" / "a"), adapter_name="a")
    here.load_adapter(str(tmp_path / "theirs" / "b"), adapter_name="b")
    here.load_adapter(str(tmp_path / "ours" / "c"), adapter_name="c")
    assert here.active_adapter == "a" and not any(p.requires_grad for p in here.parameters())
    names = ["c", "b", "a"]
    with torch.no_grad():
        torch.testing.assert_close(logits(here.eval(), adapter_names=names, **x), logits(theirs, adapter_names=names, **x),
                                   rtol=1e-5, atol=1e-5)
    ours.save_pretrained(str(tmp_path / "picked"), selected_adapters=["c"])
    assert sorted(p.name for p in (tmp_path / "picked").iterdir()) == ["c"]


def test_set_adapter_trains_only_the_active_one_and_delete_gives_base_layers_back():
    base, ours, _ = twins("llama_gqa")
    ours.set_adapter("b")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    assert {n for n in trainable} == {n for n, _ in ours.named_parameters() if ".lora_A.b." in n or ".lora_B.b." in n}
    ours.delete_adapter("c")
    ours.delete_adapter("a")
    assert "c" not in ours.peft_config and ours.peft_config.keys() == {"b"}
    mlp = ours.base_model.model.layers[0].mlp
    assert type(mlp.down_proj) is torch.nn.Linear  # only "c" adapted it
    assert type(ours.base_model.model.layers[0].self_attn.o_proj) is torch.nn.Linear  # only "a"
    assert isinstance(mlp.up_proj, LoraBranch) and mlp.up_proj.adapter_names == ["b"]
    state = ours.base_model.state_dict()
    assert not any(".a." in k or ".c." in k for k in state)
    plain = ours.unload()
    assert not any(isinstance(m, LoraBranch) for m in plain.modules())
    for key, value in base.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value)


def test_merge_and_unload_of_chosen_adapters_matches_peft():
    _, ours, theirs = twins("llama_gqa")
    x = inputs("llama_gqa", 2)
    merged_ours = ours.merge_and_unload(adapter_names=["a", "c"]).eval()
    merged_theirs = theirs.merge_and_unload(adapter_names=["a", "c"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged_ours, **x), logits(merged_theirs, **x), rtol=1e-5, atol=1e-5)


def test_all_linear_adapters_share_layers_and_never_adapt_each_others_branches():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules="all-linear"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraBranch)}
    assert len(layers) == 14 and all(m.adapter_names == ["a", "b"] for m in layers.values())  # 2 blocks x 7 linears
    assert not any(".lora_A." in n or ".lora_B." in n for n in layers)


def test_memory_of_more_adapters_is_only_their_weights():
    _, model, _ = twins("llama_gqa", names=("a",))
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.add_adapter("b", LoraConfig(**SETTINGS["llama_gqa"]["b"]))
    model.add_adapter("c", LoraConfig(**SETTINGS["llama_gqa"]["c"]))
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    added = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".b." in n or ".c." in n)
    rng_keys = sum(16 for k in model.state_dict() if k.endswith((".lora_rng.b", ".lora_rng.c")))
    assert after - before == added + rng_keys


# ---- bad input: one clear error each, the model unchanged


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()},
            model.active_adapter, sorted(model.peft_config))


def _unchanged(model, snapshot):
    state, flags, active, names = snapshot
    assert model.active_adapter == active and sorted(model.peft_config) == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_bad_input_is_refused_clearly_and_leaves_the_model_unchanged(tmp_path):
    _, model, _ = twins("llama_gqa", names=("a", "b"))
    model.save_pretrained(str(tmp_path))
    snap = _snapshot(model)
    ids = random_ids(0, (2, 4))
    cases = [
        (lambda: model.set_adapter("nope"), r"no adapter named 'nope'; this model has \['a', 'b'\]"),
        (lambda: model(input_ids=ids, adapter_names=["a", "zzz"]), r"unknown adapters \['zzz'\]"),
        (lambda: model(input_ids=ids, adapter_names=["a", "b", "a"]), r"adapter_names has 3 entries but a layer saw a batch of 2 rows"),
        (lambda: model(input_ids=ids, adapter_names="a"), "one adapter name per batch row"),
        (lambda: model.add_adapter("c", AdapterConfig(target_modules=["down_proj"])), "cannot add a BOTTLENECK_ADAPTER adapter to a model whose adapters are LORA"),
        (lambda: model.add_adapter("b", LoraConfig(target_modules=["q_proj"])), "already has an adapter named 'b'"),
        (lambda: model.load_adapter(str(tmp_path / "b"), adapter_name="a"), "already has an adapter named 'a'"),
        (lambda: model.delete_adapter("a"), r"cannot delete the active adapter 'a': set_adapter\('b'\) first"),
        (lambda: model.add_adapter("x.y", LoraConfig(target_modules=["q_proj"])), "adapter name 'x.y' cannot be used"),
        (lambda: model.add_adapter("d", LoraConfig(target_modules=["nothing_here"])), "matched no module"),
        (lambda: model.add_adapter("d", LoraConfig(target_modules=["q_proj"], use_dora=True)), "a layer with DoRA holds a single adapter"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        _unchanged(model, snap)


def test_mixed_batches_refuse_merged_adapters_and_methods_that_cannot_mix():
    _, model, _ = twins("llama_gqa", names=("a", "b"))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapter\(s\) \['a'\] are merged"):
        model(input_ids=random_ids(0, (2, 4)), adapter_names=["a", "b"])
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2), adapter_name="p")
    with pytest.raises(ValueError, match="mixed batches .* need LoRA adapters"):
        prompt(input_ids=random_ids(0, (2, 4)), adapter_names=["p", "p"])


@pytest.mark.parametrize("make_config", [
    lambda: AdapterConfig(target_modules=["down_proj"], bottleneck_size=4, init_weights=False),
    lambda: PromptTuningConfig(num_virtual_tokens=3),
    lambda: PrefixTuningConfig(num_virtual_tokens=2),
    lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
    lambda: BitFitConfig(),
], ids=["bottleneck", "prompt", "prefix", "ia3", "bitfit"])
def test_methods_with_one_live_adapter_switch_named_adapters(make_config, tmp_path):
    """Bottleneck adapters, prompt / prefix tuning, IA3, BitFit: several named adapters, each its own tensors,
    set_adapter switches, and each saves and loads as its own directory."""
    base = tiny_gpt2() if isinstance(make_config(), BitFitConfig) else tiny_llama()  # BitFit needs biases
    model = get_peft_model(copy.deepcopy(base), make_config(), adapter_name="x")
    model.eval()
    with torch.no_grad():  # as if trained: "x" differs from its starting point (BitFit's is the base itself)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1)
    torch.manual_seed(3)
    model.add_adapter("y", make_config())
    ids = random_ids(1, (2, 5))
    with torch.no_grad():
        out_x = logits(model, input_ids=ids)
        model.set_adapter("y")
        out_y = logits(model, input_ids=ids)
        assert not torch.allclose(out_x, out_y)
        assert any(p.requires_grad for p in model.parameters())
        model.save_pretrained(str(tmp_path))
        model.set_adapter("x")
        torch.testing.assert_close(logits(model, input_ids=ids), out_x)
        for name, expected in (("x", out_x), ("y", out_y)):
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name), adapter_name=name).eval()
            torch.testing.assert_close(logits(loaded, input_ids=ids), expected)
    model.delete_adapter("y")
    assert list(model.peft_config) == ["x"]


# ---- the Lightning callback trains one named adapter of a model that carries several


def _module_carrying(adapter_dir):
    """A LlamaModule whose model already carries adapter "a" (loaded for inference) from ``adapter_dir``."""
    from lightning_fixtures import LlamaModule

    module = LlamaModule()
    PeftModel.from_pretrained(module.model, str(adapter_dir), adapter_name="a")
    return module


def test_callback_trains_one_named_adapter_and_resumes_it_exactly(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_fixtures import LossRecorder, TokensData, load_ckpt, trainer_kwargs

    from lightning_peft import PEFTCallback, load_peft_checkpoint

    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False),
                   adapter_name="a").save_pretrained(str(tmp_path / "a_dir"))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])

    def run(path, epochs, ckpt_path=None):
        seed_everything(0)
        module, recorder = _module_carrying(tmp_path / "a_dir" / "a"), LossRecorder()
        a_before = {k: v.clone() for k, v in module.state_dict().items() if ".a." in k}
        callbacks = [PEFTCallback(cfg, model_attr="model", adapter_name="b"), ModelCheckpoint(dirpath=path, filename="{epoch}", save_top_k=-1), recorder]
        Trainer(**trainer_kwargs(path, max_epochs=epochs, callbacks=callbacks)).fit(module, datamodule=TokensData(), ckpt_path=ckpt_path)
        assert all(torch.equal(module.state_dict()[k], v) for k, v in a_before.items())  # "a" did not train
        assert module.model.__dict__["_lightning_peft_tuner"].adapter_name == "b"
        return recorder.losses, module

    reference, _ = run(tmp_path / "ref", 2)
    run(tmp_path / "first", 1)
    ckpt = load_ckpt(tmp_path / "first" / "epoch=0.ckpt")
    assert ckpt["state_dict"] and all(".b." in k or k.endswith(".b") for k in ckpt["state_dict"])  # only adapter "b"
    resumed, module = run(tmp_path / "resumed", 2, ckpt_path=tmp_path / "first" / "epoch=0.ckpt")
    assert sorted(resumed) == [5, 6, 7, 8]
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(5, 9)]), torch.tensor([reference[s] for s in range(5, 9)]),
                               rtol=0, atol=1e-6)
    # the checkpoint's adapter goes beside "a" on another model, under its own name
    other = _module_carrying(tmp_path / "a_dir" / "a")
    load_peft_checkpoint(other, tmp_path / "resumed" / "epoch=1.ckpt")
    assert sorted(PeftModel(other.model).peft_config) == ["a", "b"]
    final = load_ckpt(tmp_path / "resumed" / "epoch=1.ckpt")["state_dict"]
    assert all(torch.equal(other.state_dict()[k], v) for k, v in final.items())


def test_checkpoints_from_before_named_adapters_still_load_and_resume(tmp_path):
    """Adapter checkpoints written when layers held one unnamed adapter (``q_proj.lora_A.weight``) load and resume."""
    import re

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_fixtures import LlamaModule, TokensData, load_ckpt, trainer_kwargs

    from lightning_peft import PEFTCallback, load_peft_checkpoint

    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[PEFTCallback(cfg, model_attr="model"),
                                                                ModelCheckpoint(dirpath=tmp_path, filename="new")])).fit(
        LlamaModule(), datamodule=TokensData())
    ckpt = load_ckpt(tmp_path / "new.ckpt")
    legacy = {re.sub(r"\.(lora_A|lora_B|lora_rng)\.default", r".\1", k): v for k, v in ckpt["state_dict"].items()}
    assert legacy.keys() != ckpt["state_dict"].keys() and not any(".default" in k for k in legacy)
    ckpt["state_dict"] = legacy
    ckpt["lightning_peft"].pop("adapter_name")
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    module = load_peft_checkpoint(LlamaModule(), tmp_path / "legacy.ckpt")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in load_ckpt(tmp_path / "new.ckpt")["state_dict"].items())
    resumed = LlamaModule()
    Trainer(**trainer_kwargs(tmp_path / "r", max_epochs=2, callbacks=[PEFTCallback(cfg, model_attr="model")])).fit(
        resumed, datamodule=TokensData(), ckpt_path=tmp_path / "legacy.ckpt")
    assert int(resumed.model.model.layers[0].self_attn.q_proj.lora_rng.default[1]) == 8  # 4 steps restored + 4 more
