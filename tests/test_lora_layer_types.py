"""LoRA on embeddings and convolutions against peft itself: outputs, gradients, merging, files both ways, errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import VOCAB, assert_outputs_and_grads_match, random_ids, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft import LoraConfig, PeftModel, get_peft_model
from lightning_peft.tuners.lora_conv import LoraConv
from lightning_peft.tuners.lora_embedding import LoraEmbedding


class ConvNet(nn.Module):
    """Ids -> embedding -> Conv1d -> Conv2d (strided, padded, non-square kernel) -> linear head."""

    def __init__(self, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.c1 = nn.Conv1d(16, 8, 3, padding=1, groups=groups, dilation=dilation)
        self.c2 = nn.Conv2d(8, 6, (3, 2), stride=(1, 2), padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.emb(ids).transpose(1, 2))  # [B, 8, T]
        h = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # [B, 6, T, 2]
        return self.head(h.mean((2, 3)))


def _their_key(name: str) -> str:
    key = "base_model.model." + name
    for part in (".lora_A.weight", ".lora_B.weight"):
        key = key.replace(part, part.replace(".weight", ".default.weight"))
    return key + ".default" if name.endswith(("lora_embedding_A", "lora_embedding_B")) else key


def twins(base: nn.Module, **kwargs) -> tuple[PeftModel, nn.Module]:
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.base_model.named_parameters():
            if ".lora_" in name:
                their_params[_their_key(name)].copy_(param)
    return ours, theirs


def test_embedding_and_convolutions_match_peft_in_float64():
    ours, theirs = twins(ConvNet().double(), r=3, lora_alpha=6, target_modules=["emb", "c1", "c2"])
    assert [type(m) for m in (ours.base_model.emb, ours.base_model.c1, ours.base_model.c2)] == [LoraEmbedding, LoraConv, LoraConv]
    ids = random_ids(0, (3, 7)) % 50
    names = assert_outputs_and_grads_match(ours, theirs, lambda m: m(ids), _their_key, rtol=1e-10, atol=1e-12)
    assert len(names) == 6


def test_init_starts_at_the_base_model_like_peft(capsys):
    base = ConvNet()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["emb", "c1", "c2"]))
    ids = random_ids(1, (2, 5)) % 50
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), base(ids), rtol=0, atol=0)
    ours.print_trainable_parameters()
    line = capsys.readouterr().out
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["emb", "c1", "c2"])).print_trainable_parameters()
    assert capsys.readouterr().out == line


def test_merge_unmerge_and_merge_and_unload():
    ours, _ = twins(ConvNet().double(), r=3, target_modules=["emb", "c1", "c2"])
    ours.eval()
    base_state = {k: v.clone() for k, v in ours.base_model.state_dict().items() if ".lora_" not in k}
    ids = random_ids(2, (2, 6)) % 50
    with torch.no_grad():
        adapted = ours(ids)
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids), adapted, rtol=1e-12, atol=1e-12)
        ours.unmerge_adapter()
        for key, value in ours.base_model.state_dict().items():
            if key in base_state:
                torch.testing.assert_close(value, base_state[key], rtol=1e-12, atol=1e-12)
        plain = copy.deepcopy(ours).merge_and_unload()
        assert [type(m) for m in (plain.emb, plain.c1, plain.c2)] == [nn.Embedding, nn.Conv1d, nn.Conv2d]
        torch.testing.assert_close(plain(ids), adapted, rtol=1e-12, atol=1e-12)


def test_files_load_both_ways(tmp_path):
    base = ConvNet()
    ours, theirs = twins(base, r=3, target_modules=["emb", "c1", "c2"])
    ids = random_ids(3, (2, 6)) % 50
    with torch.no_grad():
        expected = ours(ids)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    here = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(in_peft(ids), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(here(ids), expected, rtol=1e-6, atol=1e-6)


def test_token_embeddings_of_a_transformers_model_with_a_tied_head():
    """GPT-2 ties lm_head to wte: the adapted table stays that Parameter, so the head stays tied; peft agrees."""
    ours, theirs = twins(tiny_gpt2().double(), r=4, target_modules=["wte", "c_attn"])
    ours.train()
    theirs.train()
    model = ours.base_model
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = random_ids(4)
    y_ours, y_theirs = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        ours.merge_adapter()
        assert model.lm_head.weight is model.transformer.wte.weight  # merged into the shared table
        ours.unmerge_adapter()


def test_a_resized_vocabulary_round_trips_through_peft_files(tmp_path):
    def resized() -> nn.Module:
        model = tiny_llama()
        model.resize_token_embeddings(VOCAB + 8)
        return model

    ours, theirs = twins(resized(), r=2, target_modules=["embed_tokens", "q_proj"])
    assert ours.base_model.model.embed_tokens.lora_embedding_A.default.shape == (2, VOCAB + 8)
    theirs.save_pretrained(tmp_path)
    here = PeftModel.from_pretrained(resized(), str(tmp_path))
    ids = random_ids(5) + 8  # ids beyond the original vocabulary too
    with torch.no_grad():
        torch.testing.assert_close(here(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_conv_dropout_masks_follow_the_key():
    model = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["c1"], lora_dropout=0.5, init_lora_weights=False)).train()
    layer = model.base_model.c1
    x = torch.randn(2, 16, 9)
    key = layer.lora_rng.default.clone()
    first, again = layer(x), layer(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # same key, same mask
    layer.lora_rng.default[1] += 1
    assert not torch.allclose(layer(x), first)
    layer.lora_rng.default.copy_(key)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    with torch.no_grad():
        expected = layer.base_forward(x) + layer.lora_B.default(layer.lora_A.default(x)) * layer.scaling["default"]
    torch.testing.assert_close(layer.eval()(x), expected)  # eval: no dropout


@pytest.mark.parametrize("kwargs, message", [({"groups": 2}, r"c1 has groups=2"), ({"dilation": 2}, r"c1 has dilation=\(2,\)")])
def test_convolutions_lora_cannot_merge_exactly_are_refused(kwargs, message):
    net = ConvNet(**kwargs)
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=message + ".*leave it out of target_modules"):
        get_peft_model(net, LoraConfig(r=2, target_modules=["c1", "c2"]))
    assert type(net.c1) is nn.Conv1d and type(net.c2) is nn.Conv2d
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_all_linear_still_means_linear_layers_only():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert type(model.base_model.model.embed_tokens) is nn.Embedding


def test_quantized_layers_of_unknown_kind_are_refused_naming_their_type():
    class PackedLinear(nn.Linear):  # an nn.Linear with a packed-integer weight that is not bitsandbytes'
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.weight = nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)

    net = nn.Sequential(nn.Linear(4, 4), PackedLinear())
    with pytest.raises(TypeError, match=r"1 \(.*PackedLinear\) holds a quantized torch.uint8 weight of a kind .* cannot adapt"):
        get_peft_model(net, LoraConfig(r=2, target_modules=["0", "1"]))
    assert type(net[0]) is nn.Linear and type(net[1]) is PackedLinear
