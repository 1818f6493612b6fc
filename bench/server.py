"""Serving: our `mlx_qwen35 serve` against `mlx_lm.server`, side by side from one run.

    python bench/server.py                        # the 2B-shaped random checkpoint (re-runs itself on OpenBLAS)
    ... --checkpoint tiny                         # a tiny random checkpoint: the script end to end in seconds
    ... --checkpoint PATH                         # another checkpoint folder in the Hugging Face layout
    ... --only agent | concurrency                # one scenario
    ... --ours CMD --anchor CMD                   # other servers: command lines with {model}, {host}, {port}

Both servers run the same float32 checkpoint folder (mlx_lm.server has no dtype
option, so a float32 copy of the checkpoint is written to bench/out once), one
at a time, on a free loopback port, as subprocesses of this script; it stops
them on exit, Ctrl-C included. Every request is streamed through the `openai`
client, greedy (every sampling field given, so no server's defaults apply),
thinking off, and times the first content (or reasoning, or tool-call) delta.

agent: one conversation of 10 requests. Each re-sends the whole conversation:
the assistant's previous reply with a call of the `search` tool, and that
call's result (about 50 tokens), as a `tool` message when the checkpoint's chat
template renders one, else (`--tool-format user`) as a user message holding
`<tool_response>`, which is what Qwen's own template renders a tool message as.
Per request: prompt tokens, prefilled tokens (prompt minus the server's
`usage.prompt_tokens_details.cached_tokens`) and time to first token.

concurrency: 1, 2 and 4 clients at once (threads), each sending
`--requests` short distinct prompts one after the other (so no prefix is
shared past the template's first tokens): aggregate generated tokens/s over
the wall time, and p50 / p95 time to first token over all requests.

Ratios are arranged so that above 1 means ours is better: anchor time / ours,
ours tokens/s / anchor. With ``--rounds`` above 1 the servers alternate
(ours, anchor, anchor, ours, ...) and each figure is the best of its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_fast_blas  # noqa: E402
from random_checkpoint import OUT, ROOT, build, default_checkpoint  # noqa: E402
from shapes import QWEN3_5_2B  # noqa: E402

HOST = "127.0.0.1"
COMMANDS = {
    "ours": f"{shlex.quote(sys.executable)} -m mlx_qwen35.cli serve --model {{model}} --host {{host}} --port {{port}}",
    "anchor": f"{shlex.quote(sys.executable)} -m mlx_lm.server --model {{model}} --host {{host}} --port {{port}}",
}
# Greedy, every sampling field given: our server lays the model card's preset (with a presence penalty) under a
# request's fields, mlx_lm.server its own defaults; thinking off.
REQUEST = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
               chat_template_kwargs={"enable_thinking": False})
DELTAS = ("content", "reasoning_content", "reasoning", "tool_calls")  # a first token: any of these (vLLM, mlx-lm names)

SYSTEM = "You are a research agent. Use the search tool to gather facts, then answer the user briefly."
TASK = "Plan a small vegetable garden for a sunny balcony: which plants, which pots, and when to sow them."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the gardening knowledge base.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to look for"}},
                "required": ["query"],
            },
        },
    }
]
TOPICS = ["tomatoes", "peppers", "basil", "lettuce", "strawberries", "beans", "mint", "radishes", "chard", "thyme"]
AGENT_REQUESTS = 10
AGENT_REPLY = 16
CLIENTS = (1, 2, 4)
SHORT_REPLY = 32


def tool_result(i: int) -> str:
    """A search result of about 50 tokens, different at every step."""
    t = TOPICS[i % len(TOPICS)]
    return json.dumps({
        "query": f"{t} on a balcony",
        "results": [
            f"{t.capitalize()} need at least five hours of direct sun and a pot of 10 to 20 litres.",
            f"Sow {t} indoors in early spring; move them outside after the last frost.",
        ],
        "page": i + 1,
    })


def tiny_checkpoint() -> Path:
    """The 2B config at toy sizes (the real vocabulary, so the real tokenizer works), for trying the script."""
    config = json.loads(json.dumps(QWEN3_5_2B))
    config["text_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=32, layer_types=["linear_attention"] * 3 + ["full_attention"],
    )
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 1, 1]
    config["vision_config"].update(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64)
    return build(config, OUT / "tiny-random")


def float32_folder(src: Path) -> Path:
    """``src`` when its weights are float32 already, else a float32 copy in bench/out (made once)."""
    import mlx.core as mx

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        sys.exit(f"--checkpoint {src}: no *.safetensors files (expected a Hugging Face checkpoint folder)")
    if all(d in ("F32", "I32", "U32", "U8") for s in shards for d in safetensors_dtypes(s)):
        return src
    out = OUT / f"{src.name}-float32"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = mx.load(str(f))
            w = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()}
            mx.save_safetensors(str(tmp / f.name), w, metadata={"format": "pt"})
        elif f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file holds, from its JSON header (the weights stay unread)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def tool_format(path: Path) -> str:
    """'tool' when the checkpoint's chat template renders a tool turn, else 'user'."""
    from mlx_qwen35.errors import Qwen35Error
    from mlx_qwen35.tokenizer import load_tokenizer, render_text

    messages = agent_messages("tool", ["x"])
    for m in messages:  # as a server hands them to the template: arguments decoded from their JSON string
        for call in m.get("tool_calls", ()):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    try:
        render_text(load_tokenizer(path), messages, tools=TOOLS)
        return "tool"
    except Qwen35Error:
        return "user"


