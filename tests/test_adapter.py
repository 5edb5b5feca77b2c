"""Bottleneck adapters: identity at init, placement, a hand-written block computation, training, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.nn import functional as F

from lightning_peft import AdapterConfig, PeftModel, count_parameters, get_peft_model
from lightning_peft.tuners.adapter import BottleneckAdapterLayer

FACTORIES = {"llama": tiny_llama, "llama_gqa": lambda: tiny_llama(kv_heads=2), "gpt2": tiny_gpt2, "bert": tiny_bert}
# (attention output, feed-forward output) inside block 0, as AdapterHub places them
EXPECTED_SITES = {
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "llama_gqa": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
}


def ids(seed: int = 0, shape=(2, 6)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def adapter_sites(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckAdapterLayer))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_identity_at_init(kind, placement):
    base = FACTORIES[kind]()
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(placement=placement))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    # and not because nothing was injected: the up projections are exactly zero, the down ones are not
    layers = [m for m in model.modules() if isinstance(m, BottleneckAdapterLayer)]
    assert layers and all(not m.adapter_up.weight.any() and m.adapter_down.weight.any() for m in layers)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_placement_per_architecture(kind):
    attn0, ffn0 = EXPECTED_SITES[kind]
    pfeiffer = adapter_sites(get_peft_model(FACTORIES[kind](), AdapterConfig(placement="pfeiffer")).base_model)
    houlsby = adapter_sites(get_peft_model(FACTORIES[kind](), AdapterConfig(placement="houlsby")).base_model)
    assert len(pfeiffer) == 2 and ffn0 in pfeiffer and attn0 not in pfeiffer  # one per block, after the FFN
    assert len(houlsby) == 4 and {attn0, ffn0} <= set(houlsby)  # two per block


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_trainable_parameters_are_exactly_the_adapters(kind):
    base = FACTORIES[kind]()
    _, total_before = count_parameters(base)
    model = get_peft_model(base, AdapterConfig(placement="houlsby", reduction_factor=16))
    d, b = 64, 64 // 16
    per_adapter = (d * b + b) + (b * d + d)
    trainable, total = count_parameters(model)
    assert trainable == 4 * per_adapter
    assert total == total_before + trainable
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapter_down." in n or ".adapter_up." in n for n in names)


def test_bottleneck_size_overrides_reduction_factor():
    model = get_peft_model(tiny_llama(), AdapterConfig(bottleneck_size=7, reduction_factor=2))
    assert {m.adapter_down.out_features for m in model.modules() if isinstance(m, BottleneckAdapterLayer)} == {7}


def test_base_state_dict_keys_do_not_change():
    base = tiny_gpt2()
    keys = set(base.state_dict())
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(placement="houlsby"))
    adapted = set(model.base_model.state_dict())
    assert keys <= adapted
    assert all(".adapter_" in k for k in adapted - keys)
    missing, unexpected = model.base_model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".adapter_" in k for k in missing)


def adapter(layer: BottleneckAdapterLayer, h: torch.Tensor, act) -> torch.Tensor:
    """``h + up(act(down(h)))`` written out with the layer's adapter weights."""
    down = h @ layer.adapter_down.weight.T + layer.adapter_down.bias
    return h + act(down) @ layer.adapter_up.weight.T + layer.adapter_up.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_llama_block_matches_a_hand_written_computation():
    """Houlsby adapters in one GQA Llama decoder layer, recomputed from its weights."""
    model = get_peft_model(tiny_llama(kv_heads=2).double(), AdapterConfig(placement="houlsby", init_weights=False, non_linearity="gelu"))
    lm = model.base_model.model
    layer = lm.layers[1]
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    pos = torch.arange(5).unsqueeze(0)
    cos, sin = lm.rotary_emb(x, position_ids=pos)  # (1, T, head_dim)
    got = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)

    def rms(t, w, eps):  # Llama's RMSNorm normalises in float32 whatever the input dtype
        t32 = t.float()
        return w * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)

    eps = lm.config.rms_norm_eps
    attn = layer.self_attn
    h = rms(x, layer.input_layernorm.weight, eps)
    q = (h @ attn.q_proj.weight.T).view(2, 5, 4, 16).transpose(1, 2)  # (B, H, T, D)
    k = (h @ attn.k_proj.weight.T).view(2, 5, 2, 16).transpose(1, 2)  # (B, KV, T, D)
    v = (h @ attn.v_proj.weight.T).view(2, 5, 2, 16).transpose(1, 2)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # each KV head serves 2 query heads
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64)
    gelu = lambda t: F.gelu(t)  # noqa: E731
    h1 = x + adapter(attn.o_proj, ctx @ attn.o_proj.weight.T, gelu)  # adapter on the attention output, then residual
    mlp = layer.mlp
    g = rms(h1, layer.post_attention_layernorm.weight, eps)
    f = (F.silu(g @ mlp.gate_proj.weight.T) * (g @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    expected = h1 + adapter(mlp.down_proj, f, gelu)  # adapter on the FFN output, then residual
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bert_block_matches_a_hand_written_computation():
    """Houlsby adapters in one BERT layer: after each output dense, before LayerNorm(h + residual)."""
    model = get_peft_model(tiny_bert().double(), AdapterConfig(placement="houlsby", init_weights=False, non_linearity="relu"))
    layer = model.base_model.bert.encoder.layer[0]
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    got = layer(x)
    got = got[0] if isinstance(got, tuple) else got

    def lin(t, m):
        return t @ m.weight.T + m.bias

    def ln(t, m):
        return F.layer_norm(t, (64,), m.weight, m.bias, m.eps)

    sa = layer.attention.self
    q, k, v = (lin(x, m).view(2, 5, 4, 16).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
    ctx = ((q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64)
    out = layer.attention.output
    a = ln(adapter(out.dense, lin(ctx, out.dense), F.relu) + x, out.LayerNorm)
    inter = F.gelu(lin(a, layer.intermediate.dense))
    expected = ln(adapter(layer.output.dense, lin(inter, layer.output.dense), F.relu) + a, layer.output.LayerNorm)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_gpt2_conv1d_pfeiffer_block_matches_a_hand_written_computation():
    """GPT-2 keeps Conv1D weights as [in, out]; the adapter sits on mlp.c_proj's output."""
    base = tiny_gpt2().double()
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(placement="pfeiffer", init_weights=False, non_linearity="tanh"))
    block, base_block = model.base_model.transformer.h[0], base.transformer.h[0]
    torch.manual_seed(2)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    got = block(x)
    got = got[0] if isinstance(got, tuple) else got
    h = x + base_block.attn(base_block.ln_1(x))[0]  # attention untouched by a Pfeiffer adapter
    mlp = block.mlp
    m = F.gelu(block.ln_2(h) @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh") @ mlp.c_proj.weight + mlp.c_proj.bias
    expected = h + adapter(mlp.c_proj, m, torch.tanh)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2", "bert"])
def test_training_changes_only_adapters_and_lowers_the_loss(kind):
    base = FACTORIES[kind]()
    head = ["classifier"] if kind == "bert" else None  # a fresh classification head trains with the adapters
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(placement="houlsby", reduction_factor=8, modules_to_save=head)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(1, (4, 8))
    labels = torch.tensor([0, 1, 2, 1]) if kind == "bert" else x
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_disable_unload_and_merge():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(init_weights=False))
    x = ids()
    with torch.no_grad():
        adapted, plain = model(input_ids=x).logits, base(input_ids=x).logits
        assert not torch.allclose(adapted, plain)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=x).logits, adapted, rtol=0, atol=0)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()
    restored = model.unload()
    assert not adapter_sites(restored)
    assert {n: type(m) for n, m in restored.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=x).logits, plain, rtol=0, atol=0)


