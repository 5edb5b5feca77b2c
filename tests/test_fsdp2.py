"""FSDP2 on the CPU (``ModelParallelStrategy`` + ``fully_shard``, gloo, 2 processes): PEFTCallback trains sharded
with the same math as one process, writes adapter-only checkpoints in both forms, and resumes them exactly
on the same or another world size.

The reference for "the same math" is a 1-process run on the same global batches: the data come in
micro-batches of 4 (:class:`MicroBatchSampler`); W ranks take micro-batches r, r+W, ..., one process
takes them all with ``accumulate_grad_batches=W``, so both average the gradients of the same 8 samples
per step, and the adapter's dropout draws the same masks (its offset advances per micro-batch and rank).

All runs happen in three launches of fresh processes (``fsdp2_worker.py``, shared by the tests through
a module fixture); every assertion is on the files they leave: per-rank results, checkpoints, and each
rank's adapter right after a resume.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from fsdp2_worker import launch
from lightning_fixtures import load_ckpt, wide_llama
from test_bitfit import biased_llama
from test_methods import CONFIGS

from lightning_peft import LoraConfig, adapter_state_dict, inject_adapter, load_peft_checkpoint
from lightning_peft.checkpoint import read_sharded_checkpoint
from models import tiny_llama

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
EPOCHS, STEPS_PER_EPOCH, MICRO_PER_EPOCH = 2, 4, 8  # 32 samples, micro-batch 4, global batch 8


def _runs(tmp):
    """The three launches: (world, runs); a later launch resumes what an earlier one wrote."""
    a, b, c = tmp / "a", tmp / "b", tmp / "c"
    two = [
        dict(out=a / "lora_full"),                                    # LoRA + dropout, full checkpoints
        dict(out=a / "lora_sharded", sharded=True, save_last=True, save_after_fit=True),  # the same, sharded (DCP)
        dict(out=a / "adapter_full", method="adapter_houlsby"),       # a second method, for the equality test
        dict(out=a / "prefix", method="prefix_projection", epochs=1),
        dict(out=a / "prompt", method="prompt", epochs=1, sharded=True),
        dict(out=a / "bitfit", method="bitfit", epochs=1, pattern="configure"),
        dict(out=a / "ia3", method="ia3", epochs=1, sharded=True, pattern="configure"),
        dict(out=a / "bf16", epochs=1, bf16_mixed=True),
        dict(out=a / "wide_full", epochs=1, wide=True, limit_train_batches=2),  # checkpoint size vs a real-ish model
        dict(out=a / "wide_sharded", epochs=1, wide=True, limit_train_batches=2, sharded=True),
    ]
    one = [
        dict(out=b / "lora_ref", accumulate=2),
        dict(out=b / "adapter_ref", method="adapter_houlsby", accumulate=2),
        dict(out=b / "lora_full_2to1", accumulate=2, pattern="configure", ckpt_path=a / "lora_full/ckpt/epoch=0.ckpt"),
        dict(out=b / "lora_sharded_2to1", accumulate=2, sharded=True, ckpt_path=a / "lora_sharded/ckpt/epoch=0.ckpt"),
        dict(out=b / "lora_sharded_1", accumulate=2, sharded=True, epochs=1),
        dict(out=b / "late", epochs=1, pattern="late"),
        dict(out=b / "other_config", accumulate=2, sharded=True, config={**LORA, "r": 8},
             ckpt_path=a / "lora_sharded/ckpt/epoch=0.ckpt"),
        dict(out=b / "missing_shard", accumulate=2, sharded=True, ckpt_path=tmp / "incomplete.ckpt"),
    ]
    two_again = [
        dict(out=c / "lora_full_1to2", ckpt_path=b / "lora_ref/ckpt/epoch=0.ckpt"),
        dict(out=c / "lora_sharded_1to2", sharded=True, pattern="configure", ckpt_path=b / "lora_sharded_1/ckpt/epoch=0.ckpt"),
        dict(out=c / "lora_sharded_2to2", sharded=True, ckpt_path=a / "lora_sharded/ckpt/epoch=0.ckpt"),
        dict(out=c / "validate_full", stage="validate", ckpt_path=a / "lora_full/ckpt/epoch=1.ckpt"),
        dict(out=c / "validate_sharded", stage="validate", sharded=True, pattern="configure",
             ckpt_path=a / "lora_sharded/ckpt/epoch=1.ckpt"),
    ]
    return two, one, two_again


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    two, one, two_again = _runs(tmp)
    results = {}
    for world, batch in ((2, two), (1, one), (2, two_again)):
        if batch is one:  # a sharded checkpoint with one shard file gone
            shutil.copytree(tmp / "a/lora_sharded/ckpt/epoch=0.ckpt", tmp / "incomplete.ckpt")
            os.remove(sorted((tmp / "incomplete.ckpt").glob("*.distcp"))[-1])
        for run, per_rank in zip(batch, launch(batch, world, os.fspath(tmp))):
            results[run["out"].name] = (run["out"], per_rank)
    return results


def _ok(runs, name):
    out, per_rank = runs[name]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"{name} rank {rank}: {result.get('traceback')}"
    return out, per_rank


def _losses(runs, name) -> dict[int, float]:
    """Per-micro-batch losses of a run, merged over its ranks."""
    _, per_rank = _ok(runs, name)
    merged: dict[int, float] = {}
    for result in per_rank:
        merged.update({int(k): v for k, v in result["micro_losses"].items()})
    return merged


def _final_adapter(runs, name, epoch=EPOCHS - 1) -> dict[str, torch.Tensor]:
    out, _ = _ok(runs, name)
    path = out / "ckpt" / f"epoch={epoch}.ckpt"
    if path.is_dir():  # sharded: read back through the library's own reader into plain tensors
        return read_sharded_checkpoint(path)["state_dict"]
    return load_ckpt(path)["state_dict"]


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=atol, msg=key)


def _assert_losses(got: dict[int, float], want: dict[int, float], micro: range, atol: float) -> None:
    assert sorted(got) == list(micro)
    g = torch.tensor([got[m] for m in micro], dtype=torch.float64)
    w = torch.tensor([want[m] for m in micro], dtype=torch.float64)
    torch.testing.assert_close(g, w, rtol=0, atol=atol)


def _expected_keys(method="lora") -> set[str]:
    if method == "lora":
        reference = tiny_llama(0)
        inject_adapter(reference, LoraConfig(**LORA))
    else:
        reference = biased_llama()
        inject_adapter(reference, CONFIGS[method]())
    return {"model." + k for k in adapter_state_dict(reference)}


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- same math as one process ----------------------------------------------------------------------------


@pytest.mark.parametrize("sharded, ref, method", [("lora_full", "lora_ref", "lora"), ("adapter_full", "adapter_ref", "adapter_houlsby")])
def test_sharded_training_equals_one_process_on_the_same_global_batches(runs, sharded, ref, method):
    _assert_losses(_losses(runs, sharded), _losses(runs, ref), range(EPOCHS * MICRO_PER_EPOCH), atol=1e-5)
    got, want = _final_adapter(runs, sharded), _final_adapter(runs, ref)
    assert set(want) == _expected_keys(method)
    _assert_close(got, want, atol=1e-5)
    first = _final_adapter(runs, ref, epoch=0)
    trained = "lora_B" if method == "lora" else "adapter_up"
    assert any(not torch.equal(first[k], want[k]) for k in want if trained in k)  # it did train
    if method == "lora":  # the dropout offsets advanced once per micro-batch in both
        assert all(int(want[k][1]) == EPOCHS * MICRO_PER_EPOCH for k in want if k.endswith("lora_rng.default"))


def test_the_sharded_run_shards_the_frozen_base_and_keeps_no_state_for_it(runs):
    _, per_rank = _ok(runs, "lora_full")
    for result in per_rank:
        mem = result["memory"]
        assert mem["frozen_all_dtensor"]
        # dim-0 shards as torch.chunk: each rank holds half of the base weights up to one row per tensor
        assert abs(mem["frozen_local_bytes"] - mem["frozen_full_bytes"] / 2) < 0.02 * mem["frozen_full_bytes"]
        assert mem["frozen_with_grad"] == 0 and mem["frozen_with_optimizer_state"] == 0
        assert mem["trainable_with_optimizer_state"] == mem["trainable"] == 8  # lora_A, lora_B in 4 layers


# ---- adapter-only checkpoints, both forms --------------------------------------------------------------


def test_full_checkpoint_holds_only_the_adapter_and_its_optimizer_state(runs):
    out, _ = _ok(runs, "lora_full")
    path = out / "ckpt" / "epoch=0.ckpt"
    ckpt = load_ckpt(path)
    keys = _expected_keys()
    assert set(ckpt["state_dict"]) == keys and ckpt["lightning_peft"]["peft_config"] == LoraConfig(**LORA).to_dict()
    (optimizer,) = ckpt["optimizer_states"]
    assert set(optimizer["state"]) == {k for k in keys if not k.endswith("lora_rng.default")}  # by name, adapter only

def _size(path) -> int:
    return os.path.getsize(path) if path.is_file() else sum(f.stat().st_size for f in path.iterdir())


@pytest.mark.parametrize("name", ["wide_full", "wide_sharded"])
def test_checkpoint_of_either_form_is_under_5_percent_of_the_model(runs, name):
    """On a 3.4M-parameter Llama (on the tiny one the fixed per-file and per-tensor overhead dominates)."""
    out, _ = _ok(runs, name)
    path = out / "ckpt" / "epoch=0.ckpt"
    assert path.is_dir() == (name == "wide_sharded")
    assert set(_final_adapter(runs, name, epoch=0)) == _expected_keys()  # both Llamas have 2 layers: the same keys
    assert _size(path) < 0.05 * _model_bytes(wide_llama())


def test_sharded_checkpoint_is_a_dcp_directory_with_only_the_adapter(runs):
    from torch.distributed.checkpoint import FileSystemReader

    out, _ = _ok(runs, "lora_sharded")
    path = out / "ckpt" / "epoch=0.ckpt"
    assert path.is_dir() and len(list(path.glob("*.distcp"))) == 2  # one shard file per rank
    # last.ckpt was replaced after each epoch: by a complete directory, nothing left beside it
    assert sorted(os.listdir(out / "ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    _assert_close(read_sharded_checkpoint(out / "ckpt" / "last.ckpt")["state_dict"], _final_adapter(runs, "lora_sharded", epoch=1), atol=0)
    # trainer.save_checkpoint() after fit writes the same adapter-only form
    _assert_close(read_sharded_checkpoint(out / "after_fit.ckpt")["state_dict"], _final_adapter(runs, "lora_sharded", epoch=1), atol=0)
    saved = FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    keys = _expected_keys()
    assert {k[len("state_dict."):] for k in saved if k.startswith("state_dict.")} == keys
    optimizer_params = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in saved if k.startswith("optimizer_0.state.")}
    assert optimizer_params == {k for k in keys if not k.endswith("lora_rng.default")}
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert meta["lightning_peft"]["peft_config"] == LoraConfig(**LORA).to_dict()
    # the library's reader agrees with torch's own converter of a DCP directory into one file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, out / "converted.pt")
    reference = torch.load(out / "converted.pt", weights_only=True)["state_dict"]
    _assert_close(_final_adapter(runs, "lora_sharded", epoch=0), reference, atol=0)


def test_both_forms_train_the_same(runs):
    _assert_losses(_losses(runs, "lora_sharded"), _losses(runs, "lora_full"), range(EPOCHS * MICRO_PER_EPOCH), atol=0)
    _assert_close(_final_adapter(runs, "lora_sharded"), _final_adapter(runs, "lora_full"), atol=0)


# ---- exact resume, same and other world size ----------------------------------------------------------------


@pytest.mark.parametrize(
    "resumed, reference, atol",
    [
        ("lora_full_2to1", "lora_full", 1e-5),
        ("lora_sharded_2to1", "lora_sharded", 1e-5),
        ("lora_full_1to2", "lora_ref", 1e-5),
        ("lora_sharded_1to2", "lora_ref", 1e-5),
        ("lora_sharded_2to2", "lora_sharded", 0),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(runs, resumed, reference, atol):
    second_epoch = range(MICRO_PER_EPOCH, EPOCHS * MICRO_PER_EPOCH)
    got = _losses(runs, resumed)
    _assert_losses(got, _losses(runs, reference), second_epoch, atol=atol)
    _assert_close(_final_adapter(runs, resumed), _final_adapter(runs, reference), atol=atol)


@pytest.mark.parametrize("resumed, saved_by", [("lora_full_1to2", "lora_ref"), ("lora_sharded_1to2", "lora_sharded_1"),
                                               ("lora_sharded_2to2", "lora_sharded")])
def test_after_resume_every_rank_holds_its_shard_of_the_saved_adapter(runs, resumed, saved_by):
    """accelerate's FSDP2 bug: an adapter-only resume kept only one rank's shard; here each rank's shard is checked."""
    out, per_rank = _ok(runs, resumed)
    saved = _final_adapter(runs, saved_by, epoch=0)
    covered = {key: torch.zeros(value.shape[0] if value.dim() else 1, dtype=torch.bool) for key, value in saved.items()}
    for rank in range(len(per_rank)):
        local = torch.load(out / f"adapter_rank{rank}.pt", weights_only=True)
        assert set(local) == set(saved)
        for key, (placed, start, rows) in local.items():
            torch.testing.assert_close(placed[start:start + rows], saved[key][start:start + rows], rtol=0, atol=0, msg=key)
            covered[key][start:start + rows] = True
    assert all(mask.all() for mask in covered.values())  # the ranks' shards together are the whole adapter


