"""Answer one completion request: its prompt and sampling, a turn to run, then the reply as
one JSON object or as server-sent events."""

from __future__ import annotations

import asyncio
import weakref

from starlette.responses import JSONResponse, Response

from layerswarm.cli.api_logprobs import TokenTexts
from layerswarm.cli.api_params import (
    ChatRequest,
    SamplingFields,
    parse_grammar,
    parse_prompt,
    parse_sampling,
    parse_tools,
)
from layerswarm.cli.api_replies import Admission, EventStream, admitted, as_api_error, generate
from layerswarm.cli.api_server import ApiConfig, ApiError
from layerswarm.cli.api_shapes import ReplyShape, collect, stream_events
from layerswarm.errors import LayerswarmError
from layerswarm.routing.generate import Generator
from layerswarm.routing.grammar import Grammar, GrammarError, grammar_tokenizer
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
        # The grammar's tokenizer takes 0.3 s once, a big schema's matcher up to a second.
        constraint = (
            None if grammar is None else await asyncio.to_thread(_open_grammar, gen, grammar)
        )
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
    texts = _token_texts(gen) if sampling.logprobs is not None else None
    shape = ReplyShape(chat, config.model_id, len(prompt), texts)
    await admission.enter()
    pieces = admitted(admission, generate(gen, prompt, sampling, constraint))
    plan = parse_tools(body)
    tools = None if plan is None else plan.names
    if not body.stream:
        return JSONResponse(await collect(pieces, shape, tools))
    try:  # wait for the first piece, so that a failure to start gets its own status
        first = await anext(pieces)
    except Exception as e:
        await pieces.aclose()  # type: ignore[attr-defined]
        raise as_api_error(e) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventStream(stream_events(first, pieces, shape, include_usage, tools))


def _open_grammar(gen: Generator, grammar: str) -> Grammar:
    try:
        return Grammar(grammar_tokenizer(gen.tokenizer), grammar)
    except GrammarError as e:
        raise ApiError(400, f"the grammar does not compile: {e}", param="response_format") from None


def _token_texts(gen: Generator) -> TokenTexts:
    """One `TokenTexts` a tokenizer: its cache of token bytes outlives the request."""
    texts = _TEXTS.get(gen.tokenizer)
    if texts is None:
        texts = _TEXTS[gen.tokenizer] = TokenTexts(gen.tokenizer)
    return texts


_TEXTS: weakref.WeakKeyDictionary[ChatTokenizer, TokenTexts] = weakref.WeakKeyDictionary()
