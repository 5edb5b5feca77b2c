"""Which modules a method adapts: peft's target semantics, block selection, exclusions, error text.

Every layer-replacing method (LoRA, bottleneck adapters, and what builds on them) chooses its
targets here, so they all read ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern`` and ``modules_to_save`` the same way, and fail with the same kind of message.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from lightning_peft.tuners.config import LayerTargetsConfig
from lightning_peft.tuners.model_arch import block_index, find_blocks

__all__ = [
    "OUTPUT_HEAD_NAMES",
    "match_module_names",
    "describe_available_modules",
    "output_head_names",
    "matched_targets",
    "narrow_targets",
    "check_target_types",
    "no_target_message",
]

#: Leaf names of output heads, which ``target_modules="all-linear"`` leaves alone (as peft does).
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output", "qa_outputs")


def match_module_names(names: Iterable[str], targets: Union[str, list[str], None]) -> list[str]:
    """peft's target semantics: a string is a regex that must match the whole name; a list holds
    names or suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if targets is None:
        return []
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def describe_available_modules(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,), limit: int = 12) -> str:
    """A short list of module leaf names of the given types a user could target, for error messages."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return shown or "(none)"


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: a transformers model's output embeddings, else a known head name."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in model.named_modules() if m is out}
    heads |= {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES}
    return heads


def matched_targets(model: nn.Module, target_modules: Union[str, list[str], None], layer_types: tuple[type, ...]) -> list[str]:
    """Module names ``target_modules`` selects: names / suffixes, a whole-name regex, or ``"all-linear"``
    (every module of ``layer_types`` outside the output head)."""
    if target_modules == "all-linear":
        heads = output_head_names(model)
        return [n for n, m in model.named_modules() if n and isinstance(m, layer_types)
                and not any(n == h or n.startswith(h + ".") for h in heads)]
    return match_module_names([n for n, _ in model.named_modules() if n], target_modules)


def narrow_targets(model: nn.Module, names: list[str], config: LayerTargetsConfig) -> list[str]:
    """``names`` minus ``exclude_modules``, outside ``layers_to_transform``, or trained whole (``modules_to_save``).

    Block indices come from :func:`~lightning_peft.tuners.model_arch.find_blocks` (the containers
    named by ``layers_pattern``, default layers/h/layer/blocks/block), for every method alike.
    """
    if config.exclude_modules:
        excluded = set(match_module_names(names, config.exclude_modules))
        names = [n for n in names if n not in excluded]
    if config.layers_to_transform is not None:
        pattern = config.layers_pattern
        blocks = find_blocks(model, [pattern] if isinstance(pattern, str) else pattern)
        wanted = set(config.layers_to_transform)
        names = [n for n in names if block_index(blocks, n) in wanted]
    if config.modules_to_save:
        trained_whole = set(match_module_names([n for n, _ in model.named_modules() if n], list(config.modules_to_save)))
        names = [n for n in names if n not in trained_whole]
    return names


def check_target_types(model: nn.Module, names: list[str], layer_types: tuple[type, ...], *, method: str, hint: str) -> None:
    """Raise TypeError naming the targets that are not of ``layer_types`` (``hint``: what to target instead)."""
    unsupported = [(n, type(model.get_submodule(n)).__name__) for n in names if not isinstance(model.get_submodule(n), layer_types)]
    if unsupported:
        shown = ", ".join(f"{n} ({kind})" for n, kind in unsupported[:5])
        kinds = _type_names(layer_types)
        raise TypeError(
            f"{method} can adapt {kinds} layers, but the targets also matched: {shown}. {hint}, e.g. one of: "
            f"{describe_available_modules(model, layer_types)}"
        )


def no_target_message(model: nn.Module, config: LayerTargetsConfig, layer_types: tuple[type, ...], what: Optional[str] = None) -> str:
    """The error text for targets that matched nothing."""
    what = what or f"{type(config).__name__}.target_modules={config.target_modules!r}"
    where = f" in layers {config.layers_to_transform}" if config.layers_to_transform is not None else ""
    return (f"{what} matched no module of {type(model).__name__}{where}. "
            f"Layers it has that could be adapted ({_type_names(layer_types)}): {describe_available_modules(model, layer_types)}")


def _type_names(types: tuple[type, ...]) -> str:
    """``"nn.Linear, Conv1D"``: torch.nn classes with their usual ``nn.`` prefix."""
    return ", ".join(("nn." if t.__module__.startswith("torch.nn") else "") + t.__name__ for t in types)
