"""The precisions weights are written and run at, by name.

Plain data with no MLX import, so that the command line lists them in its
``--help`` at once; :mod:`mlx_qwen35.convert`, :mod:`mlx_qwen35.quant` and
:mod:`mlx_qwen35.plan` give them their meaning.
"""

DTYPES = ("float32", "float16", "bfloat16")  # the floating types a checkpoint is written in
# quantization mode → (bits, group size) for the float formats, whose layout is fixed
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
Q_MODES = ("affine", *FLOAT_MODES)
PRECISIONS = ("auto", "float32", "bfloat16", "4bit", "8bit")  # what chat and generate run at
