"""The base of every method's config: peft's field names, plain-dict (de)serialisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, TypeVar, Union

from typing_extensions import dataclass_transform

__all__ = ["PeftConfig", "LayerTargetsConfig", "config_from_dict", "register_config"]

_CONFIG_CLASSES: dict[str, type["PeftConfig"]] = {}


ConfigT = TypeVar("ConfigT", bound=type)


@dataclass_transform()
def register_config(cls: ConfigT) -> ConfigT:
    """Class decorator of a method's config: make it a dataclass and let ``config_from_dict`` find it by ``peft_type``."""
    cls = dataclass(cls)
    _CONFIG_CLASSES[cls.peft_type] = cls
    return cls


@dataclass
class PeftConfig:
    """Fields every method shares, named as in HF peft so adapter_config.json round-trips.

    Args:
        task_type: peft's task type string (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), informational.
        base_model_name_or_path: where the base model came from; written to adapter_config.json.
        modules_to_save: names (suffixes) of extra modules trained in full and saved with the
            adapter, e.g. a freshly initialised classification head.
        inference_mode: inject with nothing trainable (for loading an adapter to run it).
    """

    peft_type: ClassVar[str] = ""
    method_name: ClassVar[str] = ""  # the method's name in messages, e.g. "LoRA"
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    modules_to_save: Optional[list[str]] = None
    inference_mode: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (also what goes into Lightning checkpoints: torch>=2.6 loads weights_only)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build from a dict, ignoring keys this class does not have (peft writes many)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix. Subclasses extend this."""
        if self.modules_to_save is not None and isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]


@dataclass
class LayerTargetsConfig(PeftConfig):
    """The target fields of methods that adapt chosen layers (LoRA, bottleneck adapters), with peft's names.

    Args:
        target_modules: module names or suffixes (list), a regex matching whole names (str), or
            ``"all-linear"`` (every linear layer except the output head), as in peft.
        exclude_modules: names / suffixes (list) or a regex (str) of modules to leave alone.
        layers_to_transform: only adapt modules inside the blocks with these indices.
        layers_pattern: the name(s) of the block container (default: layers, h, layer, blocks, block).
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        super().validate()
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]


def _plain(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Rebuild the right config class from a dict holding ``peft_type`` (ours or peft's JSON)."""
    peft_type = data.get("peft_type")
    if peft_type not in _CONFIG_CLASSES:
        known = ", ".join(sorted(_CONFIG_CLASSES))
        raise ValueError(f"unknown peft_type {peft_type!r} in adapter config; this library supports: {known}")
    return _CONFIG_CLASSES[peft_type].from_dict(data)

