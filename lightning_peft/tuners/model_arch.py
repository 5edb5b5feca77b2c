"""Where things are in a transformers model: the model itself, its backbone, its blocks, its KV shape.

Shared by the methods that need to know a model's structure rather than just match names:
bottleneck adapters (the output projection of each attention / feed-forward sub-block) and
prefix / prompt tuning (the embedding layer, the backbone that takes a KV cache, the key/value
width per layer). Everything is found structurally or from the model's config, with one small
table of per-architecture sub-block names; when nothing fits, the error lists what was looked for.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

__all__ = [
    "BLOCK_CONTAINER_NAMES",
    "BLOCK_OUTPUT_PROJECTIONS",
    "KVGeometry",
    "find_transformers_model",
    "cache_kwarg_name",
    "kv_geometry",
    "find_blocks",
    "block_index",
    "block_output_projections",
]

#: Names of the ``nn.ModuleList`` that holds a model's transformer blocks (``model.layers.3``,
#: ``transformer.h.3``, ``bert.encoder.layer.3``, ...).
BLOCK_CONTAINER_NAMES: tuple[str, ...] = ("layers", "h", "layer", "blocks", "block")

#: Per architecture family, the paths *inside one block* of the last linear layer of the attention
#: sub-block and of the feed-forward sub-block, i.e. the modules whose output a bottleneck adapter
#: transforms before the residual addition. The first row whose both paths exist in a block wins.
BLOCK_OUTPUT_PROJECTIONS: tuple[tuple[str, str, str], ...] = (
    # (family, attention output, feed-forward output)
    ("llama/mistral/qwen2/gemma", "self_attn.o_proj", "mlp.down_proj"),
    ("gpt2", "attn.c_proj", "mlp.c_proj"),
    ("bert/roberta/electra/minilm", "attention.output.dense", "output.dense"),
    ("distilbert", "attention.out_lin", "ffn.lin2"),
    ("opt/bart decoder", "self_attn.out_proj", "fc2"),
    ("clip/phi", "self_attn.out_proj", "mlp.fc2"),
    ("gpt-neox", "attention.dense", "mlp.dense_4h_to_h"),
    ("falcon", "self_attention.dense", "mlp.dense_4h_to_h"),
)


def find_transformers_model(root: nn.Module, method: str) -> tuple[str, nn.Module]:
    """The outermost transformers model inside ``root`` (``root`` itself when it is one).

    A transformers model is recognised by a ``config`` and a callable ``get_input_embeddings``.
    This lets prompt methods be injected into a LightningModule that holds the model as an
    attribute (what the Lightning callback does) as well as into the model itself.

    Args:
        root: the module passed to ``inject_adapter``.
        method: the method's name, for the error message.

    Returns:
        ``(name relative to root, module)``; the name is ``""`` for ``root`` itself.

    Raises:
        TypeError: no transformers model, or several side by side (ambiguous).
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            continue  # inside one already found
        if getattr(module, "config", None) is not None and callable(getattr(module, "get_input_embeddings", None)):
            found.append((name, module))
    if not found:
        raise TypeError(
            f"{method} works on transformers models (a module with .config and get_input_embeddings()), and "
            f"{type(root).__name__} contains none. Inject it into a transformers PreTrainedModel, or into a module that holds one"
        )
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise TypeError(
            f"{type(root).__name__} holds several transformers models ({names}); {method} needs one. "
            "Inject the adapter into the one to adapt (e.g. inject_adapter(module.model, config))"
        )
    return found[0]


def cache_kwarg_name(module: nn.Module) -> Optional[str]:
    """The name under which ``module.forward`` takes a KV cache: ``"cache"`` (transformers >= 5.x),
    ``"past_key_values"`` (older), or None when it takes none."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


@dataclass(frozen=True)
class KVGeometry:
    """The key/value layout of a decoder or encoder: one ``[batch, kv_heads, seq, head_dim]``
    key and value tensor per layer. ``kv_dim = kv_heads * head_dim`` (smaller than the hidden size
    under grouped-query attention)."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first(config: Any, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def kv_geometry(model: nn.Module) -> KVGeometry:
    """Layers, key/value heads and head size of a transformers model, from its config.

    Raises:
        TypeError: the config does not say (names the model class and the fields looked for).
    """
    config = _text_config(model.config)
    layers = _first(config, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads"))
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
    if layers is None or heads is None or (hidden is None and _first(config, ("head_dim",)) is None):
        raise TypeError(
            f"cannot read the attention layout of {type(model).__name__} from its config (looked for "
            "num_hidden_layers/n_layer, num_attention_heads/n_head, hidden_size/n_embd, head_dim); "
            "set num_layers, num_attention_heads and token_dim in the config of the method"
        )
    kv_heads = _first(config, ("num_key_value_heads",)) or heads
    head_dim = _first(config, ("head_dim",)) or hidden // heads  # type: ignore[operator]
    return KVGeometry(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim)


def _block_regex(containers: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(c) for c in containers)
    return re.compile(rf"(?:^|\.)(?:{alternatives})\.(\d+)$")


def find_blocks(model: nn.Module, containers: Optional[Sequence[str]] = None) -> list[tuple[str, int, nn.Module]]:
    """Every transformer block: ``(name, index in its container, module)`` in model order.

    A block is an element of an ``nn.ModuleList`` / ``nn.Sequential`` named one of ``containers``
    (default :data:`BLOCK_CONTAINER_NAMES`).
    """
    pattern = _block_regex(containers or BLOCK_CONTAINER_NAMES)
    modules = dict(model.named_modules())
    blocks = []
    for name, module in modules.items():
        match = pattern.search(name)
        if match and isinstance(modules.get(name.rsplit(".", 1)[0]), (nn.ModuleList, nn.Sequential)):
            blocks.append((name, int(match.group(1)), module))
    return blocks


def block_index(blocks: list[tuple[str, int, nn.Module]], name: str) -> Optional[int]:
    """The index of the innermost block of ``blocks`` (from :func:`find_blocks`) holding module ``name``; None outside."""
    inside = [(len(block), index) for block, index, _ in blocks if name.startswith(block + ".") or name == block]
    return max(inside)[1] if inside else None


def block_output_projections(model: nn.Module) -> list[tuple[int, str, str]]:
    """For each block, the full names of its attention- and feed-forward output projections.

    Returns:
        ``[(block index, attention output name, feed-forward output name), ...]``.

    Raises:
        ValueError: no block, or no block with a known layout; the message lists what was looked for.
    """
    blocks = find_blocks(model)
    found = []
    for name, index, block in blocks:
        sub = {n for n, _ in block.named_modules()}
        for _, attn, ffn in BLOCK_OUTPUT_PROJECTIONS:
            if attn in sub and ffn in sub:
                found.append((index, f"{name}.{attn}", f"{name}.{ffn}"))
                break
    if found:
        return found
    looked = "; ".join(f"{fam}: {attn} + {ffn}" for fam, attn, ffn in BLOCK_OUTPUT_PROJECTIONS)
    where = (
        f"it has {len(blocks)} blocks (e.g. {blocks[0][0]}) but none contains a known pair"
        if blocks
        else f"found no transformer blocks (an nn.ModuleList named one of {', '.join(BLOCK_CONTAINER_NAMES)})"
    )
    raise ValueError(
        f"cannot place bottleneck adapters in {type(model).__name__}: {where}. Looked for these output "
        f"projections inside a block: {looked}. Name the layers whose output to adapt with "
        "AdapterConfig(target_modules=[...]) instead"
    )
