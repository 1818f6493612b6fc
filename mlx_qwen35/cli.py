"""The ``mlx_qwen35`` command line."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import Qwen35Error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Qwen3.5 on MLX: convert checkpoints, chat, generate.",
)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _group() -> None:
    """Qwen3.5 on MLX: convert checkpoints, chat, generate."""


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def run_or_fail(fn, *args, **kwargs):
    """Bad input becomes one line and a non-zero exit, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except Qwen35Error as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class QMode(str, Enum):
    affine = "affine"
    mxfp4 = "mxfp4"
    nvfp4 = "nvfp4"
    mxfp8 = "mxfp8"


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Hugging Face checkpoint: local folder or hub id."),
    mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Output folder."),
    dtype: DType = typer.Option(DType.bfloat16, "--dtype", help="Precision of unquantized weights."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (see the policy in the README)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits for affine quantization."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Group size for affine quantization."),
    q_mode: QMode = typer.Option(QMode.affine, "--q-mode", help="Quantization format."),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="Also quantize the vision tower."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Convert a Hugging Face Qwen3.5 checkpoint to MLX safetensors."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .convert import QuantSpec, convert as do_convert

    spec = None
    if quantize:
        spec = run_or_fail(QuantSpec, bits=q_bits, group_size=q_group_size, mode=q_mode.value, vision=quantize_vision)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("converting")

        def progress(done: int, total: int, name: str):
            bar.update(task, completed=done, total=total, description=name[-48:])

        summary = run_or_fail(
            do_convert, hf_path, mlx_path, dtype=dtype.value, quantize_spec=spec, force=force, progress=progress
        )
    out = Console()
    out.print(f"[bold green]wrote[/] {summary.path}  ({summary.total_bytes / 2**30:.2f} GiB)")
    for part, (nbytes, nparams) in summary.parts.items():
        out.print(
            f"  {part:<15} {nparams / 1e6:9.1f} M params  {nbytes / 2**20:9.1f} MiB  "
            f"{summary.bits_per_weight(part):5.2f} bits/weight"
        )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
