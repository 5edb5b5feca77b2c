"""Prompt tuning (Lester et al., 2021): trainable virtual-token embeddings prepended to the input.

A forward pre-hook on the transformers model turns ``input_ids`` into ``inputs_embeds`` with the
``num_virtual_tokens`` learned embeddings in front, and extends what is aligned with the tokens:
the attention mask (ones), token-level ``labels`` (``-100``: virtual tokens are never predicted),
``token_type_ids`` (zeros) and explicit ``position_ids`` (virtual tokens take positions
``0..P-1``, real tokens are shifted by P, which is what the model does by itself when no
positions are passed). A call with a non-empty KV cache continues a sequence whose cache already
holds the virtual tokens (``generate()``'s decode steps), so only the mask and positions change.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import field
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_peft.tuners.config import register_config
from lightning_peft.tuners.injection import register_tuner
from lightning_peft.tuners.model_arch import cache_kwarg_name
from lightning_peft.tuners.prompt_learning import PromptLearningConfig, PromptLearningTuner, VirtualTokens
from lightning_peft.tuners.prompt_learning import batch_size_of, cache_length

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptTuner"]

PromptTuningInit = Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"]
_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@register_config
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings, with HF peft's names.

    Args:
        num_virtual_tokens: how many virtual tokens to prepend (> 0).
        prompt_tuning_init: ``"RANDOM"`` (standard normal, like peft), ``"SAMPLE_VOCAB"`` (embeddings of
            random vocabulary tokens) or ``"TEXT"`` (embeddings of ``prompt_tuning_init_text``'s tokens,
            repeated or cut to ``num_virtual_tokens``).
        prompt_tuning_init_text: the text for ``"TEXT"``, e.g. ``"Classify the sentiment:"``.
        tokenizer_name_or_path: a tokenizer directory / name for ``"TEXT"`` (``AutoTokenizer``).
        tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained`` (never ``trust_remote_code``).
        tokenizer: a tokenizer object for ``"TEXT"`` instead of a path (not written to files; its
            ``name_or_path`` is).
        token_dim: the embedding width; None takes it from the model's input embeddings.

    Example::

        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                    prompt_tuning_init="TEXT", prompt_tuning_init_text="Sentiment:",
                                    tokenizer=tokenizer)
    """

    peft_type = "PROMPT_TUNING"
    method_name = "prompt tuning"
    prompt_tuning_init: Union[PromptTuningInit, str] = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # accept peft's enum
        if init not in _INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {', '.join(_INITS)}, got {init!r}")
        self.prompt_tuning_init = init
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            # a tokenizer object given where peft expects a path: accept it
            self.tokenizer, self.tokenizer_name_or_path = self.tokenizer_name_or_path, None
        if init == "TEXT" and not self.inference_mode:  # inference: weights are loaded, no init needed
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    "PromptTuningConfig(prompt_tuning_init='TEXT') needs the text: set prompt_tuning_init_text, "
                    "e.g. 'Classify the sentiment of this review:'"
                )
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError(
                    "PromptTuningConfig(prompt_tuning_init='TEXT') needs a tokenizer to turn prompt_tuning_init_text "
                    "into tokens: pass tokenizer_name_or_path='<tokenizer dir>' or tokenizer=<a tokenizer object>"
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tokenizer = out.pop("tokenizer", None)
        if out.get("tokenizer_name_or_path") is None and tokenizer is not None:
            out["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
        return out


class PromptEmbedding(VirtualTokens):
    """The virtual-token embeddings, ``embedding.weight [P, token_dim]``, attached as ``prompt_encoder``."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, cache_kwarg: Optional[str], device: torch.device) -> None:
        super().__init__(num_virtual_tokens, cache_kwarg)
        self.token_labels = True  # labels [B, T] are per token: pad them with -100 for the virtual tokens
        # float32 like peft (also under a half-precision model); cast to the input dtype at use
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)

    def prompts(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, P, token_dim]``."""
        return self.embedding.weight.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def peft_embeddings(self) -> torch.Tensor:
        return self.embedding.weight

    def load_peft_embeddings_key(self) -> str:
        return "embedding.weight"

    def rewrite_inputs(self, module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
        """Virtual tokens in front of the input; labels, token types and positions extended to match."""
        p = self.num_virtual_tokens
        if cache is not None:
            kwargs[self.cache_kwarg or "past_key_values"] = cache
        positions = kwargs.get("position_ids")
        if cache_length(cache) > 0:  # continuing: the cache already holds the virtual tokens
            if positions is not None:
                kwargs["position_ids"] = positions + p
            return kwargs
        batch = batch_size_of(kwargs, type(module).__name__)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        seq = embeds.shape[1]
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat((self.prompts(batch, embeds.dtype), embeds), dim=1)
        labels = kwargs.get("labels")
        if self.token_labels and isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == seq:
            pad = torch.full((labels.shape[0], p, *labels.shape[2:]), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat((pad, labels), dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat((torch.zeros_like(token_types[:, :1]).expand(-1, p), token_types), dim=1)
        if positions is not None:
            front = torch.arange(p, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], p)
            kwargs["position_ids"] = torch.cat((front, positions + p), dim=-1)
        return kwargs


def _init_token_ids(cfg: PromptTuningConfig, vocab_size: int) -> Optional[torch.Tensor]:
    """Token ids whose embeddings initialise the prompt (None: random init)."""
    n = cfg.num_virtual_tokens
    assert n is not None
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (n,), dtype=torch.long)
    if cfg.prompt_tuning_init == "TEXT":
        tokenizer = cfg.tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            kwargs = dict(cfg.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # loading an adapter config must never run remote code
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path, **kwargs)
        ids = list(tokenizer(cfg.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError(f"prompt_tuning_init_text={cfg.prompt_tuning_init_text!r} tokenizes to no tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat or cut to exactly n, as peft does
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"the tokenizer produced ids {bad[:5]} outside the model's vocabulary of {vocab_size}: is it the model's tokenizer?")
        return torch.tensor(ids, dtype=torch.long)
    return None


@register_tuner("PROMPT_TUNING")
class PromptTuner(PromptLearningTuner):
    """Attaches a :class:`PromptEmbedding` to the model and prepends it to every input."""

    config: PromptTuningConfig

    def hook_target(self, hf_model: nn.Module) -> nn.Module:
        params = inspect.signature(hf_model.forward).parameters
        if "inputs_embeds" not in params or not isinstance(hf_model.get_input_embeddings(), nn.Embedding):
            raise TypeError(
                f"prompt tuning prepends embeddings through inputs_embeds, but {type(hf_model).__name__} "
                "does not take inputs_embeds or has no nn.Embedding input layer, so its inputs cannot be hooked. "
                "Use LoRA or bottleneck adapters for this model"
            )
        return hf_model

    def build_encoder(self, hf_model: nn.Module, target: nn.Module) -> PromptEmbedding:
        cfg = self.config
        embeddings: nn.Embedding = hf_model.get_input_embeddings()
        token_dim = cfg.resolve("token_dim", embeddings.embedding_dim, "input embedding width")
        table = PromptEmbedding(cfg.num_virtual_tokens, token_dim, cache_kwarg=cache_kwarg_name(target),  # type: ignore[arg-type]
                                device=embeddings.weight.device)
        # sequence-classification labels ([B] or [B, num_labels]) never line up with the tokens
        table.token_labels = cfg.task_type not in ("SEQ_CLS", "FEATURE_EXTRACTION")
        ids = None if cfg.inference_mode else _init_token_ids(cfg, embeddings.num_embeddings)
        if ids is not None:
            with torch.no_grad():
                table.embedding.weight.copy_(embeddings(ids.to(embeddings.weight.device)).float())
        return table