def agent_messages(fmt: str, replies: list[str]) -> list[dict]:
    """The conversation after the assistant's ``replies``: each followed by its search call and the result."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    for i, text in enumerate(replies):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "search", "arguments": json.dumps({"query": TOPICS[i % len(TOPICS)]})}}
        if fmt == "tool":
            messages.append({"role": "assistant", "content": text, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": tool_result(i)})
        else:
            messages.append({"role": "assistant", "content": text})
            messages.append({"role": "user", "content": f"<tool_response>\n{tool_result(i)}\n</tool_response>"})
    return messages


class Server:
    """A server subprocess on a free loopback port; stopped (its whole process group) on exit."""

    def __init__(self, name: str, command: str, model: Path, log: Path):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.name, self.url, self.log = name, f"http://{HOST}:{self.port}", log
        self.model = str(model)  # the id both servers answer to: the --model they were given
        self.argv = shlex.split(command.format(model=shlex.quote(str(model)), host=HOST, port=self.port))
        self.proc = None

    def __enter__(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:  # a file, not a pipe: a chatty server never blocks on a full pipe
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue

    def fail(self, why: str):
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{self.name} server ({shlex.join(self.argv)}): {why}; the end of {self.log}:\n"
                         + "\n".join(tail))

    def wait_ready(self, timeout: float):
        import httpx2

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.fail(f"exited with status {self.proc.returncode} before it was ready")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.5)
        self.fail(f"GET /health did not answer 200 within {timeout:.0f} s (--ready-timeout)")

    def client(self, timeout: float):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="none", timeout=timeout, max_retries=0)


def ask(server: Server, client, messages, max_tokens: int, tools=None) -> dict:
    """One streamed greedy request: seconds to the first delta, the reply text and the usage counts."""
    from openai import OpenAIError

    t0 = time.perf_counter()
    first, text = None, []
    usage = None
    try:
        stream = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body=REQUEST, **({"tools": tools} if tools else {}),
        )
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                d, extra = choice.delta, choice.delta.model_extra or {}
                if first is None and any(getattr(d, k, None) or extra.get(k) for k in DELTAS):
                    first = time.perf_counter() - t0
                text.append(d.content or "")
    except OpenAIError as e:
        server.fail(f"request failed: {e}")
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None)
    return dict(ttft=first if first is not None else time.perf_counter() - t0, text="".join(text),
                prompt=usage.prompt_tokens if usage else None, cached=cached,
                completion=usage.completion_tokens if usage else None)


def agent(server: Server, fmt: str, timeout: float) -> list[dict]:
    client = server.client(timeout)
    replies, rows = [], []
    for _ in range(AGENT_REQUESTS):
        r = ask(server, client, agent_messages(fmt, replies), AGENT_REPLY, TOOLS)
        replies.append(r["text"])
        rows.append(r)
    return rows


def concurrency(server: Server, clients: int, requests: int, timeout: float) -> dict:
    start = threading.Barrier(clients + 1)
    results: list[dict] = []
    errors: list[BaseException] = []

    def client(c: int):
        api = server.client(timeout)
        start.wait()
        try:
            for r in range(requests):
                topic = TOPICS[(c + r) % len(TOPICS)]
                prompt = f"[{clients}.{c}.{r}] Write two lines about growing {topic} on a balcony."
                results.append(ask(server, api, [{"role": "user", "content": prompt}], SHORT_REPLY))
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which reports it
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    ttft = [r["ttft"] for r in results]
    return dict(tps=sum(r["completion"] or 0 for r in results) / wall, p50=float(np.percentile(ttft, 50)),
                p95=float(np.percentile(ttft, 95)), cached=sum(r["cached"] or 0 for r in results),
                tokens=sum(r["completion"] or 0 for r in results))


def run_side(name: str, command: str, model: Path, a, fmt: str) -> dict:
    """Start one server, warm it up, run the scenarios, stop it."""
    with Server(name, command, model, OUT / "server-logs" / f"{name}.log") as server:
        t0 = time.perf_counter()
        server.wait_ready(a.ready_timeout)
        client = server.client(a.timeout)
        ask(server, client, [{"role": "user", "content": "Warm-up."}], 2)  # loads lazily loaded models
        print(f"  {name}: ready and warmed up in {time.perf_counter() - t0:.1f} s on port {server.port}", flush=True)
        out = {}
        if a.only in ("agent", "all"):
            out["agent"] = agent(server, fmt, a.timeout)
        if a.only in ("concurrency", "all"):
            out["concurrency"] = {n: concurrency(server, n, a.requests, a.timeout) for n in CLIENTS}
        return out


def best(runs: list[dict]) -> dict:
    """Each figure the best over rounds: the least time, the most tokens/s; counts from the first round."""
    out = runs[0]
    for run in runs[1:]:
        for part, value in run.items():
            if part == "agent":
                for row, new in zip(out[part], value):
                    row["ttft"] = min(row["ttft"], new["ttft"])
            else:
                for n, new in value.items():
                    old = out[part][n]
                    old.update(tps=max(old["tps"], new["tps"]), p50=min(old["p50"], new["p50"]),
                               p95=min(old["p95"], new["p95"]))
    return out


def fmt_count(v) -> str:
    return "n/a" if v is None else str(v)


def report(ours: dict, anchor: dict, fmt: str):
    if "agent" in ours:
        print(f"\n[agent] {AGENT_REQUESTS} requests, each adding the reply ({AGENT_REPLY} tokens at most) and a "
              f"~50-token tool result as a {fmt!r} message; prefilled = prompt - cached_tokens")
        print(f"{'req':>3} {'prompt':>7} {'':>7} {'prefilled':>9} {'':>7} {'TTFT s':>7} {'':>7} {'anchor/':>8}")
        print(f"{'':>3} {'ours':>7} {'anchor':>7} {'ours':>9} {'anchor':>7} {'ours':>7} {'anchor':>7} {'ours':>8}")
        tot = {"o": [0, 0.0], "a": [0, 0.0]}
        for i, (o, r) in enumerate(zip(ours["agent"], anchor["agent"])):
            pre = [None if x["prompt"] is None or x["cached"] is None else x["prompt"] - x["cached"] for x in (o, r)]
            for k, x, p in (("o", o, pre[0]), ("a", r, pre[1])):
                tot[k][0] += p or 0
                tot[k][1] += x["ttft"]
            print(f"{i + 1:>3} {fmt_count(o['prompt']):>7} {fmt_count(r['prompt']):>7} {fmt_count(pre[0]):>9} "
                  f"{fmt_count(pre[1]):>7} {o['ttft']:>7.3f} {r['ttft']:>7.3f} {r['ttft'] / o['ttft']:>7.2f}x")
        print(f"{'all':>3} {'':>7} {'':>7} {tot['o'][0]:>9} {tot['a'][0]:>7} {tot['o'][1]:>7.3f} {tot['a'][1]:>7.3f} "
              f"{tot['a'][1] / tot['o'][1]:>7.2f}x")
    if "concurrency" in ours:
        print(f"\n[concurrency] clients at once, each sending requests of {SHORT_REPLY} tokens at most one after the "
              "other; generated tokens/s over the wall time, time to first token over all requests")
        print(f"{'clients':>7} {'tok/s ours':>11} {'anchor':>8} {'ratio':>7}  {'p50 TTFT':>9} {'anchor':>8} "
              f"{'ratio':>7}  {'p95 TTFT':>9} {'anchor':>8} {'ratio':>7}  {'tokens':>13} {'cached':>9}")
        for n, o in ours["concurrency"].items():
            r = anchor["concurrency"][n]
            print(f"{n:>7} {o['tps']:>11.2f} {r['tps']:>8.2f} {o['tps'] / r['tps']:>6.2f}x  {o['p50']:>9.3f} "
                  f"{r['p50']:>8.3f} {r['p50'] / o['p50']:>6.2f}x  {o['p95']:>9.3f} {r['p95']:>8.3f} "
                  f"{r['p95'] / o['p95']:>6.2f}x  {o['tokens']:>6}/{r['tokens']:<6} {o['cached']:>4}/{r['cached']:<4}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="qwen3_5_2b",
                    help="qwen3_5_2b (the 2B-shaped random one, built into bench/out when absent), tiny, or a folder")
    ap.add_argument("--only", choices=["agent", "concurrency", "all"], default="all")
    ap.add_argument("--tool-format", choices=["auto", "tool", "user"], default="auto",
                    help="how the agent sends tool results (auto: 'tool' when the chat template renders it)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the concurrency scenario")
    ap.add_argument("--rounds", type=int, default=1, help="start each server this many times, alternating")
    ap.add_argument("--ours", default=COMMANDS["ours"], help="our server's command line")
    ap.add_argument("--anchor", default=COMMANDS["anchor"], help="the anchor server's command line")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds for a server to answer GET /health")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one request")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the servers are stopped then too
    blas = use_fast_blas()
    import mlx.core as mx

    if a.checkpoint == "tiny":
        src = tiny_checkpoint()
    elif a.checkpoint == "qwen3_5_2b":
        src = default_checkpoint("qwen3_5_2b")
    else:
        src = Path(a.checkpoint)
        if not (src / "config.json").is_file():
            sys.exit(f"--checkpoint {src}: no config.json (expected qwen3_5_2b, tiny, or a checkpoint folder)")
    model = float32_folder(src)
    fmt = tool_format(model) if a.tool_format == "auto" else a.tool_format
    print(f"checkpoint: {model}  (float32)\nmlx {mx.__version__}, BLAS: {blas}\ntool results as: {fmt!r} messages")
    sides = {"ours": a.ours, "anchor": a.anchor}
    runs: dict[str, list] = {"ours": [], "anchor": []}
    load = os.getloadavg()[0]
    for r in range(a.rounds):
        for name in sides if r % 2 == 0 else list(sides)[::-1]:
            runs[name].append(run_side(name, sides[name], model, a, fmt))
    print(f"\nbest of {a.rounds} round(s); load average {load:.1f} -> {os.getloadavg()[0]:.1f}; "
          "ratios above 1: ours is better")
    report(best(runs["ours"]), best(runs["anchor"]), fmt)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers are stopped")