# ---- the other methods, the other patterns, mixed precision ---------------------------------------------------


@pytest.mark.parametrize("name, method", [("prefix", "prefix_projection"), ("prompt", "prompt"), ("bitfit", "bitfit"), ("ia3", "ia3")])
def test_every_method_trains_sharded_and_loads_into_a_plain_model(runs, name, method):
    losses = _losses(runs, name)
    assert sorted(losses) == list(range(MICRO_PER_EPOCH)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    saved = _final_adapter(runs, name, epoch=0)
    assert set(saved) == _expected_keys(method)
    out, _ = _ok(runs, name)
    model = load_peft_checkpoint(biased_llama(), out / "ckpt" / "epoch=0.ckpt")
    own = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(own[key[len("model."):]], value, rtol=0, atol=0)
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # prompt tuning prepends virtual tokens: compare the real tokens' positions
        assert not torch.allclose(model(input_ids=tokens).logits[:, -8:], biased_llama()(input_ids=tokens).logits)


def test_bf16_mixed_precision_trains_and_saves_fp32_adapter(runs):
    losses, fp32 = _losses(runs, "bf16"), _losses(runs, "lora_full")
    assert sorted(losses) == list(range(MICRO_PER_EPOCH))
    for micro, loss in losses.items():
        assert abs(loss - fp32[micro]) < 0.05  # bf16 compute, fp32 master weights: close to the fp32 run
    saved = _final_adapter(runs, "bf16", epoch=0)
    assert {v.dtype for k, v in saved.items() if not k.endswith("lora_rng.default")} == {torch.float32}


@pytest.mark.parametrize("form", ["lora_full", "lora_sharded"])
def test_load_peft_checkpoint_of_either_form_into_a_plain_model(runs, form):
    out, _ = _ok(runs, form)
    saved = _final_adapter(runs, form)
    model = load_peft_checkpoint(tiny_llama(0), out / "ckpt" / f"epoch={EPOCHS - 1}.ckpt")
    own = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(own[key[len("model."):]], value, rtol=0, atol=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name, form", [("validate_full", "lora_full"), ("validate_sharded", "lora_sharded")])
def test_validate_from_either_form_equals_the_plain_model_loaded_from_it(runs, name, form):
    from lightning_fixtures import RandomTokens

    _, per_rank = _ok(runs, name)
    out, _ = _ok(runs, form)
    model = load_peft_checkpoint(tiny_llama(0), out / "ckpt" / f"epoch={EPOCHS - 1}.ckpt")
    with torch.no_grad():
        batches = RandomTokens(16, seed=2).data.split(8)
        want = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    for result in per_rank:
        assert abs(result["val_loss"] - want) < 1e-5


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("late", "call apply_peft(self) (from lightning_peft.lightning) in configure_model"),
        ("other_config", "was trained with"),
        ("missing_shard", "is missing shard files"),
    ],
)
def test_bad_input_fails_with_one_clear_error(runs, name, message):
    _, per_rank = runs[name]
    for result in per_rank:
        assert message in result.get("error", ""), result


