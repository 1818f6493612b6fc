"""The kernels under the model graph, and the one place that picks them per device.

- :mod:`.dispatch`: every CPU / Metal / portable decision, and the ops the
  graph calls (re-exported here).
- :mod:`.linear`: float32-BLAS projections, swapped in at load time by :func:`prepare`.
- :mod:`.cpu`: numerics for MLX's CPU backend (activations, softmax, attention, conv).
- :mod:`.recurrence`: the gated delta rule, sequential and chunk-parallel.
- :mod:`.metal`: the same recurrence as a Metal kernel (``gated_delta.metal``).
- :mod:`.blas`: which BLAS MLX's CPU backend multiplies with, and a hint when it is slow.
"""

from .dispatch import attention, causal_conv, gated_delta_update, sigmoid_mul, swiglu
from .linear import prepare

__all__ = ["attention", "causal_conv", "gated_delta_update", "prepare", "sigmoid_mul", "swiglu"]
