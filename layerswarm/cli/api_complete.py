"""Answer one completion request: its prompt and sampling, a turn to run, then the reply as
one JSON object or as server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import weakref

from starlette.responses import JSONResponse, Response

from layerswarm.cli.api_logprobs import TokenTexts
from layerswarm.cli.api_params import (
    ChatRequest,
    SamplingFields,
    parse_choices,
    parse_grammar,
    parse_prompt,
    parse_sampling,
    parse_tools,
)
from layerswarm.cli.api_replies import Admission, Admitted, EventStream, as_api_error, generate
from layerswarm.cli.api_server import ApiConfig, ApiError
from layerswarm.cli.api_shapes import Reply, ReplyShape, collect, stream_events
from layerswarm.errors import LayerswarmError
from layerswarm.routing.generate import Choices, Generator
from layerswarm.routing.grammar import Grammar, GrammarError, grammar_tokenizer
from layerswarm.routing.sampling import Constraint, SamplingConfig
from layerswarm.routing.text import ChatTokenizer


async def complete(
    gen: Generator, config: ApiConfig, admission: Admission, body: SamplingFields
) -> Response:
    """The reply to a checked request whose model was named right.

    Raises:
        ApiError: 400 for a prompt that cannot be served, 429 when the queue is full, and the
            status of a failure before the first token (`as_api_error`).
    """
    chat = isinstance(body, ChatRequest)
    limit = gen.head.config.max_position_embeddings
    try:
        # Templates and tokenizers take milliseconds per kilobyte: off the event loop.
        prompt = await asyncio.to_thread(parse_prompt, gen.tokenizer, body)
        sampling = parse_sampling(body, len(prompt), limit, config.default_max_tokens)
        grammar = parse_grammar(body)
        n, keep = parse_choices(body)
        asked_logprobs = sampling.logprobs is not None
        if n > keep and not asked_logprobs:  # best_of ranks the choices by their logprobs
            sampling = dataclasses.replace(sampling, logprobs=0)
        # The grammar's tokenizer takes 0.3 s once, a big schema's matcher up to a second.
        constraints: list[Constraint | None] = [None] * n
        if grammar is not None:
            constraints = list(await asyncio.to_thread(_open_grammars, gen, grammar, n))
    except (ValueError, LayerswarmError) as e:
        raise as_api_error(e) from None
    if len(prompt) >= limit:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens; the model's context holds {limit}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if any(not 0 <= t < gen.head.config.vocab_size for t in prompt):
        raise ApiError(400, "the prompt has token ids outside the vocabulary", param="prompt")
    texts = _token_texts(gen) if asked_logprobs else None
    shape = ReplyShape(chat, config.model_id, len(prompt), texts)
    await admission.enter()
    # One turn for the request. The choices share one prefill: the first forks its session
    # for the others (the peers share the prompt's KV pages); each samples with the request's
    # seed + its index.
    group = Choices(n) if n > 1 else None
    turn = SharedTurn(admission, n, gen, group)
    replies: list[Reply] = [
        Admitted(turn, generate(gen, prompt, _nth(sampling, i), constraints[i], group))
        for i in range(n)
    ]
    plan = parse_tools(body)
    tools = None if plan is None else plan.names
    if not body.stream:
        return JSONResponse(await collect(replies, shape, tools, keep if n > keep else 0))
    firsts = []
    try:  # wait for the first pieces, so that a failure to start gets its own status
        for reply in replies:
            firsts.append(await anext(reply))
    except Exception as e:
        for reply in replies:
            await reply.aclose()  # type: ignore[attr-defined]
        raise as_api_error(e) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventStream(stream_events(firsts, replies, shape, include_usage, tools))


class SharedTurn:
    """One turn of `Admission` held by `holders` replies: left when the last of them leaves,
    and the forks that no choice took (it ended before it began) are closed then."""

    def __init__(
        self, admission: Admission, holders: int, gen: Generator, group: Choices | None
    ) -> None:
        self.admission = admission
        self.holders = holders
        self.gen, self.group = gen, group

    def leave(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self.admission.leave()
            if self.group is not None:
                _CLOSING.add(task := asyncio.ensure_future(self.gen.net.call(self.group.aclose())))
                task.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Future[None]] = set()  # forks being closed (a task needs a reference)


def _nth(sampling: SamplingConfig, index: int) -> SamplingConfig:
    if index == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index)


def _open_grammars(gen: Generator, grammar: str, n: int) -> list[Grammar]:
    try:
        return [Grammar(grammar_tokenizer(gen.tokenizer), grammar) for _ in range(n)]
    except GrammarError as e:
        raise ApiError(400, f"the grammar does not compile: {e}", param="response_format") from None


def _token_texts(gen: Generator) -> TokenTexts:
    """One `TokenTexts` a tokenizer: its cache of token bytes outlives the request."""
    texts = _TEXTS.get(gen.tokenizer)
    if texts is None:
        texts = _TEXTS[gen.tokenizer] = TokenTexts(gen.tokenizer)
    return texts


_TEXTS: weakref.WeakKeyDictionary[ChatTokenizer, TokenTexts] = weakref.WeakKeyDictionary()