def test_save_and_load_roundtrip(tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), AdapterConfig(placement="houlsby", init_weights=False, modules_to_save=["classifier"]))
    with torch.no_grad():
        model.base_model.classifier.weight.add_(0.1)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_target_modules_and_layers_to_transform():
    model = get_peft_model(tiny_llama(), AdapterConfig(target_modules=["v_proj"], layers_to_transform=[1]))
    assert adapter_sites(model.base_model) == ["model.layers.1.self_attn.v_proj"]
    model = get_peft_model(tiny_gpt2(), AdapterConfig(placement="houlsby", layers_to_transform=[0]))
    assert adapter_sites(model.base_model) == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UnknownBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))


@pytest.mark.parametrize(
    "model_factory, kwargs, error, message",
    [
        (NoBlocks, {}, ValueError, r"NoBlocks: found no transformer blocks .*Looked for .*self_attn\.o_proj \+ mlp\.down_proj.*target_modules"),
        (UnknownBlocks, {}, ValueError, r"UnknownBlocks: it has 2 blocks \(e\.g\. layers\.0\) but none contains a known pair"),
        (tiny_llama, {"placement": "middle"}, ValueError, r"placement must be 'pfeiffer'"),
        (tiny_llama, {"reduction_factor": 0.5}, ValueError, r"reduction_factor must be >= 1"),
        (tiny_llama, {"bottleneck_size": 0}, ValueError, r"bottleneck_size must be a positive integer"),
        (tiny_llama, {"non_linearity": "softmax"}, ValueError, r"non_linearity must be one of"),
        (tiny_llama, {"target_modules": ["nope"]}, ValueError, r"matched no module of LlamaForCausalLM.*could be adapted \(nn.Linear, Conv1D\): .*down_proj"),
        (tiny_llama, {"target_modules": ["mlp"]}, TypeError, r"bottleneck adapters can adapt nn.Linear, Conv1D layers.*mlp \(LlamaMLP\)"),
    ],
)
def test_bad_input_clear_error_and_model_untouched(model_factory, kwargs, error, message):
    model = model_factory()
    state = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        get_peft_model(model, AdapterConfig(**kwargs))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_target_modules_work_on_a_model_without_known_blocks():
    model = get_peft_model(NoBlocks(), AdapterConfig(target_modules=["net.0"], bottleneck_size=2, init_weights=False))
    assert adapter_sites(model.base_model) == ["net.0"]
    assert model(torch.randn(3, 8)).shape == (3, 2)
