"""Prefix and prompt tuning against HF peft itself: same base weights, same virtual tokens copied in.

Forward outputs, losses and gradients must agree to fp32 rounding on tiny Llama (MHA and GQA),
GPT-2 and BERT; ``generate()`` with a KV cache must produce the greedy continuation; adapter files
must load both ways.

Two places where peft 0.21.2 cannot serve as the reference with transformers 5.x, and what the
tests use instead (both are independent of this library's code):

* BERT + prefix tuning: peft looks for a ``past_key_values`` argument, which transformers 5 renamed
  to ``cache``, and raises. The reference replays peft's own fallback path (``get_prompt()``, the
  backbone called with the cache and the extended mask, dropout, classifier) with the new name.
* ``generate()``: peft's ``prepare_inputs_for_generation`` also looks for ``past_key_values``, so
  under transformers 5 it drops the prefix cache and re-inserts the prompt at every step. The
  reference is the definition of greedy decoding: recompute peft's forward on the whole sequence
  without a cache and take the argmax, one token at a time.
"""

from __future__ import annotations

import contextlib
import copy
import io

import peft
import pytest
import torch
from models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import lightning_peft
from lightning_peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model, inject_adapter

MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "llama_gqa": (lambda: tiny_llama(kv_heads=2), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
}
METHODS = {
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "prompt": ("PromptTuningConfig", {}),
}
P = 3  # virtual tokens


def make_twins(kind: str, method: str, seed: int = 0):
    """(ours, theirs, base) with identical base weights and identical random virtual-token parameters."""
    factory, task = MODELS[kind]
    name, extra = METHODS[method]
    base = factory()
    kwargs = dict(task_type=task, num_virtual_tokens=P, **extra)
    if task == "SEQ_CLS":  # peft trains the classifier of SEQ_CLS models by itself; ask for the same
        ours = get_peft_model(copy.deepcopy(base), getattr(lightning_peft, name)(modules_to_save=["classifier"], **kwargs))
    else:
        ours = get_peft_model(copy.deepcopy(base), getattr(lightning_peft, name)(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kwargs))
    their_params = dict(theirs.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    copied = 0
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".prompt_encoder." in n or n.startswith("prompt_encoder."):
                src = their_params["prompt_encoder.default." + n.split("prompt_encoder.", 1)[1]]
                src.copy_(0.5 * torch.randn(src.shape, generator=gen))
                p.copy_(src)
                copied += 1
    assert copied == (5 if method == "prefix_projection" else 1)  # embedding (+ two Linear layers)
    return ours, theirs, base


def batch(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the second row
    if MODELS[kind][1] == "SEQ_CLS":
        token_types = torch.zeros_like(ids)
        token_types[:, 4:] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types, "labels": torch.tensor([0, 2])}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def peft_forward(theirs, kind: str, method: str, inputs: dict[str, torch.Tensor]):
    """peft's forward; for BERT + prefix, peft's own fallback path with transformers 5's ``cache`` name."""
    if not (kind == "bert" and method.startswith("prefix")):
        out = theirs(**inputs)
        return out.logits, out.loss
    base = theirs.base_model
    ids = inputs["input_ids"]
    cache = theirs.get_prompt(ids.shape[0])
    mask = torch.cat((torch.ones(ids.shape[0], P, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]), dim=1)
    hidden = base.bert(input_ids=ids, attention_mask=mask, token_type_ids=inputs["token_type_ids"], cache=cache)
    logits = base.classifier(base.dropout(hidden.pooler_output))
    return logits, torch.nn.functional.cross_entropy(logits, inputs["labels"]) if "labels" in inputs else None


def trainable_grads(model, strip: str) -> dict[str, torch.Tensor]:
    """Grads of trainable params keyed by a name both libraries share (prompt encoder / classifier tail)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            if "prompt_encoder." in n:
                key = "prompt_encoder." + n.split("prompt_encoder.", 1)[1].replace("default.", "", 1)
            else:
                key = n.replace("modules_to_save.default.", "").replace(strip, "")
            out[key] = p.grad
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_losses_and_gradients_match_peft(kind, method):
    ours, theirs, _ = make_twins(kind, method)
    ours.train()
    theirs.train()
    inputs = batch(kind)
    out = ours(**inputs)
    their_logits, their_loss = peft_forward(theirs, kind, method, inputs)
    assert out.logits.shape == their_logits.shape
    torch.testing.assert_close(out.logits, their_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, their_loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    their_loss.backward()
    g_ours, g_theirs = trainable_grads(ours, "base_model."), trainable_grads(theirs, "base_model.")
    assert set(g_ours) == set(g_theirs) and g_ours
    for key in g_ours:
        assert g_ours[key] is not None and g_ours[key].abs().sum() > 0, key
        torch.testing.assert_close(g_ours[key], g_theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_parameter_line_matches_peft(kind, method):
    ours, theirs, _ = make_twins(kind, method)
    lines = []
    for model in (ours, theirs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        lines.append(buf.getvalue().strip())
    assert lines[0] == lines[1]
    assert lines[0].startswith("trainable params: ")


def greedy_reference(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by definition: the whole sequence through the forward each step, no cache kept."""
    seq = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_generate_with_kv_cache_matches_greedy_decoding_of_peft(kind, method):
    ours, theirs, _ = make_twins(kind, method, seed=3)
    ours.eval()
    theirs.eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = greedy_reference(theirs, ids, 6)
    backbone = ours.base_model.base_model
    lengths: list[int] = []
    def record(module, args, kwargs):  # runs before our kwargs hook: GPT-2 passes input_ids positionally
        tokens = args[0] if args and args[0] is not None else kwargs.get("input_ids")
        lengths.append((kwargs["inputs_embeds"] if tokens is None else tokens).shape[1])

    handle = backbone.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    generated = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    handle.remove()
    assert torch.equal(generated, expected)
    # the cache was used: one prefill call, then one token per step
    real_prefill = 5 + (P if method == "prompt" else 0)
    assert lengths[0] == real_prefill and lengths[1:] == [1] * 5


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_after_in_place_injection_without_wrapper(method):
    """What the Lightning callback does: inject into the model itself, then call its own generate()."""
    ours, theirs, base = make_twins("llama_gqa", method, seed=5)
    name, extra = METHODS[method]
    model = copy.deepcopy(base)
    inject_adapter(model, getattr(lightning_peft, name)(task_type="CAUSAL_LM", num_virtual_tokens=P, **extra))
    model.load_state_dict(ours.base_model.state_dict())
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    expected = greedy_reference(theirs.eval(), ids, 4)
    got = model.eval().generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # no attention_mask either
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2", "bert"])
def test_our_files_load_in_peft_and_peft_files_load_here(tmp_path, kind, method):
    ours, theirs, base = make_twins(kind, method, seed=7)
    inputs = batch(kind)
    with torch.no_grad():
        reference = ours.eval()(**inputs).logits
        torch.testing.assert_close(peft_forward(theirs.eval(), kind, method, inputs)[0], reference, rtol=1e-6, atol=1e-6)
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded_here = lightning_peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_forward(loaded_in_peft, kind, method, inputs)[0], reference, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded_here(**inputs).logits, reference, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in loaded_here.parameters())  # loaded for inference, like peft
