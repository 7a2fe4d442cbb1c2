"""The public Python API: connect to a swarm (or run locally) and generate text.

    from layerswarm import Client

    client = Client.connect(peers=["127.0.0.1:7000", "127.0.0.1:7001"])  # or bootstrap=, local=
    print(client.generate("What is the capital of France?", max_new_tokens=32, temperature=0))
    for piece in client.stream("Tell me a story."):
        print(piece, end="")
    chat = client.chat()          # multi-turn; the KV cache stays on the peers between turns
    print(chat.send("The secret word is banana."))
    print(chat.send("What is the secret word?"))
    client.close()

`AsyncClient` offers the same with `await` and `async for`. With no `peers`, `bootstrap` or
`local`, `connect` finds the swarm on the LAN over mDNS. `speculate="lookup"` (or `"draft"`,
with `draft_model=`) guesses several tokens a pass through the swarm; the reply is the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from layerswarm.routing.conversation import ChatSession
from layerswarm.routing.drafters import open_speculator
from layerswarm.routing.generate import Generator
from layerswarm.routing.local import open_local_generator
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.routing.swarm_client import ClientConfig, open_swarm_generator
from layerswarm.routing.text import Message
from layerswarm.shards.config import parse_dtype
from layerswarm.shards.device import default_dtype, resolve_device
from layerswarm.shards.registry import resolve_model
from layerswarm.shards.weights import Progress


def _default_cache() -> Path:
    return Path.home() / ".cache" / "layerswarm"


class Conversation:
    """A multi-turn chat whose session (and KV cache) stays open between turns."""

    def __init__(self, gen: Generator, system: str | None, defaults: dict[str, Any]) -> None:
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self._session = ChatSession(gen)
        self._defaults = defaults

    def send(self, text: str, **sampling: Any) -> str:
        """Add a user turn and return the whole reply."""
        return "".join(self.stream(text, **sampling))

    def stream(self, text: str, **sampling: Any) -> Iterator[str]:
        """Add a user turn and yield the reply piece by piece."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        config = SamplingConfig(**{**self._defaults, **sampling})
        for piece in self._session.chat(self.messages, config):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def close(self) -> None:
        self._session.close()