def test_load_peft_checkpoint_of_an_incomplete_directory_leaves_the_model_alone(runs, tmp_path):
    from lightning_peft import get_tuner

    out, _ = _ok(runs, "lora_sharded")
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(out / "ckpt" / "epoch=0.ckpt", broken)
    os.remove(sorted(broken.glob("*.distcp"))[0])
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing shard files"):
        load_peft_checkpoint(model, broken)
    assert get_tuner(model) is None
    _assert_close(model.state_dict(), before, atol=0)


@pytest.mark.slow  # compiling the decoder layers takes minutes on 2 CPU cores
def test_compiled_layers_train_sharded_with_the_same_math(tmp_path):
    compiled, eager = launch([dict(out=tmp_path / "compiled", epochs=1, compile=True), dict(out=tmp_path / "eager", epochs=1)],
                             2, os.fspath(tmp_path))
    runs = {"compiled": (tmp_path / "compiled", compiled), "eager": (tmp_path / "eager", eager)}
    assert all(result["compiled_graphs"] > 0 for result in compiled)
    _assert_losses(_losses(runs, "compiled"), _losses(runs, "eager"), range(MICRO_PER_EPOCH), atol=1e-5)
    _assert_close(_final_adapter(runs, "compiled", epoch=0), _final_adapter(runs, "eager", epoch=0), atol=1e-5)


