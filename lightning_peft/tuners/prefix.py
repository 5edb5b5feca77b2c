"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes in front of every attention layer.

The adapter is a table of ``num_virtual_tokens`` rows, each holding a key and a value vector for
every layer (``num_layers * 2 * kv_dim`` numbers, ``kv_dim = head_dim * num_key_value_heads`` so
grouped-query attention gets prefixes of its own key/value width), optionally produced from a
smaller table by a two-layer MLP (``prefix_projection``), as in HF peft.

It reaches the model as a pre-filled KV cache: a forward pre-hook on the backbone (the module
that takes ``cache=``, e.g. ``LlamaModel``, ``GPT2Model``, ``BertModel``) puts the prefixes into
an empty or missing cache, prepends ones to the attention mask and shifts explicit
``position_ids`` by ``num_virtual_tokens`` (real tokens sit after the prefix, as in peft). A
non-empty cache already holds the prefix (it came from an earlier call, e.g. inside
``generate()``), so only the mask and positions are adjusted then. Prefix keys are used as
stored: rotary embeddings are not applied to them, exactly as for cached keys in peft.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_peft.tuners.config import register_config
from lightning_peft.tuners.injection import register_tuner
from lightning_peft.tuners.model_arch import KVGeometry, cache_kwarg_name, kv_geometry
from lightning_peft.tuners.prompt_learning import PromptLearningConfig, PromptLearningTuner, VirtualTokens
from lightning_peft.tuners.prompt_learning import batch_size_of, cache_length

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuner"]


