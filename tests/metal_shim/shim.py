"""``mx.fast.metal_kernel`` on the CPU: a kernel's source compiled as C++ under metal_shim.h.

:class:`MetalKernel` takes ``mx.fast.metal_kernel``'s arguments, and calling it
takes the returned kernel's. It writes the signature MLX generates
(``write_signature`` in mlx/backend/metal/custom_kernel.cpp): template
parameters in the order the call gives them, the inputs in ``input_names``
order typed by the arrays passed, the outputs, then the thread attributes the
source names. It instantiates the template with the call's values and runs
the call's grid and threadgroup (clipped to the grid, as MLX does) through
``shim::dispatch``. So whatever the Python launch code passes is what runs:
nothing about the launch is retyped here. Buffers are bounds-checked and the
outputs start as NaN, since MLX hands kernels uninitialised outputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

SHIM = Path(__file__).resolve().parent

# MLX's type names for the dtypes the shim carries.
TYPES = {mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.bool_: "bool", mx.int32: "int32_t", mx.uint32: "uint32_t"}

# MLX adds these to the signature when the source names them (in this order);
# the shim provides the two the dispatch passes.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
PROVIDED = {"thread_index_in_simdgroup": "lane", "thread_position_in_grid": "pos"}


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def compile_library(source: str, out: Path, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build ``source`` (C++ including metal_shim.h) into a shared library, warnings as errors.

    Builds of the same source may run at once (the fixture compiles in parallel):
    each writes its own files and moves the library into place whole.
    """
    tag = f"{os.getpid()}-{threading.get_ident()}"
    src, tmp = out.with_name(f"{out.stem}.{tag}.cpp"), out.with_name(f"{out.stem}.{tag}.so")
    src.write_text(source)
    cmd = [compiler(), "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{SHIM}", *extra]
    cmd += [str(src), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"shim compile failed:\n{proc.stderr}")
    os.replace(tmp, out)
    return ctypes.CDLL(str(out))


def _arrays(inputs) -> list[mx.array]:
    # Python scalars become 0-d arrays (an int: int32), passed by reference.
    return [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]


def _host(a: mx.array) -> np.ndarray:
    """A contiguous host copy (bfloat16 as its bits), as MLX's row-contiguous inputs."""
    return np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


class MetalKernel:
    """Stands in for ``mx.fast.metal_kernel(name, input_names, output_names, source, ...)``."""

    build_dir: Optional[Path] = None  # set by the test fixture
    _libraries: dict[str, ctypes.CDLL] = {}

    def __init__(
        self, name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False
    ):
        if header or atomic_outputs or not ensure_row_contiguous:
            raise NotImplementedError("the shim supports neither header, atomic_outputs nor strided inputs")
        for n in input_names:
            if any(n + suffix in source for suffix in ("_shape", "_strides", "_ndim")):
                raise NotImplementedError(f"the shim passes no shape, strides or ndim of {n}")
        self.name, self.input_names, self.output_names, self.source = name, list(input_names), list(output_names), source
        self.attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]
        missing = [a for a, _ in self.attributes if a not in PROVIDED]
        if missing:
            raise NotImplementedError(f"the shim does not provide {', '.join(missing)}")

    def __call__(
        self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None, **_
    ) -> list[mx.array]:
        names = (self.input_names, self.output_names, self.output_names)
        if [len(x) for x in (inputs, output_shapes, output_dtypes)] != [len(x) for x in names]:
            raise ValueError("[metal_kernel] inputs or outputs do not match the names given")
        lib = self.build(inputs=inputs, output_dtypes=output_dtypes, template=template)
        # MLX hands kernels uninitialised outputs: NaN shows what is never written.
        fill = np.nan if init_value is None else init_value
        outputs = [mx.full(shape, fill, d) for shape, d in zip(output_shapes, output_dtypes)]
        host = [_host(a) for a in _arrays(inputs) + outputs]
        buffers = (ctypes.c_void_p * len(host))(*(a.ctypes.data for a in host))
        sizes = (ctypes.c_size_t * len(host))(*(a.size for a in host))
        # MLX clips the threadgroup to the grid before dispatching.
        group = [min(t, g) for t, g in zip(threadgroup, grid)]
        err = ctypes.create_string_buffer(512)
        rc = lib.shim_launch(buffers, sizes, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group), err, len(err))
        if rc:
            raise RuntimeError(f"[metal shim] {err.value.decode()}")
        out = host[len(inputs) :]
        return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o) for o, d in zip(out, output_dtypes)]

    def build(self, *, inputs, output_dtypes, template=(), **launch) -> ctypes.CDLL:
        """The library for a launch with these arguments, compiled once."""
        source = self.write_source(_arrays(inputs), output_dtypes, template)
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        if key not in self._libraries:
            self._libraries[key] = compile_library(source, self.build_dir / f"{self.name}_{key}.so")
        return self._libraries[key]

    def write_source(self, arrays, output_dtypes, template) -> str:
        """The kernel as MLX would generate it, and an entry point that dispatches it."""
        kernel = f"custom_kernel_{self.name}"
        params, args = [], []
        for i, (name, a) in enumerate(zip(self.input_names, arrays)):
            t = TYPES[a.dtype]
            if a.ndim == 0:
                params.append(f"const constant {t}& {name}")
                args.append(f"*static_cast<const {t}*>(buffers[{i}])")
            else:
                params.append(f"shim::device_ptr<const {t}> {name}")
                args.append(f"shim::device_ptr<const {t}>(static_cast<const {t}*>(buffers[{i}]), sizes[{i}])")
        for j, (name, d) in enumerate(zip(self.output_names, output_dtypes), start=len(arrays)):
            t = TYPES[d]
            params.append(f"shim::device_ptr<{t}> {name}")
            args.append(f"shim::device_ptr<{t}>(static_cast<{t}*>(buffers[{j}]), sizes[{j}])")
        params += [f"{t} {a}" for a, t in self.attributes]
        args += [PROVIDED[a] for a, _ in self.attributes]
        kinds = ["typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int" for _, v in template]
        values = [TYPES[v] if isinstance(v, mx.Dtype) else str(v).lower() for _, v in template]
        head = f"template <{', '.join(f'{k} {n}' for k, (n, _) in zip(kinds, template))}>\n" if template else ""
        inst = f"<{', '.join(values)}>" if template else ""
        sep = ",\n    "
        return f"""#include <cstdio>
#include "metal_shim.h"

{head}void {kernel}(
    {sep.join(params)}) {{
{self.source}
}}

extern "C" int shim_launch(void* const* buffers, const size_t* sizes, const unsigned* grid, const unsigned* group,
                           char* err, int err_len) {{
  try {{
    shim::dispatch(uint3{{grid[0], grid[1], grid[2]}}, uint3{{group[0], group[1], group[2]}}, [&](uint3 pos, uint lane) {{
      {kernel}{inst}(
          {sep.join(args)});
    }});
  }} catch (const std::exception& e) {{
    std::snprintf(err, size_t(err_len), "%s", e.what());
    return 1;
  }}
  return 0;
}}
"""