class Client:
    """Text generation on a swarm, or on every layer in this process (`local=True`)."""

    def __init__(self, gen: Generator, defaults: dict[str, Any] | None = None) -> None:
        self.generator = gen
        self.defaults = defaults or {}  # SamplingConfig fields used unless a call says otherwise

    @classmethod
    def connect(
        cls,
        model: str = "smollm2-135m",
        *,
        peers: Sequence[str] = (),
        bootstrap: Sequence[str] = (),
        local: bool = False,
        swarm_key: bytes | None = None,
        dtype: str | None = None,
        device: str = "auto",
        cache_dir: Path | None = None,
        speculate: str | None = None,
        draft_model: str | None = None,
        draft_quant: str | None = None,
        relay: bool = False,
        config: ClientConfig | None = None,
        on_event: Callable[[str], None] | None = None,
        progress: Progress | None = None,
        **defaults: Any,
    ) -> Client:
        """Resolve the model (fetching the default one if missing) and connect.

        The one way clients are built: `swarm-chat` and `swarm-api` come through here too.

        Args:
            peers: explicit peer addresses `host:port[/PEERID]`.
            bootstrap: DHT multiaddrs of a swarm elsewhere.
            local: run every layer in this process instead.
            swarm_key: a private swarm's 32-byte key.
            dtype: float32, bfloat16 or float16; None: bfloat16 on a GPU, float32 on a CPU.
            device: where the embedding and the head run, and with `local` every layer:
                auto (the CUDA device with the most free memory, else the CPU), cpu, cuda:N.
            cache_dir: where converted models are kept (default `~/.cache/layerswarm`).
            relay: the client relays every hop's output (instead of peers pushing it on).
            speculate: guess several tokens a pass through the layers: "lookup" (n-grams of
                the context) or "draft" (a local draft model); None: one token a pass.
            draft_model: with "draft", a model name or folder with the same tokenizer (a
                smaller one of the family); None: the model itself.
            draft_quant: "int8", "int4" or "none" for the draft model's layers.
            config: every other client option (`ClientConfig`); `bootstrap`, `swarm_key` and
                `relay` override its fields when given, and without peers or bootstrap it
                looks for the swarm on the LAN (mDNS) unless the config says where.
            on_event: hears of reroutes and peers leaving, one line each (default: the log).
            progress: hears of a model's download and conversion.
            defaults: sampling defaults, e.g. `temperature=0, max_new_tokens=64`.

        Raises:
            PeerUnavailable: no peer could be reached (or none found on the LAN).
            ModelFormatError: the model cannot be read.
        """
        cache = cache_dir or _default_cache()
        model_dir = resolve_model(model, cache, progress=progress)
        where = resolve_device(device)
        torch_dtype = parse_dtype(dtype or default_dtype(where))
        if local:
            gen = open_local_generator(model_dir, torch_dtype, device=where)
        else:
            config = config or ClientConfig()
            discover = not peers and not bootstrap and not config.bootstrap
            config = replace(
                config,
                bootstrap=tuple(bootstrap) or config.bootstrap,
                swarm_key=swarm_key if swarm_key is not None else config.swarm_key,
                mdns_interfaces=()
                if discover and config.mdns_interfaces is None
                else config.mdns_interfaces,
                push=config.push and not relay,
            )
            gen = open_swarm_generator(
                model_dir,
                list(peers),
                dtype=torch_dtype,
                config=config,
                on_event=on_event,
                device=where,
            )
        if speculate is not None:
            draft_dir = (
                resolve_model(draft_model, cache, progress=progress)
                if draft_model is not None
                else None
            )
            gen.speculator = open_speculator(
                gen, speculate, model_dir, draft_dir, draft_quant, torch_dtype
            )
        return cls(gen, defaults)

    def _sampling(self, overrides: dict[str, Any]) -> SamplingConfig:
        return SamplingConfig(**{**self.defaults, **overrides})

    def _prompt(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            return self.generator.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.generator.tokenizer.encode(prompt)

    def stream(self, prompt: str, *, chat: bool = True, **sampling: Any) -> Iterator[str]:
        """Yield the reply to `prompt` piece by piece (`chat=False`: plain continuation)."""
        return self.generator.stream_ids(self._prompt(prompt, chat), self._sampling(sampling))

    def generate(self, prompt: str, *, chat: bool = True, **sampling: Any) -> str:
        """The whole reply to `prompt`."""
        return "".join(self.stream(prompt, chat=chat, **sampling))

    def generate_batch(
        self, prompts: Sequence[str], *, chat: bool = True, **sampling: Any
    ) -> list[str]:
        """Replies to several prompts, generated at the same time, each in its own session.

        They all run on the client's one event loop: their steps go out without waiting for
        each other, so peers batch them and each fills the others' pipeline bubbles.
        """
        replies = [self._reply(self._prompt(p, chat), sampling) for p in prompts]
        return self.generator.net.run(_gather(replies))

    async def _reply(self, ids: list[int], sampling: dict[str, Any]) -> str:
        """The whole reply to the token ids `ids`; runs on the generator's loop."""
        return "".join([p async for p in self.generator.astream(ids, self._sampling(sampling))])

    def chat(self, system: str | None = None) -> Conversation:
        """A multi-turn conversation."""
        return Conversation(self.generator, system, self.defaults)

    def close(self) -> None:
        """Close what `connect` opened: the swarm's connections, or the local engine, and the
        network thread.

        A process must not exit with them running: a daemon thread inside uvloop, zeroconf or
        py-libp2p while the interpreter finalizes can crash it (a `swarm-chat` SIGSEGV, exit
        -11 with an empty stderr, was once seen under load).
        """
        gen = self.generator
        swarm = getattr(gen, "client", None)
        if swarm is not None:
            swarm.close()  # its network thread too
            return
        engine = getattr(gen, "engine", None)
        if engine is not None:
            engine.close()  # its compute loop, not left pending on the loop
        gen.net.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio code: replies run on the client's own event loop, as many as asked,
    and are awaited from the caller's loop; no thread per request."""

    def __init__(self, client: Client) -> None:
        self.sync = client

    @classmethod
    async def connect(cls, model: str = "smollm2-135m", **kwargs: Any) -> AsyncClient:
        return cls(await asyncio.to_thread(Client.connect, model, **kwargs))

    async def generate(self, prompt: str, *, chat: bool = True, **sampling: Any) -> str:
        """The whole reply to `prompt`."""
        ids = self.sync._prompt(prompt, chat)
        return await self.sync.generator.net.call(self.sync._reply(ids, sampling))

    async def generate_batch(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        return list(await asyncio.gather(*(self.generate(p, **kwargs) for p in prompts)))

    async def stream(
        self, prompt: str, *, chat: bool = True, **sampling: Any
    ) -> AsyncIterator[str]:
        """The reply to `prompt`, piece by piece as it is generated."""
        gen = self.sync.generator
        ids = self.sync._prompt(prompt, chat)
        pieces = gen.net.iterate(gen.astream(ids, self.sync._sampling(sampling)))
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


async def _gather(replies: Sequence[Coroutine[Any, Any, str]]) -> list[str]:
    return list(await asyncio.gather(*replies))
