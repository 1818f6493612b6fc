"""The checkpoint's own tokenizer, wrapped by mlx-lm for streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer as _mlx_lm_load_tokenizer

from .errors import Qwen35Error

# <|im_end|> ends a chat turn; <|endoftext|> is the text model's eos.
STOP_TOKEN_IDS = (248046, 248044)


def load_tokenizer(folder: Path) -> TokenizerWrapper:
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise Qwen35Error(f"{folder}: no tokenizer.json or tokenizer_config.json (the checkpoint's tokenizer)")
    return _mlx_lm_load_tokenizer(folder, eos_token_ids=list(STOP_TOKEN_IDS))
