"""A turn's figures and a session's totals, as the REPL and ``generate`` print them."""

from __future__ import annotations

from dataclasses import dataclass


def rate(tokens_per_s: float) -> str:
    """A speed in tok/s: one decimal, or two significant digits below 1 (CPU runs of big models)."""
    return f"{tokens_per_s:.1f}" if tokens_per_s >= 1 else f"{tokens_per_s:.2g}"


def stats_line(r) -> str:
    """One turn's figures: prompt tokens (of which prefilled now), speeds, peak memory."""
    line = (
        f"prompt {r.prompt_tokens} tok ({r.prefilled_tokens} new) {rate(r.prompt_tps)} tok/s │ "
        f"generated {r.generation_tokens} tok {rate(r.generation_tps)} tok/s │ peak {r.peak_memory_gb:.2f} GB"
    )
    if r.draft_tokens:
        line += f" │ drafts {r.accepted_draft_tokens}/{r.draft_tokens} accepted"
    if r.finish_reason == "length":
        line += " │ hit the token limit"
    elif r.finish_reason == "context":
        line += " │ hit the model's context length"
    return line


@dataclass
class Totals:
    """Cumulative figures over every turn of a session (across /reset and /load)."""

    turns: int = 0
    prompt: int = 0
    prefilled: int = 0
    generated: int = 0
    prefill_s: float = 0.0
    generate_s: float = 0.0
    peak_gb: float = 0.0
    interrupted: int = 0

    def add(self, r) -> None:
        self.turns += 1
        self.prompt += r.prompt_tokens
        self.prefilled += r.prefilled_tokens
        self.generated += r.generation_tokens
        self.prefill_s += r.prefilled_tokens / r.prompt_tps if r.prompt_tps else 0.0
        self.generate_s += r.generation_tokens / r.generation_tps if r.generation_tps else 0.0
        self.peak_gb = max(self.peak_gb, r.peak_memory_gb)
        self.interrupted += r.finish_reason == "interrupted"

    def line(self) -> str:
        stopped = f" ({self.interrupted} stopped)" if self.interrupted else ""
        return (
            f"{self.turns} turn{'s' if self.turns != 1 else ''}{stopped} │ "
            f"prompt {self.prompt} tok, {self.prefilled} prefilled at "
            f"{rate(self.prefilled / max(self.prefill_s, 1e-9))} tok/s │ "
            f"generated {self.generated} tok at {rate(self.generated / max(self.generate_s, 1e-9))} tok/s │ "
            f"peak {self.peak_gb:.2f} GB"
        )
