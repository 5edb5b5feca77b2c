"""Mixed-adapter batches on CPU at model level: the CPU benchmark's tiny Llama, all-linear LoRA r=8, 4 adapters.

Not a test. One batch of 8 rows x 256 tokens whose rows use adapters ``[0, 1, 2, 3, 0, 1, 2, 3]``
shuffled. Every variant is timed in rotating order within one process (the shared machine's drift
hits all alike); a ratio is the median over rotations of variant time / reference time.

Inference (eval, ``torch.no_grad``), reference: the frozen base model's forward (no adapter layers):

* ``ours mixed`` / ``peft mixed``: ``model(input_ids, adapter_names=rows)``;
* ``ours single`` / ``peft single``: the same batch through one adapter.

Training (forward + backward with the LM loss, dropout 0.1), reference: our single-adapter step:

* ``ours mixed``: the mixed batch with all 4 adapters trainable (peft refuses mixed batches in training).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_cpu_mixed_batch.py --reps 8
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "cpu_mixed_batch"
MODEL_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
BATCH, SEQ, ADAPTERS, RANK = 8, 256, 4, 8


def build(dropout: float):
    """``(plain base, ours, peft, ids, row names)`` with the same base and the same adapter weights."""
    import peft
    import transformers

    import lightning_peft

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL_CONFIG)).float()
    names = [f"a{i}" for i in range(ADAPTERS)]
    settings = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    ours = lightning_peft.get_peft_model(copy.deepcopy(base), lightning_peft.LoraConfig(**settings), adapter_name=names[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, lightning_peft.LoraConfig(**settings))
        theirs.add_adapter(name, peft.LoraConfig(**settings))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, param in ours.base_model.named_parameters():
            if ".lora_" in key:
                their_params["base_model.model." + key].copy_(param)
    base.requires_grad_(False)
    order = torch.randperm(BATCH, generator=torch.Generator().manual_seed(0)).tolist()
    rows = [names[i % ADAPTERS] for i in order]
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return base, ours, theirs, ids, rows, names


def rotate(variants: dict[str, Callable[[], object]], reference: str, reps: int) -> dict[str, list[float]]:
    """Time every variant once per rotation (order shifted each time); per variant, its time / the reference's."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    ratios: dict[str, list[float]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        took = {}
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            variants[name]()
            took[name] = time.perf_counter() - start
        for name in names:
            ratios[name].append(took[name] / took[reference])
            seconds[name].append(took[name])
    return {n: {"ratio": statistics.median(ratios[n]), "seconds": statistics.median(seconds[n])} for n in names}


def inference(reps: int) -> dict:
    base, ours, theirs, ids, rows, names = build(0.0)
    for m in (base, ours, theirs):
        m.eval()
    ours.set_adapter(names[0])
    theirs.set_adapter(names[0])

    def run(fn):
        def timed():
            with torch.no_grad():
                fn()
        return timed

    with torch.no_grad():  # the mixed batch computes what each adapter computes on its rows, in both libraries
        torch.testing.assert_close(ours(input_ids=ids, adapter_names=rows).logits, theirs(input_ids=ids, adapter_names=rows).logits,
                                   rtol=1e-4, atol=1e-4)
    return rotate({
        "frozen base": run(lambda: base(input_ids=ids)),
        "ours mixed": run(lambda: ours(input_ids=ids, adapter_names=rows)),
        "ours single": run(lambda: ours(input_ids=ids)),
        "peft mixed": run(lambda: theirs(input_ids=ids, adapter_names=rows)),
        "peft single": run(lambda: theirs(input_ids=ids)),
    }, "frozen base", reps)


def training(reps: int) -> dict:
    _, ours, _, ids, rows, names = build(0.1)
    ours.train()

    def single():
        ours.set_adapter(names[0])
        ours(input_ids=ids, labels=ids).loss.backward()
        ours.zero_grad(set_to_none=True)

    def mixed():
        ours.set_requires_grad(names)
        ours(input_ids=ids, labels=ids, adapter_names=rows).loss.backward()
        ours.zero_grad(set_to_none=True)

    return rotate({"ours single": single, "ours mixed": mixed}, "ours single", reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=8, help="rotations (each times every variant once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT), help="write PREFIX.md / PREFIX.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"inference (reference: frozen base forward)": inference(args.reps),
               "training, dropout 0.1 (reference: our single-adapter step)": training(args.reps)}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "reps": args.reps,
           "command": f"python benchmarks/bench_cpu_mixed_batch.py --reps {args.reps} --threads {args.threads}"}
    lines = [f"Mixed-adapter batch, tiny Llama all-linear r={RANK}, {BATCH} rows x {SEQ} tokens over {ADAPTERS} adapters "
             f"({env['date']}, {env['commit']}, torch {env['torch']}, {args.threads} threads; `{env['command']}`)", ""]
    for section, rows in results.items():
        lines += [f"| {section} | time / reference | median s |", "|---|---|---|"]
        lines += [f"| {name} | {r['ratio']:.3f}x | {r['seconds']:.3f} |" for name, r in rows.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
