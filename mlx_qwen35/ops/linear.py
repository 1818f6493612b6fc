"""Projections through float32 BLAS on MLX's CPU backend, swapped in at load time.

On the CPU only float32 matmuls reach BLAS: half-precision ones run a plain
loop, and ``quantized_matmul`` with half-precision activations both crawls
and accumulates in bfloat16. :func:`prepare` swaps a model's (quantized)
Linear and Embedding layers for subclasses that multiply in float32 through
BLAS, casting or dequantizing the weight a block of rows at a time (for an
Embedding: its use as the tied output head, ``as_linear``); float32 and
bfloat16 weights at decode's few rows go to our C kernel, or float32 ones to
numpy's BLAS as gemvs (:func:`gemv_product`), where MLX would run a full
sgemm. It swaps nothing where
:func:`.dispatch.cpu_paths` says no (a GPU, ``MLX_QWEN35_PORTABLE=1``), and a
swapped layer runs as its base class wherever that holds at call time.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from . import dispatch, native

# Blocks of BLOCK_ELEMS weights (4 MB in float32) stay in the range that malloc
# reuses; whole-matrix temporaries are mapped afresh, and their page faults
# cost more than the multiply at one row.
BLOCK_ELEMS = 1 << 20
# Below this many rows a half-precision product runs faster natively than cast.
HALF_BLAS_ROWS = 8
# Up to this many rows the gemv route multiplies row by row (bench/NOTES.md).
ROW_BY_ROW = 3


@lru_cache(maxsize=None)
def _dequantizer(bits: int, group_size: int):
    """(dtype to view the packed weight as, compiled affine dequantization of its rows to float32).

    MLX packs values as a little-endian bit stream. A unit of ``width``
    elements holds ``vals`` whole values: one uint32 word when the bit width
    divides 32 (4-bit: 8 values), else a few bytes (6-bit: 3 bytes, 4
    values). Scale and bias apply in float32, so the weights are exact, not
    rounded to the scales' dtype as ``mx.dequantize`` leaves them.
    """
    if 32 % bits == 0:
        view, elem_bits, width, vals = mx.uint32, 32, 1, 32 // bits
    else:
        g = math.gcd(bits, 8)
        view, elem_bits, width, vals = mx.uint8, 8, bits // g, 8 // g
    utype = mx.uint64 if width * elem_bits > 32 else mx.uint32
    shifts = (mx.arange(vals) * bits).astype(utype)
    mask = (1 << bits) - 1

    def dequantize(packed, scales, biases):
        rows = packed.shape[0]
        packed = packed.reshape(rows, -1, width)
        units = packed[..., 0].astype(utype)
        for i in range(1, width):
            units = units | (packed[..., i].astype(utype) << (elem_bits * i))
        q = (units.reshape(rows, -1, group_size // vals, 1) >> shifts) & mask
        w = q.astype(mx.float32) * scales[..., None, None].astype(mx.float32)
        return (w + biases[..., None, None].astype(mx.float32)).reshape(rows, -1)

    return view, mx.compile(dequantize)


def float32_product(layer: nn.Module, x: mx.array) -> Optional[mx.array]:
    """x times a (quantized) Linear or Embedding's weight in float32 through BLAS, plus its bias.

    None where the layer's own product is as good: float32 weights,
    non-affine quantization, half-precision weights for a few rows.
    """
    w = layer.weight
    if "scales" in layer:
        if layer.mode != "affine":
            return None
        view, deq = _dequantizer(layer.bits, layer.group_size)
        packed = mx.view(w, view)
        block = lambda i, j: deq(packed[i:j], layer.scales[i:j], layer.biases[i:j])
        dtype = x.dtype
    elif w.dtype in (mx.bfloat16, mx.float16) and x.size // x.shape[-1] >= HALF_BLAS_ROWS:
        block = lambda i, j: w[i:j].astype(mx.float32)
        dtype = mx.result_type(x, w)
    else:
        return None
    x32 = x.astype(mx.float32)
    n = w.shape[0]
    step = max(1, BLOCK_ELEMS // (x.shape[-1]))
    outs = []
    for i in range(0, n, step):
        wb = block(i, min(i + step, n))
        if outs:  # after the previous block's product, or MLX would expand every block at once
            wb = mx.depends(wb, outs[-1])
        outs.append(x32 @ wb.T)
    y = mx.concatenate(outs, axis=-1)
    if "bias" in layer:
        y = y + layer.bias
    return y.astype(dtype)


def gemv_product(layer: nn.Module, x: mx.array, route: str) -> Optional[mx.array]:
    """x times a Linear or Embedding's weight outside MLX's matmul, plus its bias, by ``route``.

    ``"native"`` (:mod:`.native`): a float32 or bfloat16 weight read once for
    all of x's few rows. ``"numpy"``: a float32 weight by numpy's BLAS, a gemv
    per row up to ROW_BY_ROW rows, else one product. Evaluates x (the graph
    so far runs here), then multiplies numpy views of MLX's buffers, which
    share their memory; only the product is copied back. None inside
    ``mx.compile`` or ``mx.vmap``, which cannot evaluate. Not differentiable:
    inference only.
    """
    x32 = x.astype(mx.float32)
    try:
        mx.eval(x32)
    except ValueError:  # a function transformation is tracing x
        return None
    xs = np.asarray(x32).reshape(-1, x.shape[-1])
    weight = layer.weight
    if route == "native":
        # bfloat16 as its uint16 bits: numpy has no bfloat16, and the view shares the buffer.
        w = np.asarray(mx.view(weight, mx.uint16) if weight.dtype == mx.bfloat16 else weight)
        y = native.matmul(xs, w)
    else:
        w = np.asarray(weight)
        # A few rows: one gemv each streams the weight fastest; more, one product that reads it once.
        y = np.stack([w @ row for row in xs]) if len(xs) <= ROW_BY_ROW else xs @ w.T
    y = mx.array(y).reshape(*x.shape[:-1], w.shape[0])
    if "bias" in layer:
        y = y + layer.bias
    return y.astype(mx.result_type(x, weight))


def _product(layer: nn.Module, x: mx.array, own: Callable[[mx.array], mx.array]) -> mx.array:
    route = dispatch.gemv_route(x.size // x.shape[-1], layer.weight.dtype)
    y = gemv_product(layer, x, route) if route else None
    if y is None and dispatch.cpu_paths():
        y = float32_product(layer, x)
    return own(x) if y is None else y


class _Quantizes:
    """Quantizing a swapped layer (``nn.quantize``) gives a swapped quantized layer."""

    def to_quantized(self, *args, **kwargs):
        return swapped(super().to_quantized(*args, **kwargs))


class Linear(_Quantizes, nn.Linear):
    def __call__(self, x):
        return _product(self, x, super().__call__)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        return _product(self, x, super().__call__)


class Embedding(_Quantizes, nn.Embedding):
    def as_linear(self, x):  # the tied output head
        return _product(self, x, super().as_linear)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        return _product(self, x, super().as_linear)


_SWAPS = {
    nn.Linear: Linear,
    nn.QuantizedLinear: QuantizedLinear,
    nn.Embedding: Embedding,
    nn.QuantizedEmbedding: QuantizedEmbedding,
}


def swapped(layer):
    """``layer`` as its float32-BLAS subclass, sharing its arrays; any other module as it is."""
    cls = _SWAPS.get(type(layer))
    if cls is None:
        return layer
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._no_grad = set(layer._no_grad)  # its own, as a copy's freezing state should be
    dict.update(new, layer)  # its arrays (Module.update would check names against an empty module)
    return new


def prepare(model: nn.Module) -> nn.Module:
    """Swap ``model``'s projections for float32-BLAS ones where the CPU paths apply, in place.

    Returns ``model``; a single layer comes back as its swapped copy.
    """
    if not dispatch.cpu_paths():
        return model
    if type(model) in _SWAPS:
        return swapped(model)
    model.update_modules(tree_map(swapped, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model
