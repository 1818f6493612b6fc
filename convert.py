"""Convert a Hugging Face Qwen3.5 checkpoint to MLX: ``python convert.py --hf-path … --mlx-path …``.

The same command as ``mlx_qwen35 convert``.
"""

import sys

from mlx_qwen35.cli import app

if __name__ == "__main__":
    sys.exit(app(["convert", *sys.argv[1:]]))
