"""The command line's options: their choices, taken from the lower-level tuples, and those chat and generate share.

Nothing here imports MLX at module level, so ``--help`` answers at once.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import Qwen35Error
from .precision import DTYPES, PRECISIONS, Q_MODES
from .sampling import PRESETS


def choice(name: str, values) -> type[Enum]:
    """The choices of an option: the lower-level tuple (or dict's keys) stays the one list."""
    return Enum(name, {v: v for v in values}, type=str)


DType = choice("DType", DTYPES)
QMode = choice("QMode", Q_MODES)
Precision = choice("Precision", PRECISIONS)
Preset = choice("Preset", PRESETS)


PRECISION = typer.Option(
    Precision.auto,
    "--precision",
    help="Weights at run time. auto: 4bit on an Apple GPU, float32 on a CPU (fastest there); "
    "an already quantized checkpoint runs as stored.",
)


def _shared_options(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Local folder (Hugging Face, mlx_qwen35 or mlx-lm/mlx-vlm layout) or hub id. "
        "Default: Qwen/Qwen3.5-2B, downloaded and converted once into ~/.cache/mlx_qwen35.",
        show_default=False,
    ),
    precision: Precision = PRECISION,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think/--no-think", help="Reason before answering."),
    thinking_budget: Optional[int] = typer.Option(
        None, "--thinking-budget", min=0, help="End reasoning after about this many tokens."
    ),
    preset: Optional[Preset] = typer.Option(
        None,
        "--preset",
        help="Sampling preset from the model card. Default: thinking with --think, else instruct.",
        show_default=False,
    ),
    temperature: Optional[float] = typer.Option(None, "--temp", help="Temperature; 0 is greedy. Overrides the preset."),
    top_p: Optional[float] = typer.Option(
        None, "--top-p", help="Nucleus sampling mass in (0, 1]. Overrides the preset."
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="Sample among the k likeliest tokens (0: all). Overrides the preset."
    ),
    min_p: Optional[float] = typer.Option(
        None, "--min-p", help="Drop tokens below min-p × the top probability. Overrides the preset."
    ),
    presence_penalty: Optional[float] = typer.Option(
        None, "--presence-penalty", help="Penalty on tokens already generated. Overrides the preset."
    ),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", help="Multiplicative repetition penalty (1: off)."
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, max=2**64 - 1, help="Random seed, for repeatable sampling."
    ),
    kv_bits: Optional[int] = typer.Option(
        None, "--kv-bits", help="Quantize the attention KV cache to 4 or 8 bits (long contexts)."
    ),
    mtp: Optional[bool] = typer.Option(
        None,
        "--mtp/--no-mtp",
        help="Speculative decoding with the model's MTP head: the same output, several tokens a step when its "
        "drafts hit. Default: on an Apple GPU.",
        show_default=False,
    ),
    num_draft_tokens: int = typer.Option(
        2,
        "--num-draft-tokens",
        min=1,
        max=8,
        help="With --mtp: the most tokens drafted a step (fewer while they miss).",
    ),
    chat_template: Optional[Path] = typer.Option(
        None,
        "--chat-template",
        exists=True,
        dir_okay=False,
        help="Jinja chat template file replacing the checkpoint's own.",
        show_default=False,
    ),
    tools: Optional[Path] = typer.Option(
        None,
        "--tools",
        help="A Python file whose public functions the model may call; they run when it does, "
        "and their results go back to it.",
        show_default=False,
    ),
) -> None:
    """The options chat and generate share; only its signature is used (by :func:`with_shared_options`)."""


def with_shared_options(command):
    """``command`` with the options of :func:`_shared_options` after its own; it receives them as ``**shared``."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = inspect.signature(_shared_options, eval_str=True).parameters.values()
    command.__signature__ = own.replace(parameters=[*params, *shared])
    return command


def settings_from(shared: dict) -> dict:
    """The Chat settings the shared options give, but ``max_tokens``; bad values fail here, before loading."""
    from dataclasses import fields, replace

    from .cli_tools import load_tools
    from .model.cache import KV_BITS
    from .sampling import Sampling, default_sampling, preset
    from .turn import Settings

    # No sampling flag: None, so that the think mode picks the preset.
    overrides = {f.name: shared[f.name] for f in fields(Sampling) if shared[f.name] is not None}
    sampling = None
    if shared["preset"] is not None or overrides:
        base = default_sampling(shared["think"]) if shared["preset"] is None else preset(shared["preset"].value)
        sampling = replace(base, **overrides)
    if shared["kv_bits"] is not None and shared["kv_bits"] not in KV_BITS:
        raise Qwen35Error(f"--kv-bits: {shared['kv_bits']} is not one of {', '.join(map(str, KV_BITS))}")
    check_text("--system", shared["system"])
    settings = {f.name: shared[f.name] for f in fields(Settings) if f.name in shared}
    return settings | {"sampling": sampling, "tools": load_tools(shared["tools"])}


def check_text(name: str, value: Optional[str]) -> None:
    """A string from the command line; Python maps argument bytes that are not UTF-8 to lone surrogates."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Qwen35Error(f"{name}: not valid UTF-8") from None
