"""Our C kernel for decode's few-row products (``native.c``), compiled at first use.

:func:`matmul` multiplies 1 to 8 float32 rows by a float32 or bfloat16
weight, reading the weight once for all rows (bench/NOTES.md). The source
ships with the package and is compiled by the first call of
:func:`available` with the C compiler at hand (``$CC``, else ``cc``, ``gcc``
or ``clang``) into a per-user cache folder (``$MLX_QWEN35_CACHE_DIR``, else
``$XDG_CACHE_HOME/mlx_qwen35``, else ``~/.cache/mlx_qwen35``), once per
source, flags, compiler and machine. Where that fails the kernel is
unavailable, with one warning, and callers keep numpy's BLAS.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

SOURCE = Path(__file__).with_name("native.c")
ENV_CACHE = "MLX_QWEN35_CACHE_DIR"
MAX_ROWS = 8
# Tried in order: the first set that compiles wins (``-march=native`` is missing on some compilers).
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
COMMON_FLAGS = ("-fPIC", "-shared", "-pthread")


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_qwen35"


def compiler() -> Optional[list[str]]:
    """The compiler command (``$CC`` may carry arguments), or None when none is on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    return [found] if found else None


def threads() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _build(cc: list[str], flags: tuple[str, ...], folder: Path) -> Path:
    # The host name too: with -march=native a build is only good for the CPU it was made on, and home
    # folders are shared across machines.
    key = "\0".join([SOURCE.read_text(), *cc, *flags, platform.platform(), platform.node()])
    target = folder / f"native-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run(
            [*cc, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)  # atomic: a process compiling at the same time replaces it with the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    cc = compiler()
    if cc is None:
        return _unavailable("no C compiler on PATH (set CC)")
    errors = []
    for flags in FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(cc, flags, cache_dir())))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {e} {detail.decode(errors='replace').strip()[:200]}")
            continue
        # CDLL (not PyDLL): the call releases the GIL.
        fn = lib.matmul_few_rows
        ptr, n = ctypes.c_void_p, ctypes.c_long
        fn.argtypes = [ptr, ptr, ctypes.c_int, ptr, n, n, n, ctypes.c_int]
        fn.restype = ctypes.c_int
        return lib
    return _unavailable("; ".join(errors))


def _unavailable(why: str) -> None:
    warnings.warn(f"mlx_qwen35: the native decode kernel is unavailable, numpy's BLAS runs instead: {why}")
    return None


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiling it on the first call)."""
    return _library() is not None


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] float32 (M <= 8) times w [N, K]ᵀ, w float32 or the uint16 bits of bfloat16: [M, N] float32.

    Needs :func:`available`. Copies x or w only where they are not C-contiguous.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    M, K = x.shape
    if w.dtype not in (np.float32, np.uint16) or w.ndim != 2 or w.shape[1] != K or not 1 <= M <= MAX_ROWS:
        raise ValueError(f"matmul: x {x.shape} and w {w.shape} {w.dtype}: expected [M <= 8, K] and [N, K]")
    N, bf16 = w.shape[0], int(w.dtype == np.uint16)
    y = np.empty((M, N), np.float32)
    _library().matmul_few_rows(x.ctypes.data, w.ctypes.data, bf16, y.ctypes.data, M, K, N, _THREADS)
    return y


_THREADS = threads()  # once: the affinity is a system call, and decode makes many products a step
