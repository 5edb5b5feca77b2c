"""(IA)³ against HF peft itself (same base, same scaling vectors copied over), merging, files, errors, training."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import MODEL_FACTORIES, assert_merge_round_trip, assert_outputs_and_grads_match, random_ids, tiny_bert, tiny_gpt2, tiny_llama

from lightning_peft import IA3Config, PeftModel, get_peft_model
from lightning_peft.tuners.ia3 import IA3Linear

#: per model kind: (target_modules, feedforward_modules)
TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama_gqa": (["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], ["down_proj", "up_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # Conv1D
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


def twins(kind: str, **kwargs) -> tuple[PeftModel, torch.nn.Module]:
    """Our and peft's IA3 on copies of one base, with our (random) vectors copied into peft's."""
    targets, feedforward = TARGETS[kind]
    base = MODEL_FACTORIES[kind][0]()
    settings = dict(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False, **kwargs)
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**settings))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if name.endswith(".ia3_l"):
                their_params[f"base_model.model.{name}.default"].copy_(param)
    return ours, theirs


def ia3_layers(model) -> list[IA3Linear]:
    return [m for m in model.modules() if isinstance(m, IA3Linear)]


@pytest.mark.parametrize("kind", list(TARGETS))
def test_outputs_and_gradients_match_peft_in_float64(kind):
    ours, theirs = twins(kind)
    ours.double().train()
    theirs.double().train()
    ids = random_ids(1)
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: m(input_ids=ids).logits,
                                           lambda n: f"base_model.model.{n}.default", rtol=1e-10, atol=1e-10)
    assert len(names) == len(ia3_layers(ours)) > 0 and all(n.endswith(".ia3_l") for n in names)


def test_identity_at_init_and_vectors_shaped_like_peft():
    base = tiny_llama()
    ours = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ids = random_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    their_shapes = {n.removeprefix("base_model.model.").removesuffix(".default"): p.shape
                    for n, p in theirs.named_parameters() if ".ia3_l" in n}
    assert {n: p.shape for n, p in ours.base_model.named_parameters() if n.endswith(".ia3_l")} == their_shapes
    assert all((layer.ia3_l.shape[0] == 1) == layer.is_feedforward for layer in ia3_layers(ours))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_default_targets_are_peft_defaults(factory, capsys):
    base = factory()
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    get_peft_model(copy.deepcopy(base), IA3Config()).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == theirs


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2", "bert"])
def test_merge_equals_the_adapted_model_and_unmerge_restores_the_base(kind):
    ours, _ = twins(kind)
    ours.double().eval()
    ids = random_ids(3)
    adapted = assert_merge_round_trip(ours, ids, rtol=1e-10, atol=1e-10, weight_tol=1e-12)
    with torch.no_grad(), ours.disable_adapter():
        plain = ours(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


def test_unmerge_refuses_a_zero_vector_and_changes_nothing():
    ours, _ = twins("llama")
    with torch.no_grad():
        ia3_layers(ours)[0].ia3_l[0, 0] = 0.0
    ours.merge_adapter()
    merged = {k: v.clone() for k, v in ours.base_model.state_dict().items()}
    with pytest.raises(ValueError, match="scaling vector holds zeros"):
        ours.unmerge_adapter()
    layer = ia3_layers(ours)[0]
    assert layer.merged and all(torch.equal(v, merged[k]) for k, v in ours.base_model.state_dict().items() if k.startswith("model.layers.0."))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_our_files_load_in_peft_and_peft_files_load_here(kind, tmp_path):
    ours, theirs = twins(kind)
    ours.eval()
    theirs.eval()
    ids = random_ids(4)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    base = MODEL_FACTORIES[kind][0]()
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    here = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(here(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in here.parameters())


def test_a_training_step_changes_only_the_vectors():
    model = get_peft_model(tiny_llama().train(), IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".ia3_l") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = random_ids(5)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, ValueError, r"feedforward_modules \['down_proj'\] are not among target_modules"),
        ({"target_modules": ["nope"]}, ValueError, "matched no module"),
        ({"target_modules": ["mlp"]}, TypeError, r"IA3 can adapt nn.Linear, Conv1D layers.*mlp \(LlamaMLP\)"),
        ({"init_ia3_weights": "yes"}, ValueError, "init_ia3_weights must be True or False"),
    ],
)
def test_bad_input_gets_one_clear_error_and_the_model_is_untouched(kwargs, error, message):
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=message):
        get_peft_model(model, IA3Config(**kwargs))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_model_type_without_targets_says_what_to_set():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="has no default IA3 targets .* name them"):
        get_peft_model(net, IA3Config())
