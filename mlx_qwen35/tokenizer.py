"""The checkpoint's own tokenizer and chat template, wrapped by mlx-lm for streaming detokenization.

The package carries no chat template of its own: prompts are rendered with the
template that ships with the checkpoint (``chat_template.jinja`` in the folder,
which transformers prefers, else ``chat_template`` in tokenizer_config.json) or
with a template file the user names explicitly, which overrides both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from jinja2 import TemplateError
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer as _mlx_lm_load_tokenizer

from .errors import Qwen35Error


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the chat control tokens in one tokenizer's vocabulary (a vocabulary may place them anywhere)."""

    stop: frozenset[int] = frozenset()  # ends a reply: <|im_end|>, <|endoftext|> and the tokenizer's eos
    im_start: Optional[int] = None  # begins every message
    think_open: Optional[int] = None
    think_close: Optional[int] = None


def special_tokens(tokenizer) -> SpecialTokens:
    """The chat control token ids of ``tokenizer``, looked up in its vocabulary once and kept on it."""
    try:
        return tokenizer._special_tokens
    except AttributeError:
        pass

    def find(token: str) -> Optional[int]:
        i = tokenizer.convert_tokens_to_ids(token)
        # A missing token maps to None or to the unknown token's id.
        return i if i is not None and tokenizer.convert_ids_to_tokens(i) == token else None

    im_end, endoftext = find("<|im_end|>"), find("<|endoftext|>")
    if im_end is None:
        raise Qwen35Error(f"{tokenizer.name_or_path}: the tokenizer has no <|im_end|> token (the end of a chat turn)")
    stop = {im_end, *getattr(tokenizer, "eos_token_ids", ())}
    if endoftext is not None:
        stop.add(endoftext)
    found = SpecialTokens(frozenset(stop), find("<|im_start|>"), find("<think>"), find("</think>"))
    tokenizer._special_tokens = found
    return found


def load_tokenizer(folder: Union[str, Path], chat_template: Optional[Union[str, Path]] = None) -> TokenizerWrapper:
    """Load the tokenizer of the checkpoint in ``folder``, stopping on its <|im_end|> and <|endoftext|>.

    ``chat_template``: a Jinja template file that replaces the checkpoint's own.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise Qwen35Error(f"{folder}: no tokenizer.json or tokenizer_config.json (the checkpoint's tokenizer)")
    if not (folder / "config.json").is_file():
        # The Hub's tokenizer_config.json names Qwen2Tokenizer, whose pre-tokenizer
        # lacks Qwen3.5's \p{M}; transformers only switches to the Qwen3.5 class
        # when config.json says model_type qwen3_5.
        raise Qwen35Error(f"{folder}: no config.json; the tokenizer needs the checkpoint's config.json")
    extra = {}
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise Qwen35Error(f"--chat-template {path}: no such file (expected a Jinja chat template)")
        extra["chat_template"] = path.read_text(encoding="utf-8")
    tokenizer = _mlx_lm_load_tokenizer(folder, tokenizer_config_extra=extra)
    tokenizer.eos_token_ids = special_tokens(tokenizer).stop
    return tokenizer


def render_text(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
) -> str:
    """The prompt text for ``messages``, rendered with the checkpoint's chat template.

    Messages are dicts with ``role`` and ``content`` and, for past assistant
    turns, optionally ``reasoning_content`` and ``tool_calls``; the template
    decides what to keep. Thinking is off unless ``enable_thinking``.
    """
    if tokenizer.chat_template is None:
        raise Qwen35Error(
            f"{tokenizer.name_or_path} has no chat template (no chat_template.jinja and no chat_template "
            "in tokenizer_config.json); pass --chat-template FILE"
        )
    if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) for m in messages):
        raise Qwen35Error(f"messages: expected a list of dicts with 'role' and 'content', got {messages!r:.200}")
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tools=None if tools is None else list(tools),
            add_generation_prompt=add_generation_prompt,
            # Always passed: mlx-lm's wrapper would otherwise turn thinking on.
            enable_thinking=enable_thinking,
            tokenize=False,
        )
    except TemplateError as e:
        raise Qwen35Error(f"chat template of {tokenizer.name_or_path} rejected the messages: {e}") from None


def render_prompt(tokenizer: TokenizerWrapper, messages: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
    """Token ids of :func:`render_text` (its ``options``; special tokens in the text become their ids, no BOS added)."""
    return tokenizer.encode(render_text(tokenizer, messages, **options), add_special_tokens=False)
