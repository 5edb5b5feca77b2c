"""Load-once state of a compiled kernel library, shared by the CUDA and the CPU backends.

A backend gives a function that tries to load its library (prebuilt or JIT-compiled) and says
how it went; :class:`KernelLoader` calls it at most once per process, under a lock, never raises,
warns once when the kernels are unavailable, and keeps a run-time switch that forces the
pure-PyTorch implementation (``LIGHTNING_PEFT_FORCE_FALLBACK=1`` sets it at start).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from typing import Callable, Iterator, Optional

import torch

__all__ = ["ENV_FORCE_FALLBACK", "ENV_JIT_STALE_S", "ENV_NO_JIT", "KernelLoader", "env_true", "ops_registered", "jit_load", "raise_if_stale", "stale_jit_lock"]

ENV_FORCE_FALLBACK = "LIGHTNING_PEFT_FORCE_FALLBACK"
ENV_NO_JIT = "LIGHTNING_PEFT_NO_JIT"
ENV_JIT_STALE_S = "LIGHTNING_PEFT_JIT_STALE_S"

# try_load(verbose) -> (available, source, reason); source: "prebuilt" | "jit" | "preloaded" | None
TryLoad = Callable[[bool], "tuple[bool, Optional[str], str]"]


def ops_registered(namespace: str, op: str) -> bool:
    """Whether ``torch.ops.<namespace>.<op>`` exists (a library's ops register when it loads)."""
    return hasattr(torch.ops, namespace) and hasattr(getattr(torch.ops, namespace), op)


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class KernelLoader:
    """What loading one kernel library found; one attempt per process.

    Args:
        what: the kernels in words, for the warning (e.g. ``"CUDA kernels"``).
        fallback_on: where the fallback runs, for the warning (e.g. ``"on CUDA"``).
        status_call: the call that shows the full reason, for the warning.
        try_load: the backend's loader.
    """

    def __init__(self, what: str, fallback_on: str, status_call: str, try_load: TryLoad) -> None:
        self._what, self._fallback_on, self._status_call, self._try_load = what, fallback_on, status_call, try_load
        self._lock = threading.Lock()
        self.attempted = False
        self.available = False
        self.source: Optional[str] = None
        self.reason = "not loaded yet"
        self.force_fallback = env_true(ENV_FORCE_FALLBACK)

    def set_force_fallback(self, enabled: bool = True) -> None:
        """Use the pure-PyTorch implementation (``enabled``) or the kernels again."""
        self.force_fallback = bool(enabled)

    @contextlib.contextmanager
    def forcing_fallback(self, enabled: bool = True) -> Iterator[None]:
        """Context manager form of :meth:`set_force_fallback`; restores the previous setting on exit."""
        previous = self.force_fallback
        self.force_fallback = bool(enabled)
        try:
            yield
        finally:
            self.force_fallback = previous

    def status(self) -> dict:
        """State without triggering a load: ``attempted``, ``available``, ``source``, ``reason``, ``force_fallback``."""
        return {
            "attempted": self.attempted,
            "available": self.available,
            "source": self.source,
            "reason": self.reason,
            "force_fallback": self.force_fallback,
        }

    def load(self, verbose: bool = False) -> bool:
        """Load the kernels once; True if they are usable. A failure is one warning, and :meth:`status` keeps the reason."""
        if self.attempted:
            return self.available
        with self._lock:
            if self.attempted:
                return self.available
            try:
                self.available, self.source, self.reason = self._try_load(verbose)
            except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"
                self.available, self.source, self.reason = False, None, f"{type(exc).__name__}: {exc}"
            self.attempted = True
            if not self.available:
                self.warn_unavailable(self.reason)
            return self.available

    def disable(self, reason: str) -> None:
        """Stop using kernels that loaded but cannot run here (e.g. built for another GPU)."""
        self.available, self.reason = False, reason

    def warn_unavailable(self, reason: str) -> None:
        first_line = (reason.strip().splitlines() or ["unknown"])[0][:300]
        warnings.warn(
            f"lightning_peft: {self._what} unavailable ({first_line}); using the PyTorch implementation of the "
            f"LoRA op {self._fallback_on}. Full reason: {self._status_call}['reason']",
            RuntimeWarning,
            stacklevel=4,
        )


def _lock_file_blocks() -> bool:
    """Whether this torch's JIT build waits while ``<build dir>/lock`` merely exists (its
    FileBaton, torch <= 2.13 or so) rather than holding an OS-level lock on it (FileLock, which
    the kernel releases when the holder dies, so a leftover file is harmless)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def stale_jit_lock(build_directory: str, stale_after_s: Optional[float] = None) -> Optional[str]:
    """The path of a stale JIT lock in ``build_directory``, or None.

    With a torch whose JIT build waits for ``<build_directory>/lock`` to disappear, a build that
    was killed (a timeout, Ctrl-C) leaves it behind and every later load waits forever. It counts
    as stale when nothing in the directory changed for ``stale_after_s`` seconds (default
    ``LIGHTNING_PEFT_JIT_STALE_S`` or 600: longer than any one compile step takes). With a torch
    that holds an OS-level lock instead, a leftover file never blocks: always None.
    """
    lock = os.path.join(build_directory, "lock")
    if not os.path.exists(lock) or not _lock_file_blocks():
        return None
    if stale_after_s is None:
        stale_after_s = float(os.environ.get(ENV_JIT_STALE_S, "600"))
    newest = 0.0
    for entry in os.scandir(build_directory):
        with contextlib.suppress(OSError):
            newest = max(newest, entry.stat().st_mtime)
    return lock if time.time() - newest > stale_after_s else None


def raise_if_stale(build_directory: str) -> None:
    """Raise a RuntimeError that says what to delete if ``build_directory`` holds a stale JIT lock."""
    stale = stale_jit_lock(build_directory)
    if stale is not None:
        raise RuntimeError(
            f"stale JIT build lock {stale}: an earlier build was killed and nothing there changed for "
            f"{os.environ.get(ENV_JIT_STALE_S, '600')} s; if no build is running, delete it (rm {stale}) and retry"
        )


def jit_load(name: str, sources: list[str], build_directory: Optional[str], verbose: bool, **load_kwargs) -> str:
    """Compile ``sources`` with ninja into ``build_directory`` (default: torch's extensions cache for
    ``name``) and load the library, refusing a stale lock first; returns the build directory.

    ``load_kwargs`` go to ``torch.utils.cpp_extension.load`` (flags, include paths); the library
    registers its ops itself (``is_python_module=False``).
    """
    from torch.utils import cpp_extension

    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    directory = build_directory or cpp_extension._get_build_directory(name, verbose=False)
    raise_if_stale(directory)
    cpp_extension.load(name=name, sources=sources, build_directory=build_directory, is_python_module=False, verbose=verbose, **load_kwargs)
    return directory
