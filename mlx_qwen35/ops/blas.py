"""MLX's CPU backend: which BLAS it multiplies with, and how to get a fast one on Linux.

The ``mlx[cpu]`` wheel carries the reference BLAS, an order of magnitude
slower for float32 matmuls than Debian's OpenBLAS preloaded (bench/NOTES.md).
MLX loads its bundled BLAS privately, so a BLAS that the process's global
symbol scope resolves ``cblas_sgemm`` to (a preloaded one) is the one MLX
calls. Finding it is a symbol lookup, not a timing.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path
from typing import Optional


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def sgemm_provider() -> Optional[str]:
    """Path of the library the global scope resolves ``cblas_sgemm`` to, if any."""
    scope = ctypes.CDLL(None)
    try:
        addr = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    if not scope.dladdr(addr, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


def openblas_core(path: str) -> Optional[str]:
    """The kernel set OpenBLAS picked for this CPU, or None if ``path`` is not OpenBLAS."""
    lib = ctypes.CDLL(path)
    if not hasattr(lib, "openblas_get_corename"):
        return None
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_library() -> str:
    """Where Debian and Ubuntu's ``libopenblas0-pthread`` puts its BLAS."""
    return f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"


def blas_env() -> dict[str, str]:
    """Environment variables that would put MLX's CPU matmuls on a fast BLAS here.

    Empty when they already are, or off Linux. ``LD_PRELOAD`` when MLX runs on
    its bundled reference BLAS; ``OPENBLAS_CORETYPE`` when OpenBLAS fell back
    to its generic kernels on a CPU it did not recognise but that has AVX2.
    """
    if not sys.platform.startswith("linux"):
        return {}
    path = sgemm_provider()
    fast_names = ("openblas_get_corename", "mkl_get_version", "bli_info_get_version_str")
    if path is None or not any(hasattr(ctypes.CDLL(path), name) for name in fast_names):
        return {"LD_PRELOAD": openblas_library()}
    if openblas_core(path) == "Prescott":  # OpenBLAS's generic fallback
        flags = _cpu_flags()
        target = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
        if target:
            return {"OPENBLAS_CORETYPE": target}
    return {}


def blas_hint() -> Optional[str]:
    """A one-line hint when MLX runs float32 matmuls on a slow BLAS on Linux, else None."""
    env = blas_env()
    if "LD_PRELOAD" in env:
        lib = env["LD_PRELOAD"]
        install = "" if Path(lib).exists() else "`sudo apt-get install libopenblas0-pthread`, then "
        return (
            "MLX is using its bundled reference BLAS (float32 matmuls 10-40x slower): "
            f"{install}run with LD_PRELOAD={lib}"
        )
    if "OPENBLAS_CORETYPE" in env:
        return (
            "OpenBLAS did not recognise this CPU and runs generic kernels: "
            f"set OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} for 3-10x faster float32 matmuls"
        )
    return None
