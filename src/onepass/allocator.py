"""The memory allocator under a model-running command: mimalloc where its wheel is installed (Linux).

A CPU training step frees and re-allocates thousands of tensors of 1-6 MB (activations, their
gradients, bf16 copies), at new sizes every step as packed rows change length. glibc's malloc serves
them all from one heap and splits and merges its free blocks, so it holds ~1 GB more than is ever in
use at once (SmolLM2-135M, bf16: 2.6 GB in use at the peak, 3.6 GB held; bench/heap_slack.py). mimalloc keeps
freed blocks in pages of one size class and hands them out again: the same bf16 run is 13-25% faster
with a slightly lower peak; fp32 is within noise (bench/real_model.py's onepass_glibc runs; PyTorch's CPU
tuning guide recommends a preloaded jemalloc or tcmalloc for the same reason).

An allocator must be in place before the process's first malloc, so it cannot be switched on from
Python: `onepass train`, `score`, `chat` and `demo` start again once, in the same process (same pid, so
torchrun keeps track of it), with LD_PRELOAD naming the library. Freed memory is kept for reuse rather
than returned to the system (MIMALLOC_PURGE_DELAY=-1: returning it costs a page fault per 4 KiB when the
next step takes it back, 10-15% of a step). ONEPASS_ALLOCATOR=system keeps the C library's malloc; an
LD_PRELOAD of the user's own is left alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from onepass.errors import OnepassError

SWITCH = "ONEPASS_ALLOCATOR"
CHOICES = ("mimalloc", "system")
STARTED = "ONEPASS_ALLOCATOR_STARTED"  # set in the restarted process: it never restarts again
DISTRIBUTION = "cmeel-mimalloc"  # mimalloc's shared library as a wheel, for Linux and macOS


def mimalloc_library() -> Path | None:
    """The mimalloc shared library installed with the `cmeel-mimalloc` wheel, or None."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libraries = sorted((f for f in files if f.name.startswith("libmimalloc.so")), key=lambda f: len(f.name))
    for library in libraries:
        path = Path(str(library.locate()))
        if path.is_file():
            return path
    return None


def choice(environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(SWITCH, "mimalloc").strip().lower() or "mimalloc"
    if value not in CHOICES:
        raise OnepassError(f"{SWITCH}={environ[SWITCH]!r} is not an allocator onepass knows. "
                           f"Fix: set it to {' or '.join(CHOICES)}, or unset it.")
    return value


def preload_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """The environment that starts this process again on mimalloc, or None where it should not: not
    Linux, ONEPASS_ALLOCATOR=system, the library not installed, an LD_PRELOAD already set, or this
    process already the restarted one."""
    if not sys.platform.startswith("linux") or choice(environ) == "system" or environ.get(STARTED):
        return None
    if environ.get("LD_PRELOAD", "").strip():
        return None  # the user's own preload (a profiler, another allocator) wins
    library = mimalloc_library()
    if library is None:
        return None
    environment = {**environ, "LD_PRELOAD": str(library), STARTED: "1"}
    environment.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    return environment


def restart_on_mimalloc() -> None:
    """Replace this process with itself on mimalloc (the same command line and pid) where
    `preload_environment` says so; otherwise, or if the restart fails, return and go on as is."""
    environment = preload_environment()
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environment)
    except OSError:
        return


def active() -> str:
    """Which allocator this process runs on: "mimalloc" or "system"."""
    try:
        return "mimalloc" if hasattr(ctypes.CDLL(None), "mi_version") else "system"
    except OSError:
        return "system"


def describe() -> str:
    """One line for the start of a CPU run."""
    if active() == "mimalloc":
        return f"allocator: mimalloc, freed memory kept for reuse ({SWITCH}=system for the C library's malloc)"
    line = "allocator: the C library's malloc"
    if not sys.platform.startswith("linux"):
        return line
    if choice() == "system":
        return f"{line} ({SWITCH}=system)"
    if os.environ.get("LD_PRELOAD", "").strip():
        return f"{line} (LD_PRELOAD names another library)"
    if mimalloc_library() is None:
        return f"{line} (pip install {DISTRIBUTION} for mimalloc, which bf16 training runs faster on: docs/speed.md)"
    return line


def cpu_memory_settings() -> None:
    """For a CPU training process, called by the entry points (never by the library): with glibc's
    malloc, keep freed memory (`compat.keep_freed_memory`: each step re-allocates the same large
    tensors), and bound oneDNN's kernel caches before the first matmul (`compat.bound_kernel_caches`:
    packed rows' changing lengths would fill them)."""
    from onepass.compat import bound_kernel_caches, keep_freed_memory

    if active() == "system":
        keep_freed_memory()
    bound_kernel_caches()
