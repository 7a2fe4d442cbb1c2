"""Benchmark the swarm over emulated home and WAN links: relay, push and speculation.

Every peer sits behind a link emulator (`layerswarm/devtools/linkemu.py`, a TCP proxy in a
process of its own: this kernel has no netem) with a one-way delay each way, and optionally a
bandwidth cap; a peer that pushes to the next one goes through that peer's link too, so a
token costs `compute + crossings x one-way delay`: 2N crossings through N peers when the
client relays, N+1 with push.

Decode table: decode tok/s and time to first token, for 2 and 3 peers, at each one-way delay
and with a bandwidth cap, for client relay, push, push + prompt lookup and push + a draft model
(the last two with `Client.connect(speculate=...)`; marked n/a where that option is missing),
on two prompts: "edit" (the reply repeats much of its input: fix a paragraph's typos) and
"chat" (free writing). Beside each row, the floor `compute + crossings x delay` (compute: the
same mode's ms a token at 0 ms delay), divided by the tokens accepted per pipeline pass.

Prefill table (`--prefill-tokens N`, 0 to skip): time to first token of an N-token prompt
over the capped link, for each wire option of the client (`ClientConfig`).

    python scripts/bench_network.py [--model smollm2-135m] [--peers 2 3] [--delays 0 5 10 25]
        [--mbit 20] [--new-tokens 32] [--repeats 2] [--draft-model PATH] [--prefill-tokens 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from benchlib import spread

from layerswarm.cli.common import default_cache_dir, resolve_model_cli
from layerswarm.peer.launch import LocalSwarm, even_spans, start_peers
from layerswarm.routing.client import Client
from layerswarm.routing.generate import Generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator
from layerswarm.routing.text import ChatTokenizer
from layerswarm.shards.config import ModelConfig, Span
from layerswarm.shards.weights import load_client_head, load_span
from layerswarm.swarm.compress import compress_int8, decompress_int8

EDIT_PROMPT = (
    "Fix the spelling mistakes in this paragraph and write the corrected paragraph out in "
    "full, changing nothing else:\n\n"
    "The lighthouse keeper climbed the stairs every evning at sunset. He carried a small lamp "
    "and a flask of tea, and he counted the steps as he went, one hundred and twelve of them. "
    "At the top he cleaned the great lens with a soft cloth, checked the oil, and wrote the "
    "wether in his log book before the light was lit."
)
CHAT_PROMPT = "Tell me about your favourite season of the year and why you like it."
PROMPTS = {"edit": EDIT_PROMPT, "chat": CHAT_PROMPT}
MODES = ["relay", "push", "push + lookup", "push + draft"]
QUALITY_TEXT = Path(__file__).parent / "data" / "quality_text.txt"
SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}  # what `swarm-peer` sets: OpenMP spins briefly


@dataclass(frozen=True)
class Link:
    delay_ms: float
    mbit: float | None = None

    def __str__(self) -> str:
        return f"{self.delay_ms:g} ms" + (f", {self.mbit:g} Mbit/s" if self.mbit else "")


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)  # s
    tok_s: list[float] = field(default_factory=list)
    per_pass: list[float] = field(default_factory=list)
    error: str = ""


@contextmanager
def links(swarm: LocalSwarm, link: Link) -> Iterator[list[str]]:
    """Start one link emulator per peer; yield the peers' addresses behind them."""
    cmd = [sys.executable, "-m", "layerswarm.devtools.linkemu", "--delay-ms", str(link.delay_ms)]
    if link.mbit:
        cmd += ["--up-mbit", str(link.mbit), "--down-mbit", str(link.mbit)]
    cmd += [f"127.0.0.1:{p.port}" for p in swarm.peers]
    # Its timers must fire on time on a busy machine: a late wakeup adds to every crossing.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_higher_priority)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LINKEMU-READY"):
            raise RuntimeError(f"the link emulator did not start: {line!r}")
        ports = line.split()[1:]
        yield [f"127.0.0.1:{port}/{p.peer_id}" for port, p in zip(ports, swarm.peers, strict=True)]
    finally:
        proc.terminate()
        proc.wait(10)


def _higher_priority() -> None:
    with contextlib.suppress(PermissionError):  # not root: delays may come out longer
        os.nice(-10)


def speculation_available() -> bool:
    return "speculate" in inspect.signature(Client.connect).parameters


def open_mode(model: str, addresses: list[str], mode: str, draft: str | None) -> Generator:
    """A generator for one mode of the decode table, through `Client.connect`."""
    kwargs: dict[str, Any] = {"peers": addresses, "relay": mode == "relay"}
    if mode == "push + lookup":
        kwargs["speculate"] = "lookup"
    elif mode == "push + draft":
        kwargs["speculate"] = "draft"
        if draft:
            kwargs["draft_model"] = draft
    return Client.connect(model, **kwargs).generator