@register_config
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings, with HF peft's names.

    Args:
        num_virtual_tokens: prefix length per layer (> 0).
        prefix_projection: produce the prefixes with an MLP ``kv_dim -> encoder_hidden_size ->
            num_layers * 2 * kv_dim`` (tanh) from a ``[num_virtual_tokens, kv_dim]`` table
            (Li & Liang's reparameterisation; trains more stably, costs more parameters).
        encoder_hidden_size: hidden width of that MLP (None: the key/value width ``token_dim``).
        init_weights: None (random, like peft) or ``"zero"`` (prefixes start at zero).
        token_dim, num_attention_heads, num_layers: key/value width, key/value heads and layers;
            None takes them from the model (set them only to check a config against a model).

    Example::

        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
        model = get_peft_model(model, config)
    """

    peft_type = "PREFIX_TUNING"
    method_name = "prefix tuning"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[Literal["zero"]] = None

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0):
            raise ValueError(f"PrefixTuningConfig.encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")


class PrefixEncoder(VirtualTokens):
    """The prefix table (and optional MLP), attached to the backbone as ``prompt_encoder``.

    Args:
        num_virtual_tokens: P.
        geometry: layers, key/value heads and head size of the model.
        projection: use the MLP (parameters ``embedding.weight [P, kv_dim]``, ``transform.0/2``);
            otherwise ``embedding.weight`` is ``[P, num_layers * 2 * kv_dim]`` directly.
        encoder_hidden_size: the MLP's hidden width.
        zero_init: start with all-zero prefixes.
        cache_kwarg: ``"cache"`` or ``"past_key_values"``: how the hooked module takes its KV cache.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        geometry: KVGeometry,
        *,
        projection: bool,
        encoder_hidden_size: int,
        zero_init: bool,
        cache_kwarg: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(num_virtual_tokens, cache_kwarg)
        self.geometry = geometry
        self.prefix_projection = projection
        width = geometry.num_layers * 2 * geometry.kv_dim
        factory = {"device": device, "dtype": dtype}
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.kv_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(geometry.kv_dim, encoder_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, width, **factory),
            )
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **factory)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> torch.Tensor:
        """All prefixes, ``[P, num_layers * 2 * kv_dim]`` (peft's layout: layer-major, key before value)."""
        weight = self.embedding.weight
        return self.transform(weight) if self.prefix_projection else weight

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``[B, kv_heads, P, head_dim]`` (expanded over the batch)."""
        g, p = self.geometry, self.num_virtual_tokens
        table = self.flat().to(dtype).view(p, g.num_layers * 2, g.kv_heads, g.head_dim).permute(1, 2, 0, 3)  # (2L, H, P, D)
        return [
            (table[2 * i].expand(batch_size, -1, -1, -1), table[2 * i + 1].expand(batch_size, -1, -1, -1))
            for i in range(g.num_layers)
        ]

    def peft_embeddings(self) -> torch.Tensor:
        return self.flat()

    def load_peft_embeddings_key(self) -> str:
        if self.prefix_projection:
            raise ValueError(
                "this prefix-tuning adapter file holds only the projected prefixes (it was trained with "
                "prefix_projection=True), which cannot be turned back into the MLP's weights: load it with "
                "is_trainable=False to run it, or resume training from an adapter checkpoint of this library "
                "(which keeps the MLP)"
            )
        return "embedding.weight"

    def to_plain_table(self) -> None:
        """Drop the MLP for a frozen ``[P, num_layers * 2 * kv_dim]`` table (to run a peft file of a projected prefix)."""
        g = self.geometry
        weight = self.embedding.weight
        self.embedding = nn.Embedding(self.num_virtual_tokens, g.num_layers * 2 * g.kv_dim, device=weight.device, dtype=weight.dtype)
        self.embedding.weight.requires_grad_(False)
        del self.transform
        self.prefix_projection = False

    def rewrite_inputs(self, module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
        """Prefixes into the cache, positions shifted past them."""
        if module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
            # transformers' checkpointed layers drop the cache (a replay would write it twice), and with it the
            # prefixes; some models (GPT-2) drop it in training mode even without gradients
            raise RuntimeError(
                f"prefix tuning reaches the attention of {type(module).__name__} through the KV cache, which transformers "
                "drops in layers that use gradient checkpointing. Call model.gradient_checkpointing_disable(), or use "
                "prompt tuning, LoRA or bottleneck adapters with gradient checkpointing"
            )
        if cache_length(cache) == 0:  # no cache, or generate()'s fresh one: start it with the prefixes
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=module.config)
            for layer, (key, value) in enumerate(self.key_values(batch_size_of(kwargs, type(module).__name__), _model_dtype(module))):
                cache.update(key, value, layer)
        kwargs[self.cache_kwarg] = cache
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens
        return kwargs

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={g.num_layers}, kv_heads={g.kv_heads}, "
                f"head_dim={g.head_dim}, prefix_projection={self.prefix_projection}")


def _model_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


@register_tuner("PREFIX_TUNING")
class PrefixTuner(PromptLearningTuner):
    """Attaches a :class:`PrefixEncoder` to the backbone and feeds it in as a KV cache."""

    config: PrefixTuningConfig

    def hook_target(self, hf_model: nn.Module) -> nn.Module:
        # The backbone takes the cache even where the task head does not (BertForSequenceClassification).
        candidates = [getattr(hf_model, "base_model", None), hf_model]
        for module in candidates:
            if isinstance(module, nn.Module) and cache_kwarg_name(module) is not None:
                return module
        raise TypeError(
            f"prefix tuning feeds the prefixes in as a KV cache, but neither {type(hf_model).__name__}.forward nor "
            f"its backbone's forward takes a cache (cache= / past_key_values=), so its attention cannot be hooked. "
            "Use prompt tuning, LoRA or bottleneck adapters for this model"
        )

    def build_encoder(self, hf_model: nn.Module, target: nn.Module) -> PrefixEncoder:
        cfg = self.config
        geometry = kv_geometry(hf_model)
        cfg.resolve("num_layers", geometry.num_layers, "number of layers")
        cfg.resolve("num_attention_heads", geometry.kv_heads, "number of key/value heads")
        cfg.resolve("token_dim", geometry.kv_dim, f"key/value width (head_dim {geometry.head_dim} x {geometry.kv_heads} key/value heads)")
        hidden = cfg.encoder_hidden_size if cfg.encoder_hidden_size is not None else geometry.kv_dim  # peft's default
        param = next(p for p in hf_model.parameters() if p.is_floating_point())
        return PrefixEncoder(
            cfg.num_virtual_tokens,  # type: ignore[arg-type]
            geometry,
            # the MLP also in inference mode (peft drops it there), so this library's checkpoints load for
            # inference too; a peft file of a projected prefix switches to a plain table when loaded
            projection=cfg.prefix_projection,
            encoder_hidden_size=hidden,
            zero_init=cfg.init_weights == "zero",
            cache_kwarg=cache_kwarg_name(target),  # type: ignore[arg-type]
            device=param.device,
            # float32 table even under a half-precision model, like peft; cast at use
            dtype=torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype,
        )

    def fit_to_peft_state(self, model: nn.Module, peft_state: dict[str, torch.Tensor]) -> None:
        """A peft file of a projected prefix holds only the projected table: loaded for inference, the
        encoder becomes that plain (frozen) table; loaded to train, the key conversion refuses it (see
        :meth:`PrefixEncoder.load_peft_embeddings_key`)."""
        encoder = self.encoder(model)
        if "prompt_embeddings" in peft_state and encoder.prefix_projection and self.config.inference_mode:
            encoder.to_plain_table()
