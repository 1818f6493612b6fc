"""The ``mlx_qwen35`` command line: convert, chat, generate, serve, info.

Heavy imports (MLX, mlx-lm, the tokenizer) happen inside the commands, so
``--help`` answers at once. Bad input of any kind ends in one ``error:`` line
and a non-zero exit: usage errors exit 2, everything else 1.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli_options import PRECISION, DType, Precision, QMode, check_text, settings_from, with_shared_options
from .cli_tools import call_json, call_line, result_line
from .errors import Qwen35Error
from .server.cli import serve

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Qwen3.5 on MLX: chat, generate, serve an OpenAI-compatible API, convert checkpoints, inspect memory.",
)
err = Console(stderr=True, soft_wrap=True)
json_errors = False  # generate --json: an error is also one JSON object on stdout


@app.callback()
def _group() -> None:
    """Qwen3.5 on MLX: chat, generate, serve an OpenAI-compatible API, convert checkpoints, inspect memory.

    Start with `mlx_qwen35 chat`; every command has --help.
    """
    global json_errors
    json_errors = False


def fail(message: str, code: int = 1) -> None:
    err.print(Text("error: ", style="bold red") + Text(message))
    if json_errors:
        print_json_error(message)
    raise typer.Exit(code)


def print_json_error(message: str) -> None:
    sys.stdout.write(json.dumps({"error": message}, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def capped_max_tokens(max_tokens: int, context: int) -> int:
    """As llama.cpp does, an answer cannot outgrow the context: a larger --max-tokens means up to the context."""
    if max_tokens <= context:
        return max_tokens
    note(f"--max-tokens: {max_tokens} is more than the model's context; capped at {context} tokens")
    return context


def run_or_fail(fn, *args, **kwargs):
    """Bad input becomes one line and a non-zero exit, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except Qwen35Error as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def note(message: str) -> None:
    err.print(Text(message, style="dim"))


