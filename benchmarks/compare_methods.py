"""SST-2 on all-MiniLM-L6-v2 with every method under one budget: ours, full fine-tuning, and HF peft.

Each of this library's five methods is trained from its own example config
(``examples/configs/sst2_{lora,adapter,prefix,prompt,bitfit}.yaml``, through the ``lightning-peft``
CLI machinery); full fine-tuning is the LoRA config without its ``peft:`` section; peft's LoRA,
prefix and prompt tuning run in the same LightningModule, data and trainer, the model wrapped by
``peft.get_peft_model`` with the same settings. Every run gets the same budget (``--epochs`` over
the same ``--train-subset`` of the training set, the full dev set for accuracy); the learning rate
is tuned per method over a small grid and the best dev accuracy is reported (so the numbers are
"best of the grid on dev", as usual for GLUE dev results, not held-out test accuracy).

Every run is a separate process (clean memory, its own timing). Timing is the wall time of the
training epoch without validation; on a shared CPU it is noisy, compare within one run of this script.

Usage (about an hour on 2 CPU cores; it writes the table when done)::

    python benchmarks/compare_methods.py --seeds 0 1 2      # everything (the committed table; LoRA also --seeds 0 1 2 3 4)
    python benchmarks/compare_methods.py --methods prefix peft_prefix --lrs 1e-2
    python benchmarks/compare_methods.py --report-only      # rebuild the table from the saved runs
    python benchmarks/compare_methods.py --epochs 3 --train-subset 6920   # a bigger budget

Writes ``benchmarks/results/methods_sst2.md`` and the raw runs to ``benchmarks/results/methods_sst2.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the example's module (examples.text_classification), which the configs also name

from examples.text_classification import TextClassifier  # noqa: E402
RESULTS = os.path.join(REPO, "benchmarks", "results")
CONFIGS = os.path.join(REPO, "examples", "configs")

#: method -> (label, how it is built, learning-rate grid)
METHODS: dict[str, tuple[str, str, list[float]]] = {
    "full": ("full fine-tuning", "full", [5e-5, 1e-4, 2e-4]),
    "lora": ("LoRA (ours)", "ours", [5e-4, 1e-3, 3e-3, 1e-2]),
    "peft_lora": ("LoRA (peft)", "peft", [5e-4, 1e-3, 3e-3, 1e-2]),
    "adapter": ("bottleneck adapters, Houlsby (ours)", "ours", [5e-4, 1e-3, 3e-3, 1e-2]),
    "prefix": ("prefix tuning (ours)", "ours", [3e-3, 1e-2, 3e-2]),
    "peft_prefix": ("prefix tuning (peft)", "peft", [3e-3, 1e-2, 3e-2]),
    "prompt": ("prompt tuning (ours)", "ours", [1e-3, 3e-3, 1e-2, 3e-2]),
    "peft_prompt": ("prompt tuning (peft)", "peft", [1e-3, 3e-3, 1e-2, 3e-2]),
    "bitfit": ("BitFit (ours)", "ours", [1e-3, 3e-3, 1e-2]),
    "dora": ("DoRA (ours)", "ours", [5e-4, 1e-3, 3e-3, 1e-2]),
    "peft_dora": ("DoRA (peft)", "peft", [5e-4, 1e-3, 3e-3, 1e-2]),
    "ia3": ("(IA)³ (ours)", "ours", [3e-3, 1e-2, 3e-2, 1e-1]),
    "peft_ia3": ("(IA)³ (peft)", "peft", [3e-3, 1e-2, 3e-2, 1e-1]),
}


def load_yaml(name: str) -> dict[str, Any]:
    import yaml

    with open(os.path.join(CONFIGS, f"sst2_{name}.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def peft_settings(method: str) -> tuple[str, dict[str, Any]]:
    """peft's config class name and arguments: the same settings as our config for that method."""
    ours = load_yaml(method.removeprefix("peft_"))["peft"]["init_args"]["peft_config"]
    name = ours["class_path"].rsplit(".", 1)[1]
    return name, dict(ours["init_args"])