def reply(gen: Generator, prompt: str, new_tokens: int) -> tuple[float, float, float, list[int]]:
    """(time to first token s, decode tok/s, tokens per pipeline pass, tokens) of one reply."""
    ids = gen.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    gen.tokenizer.eos_ids = frozenset()  # every reply decodes the same number of tokens
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    tokens = list(gen.tokens(ids, cfg))
    stats = gen.last_stats
    per_pass = float(getattr(stats, "tokens_per_pass", 1.0) or 1.0)
    return stats.prefill_seconds, stats.decode_tokens_per_second, per_pass, tokens


def close(gen: Generator) -> None:
    client = getattr(gen, "client", None)
    if client is not None:
        client.close()


def decode_table(args: argparse.Namespace, model_dir: Path, tmp: Path) -> list[str]:
    num_layers = ModelConfig.from_file(model_dir).num_layers
    spec = speculation_available()
    link_list = [Link(d) for d in args.delays]
    if args.mbit:
        link_list.append(Link(args.mbit_delay, args.mbit))
    out = [
        "| peers | one-way delay | prompt | mode | TTFT ms | decode tok/s | ms/token | "
        "floor ms/token | tokens/pass | x relay | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.peers:
        with start_peers(model_dir, even_spans(num_layers, n), tmp) as swarm:
            compute: dict[tuple[str, str], float] = {}  # (mode, prompt) -> ms/token at 0 ms
            for link in link_list:
                with links(swarm, link) as addresses:
                    samples = measure_link(args, addresses, spec)
                for (prompt, mode), s in samples.items():
                    out.append(row(n, link, prompt, mode, s, samples, compute))
                    print(out[-1], flush=True)
    return out


def measure_link(
    args: argparse.Namespace, addresses: list[str], spec: bool
) -> dict[tuple[str, str], Sample]:
    """Every mode and prompt over one link, interleaved (A B A B) and repeated."""
    samples = {(p, m): Sample() for p in PROMPTS for m in MODES}
    reference: dict[str, list[int]] = {}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:  # A B, then B A
            if "+" in mode and not spec:
                for p in PROMPTS:
                    samples[(p, mode)].error = "n/a (speculation not merged)"
                continue
            try:
                gen = open_mode(args.model, addresses, mode, args.draft_model)
            except Exception as e:  # a mode that cannot run here: say why in its row
                for p in PROMPTS:
                    samples[(p, mode)].error = f"n/a ({type(e).__name__}: {e})"[:80]
                continue
            try:
                for p, text in PROMPTS.items():
                    ttft, tok_s, per_pass, tokens = reply(gen, text, args.new_tokens)
                    s = samples[(p, mode)]
                    s.ttft.append(ttft)
                    s.tok_s.append(tok_s)
                    s.per_pass.append(per_pass)
                    same = reference.setdefault(p, tokens) == tokens
                    s.error = s.error or ("" if same else "DIFFERENT TOKENS")
            finally:
                close(gen)
    return samples


def row(
    n: int,
    link: Link,
    prompt: str,
    mode: str,
    s: Sample,
    samples: dict[tuple[str, str], Sample],
    compute: dict[tuple[str, str], float],
) -> str:
    head = f"| {n} | {link} | {prompt} | {mode} |"
    if not s.tok_s:
        return head + f" {s.error or 'n/a'} | | | | | | |"
    ms = 1e3 / statistics.median(s.tok_s)
    if link.delay_ms == 0 and not link.mbit:
        compute[(mode, prompt)] = ms
    per_pass = statistics.median(s.per_pass)
    crossings = 2 * n if mode == "relay" else n + 1
    base = compute.get((mode, prompt))
    floor = (
        "-" if base is None else f"{(base * per_pass + crossings * link.delay_ms) / per_pass:.0f}"
    )
    relay = samples[(prompt, "relay")].tok_s
    x = f"{statistics.median(s.tok_s) / statistics.median(relay):.2f}x" if relay else "-"
    same = "no" if s.error == "DIFFERENT TOKENS" else "yes"
    return (
        head + f" {spread(s.ttft, scale=1e3)} | {spread(s.tok_s, '.1f')} | {ms:.0f} | {floor} | "
        f"{per_pass:.2f} | {x} | {same} |"
    )


PREFILL_OPTIONS: dict[str, Callable[[], ClientConfig]] = {
    "relay, fp32, one step": lambda: ClientConfig(push=False, **_wire("float32", None, 0)),
    "push, fp32, one step": lambda: ClientConfig(**_wire("float32", None, 0)),
    "push, flowing prefill": lambda: ClientConfig(**_wire("float32", None, None)),
    "push, flowing, int8 prefill": lambda: ClientConfig(**_wire("float32", "int8", None)),
}


def _wire(dtype: str, compress: str | None, chunk: int | None) -> dict[str, Any]:
    """The ClientConfig fields of one prefill row, those that this version of it has."""
    wanted = {"wire_dtype": dtype, "prefill_compression": compress}
    if chunk is not None:
        wanted["prefill_chunk_tokens"] = chunk
    fields = ClientConfig.__dataclass_fields__
    return {k: v for k, v in wanted.items() if k in fields}


def prefill_table(args: argparse.Namespace, model_dir: Path, tmp: Path) -> list[str]:
    num_layers = ModelConfig.from_file(model_dir).num_layers
    link = Link(args.mbit_delay, args.mbit)
    words = "The sea was calm at dawn and the gulls were quiet. " * (args.prefill_tokens // 11)
    out = [
        "| peers | link | prompt tokens | client option | TTFT ms | x first row |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.peers:
        with start_peers(model_dir, even_spans(num_layers, n), tmp) as swarm:
            with links(swarm, link) as addresses:
                times: dict[str, list[float]] = {name: [] for name in PREFILL_OPTIONS}
                prompt_tokens = 0
                for repeat in range(args.repeats):
                    options = list(PREFILL_OPTIONS.items())
                    for name, config in options if repeat % 2 == 0 else options[::-1]:
                        gen = open_swarm_generator(model_dir, addresses, config=config())
                        try:
                            ids = gen.tokenizer.encode_chat([{"role": "user", "content": words}])
                            ids = ids[: args.prefill_tokens]
                            prompt_tokens = len(ids)
                            cfg = SamplingConfig(max_new_tokens=1, temperature=0.0)
                            list(gen.tokens(ids, cfg))
                            times[name].append(gen.last_stats.prefill_seconds)
                        finally:
                            close(gen)
            first = statistics.median(next(iter(times.values())))
            for name, values in times.items():
                x = first / statistics.median(values)
                ms = spread(values, scale=1e3)
                out.append(f"| {n} | {link} | {prompt_tokens} | {name} | {ms} | {x:.2f}x |")
                print(out[-1], flush=True)
    return out


@torch.inference_mode()
def quality_table(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """Top-1 agreement of the next token when each span boundary of the swarm carries int8
    activations (a scale per token), against float32 boundaries, as `eval_quality.py` scores
    weight quantization: every position of a text, in windows of 512 tokens."""
    config = ModelConfig.from_file(model_dir)
    ids = ChatTokenizer(model_dir).encode(QUALITY_TEXT.read_text())
    windows = [ids[i : i + 512] for i in range(0, len(ids) - 1, 512)]
    head = load_client_head(model_dir, torch.float32, config)
    model = load_span(model_dir, Span(0, config.num_layers), torch.float32, config)
    out = [
        "| peers | boundaries | positions | top-1 agreement, int8 boundaries vs float32 |",
        "|---|---|---|---|",
    ]
    for n in args.peers:
        spans = even_spans(config.num_layers, n)
        top1: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        for window in windows:
            for compress in (False, True):
                cache = model.new_cache(len(window))
                seq = cache.allocate(len(window))
                hidden = head.embed_tokens(torch.tensor([window]))
                for i, span in enumerate(spans):
                    if compress and i:
                        hidden = decompress_int8(*compress_int8(hidden), torch.float32)
                    hidden = model(hidden, [0], cache, [seq], layers=span)
                top1[compress].append(head.logits(hidden)[0].argmax(dim=-1))
        agree = (torch.cat(top1[True]) == torch.cat(top1[False])).float().mean().item()
        positions = sum(len(w) for w in windows)
        out.append(f"| {n} | {n - 1} | {positions} | {agree:.2%} |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--delays", type=float, nargs="+", default=[0, 5, 10, 25], help="ms, one-way")
    ap.add_argument("--mbit", type=float, default=20.0, help="the capped link's Mbit/s; 0: none")
    ap.add_argument("--mbit-delay", type=float, default=10.0, help="ms, the capped link's delay")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-model", default=None, help="the draft model of 'push + draft'")
    ap.add_argument("--prefill-tokens", type=int, default=2000, help="0: no prefill table")
    ap.add_argument("--skip-decode", action="store_true", help="no decode table")
    ap.add_argument("--quality", action="store_true", help="int8 boundaries' top-1 agreement")
    args = ap.parse_args()
    os.environ.update(SPIN_ENV)
    model_dir = resolve_model_cli(args.model, default_cache_dir())
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        decode = [] if args.skip_decode else decode_table(args, model_dir, Path(tmp))
        prefill = prefill_table(args, model_dir, Path(tmp)) if args.prefill_tokens else []
        quality = quality_table(args, model_dir) if args.quality else []
    print(
        f"\n{args.model}, {started} UTC, every process on this machine ({os.cpu_count()} "
        f"cores), each peer behind a link emulator with the delay each way; greedy, "
        f"{args.new_tokens} new tokens, {args.repeats} repeats, median (min-max). Prompts: "
        '"edit" asks to fix a paragraph\'s typos (the reply repeats its input), "chat" is '
        "free writing.\n"
    )
    print("\n".join(decode))
    print()
    print("\n".join(prefill))
    print()
    print("\n".join(quality))


if __name__ == "__main__":
    main()
