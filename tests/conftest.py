"""Shared pytest setup: offline hub, deterministic threads, tests/ importable as a package root."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh Inductor cache per test run: torch 2.14's FX graph cache key does not cover a custom
# op's fake implementation (pytorch/pytorch#160472), so code compiled against an earlier
# version of our ops' fakes could be reused and fail its output-metadata asserts.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lightning_peft_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
sys.path.insert(0, os.path.dirname(__file__))