def run_config(method: str, lr: float, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """The CLI config (a dict) of one run: the method's example config with the budget applied."""
    kind = METHODS[method][1]
    config = load_yaml("lora" if kind in ("full", "peft") else method)
    if kind != "ours":
        config.pop("peft")  # full fine-tuning / the model wrapped by peft itself
    if kind == "peft":
        config["model"]["class_path"] = "compare_methods.PeftTextClassifier"
        config["model"]["init_args"]["peft_config"] = dict(zip(("class_name", "kwargs"), peft_settings(method)))
    config["model"]["init_args"]["learning_rate"] = lr
    config["seed_everything"] = args.seed  # initialisation and dropout; the data subset and order stay fixed
    data = config["data"]["init_args"]
    data["train_file"] = os.path.join(REPO, data["train_file"])
    data["val_file"] = os.path.join(REPO, data["val_file"])
    data["train_subset"] = args.train_subset
    trainer = config["trainer"]
    trainer.update(max_epochs=args.epochs, default_root_dir=workdir, logger=False, enable_progress_bar=False,
                   enable_model_summary=False)
    callbacks = []
    for cb in trainer.get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb = copy.deepcopy(cb)
            cb["init_args"].update(dirpath=os.path.join(workdir, "checkpoints"), save_top_k=0, save_last=True, monitor=None)
            cb["init_args"].pop("mode", None)
            callbacks.append(cb)
    callbacks.append({"class_path": "compare_methods.EpochTimer"})
    trainer["callbacks"] = callbacks
    return config


def run_one(method: str, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (method, learning rate) in this process and measure it."""
    torch.set_num_threads(args.threads)
    from lightning_peft.cli import PEFTLightningCLI

    workdir = tempfile.mkdtemp(prefix=f"sst2_{method}_", dir=args.workdir)
    cli = PEFTLightningCLI(model_class=None, datamodule_class=None, args=run_config(method, lr, args, workdir), run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # by name: the class_path loaded this file as module `compare_methods`, not as `__main__`
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EpochTimer")
    module = cli.model
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    adapter_dir = os.path.join(workdir, "adapter")
    if METHODS[method][1] == "ours":
        from lightning_peft import save_adapter

        save_adapter(module.model, adapter_dir)
    elif METHODS[method][1] == "peft":
        module.model.save_pretrained(adapter_dir)
    else:
        from safetensors.torch import save_file

        os.makedirs(adapter_dir)
        state = {k: v.contiguous() for k, v in module.model.state_dict().items()}
        save_file(state, os.path.join(adapter_dir, "model.safetensors"))
    weights_bytes = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir) if f.endswith(".safetensors"))
    last = os.path.join(workdir, "checkpoints", "last.ckpt")
    return {
        "method": method, "lr": lr, "seed": args.seed, "epochs": args.epochs, "train_subset": args.train_subset,
        "val_acc": float(cli.trainer.callback_metrics["val_acc"]), "trainable": trainable,
        "seconds_per_epoch": sum(timer.seconds) / len(timer.seconds),
        "weights_bytes": weights_bytes, "lightning_ckpt_bytes": os.path.getsize(last) if os.path.isfile(last) else None,
    }


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, without its validation."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: Optional[float] = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.training:
            self._stop()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop()


class PeftTextClassifier(TextClassifier):
    """The example's TextClassifier with its model wrapped by HF peft (the reference implementation).

    peft 0.21.2 cannot run prefix tuning on BERT under transformers 5 (it looks for a
    ``past_key_values`` argument, renamed ``cache``), so for that method the forward replays
    peft's own fallback path (``get_prompt()``, the backbone with the cache and the extended
    mask, dropout, classifier, cross-entropy) with the new argument name.

    Args:
        peft_config: ``{"class_name": "PrefixTuningConfig", "kwargs": {...}}`` for ``peft.<class_name>(**kwargs)``.
        kwargs: TextClassifier's arguments (jsonargparse follows ``**kwargs`` into its signature).
    """

    def __init__(self, peft_config: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peft_config_args = peft_config

    def configure_model(self) -> None:
        if self.model is not None:
            return
        import peft

        super().configure_model()
        cls = getattr(peft, self.peft_config_args["class_name"])
        self.model = peft.get_peft_model(self.model, cls(**self.peft_config_args["kwargs"]))

    def forward(self, **batch: Any) -> Any:
        if self.peft_config_args["class_name"] != "PrefixTuningConfig":
            return self.model(**batch)
        model, base = self.model, self.model.base_model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cache = model.get_prompt(ids.shape[0])
        prefix = torch.ones(ids.shape[0], model.peft_config["default"].num_virtual_tokens, dtype=mask.dtype, device=mask.device)
        hidden = base.bert(input_ids=ids, attention_mask=torch.cat((prefix, mask), dim=1),
                           token_type_ids=batch.get("token_type_ids"), cache=cache)
        logits = base.classifier(base.dropout(hidden.pooler_output))
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"]) if "labels" in batch else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _by_method(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    return by_method


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method measured (in METHODS order): its best learning rate of the seed-0 grid and the accuracy over seeds there.

    Returns dicts with ``method``, ``label``, ``kind`` ("ours" / "peft" / "full"), ``best`` (the best seed-0 run),
    ``accs`` (dev accuracy in % of every seed at that rate), ``mean``, ``sd`` (0 for one seed), ``fastest``
    (s / epoch of the least disturbed run: all runs of a method compute the same) and ``paired`` (ours − peft text).
    """
    import statistics

    by_method = _by_method(runs)
    out = []
    for method, (label, kind, _) in METHODS.items():
        grid = [r for r in by_method.get(method, []) if r.get("seed", 0) == 0]
        if not grid:
            continue
        best = max(grid, key=lambda r: r["val_acc"])
        accs = [100 * r["val_acc"] for r in by_method[method] if r["lr"] == best["lr"]]
        out.append({"method": method, "label": label, "kind": kind, "best": best, "accs": accs,
                    "mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "fastest": min(r["seconds_per_epoch"] for r in by_method[method]),
                    "paired": _paired_difference(method, best["lr"], by_method)})
    return out


def _spread(summary: dict[str, Any]) -> str:
    return f" ± {summary['sd']:.2f}" if len(summary["accs"]) > 1 else ""


def _mib(n: Optional[float]) -> str:
    return "—" if n is None else (f"{n / 2**20:.2f}" if n >= 2**20 / 100 else f"{n / 2**10:.1f} KiB")


def write_report(runs: list[dict[str, Any]], path: str) -> str:
    """The markdown table: per method the best learning rate of the grid (first seed), its accuracy
    over all seeds run at that rate, and the grid behind it."""
    lines = ["# SST-2 (dev accuracy) with all-MiniLM-L6-v2: every method under one budget", ""]
    if runs:
        r0 = runs[0]
        lines += [
            f"Budget per run: {r0['epochs']} epoch(s) over a fixed random subset of {r0['train_subset']} SST-2 training "
            "sentences (batch 32, max 64 tokens, AdamW with weight decay 0.01, linear warm-up over 6% of the steps then "
            "linear decay), accuracy on the full dev set (872 sentences). The learning rate is tuned per method over the "
            "grid shown (seed 0); the best one is rerun with more seeds (initialisation and dropout; same data) and the "
            "table gives mean ± standard deviation over the seeds at that rate. All methods also train the fresh "
            "classifier and the pooler (`modules_to_save: [classifier, pooler]`), included in the trainable counts. "
            "Produced by `python benchmarks/compare_methods.py` on 2 CPU threads.",
            "",
            "| method | trainable params | dev accuracy | seeds | ours − peft, paired by seed | best lr | grid, seed 0 (lr: acc %) | s / epoch | weights file | Lightning ckpt |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
    by_method = _by_method(runs)
    for s in summarize(runs):
        grid = sorted((r for r in by_method[s["method"]] if r.get("seed", 0) == 0), key=lambda r: r["lr"])
        grid_text = ", ".join(f"{r['lr']:g}: {100 * r['val_acc']:.1f}" for r in grid)
        best = s["best"]
        lines.append(
            f"| {s['label']} | {best['trainable']:,d} | {s['mean']:.2f}%{_spread(s)} | {len(s['accs'])} | {s['paired']} | {best['lr']:g} | "
            f"{grid_text} | {s['fastest']:.0f} | {_mib(best['weights_bytes'])} | {_mib(best['lightning_ckpt_bytes'])} |"
        )
    lines += [
        "",
        "*ours − peft, paired by seed*: for a method peft also has, the mean over the seeds both ran of (our accuracy − "
        "peft's accuracy) at each one's best learning rate, ± its standard error, in points. Prefix and prompt tuning "
        "draw their initial parameters exactly as peft does and have no dropout, so with the same seed both libraries "
        "follow the same trajectory and the difference is 0 (it checks the two implementations against each other "
        "end to end); LoRA's initial A and its dropout masks come from different random draws than peft's, so its "
        "pairs differ by training noise, which the standard error measures.",
        "",
        "*s / epoch*: wall time of the training epoch (validation excluded), the fastest of the method's runs: the "
        "machine was shared with other jobs, which slowed single runs by up to 10x. Sizes in MiB unless marked. "
        "*Weights file*: what is needed on top of the base model (`save_adapter` / peft's `save_pretrained` "
        "safetensors; for full fine-tuning the whole model). *Lightning ckpt*: the run's `last.ckpt`, optimizer state "
        "included; with `PEFTCallback` it holds only the adapter, without it (full fine-tuning, peft wrapped by hand) "
        "the whole module.",
        "",
    ]
    text = "\n".join(lines)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def _paired_difference(method: str, lr: float, by_method: dict[str, list[dict[str, Any]]]) -> str:
    """``"+0.12 ± 0.30 (n=5)"``: mean ± standard error over seeds of ours − peft at each one's best lr; "—" if no peft twin."""
    import statistics

    twin = f"peft_{method}"
    if twin not in by_method:
        return "—"
    twin_grid = [r for r in by_method[twin] if r.get("seed", 0) == 0]
    if not twin_grid:
        return "—"
    twin_lr = max(twin_grid, key=lambda r: r["val_acc"])["lr"]
    ours = {r.get("seed", 0): r["val_acc"] for r in by_method[method] if r["lr"] == lr}
    theirs = {r.get("seed", 0): r["val_acc"] for r in by_method[twin] if r["lr"] == twin_lr}
    diffs = [100 * (ours[s] - theirs[s]) for s in sorted(ours.keys() & theirs.keys())]
    if not diffs:
        return "—"
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f} (n=1)"
    stderr = statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{statistics.mean(diffs):+.2f} ± {stderr:.2f} (n={len(diffs)})"


README_START = "<!-- methods-table:start (written by benchmarks/compare_methods.py --readme) -->"
README_END = "<!-- methods-table:end -->"


def readme_table(runs: list[dict[str, Any]]) -> str:
    """The README's condensed table: per method its best-lr accuracy over seeds, the paired gap to peft, speed, sizes."""
    lines = [
        "| method | trainable params | SST-2 dev accuracy (mean ± sd over seeds) | ours − peft (paired) | s / epoch | weights to ship (MiB) | Lightning ckpt (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summarize(runs):
        best = s["best"]
        lines.append(
            f"| {s['label']} | {best['trainable']:,d} | {s['mean']:.2f}%{_spread(s)} (n={len(s['accs'])}) | "
            f"{s['paired']} | {s['fastest']:.0f} | {_mib(best['weights_bytes'])} | {_mib(best['lightning_ckpt_bytes'])} |"
        )
    return "\n".join(lines)


def update_readme(runs: list[dict[str, Any]], path: str) -> None:
    """Replace the block between README_START and README_END in ``path`` with :func:`readme_table`."""
    from readme_block import replace_block

    replace_block(README_START, README_END, readme_table(runs), path)


def wait_for_quiet(threshold: Optional[float], max_wait: float) -> Optional[float]:
    """Sleep until the 1-minute load average drops below ``threshold`` (or ``max_wait`` passes); returns it."""
    if threshold is None:
        return None
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(15)
    return round(os.getloadavg()[0], 1)


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return run["method"], run["lr"], run.get("seed", 0), run["epochs"], run["train_subset"]


def measure(method: str, lr: float, seed: int, runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (method, lr, seed) in a child process unless already measured; returns the updated runs (also saved)."""
    key = (method, lr, seed, args.epochs, args.train_subset)
    if any(_key(r) == key for r in runs):
        return runs  # measured already (rerun by deleting it from the JSON)
    cmd = [sys.executable, os.path.abspath(__file__), "--run-one", method, repr(lr), "--seed", str(seed), "--epochs", str(args.epochs),
           "--train-subset", str(args.train_subset), "--threads", str(args.threads), "--workdir", args.workdir]
    load = wait_for_quiet(args.quiet_load, args.quiet_max_wait)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        print(f"{method} lr={lr:g} seed={seed} FAILED:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
        return runs
    result = json.loads(found[-1][len("RESULT "):])
    result["load_before"] = round(os.getloadavg()[0], 1) if load is None else load
    runs = [r for r in runs if _key(r) != key] + [result]
    with open(args.results, "w", encoding="utf-8") as fh:
        json.dump(runs, fh, indent=1)
    print(f"{method:12s} lr={lr:<8g} seed={seed} acc={result['val_acc']:.4f} trainable={result['trainable']:,d} "
          f"{result['seconds_per_epoch']:.0f} s/epoch ({time.perf_counter() - start:.0f} s in all)", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="override every method's grid")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="the lr grid runs with the first seed; the best lr of each method reruns with the others")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # of one --run-one child
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "compare_methods"))
    parser.add_argument("--results", default=os.path.join(RESULTS, "methods_sst2.json"))
    parser.add_argument("--report", default=os.path.join(RESULTS, "methods_sst2.md"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--readme", action="store_true", help="also rewrite the methods table block in README.md")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each run wait (at most --quiet-max-wait s) until the 1-minute load average is below this")
    parser.add_argument("--quiet-max-wait", type=float, default=900)
    parser.add_argument("--run-one", nargs=2, metavar=("METHOD", "LR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # class_path: compare_methods.X

    if args.run_one:
        result = run_one(args.run_one[0], float(args.run_one[1]), args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    runs: list[dict[str, Any]] = []
    if os.path.isfile(args.results):
        with open(args.results, encoding="utf-8") as fh:
            runs = json.load(fh)
    if not args.report_only:
        for method in args.methods:
            for lr in args.lrs or METHODS[method][2]:
                runs = measure(method, lr, args.seeds[0], runs, args)
        for seed in args.seeds[1:]:
            for method in args.methods:
                grid = [r for r in runs if r["method"] == method and _key(r)[2:] == (args.seeds[0], args.epochs, args.train_subset)]
                if grid:
                    runs = measure(method, max(grid, key=lambda r: r["val_acc"])["lr"], seed, runs, args)
    print(write_report(runs, args.report))
    if args.readme:
        update_readme(runs, os.path.join(REPO, "README.md"))


if __name__ == "__main__":
    main()
