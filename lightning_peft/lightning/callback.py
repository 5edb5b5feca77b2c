"""``PEFTCallback``: adapt an unchanged LightningModule's model, train only the adapter, save only the adapter.

Where each job happens, and why there (Lightning 2.6 order in ``fit``: ``Callback.setup`` →
``LightningModule.setup`` → ``configure_model`` → checkpoint restore of the module → ``strategy.setup``
(DDP/FSDP wrap, *then* optimizers) → ``on_fit_start``):

* injection + freezing: in ``setup`` when the model already exists there (built in ``__init__``),
  so before ``configure_model`` can shard it (FSDP2's ``fully_shard``); else right after the
  module's own ``configure_model`` (the callback wraps it for that one call; the model may be
  built there). A module that builds *and* shards its model in ``configure_model`` calls
  :func:`apply_peft` between the two. Either way before any wrapper or optimizer sees the
  parameters, and only once: a model that already carries this adapter (validate/test/predict
  after fit, a second ``fit``) is left alone; adapting an already sharded model is refused.
* optimizer check: ``on_fit_start``, the first hook after optimizers exist.
* dropout RNG: ``on_train_batch_start`` advances the adapters' (seed, offset) buffers once per
  micro-batch and data-parallel rank: with W ranks the offset moves by W and rank r draws at
  ``offset - (W - 1) + r`` during its step (``on_train_batch_end`` takes the rank shift back),
  so W ranks draw exactly the masks one process would draw for the same micro-batches in
  sequence (``accumulate_grad_batches=W``), and between steps every rank holds the same
  offset. The buffers travel in the checkpoint, so a resumed run, on any world size, draws the
  same masks.
* adapter-only checkpoints: an :class:`~lightning_peft.lightning.checkpoint_io.AdapterCheckpointIO`
  around the strategy's CheckpointIO (it also sees weights-only saves, which skip
  ``Callback.on_save_checkpoint``); ``strict_loading = False`` on the module so Lightning accepts
  the partial state dict, with our own strict check of the adapter keys instead.

Strategies: DDP / ``ddp_spawn`` (CPU or GPU) inject in every process before the DDP wrap and
write checkpoints from rank zero. FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) writes
adapter-only checkpoints in both forms (full file or sharded directory) through
:class:`~lightning_peft.lightning.fsdp2.FSDP2AdapterCheckpoints`, and resumes them on any world
size. FSDP1 needs ``FSDPStrategy(state_dict_type="full")`` (the full
state dict is gathered on rank zero, then filtered; sharded partial loads do not work) and a seed
set before the model is built. DeepSpeed writes its own checkpoint directories without Lightning's
CheckpointIO, so nothing here filters them: use ``DeepSpeedStrategy(exclude_frozen_parameters=True)``
(untested); ``strict_loading = False`` still lets the partial module state load on resume.

This module only uses the method-agnostic functions of :mod:`lightning_peft.tuners`
(``inject_adapter``, ``get_tuner``, ``adapter_state_dict``, the named-adapter functions), so every PEFT
method works through it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_peft.checkpoint import (
    CHECKPOINT_METADATA_KEY,
    build_checkpoint_metadata,
    read_checkpoint_metadata,
    resolve_model_attr,
    same_config,
)
from lightning_peft.lightning.checkpoint_io import AdapterCheckpointIO, AtomicCheckpointIO
from lightning_peft.lightning.fsdp2 import FSDP2AdapterCheckpoints, is_sharded
from lightning_peft.peft_model import format_trainable_parameters
from lightning_peft.tuners.config import PeftConfig, config_from_dict
from lightning_peft.tuners.injection import (
    DEFAULT_ADAPTER,
    adapter_state_dict,
    check_adapter_name,
    get_adapter_set,
    get_tuner,
    inject_adapter,
    with_adapter_names,
)
from lightning_peft.tuners.named_adapters import add_adapter, set_adapter

__all__ = ["PEFTCallback", "apply_peft"]

_WRAPPED_MARK = "_lightning_peft_configure_model"

try:  # let jsonargparse / LightningCLI accept `class_path: lightning_peft.LoraConfig` for a PeftConfig argument
    from jsonargparse import set_parsing_settings

    set_parsing_settings(subclasses_enabled=[PeftConfig])
except (ImportError, TypeError):  # jsonargparse is optional (only the CLI needs it)
    pass


class PEFTCallback(Callback):
    r"""Fine-tune a LightningModule's model with a PEFT method: inject, freeze, train and save only the adapter.

    Works on an unchanged LightningModule, whether it builds its model in ``__init__`` or in
    ``configure_model``. Under FSDP2 (``ModelParallelStrategy``), a module that builds *and*
    shards its model in ``configure_model`` calls :func:`apply_peft` between the two. Configure optimizers from the trainable parameters
    (``filter(lambda p: p.requires_grad, self.parameters())`` or simply ``self.parameters()``)
    inside ``configure_optimizers``, which runs after the injection.

    Args:
        peft_config: the method and its settings, e.g. ``LoraConfig(r=8, target_modules=["q_proj", "v_proj"])``.
        model_attr: dotted attribute path of the model inside the LightningModule (``"model"`` for
            ``self.model``); None adapts the whole LightningModule. Target names are matched
            relative to that module, and suffixes work either way.
        adapter_only_checkpoints: make checkpoints hold only the adapter (plus ``modules_to_save``
            and the dropout RNG state) and accept such partial checkpoints on resume.
        atomic_checkpoints: write checkpoint files atomically (replace Lightning's default
            ``TorchCheckpointIO`` with :class:`AtomicCheckpointIO`; a custom CheckpointIO is kept).
        verbose: report trainable vs total parameters at fit start (rank zero).
        adapter_name: the adapter's name. A model that already carries named adapters (e.g. loaded with
            ``load_adapter``) gets this one added beside them, or, if it has one of this name and config,
            trains that one; either way only this adapter trains and checkpoints hold only it.

    Raises:
        TypeError: ``peft_config`` is not a PeftConfig.
        ValueError: bad config (on construction); at setup: the model is missing, the targets match
            nothing, or the module carries a different adapter.
        RuntimeError: at setup, the model was sharded before the adapter could be injected; at fit
            start, some trainable parameter is in no optimizer.

    Example::

        from lightning_peft import LoraConfig, PEFTCallback

        peft = PEFTCallback(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), model_attr="model")
        trainer = Trainer(callbacks=[peft, ModelCheckpoint(save_last=True)])
        trainer.fit(module)                                  # only the adapter trains; checkpoints hold only it
        trainer.fit(fresh_module, ckpt_path="last")          # exact resume on a freshly built base model
    """

    def __init__(
        self,
        peft_config: PeftConfig,
        model_attr: Optional[str] = None,
        adapter_only_checkpoints: bool = True,
        atomic_checkpoints: bool = True,
        verbose: bool = True,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"PEFTCallback needs a PeftConfig such as LoraConfig(...), got {type(peft_config).__name__}; "
                "in YAML give it as {class_path: lightning_peft.LoraConfig, init_args: {...}}"
            )
        peft_config = copy.deepcopy(peft_config)
        peft_config.validate()  # bad settings fail here, not at the first fit
        check_adapter_name(adapter_name)
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.model_attr = model_attr or None
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.atomic_checkpoints = atomic_checkpoints
        self.verbose = verbose
        self._target: Any = None  # the adapted nn.Module (a reference, not a path: wrappers move paths)
        self._adapter_keys: frozenset[str] = frozenset()  # LightningModule state-dict keys of the adapter
        self._model_keys: frozenset[str] = frozenset()
        self._param_report = ""
        self._stage: Optional[str] = None
        self._rng_shift = 0  # this rank's dropout-offset shift while a training step runs
        self._fsdp2: Optional[FSDP2AdapterCheckpoints] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr)

    # ------------------------------------------------------------------ injection

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if sum(isinstance(cb, PEFTCallback) for cb in trainer.callbacks) > 1:
            raise ValueError(
                "the Trainer has more than one PEFTCallback (e.g. one in the CLI's `peft:` section and one in "
                "trainer.callbacks); one model takes one adapter: keep one of them"
            )
        self._configure_checkpointing(trainer, pl_module)
        has_configure_model = is_overridden("configure_model", pl_module)
        target = resolve_model_attr(pl_module, self.model_attr)
        # With model_attr=None the target (the module itself) always exists, but configure_model may
        # still add the layers to adapt: only a named model that exists now is adapted now.
        if target is not None and (self.model_attr is not None or not has_configure_model):
            # before configure_model, which may shard it (FSDP2's fully_shard works on what is there)
            self._adapt_unsharded(pl_module, target, stage)
        if has_configure_model:
            # Lightning calls it right after the setup hooks in every stage; the model may only exist
            # once it ran, or it may be replaced there: check (and adapt) again afterwards
            self._inject_after_configure_model(pl_module, stage)
        elif target is None:
            raise ValueError(self._missing_model_message(pl_module))

    def _inject_after_configure_model(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Wrap the instance's ``configure_model`` once: run it, then adapt what it built."""
        if _WRAPPED_MARK in pl_module.__dict__:
            return
        original = pl_module.configure_model

        def configure_model() -> None:
            del pl_module.__dict__["configure_model"]  # one-shot: the instance is plain again
            del pl_module.__dict__[_WRAPPED_MARK]
            original()
            target = resolve_model_attr(pl_module, self.model_attr)
            if target is None:
                raise ValueError(self._missing_model_message(pl_module))
            self._adapt_unsharded(pl_module, target, stage)

        pl_module.__dict__["configure_model"] = configure_model
        pl_module.__dict__[_WRAPPED_MARK] = True

    def _adapt_unsharded(self, pl_module: pl.LightningModule, target: Any, stage: str) -> None:
        """:meth:`_adapt`, refusing a model that is sharded but not adapted yet."""
        if get_tuner(target) is None and is_sharded(target):
            where = f"self.{self.model_attr}" if self.model_attr else "the LightningModule"
            raise RuntimeError(
                f"PEFTCallback: {where} was sharded (fully_shard / DTensor parameters) before the adapter was "
                "injected; an adapter injected after sharding would mix plain and sharded tensors and escape FSDP. "
                "Build the model in __init__ (the callback then adapts it before configure_model runs), or, when "
                "configure_model builds and shards it, call apply_peft(self) (from lightning_peft.lightning) in configure_model "
                "after building the model and before fully_shard"
            )
        self._adapt(pl_module, target, stage)

    def _adapt(self, pl_module: pl.LightningModule, target: Any, stage: str) -> None:
        tuner = get_tuner(target)
        if tuner is None:
            tuner = inject_adapter(target, copy.deepcopy(self.peft_config), adapter_name=self.adapter_name, advance_rng_on_forward=False)
        else:
            adapters = get_adapter_set(target)
            assert adapters is not None
            if self.adapter_name in adapters.tuners:
                self._check_existing_adapter(adapters.tuners[self.adapter_name].config, stage)
            else:  # beside the adapters the model carries
                add_adapter(target, self.adapter_name, copy.deepcopy(self.peft_config))
            set_adapter(target, self.adapter_name)  # the active adapter, the only trainable one
            tuner = get_tuner(target)
            # adapted elsewhere, maybe with forward-advancing RNG: this callback advances it once per step now
            tuner.set_rng_advance_on_forward(target, False)
        prefix = f"{self.model_attr}." if self.model_attr else ""
        self._target = target
        self._adapter_keys = frozenset(prefix + k for k in adapter_state_dict(target))
        self._model_keys = frozenset(pl_module.state_dict())
        self._param_report = format_trainable_parameters(target)

    def _check_existing_adapter(self, existing: PeftConfig, stage: str) -> None:
        if not same_config(existing, self.peft_config):
            raise ValueError(
                f"the model already carries a different adapter ({existing}) than this PEFTCallback's "
                f"({self.peft_config}). Give the callback the same config, or start from a fresh base model"
            )
        if existing.inference_mode and stage == "fit":
            raise ValueError(
                "the model's adapter was loaded for inference (nothing trainable); to train it, load it with "
                "load_peft_checkpoint(..., is_trainable=True) or start from a fresh base model"
            )

    def _missing_model_message(self, pl_module: pl.LightningModule) -> str:
        children = ", ".join(name for name, _ in pl_module.named_children()) or "(none)"
        return (
            f"PEFTCallback(model_attr={self.model_attr!r}) found no model at {type(pl_module).__name__}."
            f"{self.model_attr}: it is not set in __init__ nor by configure_model(). Set model_attr to the "
            f"attribute holding the model (submodules: {children}), or None to adapt the whole LightningModule"
        )

    # ------------------------------------------------------------------ training

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_optimizers(trainer, pl_module)
        if self.verbose:
            rank_zero_info(f"PEFTCallback ({self.peft_config.peft_type}): {self._param_report}")

    def _check_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not trainer.optimizers:
            rank_zero_warn("PEFTCallback: no optimizer is configured, so the adapter will not be trained")
            return
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, p in trainable if id(p) not in optimized]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise RuntimeError(
                f"PEFTCallback: {len(missing)} trainable parameters belong to no optimizer and would never be "
                f"updated: {shown}. The optimizer was built before the adapter was injected. The usual cause is "
                "LightningCLI's `--optimizer` / `optimizer:` option, which builds the optimizer from "
                "model.parameters() before fit starts. Fix: build it in your LightningModule's "
                "configure_optimizers (e.g. torch.optim.AdamW(p for p in self.parameters() if p.requires_grad)), "
                "which runs after the injection, or run through the `lightning-peft` CLI, whose --optimizer is "
                "built from the trainable parameters at fit time"
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._target is None:
            return
        world, rank = _data_parallel_world_and_rank(trainer)
        if world == 1:
            _move_dropout_offsets(self._target, 1)  # the trained adapter's; others stay put (not in checkpoints)
            return
        # this step's offset for rank r: the canonical one moved by `world`, minus (world - 1 - r)
        self._rng_shift = rank - (world - 1)
        _move_dropout_offsets(self._target, world + self._rng_shift)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._target is not None and self._rng_shift:
            _move_dropout_offsets(self._target, -self._rng_shift)  # between steps all ranks hold the canonical offset
        self._rng_shift = 0

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.__dict__.pop(_WRAPPED_MARK, None):  # configure_model never ran: undo the wrap
            pl_module.__dict__.pop("configure_model", None)
        # the FSDP2 checkpoint methods stay on the strategy: trainer.save_checkpoint() after fit uses them

    # ------------------------------------------------------------------ checkpoints

    def _configure_checkpointing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        if isinstance(io, AdapterCheckpointIO):
            io = io.checkpoint_io  # a previous stage's wrapper: rewrap for this callback
        if self.atomic_checkpoints and type(io) is TorchCheckpointIO:
            io = AtomicCheckpointIO()
        if self.adapter_only_checkpoints:
            io = AdapterCheckpointIO(io, self._filter_checkpoint, self._check_checkpoint)
            pl_module.strict_loading = False  # Lightning accepts the partial state dict; _check_checkpoint is strict instead
        strategy.checkpoint_io = io
        if self._fsdp2 is not None:
            self._fsdp2.uninstall()
            self._fsdp2 = None
        if self.adapter_only_checkpoints and _is_model_parallel(strategy):
            # ModelParallelStrategy saves and loads without the CheckpointIO for sharded checkpoints
            self._fsdp2 = FSDP2AdapterCheckpoints(
                strategy, lambda: self._adapter_keys, self._metadata, self._check_checkpoint, CHECKPOINT_METADATA_KEY
            )
            self._fsdp2.install()

    def _metadata(self) -> dict[str, Any]:
        return build_checkpoint_metadata(self.peft_config, self.model_attr, sorted(self._adapter_keys), self.adapter_name)

    def _filter_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A copy of a Lightning checkpoint whose state dict holds only the adapter, plus our record."""
        state = checkpoint["state_dict"]
        if not self._adapter_keys:
            return checkpoint  # nothing injected (yet): leave Lightning's checkpoint alone
        missing = sorted(self._adapter_keys - set(state))
        if missing and state:
            raise RuntimeError(
                f"PEFTCallback: the state dict to save lacks adapter keys {missing[:5]}: this strategy names or "
                "shards parameters differently (FSDP needs state_dict_type='full'; DeepSpeed writes its own "
                "files, see exclude_frozen_parameters=True)"
            )
        kept = {k: v for k, v in state.items() if k in self._adapter_keys}
        return {**checkpoint, "state_dict": kept, CHECKPOINT_METADATA_KEY: self._metadata()}

    def _check_checkpoint(self, checkpoint: dict[str, Any], path: str) -> None:
        """Before Lightning restores anything: the checkpoint's adapter must be this one."""
        meta = read_checkpoint_metadata(checkpoint)
        if meta is not None:
            self._check_config_dict(meta.get("peft_config", {}), path)
        if self._stage == "fit" and "optimizer_states" not in checkpoint:
            raise ValueError(
                f"checkpoint {path} is weights-only (ModelCheckpoint(save_weights_only=True)): it cannot resume "
                "training (no optimizer, scheduler or loop state). Resume from a full checkpoint, use this one with "
                "validate/test/predict, or start a new fit from its adapter: "
                "load_peft_checkpoint(module, path, is_trainable=True), then trainer.fit(module) without ckpt_path"
            )
        if not self._adapter_keys:
            return
        # checkpoints from before layers held named adapters: their keys lack the adapter's name
        state = checkpoint["state_dict"] = with_adapter_names(checkpoint["state_dict"], set(self._adapter_keys))
        missing = sorted(self._adapter_keys - set(state))
        unexpected = sorted(set(state) - self._model_keys)
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing adapter keys {_few(missing)}")
            if unexpected:
                problems.append(f"keys the model does not have {_few(unexpected)}")
            raise ValueError(
                f"checkpoint {path} does not fit this model + adapter: {'; '.join(problems)}. Resume with the same "
                f"LightningModule, model_attr ({self.model_attr!r}) and PEFT config it was trained with"
            )

    def _check_config_dict(self, saved: dict[str, Any], path: str) -> None:
        if not saved:
            return
        try:
            saved_config = config_from_dict(saved)
        except ValueError as err:
            raise ValueError(f"checkpoint {path}: {err}") from err
        if not same_config(saved_config, self.peft_config):
            raise ValueError(
                f"checkpoint {path} was trained with {saved_config}, but this PEFTCallback has {self.peft_config}. "
                "Use the checkpoint's config to resume or evaluate it"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._metadata()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config_dict(state_dict.get("peft_config", {}), "being restored")


def apply_peft(pl_module: pl.LightningModule, callback: Optional[PEFTCallback] = None) -> None:
    """Inject the Trainer's PEFTCallback adapter now: call it in ``configure_model`` between building and sharding.

    For a LightningModule that builds *and* shards its model in ``configure_model`` (FSDP2's
    ``fully_shard`` under ``ModelParallelStrategy``): the adapter must be in place, and the base
    frozen, before ``fully_shard`` sees the parameters, and the callback cannot step in between
    by itself. A model built in ``__init__`` needs no call: the callback adapts it in ``setup``.

    Example::

        def configure_model(self):
            if self.model is not None:
                return
            self.model = AutoModelForCausalLM.from_config(config)
            apply_peft(self)  # inject + freeze, before sharding
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    Args:
        pl_module: the LightningModule (``self`` in ``configure_model``).
        callback: the PEFTCallback to apply; by default the one in ``pl_module.trainer.callbacks``.
            Without a Trainer, or a Trainer without a PEFTCallback, nothing happens (the same
            ``configure_model`` then builds a plain model, e.g. for ``load_peft_checkpoint``).

    Raises:
        ValueError: no model at the callback's ``model_attr`` yet; a different adapter is there.
        RuntimeError: the model is already sharded (call this before ``fully_shard``).
    """
    if callback is None:
        trainer = pl_module._trainer
        found = [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, PEFTCallback)]
        if not found:
            return
        callback = found[0]
    target = resolve_model_attr(pl_module, callback.model_attr)
    if target is None:
        raise ValueError(callback._missing_model_message(pl_module) + "; call apply_peft(self) after building the model")
    callback._adapt_unsharded(pl_module, target, callback._stage or "fit")


def _is_model_parallel(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # Lightning < 2.4
        return False
    return isinstance(strategy, ModelParallelStrategy)


def _data_parallel_world_and_rank(trainer: pl.Trainer) -> tuple[int, int]:
    """(number of data-parallel replicas, this one's index): ranks that see different batches."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


@torch.no_grad()
def _move_dropout_offsets(target: Any, delta: int) -> None:
    tuner = get_tuner(target)
    if tuner is not None:
        for buf in tuner.dropout_rng_buffers(target):
            buf[1:].add_(delta)


def _few(items: list[str], limit: int = 6) -> str:
    return "[" + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "") + "]"