def test_apply_peft_outside_a_trainer_leaves_the_model_plain_and_with_a_callback_injects_once():
    from lightning_fixtures import BuildAndShardLlamaModule

    from lightning_peft import PEFTCallback, get_tuner
    from lightning_peft.lightning import apply_peft

    module = BuildAndShardLlamaModule()
    module.model = module.build()
    apply_peft(module)  # no Trainer: the same configure_model builds a plain model (e.g. for load_peft_checkpoint)
    assert get_tuner(module.model) is None
    callback = PEFTCallback(LoraConfig(**LORA), model_attr="model", verbose=False)
    apply_peft(module, callback)
    apply_peft(module, callback)  # idempotent, like configure_model must be
    assert get_tuner(module.model).config.to_dict() == LoraConfig(**LORA).to_dict()
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        k for k in _expected_keys() if not k.endswith("lora_rng.default")}


def test_replace_directory_swaps_a_complete_directory_in(tmp_path):
    from lightning_peft.lightning.fsdp2 import replace_directory

    for content in ("old", "new"):
        staging = tmp_path / ".last.ckpt.tmp"
        staging.mkdir()
        (staging / "shard").write_text(content)
        replace_directory(staging, tmp_path / "last.ckpt")
        assert (tmp_path / "last.ckpt" / "shard").read_text() == content
        assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_inject_adapter_refuses_a_model_with_sharded_parameters():
    """get_peft_model / inject_adapter after fully_shard: one clear error naming the fix, the model unchanged."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_llama()
        proj = model.model.layers[0].self_attn.q_proj
        proj.weight = torch.nn.Parameter(DTensor.from_local(proj.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(ValueError, match=r"already sharded .*apply_peft\(self\)"):
            inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    finally:
        if owns_group:
            dist.destroy_process_group()