@contextmanager
def conversion_progress() -> Iterator:
    """Yields the ``progress(done, total, name)`` callback of convert(); its bar (stderr) appears on the first call."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("converting", start=False)

    def progress(done: int, total: int, name: str):
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total, description=name[-48:])

    try:
        yield progress
    finally:
        if bar.live.is_started:
            bar.stop()


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
    from .convert import QuantSpec, convert as do_convert

    spec = None
    if quantize:
        spec = run_or_fail(QuantSpec, bits=q_bits, group_size=q_group_size, mode=q_mode.value, vision=quantize_vision)
    with conversion_progress() as progress:
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


def check_model(model: Optional[str], name: str = "--model") -> None:
    if model is not None and not model.strip():  # would otherwise mean the default model
        fail(f"{name}: empty; expected a local folder or a hub id (leave it out for the default)")


def plan_model(model: Optional[str], precision: Precision):
    """Resolve and convert if needed (no weights loaded); notes and hints on stderr."""
    from .plan import plan

    check_model(model)
    if sys.platform.startswith("linux"):
        from .ops.blas import blas_hint

        hint = blas_hint()
        if hint:
            note(hint)
    with conversion_progress() as progress:
        p = run_or_fail(plan, model, precision.value, say=note, progress=progress)
    for line in p.notes:
        note(line)
    return p


def load_planned(p, chat_template: Optional[Path], mtp: Optional[bool] = None):
    """Load a plan (the MTP head too where ``mtp``; None: where drafting pays)."""
    from dataclasses import replace

    from .plan import load_plan

    with err.status(f"loading {p.folder.name} ({p.precision})", spinner="dots"):
        return run_or_fail(load_plan, replace(p, mtp=mtp), chat_template)



def context_of(p) -> int:
    """The context, in tokens, of a planned model (from its config: nothing loaded)."""
    from .config import load_config

    return run_or_fail(load_config, p.folder).text.max_position_embeddings


def make_chat(model, tokenizer, **settings):
    from .chat import Chat

    return run_or_fail(Chat, model, tokenizer, **settings)


@contextmanager
def wired(model):
    """On an Apple GPU, keep the weights wired as mlx-lm does; nothing elsewhere."""
    from mlx_lm.generate import wired_limit

    with wired_limit(model):
        yield


@app.command()
@with_shared_options
def chat(
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Longest answer, in tokens, per turn."),
    **shared,
):
    """Chat with the model in the terminal (the answer streams; /help lists the commands).

    Thinking, its budget and the system prompt can be changed between turns
    (/think, /budget, /system); /save and /load keep a conversation with its
    cache. Ctrl-C stops an answer, Ctrl-D leaves.
    """
    from .plan import cache_root
    from .repl import Repl, plain_reader, terminal_reader

    settings = run_or_fail(settings_from, shared)
    p = plan_model(shared["model"], shared["precision"])
    m, tokenizer = load_planned(p, shared["chat_template"], shared["mtp"])
    max_tokens = capped_max_tokens(max_tokens, m.config.text.max_position_embeddings)
    conversation = make_chat(m, tokenizer, max_tokens=max_tokens, **settings)
    console = Console(soft_wrap=True, highlight=False)
    interactive = sys.stdin.isatty()
    if not interactive and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, not fatal
    read = terminal_reader(cache_root() / "history") if interactive else plain_reader
    tools = f"tools {', '.join(f.__name__ for f in settings['tools'])} │ " if settings["tools"] else ""
    note(f"{tools}thinking {'on' if settings['think'] else 'off'} │ /help for commands, Ctrl-D to leave")
    with wired(m):
        Repl(conversation, console=console, read=read).run()


@app.command()
@with_shared_options
def generate(
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="The user message. Default: read from stdin.", show_default=False
    ),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="A text file sent as the message (before --prompt, if both).", show_default=False
    ),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Longest answer, in tokens."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable); it is not output."),
    image: list[Path] = typer.Option([], "--image", help="An image to look at (repeatable; they precede the text)."),
    video: list[Path] = typer.Option(
        [], "--video", help="A video: an animated GIF or a folder of frames (repeatable)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (reasoning, text, finish_reason, stats, tool_calls), not a stream."
    ),
    **shared,
):
    """Answer one message and exit: for scripts and pipes.

    The answer streams to stdout; reasoning (with --think) goes to stderr,
    dimmed, and so do the figures, so stdout holds only the answer.
    With --json nothing streams and stdout gets one JSON object.
    With --tools, the model's calls run, and their results go back to it.
    """
    from .documents import document_message, read_stdin
    from .figures import stats_line
    from .tool_loop import tool_rounds

    global json_errors
    json_errors = as_json
    settings = run_or_fail(settings_from, shared)
    for name, value in (("--prompt", prompt), *(("--stop", s) for s in stop)):
        run_or_fail(check_text, name, value)
    from_stdin = prompt is None and not sys.stdin.isatty()
    if prompt is None and file is None and not from_stdin:
        fail("no prompt: pass --prompt TEXT, pipe the message on stdin, or --file PATH")
    if file is None and prompt is not None and not prompt.strip():
        fail("prompt: empty")
    p = plan_model(shared["model"], shared["precision"])
    context = context_of(p)  # bounds what is read: stdin or a file can be endless
    if from_stdin:
        prompt = run_or_fail(read_stdin, context)
    if file is not None:
        message = run_or_fail(document_message, file, prompt or "", context)
    elif not prompt.strip():
        fail("prompt: empty")
    else:
        message = prompt
    m, tokenizer = load_planned(p, shared["chat_template"], shared["mtp"])
    conversation = make_chat(m, tokenizer, max_tokens=capped_max_tokens(max_tokens, context), **settings)
    gen = run_or_fail(conversation.send, message, images=image, videos=video, stop=stop)
    open_line = {"reasoning": False, "answer": False}  # text written without a final newline
    calls = []  # every call, with its result once it ran
    try:
        with wired(m):
            for results, gen in tool_rounds(conversation, gen, stop=stop):
                calls += [call_json(call, text) for call, text in results]
                if not as_json:
                    write_results(results, open_line)
                for piece in gen:
                    if not as_json:
                        write_piece(piece, open_line)
    except KeyboardInterrupt:
        gen.close()
    except Qwen35Error as e:
        fail(str(e))
    r = gen.result
    calls += [call_json(call) for call in r.tool_calls]  # the last reply's calls did not run
    if as_json:
        stats = ("prompt_tokens", "prefilled_tokens", "generation_tokens", "prompt_tps", "generation_tps",
                 "draft_tokens", "accepted_draft_tokens")
        stats = {k: getattr(r, k) for k in (*stats, "peak_memory_gb")}
        reply = {"reasoning": r.reasoning, "text": r.text, "finish_reason": r.finish_reason, "stats": stats}
        reply["tool_calls"] = calls
        json.dump(reply, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    elif open_line["answer"]:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if open_line["reasoning"]:
        err.print()
    note(stats_line(r))
    if r.finish_reason == "interrupted":
        raise typer.Exit(130)


def write_piece(piece, open_line: dict) -> None:
    """The answer to stdout; reasoning (dimmed) and tool calls to stderr; ``open_line``: which ends mid-line."""
    if not piece.text and piece.call is None:
        return
    if piece.kind == "reasoning":
        err.print(Text(piece.text, style="dim"), end="")
    else:
        if open_line["reasoning"]:
            err.print()
            open_line["reasoning"] = False
        if piece.kind == "tool_call":
            if piece.call is not None:
                note(call_line(piece.call))
            return
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    open_line[piece.kind] = not piece.text.endswith("\n")


def write_results(results, open_line: dict) -> None:
    """Each tool result as a dimmed line on stderr; the answer so far ends its line first."""
    if results and open_line["answer"]:
        sys.stdout.write("\n")
        open_line["answer"] = False
    for _, text in results:
        note(result_line(text))


@app.command()
def info(
    model: Optional[str] = typer.Argument(
        None, metavar="MODEL", help="Folder or hub id. Default: Qwen/Qwen3.5-2B.", show_default=False
    ),
    precision: Precision = PRECISION,
):
    """Memory: weights, KV cache per token, recurrent state, and the longest context that fits.

    Nothing is loaded: the figures come from the config and the weights'
    shapes and dtypes, at the precision chat and generate would use.
    """
    from .model.cache import KV_BITS as ALLOWED_KV_BITS
    from .memory import available_memory, footprint
    from .plan import DEFAULT_MODEL, DTYPE_NAMES, build, plan

    check_model(model, "MODEL")
    p = run_or_fail(plan, model, precision.value, convert=False)
    fp = footprint(run_or_fail(build, p, lazy=True))
    available, source = available_memory()
    dtype = DTYPE_NAMES.get(fp.compute_dtype, str(fp.compute_dtype))
    out = Console(highlight=False, soft_wrap=True)
    out.print(Text(model or DEFAULT_MODEL, style="bold") + f": {p.precision} weights, activations and KV cache in {dtype}")
    vision = f" + {gib(fp.weights['vision'])} vision (loaded only for images)" if "vision" in fp.weights else ""
    out.print(f"  weights   {gib(fp.weights['text'])} text{vision}")
    out.print(f"  state     {fp.state / 2**20:.1f} MiB per conversation ({fp.linear_layers} Gated DeltaNet layers)")
    out.print(f"  memory    {gib(available)} available ({source})")
    out.print(f"  KV cache  ({fp.attention_layers} attention layers)  per token    longest context that fits")
    for bits in (None, *sorted(ALLOWED_KV_BITS, reverse=True)):
        label = dtype if bits is None else f"--kv-bits {bits}"
        tokens = fp.longest_context(available, bits)
        limit = "  (the model's limit)" if tokens == fp.max_context else ""
        out.print(f"    {label:<12} {fp.kv_per_token[bits] / 1024:20.2f} KiB {tokens:>16,} tokens{limit}")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


app.command()(serve)
# Typer raises click's UsageError, or its bundled copy's (typer ≥ 0.2x); both are BadParameter's base.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main() -> None:
    """The console entry point: usage errors too become one line (exit 2)."""
    try:
        code = app(standalone_mode=False)
    except _UsageError as e:
        if e.format_message():  # empty after no_args_is_help has shown the help
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            err.print(Text("error: ", style="bold red") + Text(e.format_message() + hint))
            if e.ctx is not None and e.ctx.info_name == "generate" and "--json" in sys.argv[1:]:
                print_json_error(e.format_message())
        code = 2
    except typer.Abort:
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
