"""`swarm-api` in front of a real local swarm, driven by the official `openai` client."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from layerswarm.cli.api import parse_args
from layerswarm.cli.api_params import parse_sampling
from layerswarm.cli.api_server import ApiError
from layerswarm.peer.launch import LocalSwarm, start_peers
from layerswarm.routing.sampling import SamplingConfig
from layerswarm.shards.config import Span

openai = pytest.importorskip("openai")
OpenApi = Callable[..., AbstractContextManager[str]]

KEY = "test-key-123"
HALVES = [Span(0, 15), Span(0, 15), Span(15, 30), Span(15, 30)]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


# --- request checks: table-driven, no model ------------------------------------------------------

SAMPLING_CASES = [
    # (body, expected SamplingConfig)
    ({}, SamplingConfig(max_new_tokens=90, temperature=1.0)),
    (
        {"max_tokens": 5, "temperature": 0, "seed": 3, "stop": "\n"},
        SamplingConfig(max_new_tokens=5, temperature=0.0, seed=3, stop=("\n",)),
    ),
    (
        {"max_completion_tokens": 7, "top_p": 0.5, "stop": ["a", "b"], "presence_penalty": 1},
        SamplingConfig(
            max_new_tokens=7, temperature=1.0, top_p=0.5, stop=("a", "b"), presence_penalty=1.0
        ),
    ),
    (
        {"frequency_penalty": -0.5, "presence_penalty": 0.25},
        SamplingConfig(
            max_new_tokens=90, temperature=1.0, frequency_penalty=-0.5, presence_penalty=0.25
        ),
    ),
    ({"top_p": 0, "n": 1}, SamplingConfig(max_new_tokens=90, temperature=0.0)),
]


@pytest.mark.parametrize(("body", "expected"), SAMPLING_CASES)
def test_request_fields_become_a_sampling_config(
    body: dict[str, Any], expected: SamplingConfig
) -> None:
    assert parse_sampling(body, prompt_tokens=10, context=100, default_max=None) == expected


BAD_CASES = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CASES)
def test_bad_request_fields_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_sampling(body, prompt_tokens=10, context=100, default_max=None)
    assert e.value.status == 400 and e.value.param == param


def test_arguments_keep_swarm_chat_defaults_for_the_rest() -> None:
    args = parse_args(["--peer", "127.0.0.1:1", "--port", "0", "--api-key", "k"])
    assert (args.peer, args.port, args.api_key, args.host) == (["127.0.0.1:1"], 0, "k", "127.0.0.1")
    assert args.local is False and args.mdns_interface is None and args.bootstrap == []
    assert hasattr(args, "temperature")  # swarm-chat's, for open_generator's sake
    with pytest.raises(SystemExit):
        parse_args(["--local", "--peer", "127.0.0.1:1"])


def test_the_swarm_client_options_of_swarm_chat_reach_swarm_api() -> None:
    client = ["--relay", "--verify-fraction", "0.1", "--verify-locally", "--speculate", "lookup"]
    args = parse_args(["--peer", "127.0.0.1:1", *client, "--device", "cpu"])
    assert args.relay and args.verify_fraction == 0.1 and args.verify_locally
    assert args.speculate == "lookup" and args.device == "cpu"
    from layerswarm.cli.chat import client_config

    assert client_config(args, False).prefix_cache  # on unless asked
    plain = parse_args(["--peer", "127.0.0.1:1", "--no-prefix-cache"])
    assert not client_config(plain, False).prefix_cache


# --- the server in front of a swarm --------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    # --verbose: a peer's log then says when it opens a session, so a test can tell which
    # peers a reply is using.
    with start_peers(smollm2_dir, HALVES, tmp_path_factory.mktemp("api"), ["--verbose"]) as s:
        yield s


@pytest.fixture(scope="module")
def api_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-log") / "swarm-api.log"


@pytest.fixture(scope="module")
def api_url(
    smollm2_dir: Path, swarm: LocalSwarm, api_log: Path, open_api: OpenApi
) -> Iterator[str]:
    with open_api(smollm2_dir, swarm.addresses, ("--api-key", KEY), api_log) as url:
        yield url


@pytest.fixture(scope="module")
def client(api_url: str) -> Any:
    return openai.OpenAI(base_url=api_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: Any) -> str:
    return str(client.models.list().data[0].id)


def test_lists_the_served_model(client: Any, smollm2_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2_dir.name]
    assert client.models.retrieve(smollm2_dir.name).id == smollm2_dir.name


def test_chat_completion_answers_with_usage(client: Any, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=32
    )
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_completion_matches_the_whole_reply(client: Any, model: str) -> None:
    args: dict[str, Any] = {"model": model, "messages": FRANCE, "temperature": 0, "max_tokens": 32}
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stops_at_length_and_at_a_stop_string(client: Any, model: str) -> None:
    args: dict[str, Any] = {"model": model, "prompt": "The capital of France is", "temperature": 0}
    long = client.completions.create(**args, max_tokens=12)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 12
    assert "Paris" in long.choices[0].text
    cut = client.completions.create(**args, max_tokens=12, stop=["Paris"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == long.choices[0].text.split("Paris")[0]


def test_concurrent_requests_all_answer_correctly(client: Any, model: str) -> None:
    def ask(n: int) -> str:
        messages = [{"role": "user", "content": f"What is {n} plus {n}?"}] if n else FRANCE
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=24
        )
        return str(reply.choices[0].message.content)

    alone = [ask(n) for n in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, range(3)))
    assert together == alone
    assert "Paris" in together[0]


def test_bad_requests_get_openai_errors(client: Any, model: str, api_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert e404.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.post("/chat/completions", body={"messages": FRANCE}, cast_to=object)
    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model=model, messages=FRANCE, temperature=-1)
    assert e400.value.body["param"] == "temperature"
    assert e400.value.body["type"] == "invalid_request_error"
    too_long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=model, messages=too_long, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded"
    wrong = openai.OpenAI(base_url=api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e401:
        wrong.models.list()
    assert e401.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.get("/nothing-here", cast_to=object)


def test_a_client_that_goes_away_stops_its_reply(client: Any, model: str, api_log: Path) -> None:
    stream = client.completions.create(
        model=model, prompt="1, 2, 3, 4,", temperature=0, max_tokens=2000, stream=True
    )
    for n, _ in enumerate(stream):
        if n == 5:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while "a client went away" not in api_log.read_text():
        assert time.monotonic() < deadline, api_log.read_text()[-2000:]
        time.sleep(0.1)
    # The server goes on serving.
    reply = client.completions.create(model=model, prompt="1, 2, 3,", temperature=0, max_tokens=4)
    assert reply.choices[0].text.startswith(" 4")


def test_a_missing_span_is_a_503(
    smollm2_dir: Path, swarm: LocalSwarm, model: str, open_api: OpenApi
) -> None:
    first_half = [p.address for p in swarm.peers if p.span == Span(0, 15)]
    # the layers are waited for up to --route-wait before the 503 (30 s by default)
    with open_api(smollm2_dir, first_half, ("--route-wait", "1")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model=model, messages=FRANCE, stream=stream)
            assert e.value.status_code == 503
            assert "no peer serves layers 15-29" in e.value.body["message"]


def first_hops_in_flight(api_url: str) -> set[str]:
    """The host:port of each in-flight reply's first hop, as swarm-api's dashboard shows them
    (a peer's own log cannot tell: replicas also serve the shadow sessions of checked steps)."""
    root = api_url.rsplit("/v1", 1)[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    state = httpx.get(f"{root}/dashboard/state", headers=auth, timeout=30).json()
    return {r["hops"][0]["address"].split("/")[0] for r in state["routes"] if r["hops"]}


STEPS = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 4,
            "maxItems": 6,
        }
    },
    "required": ["steps"],
    "additionalProperties": False,
}
BREAD = [{"role": "user", "content": "List the steps to bake bread, as JSON."}]
STEPS_FORMAT = {"type": "json_schema", "json_schema": {"name": "steps", "schema": STEPS}}


def test_json_schema_and_a_forced_tool_call_through_the_swarm(client: Any, model: str) -> None:
    import json

    import jsonschema

    reply = client.chat.completions.create(
        model=model, messages=BREAD, response_format=STEPS_FORMAT, temperature=0, max_tokens=200
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), STEPS)
    tool = {"type": "function", "function": {"name": "bake", "parameters": STEPS}}
    called = client.chat.completions.create(
        model=model,
        messages=BREAD,
        tools=[tool],
        tool_choice="required",
        temperature=0,  # sampled, a call can outrun max_tokens before it closes (seen once)
        max_tokens=200,
    )
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "bake"
    jsonschema.validate(json.loads(call.function.arguments), STEPS)


def test_stream_survives_kill_9_of_a_peer_in_use(
    client: Any, model: str, swarm: LocalSwarm, api_url: str
) -> None:
    # Near the end of this file: it leaves the swarm one peer short.
    args: dict[str, Any] = {"model": model, "messages": STORY, "temperature": 0, "max_tokens": 96}
    undisturbed = client.chat.completions.create(**args)
    assert undisturbed.choices[0].finish_reason == "length"  # the kill lands mid-reply
    pieces, reasons = [], []
    for n, chunk in enumerate(client.chat.completions.create(**args, stream=True)):
        if n == 30:
            in_use = first_hops_in_flight(api_url)
            first_hop = [p for p in swarm.peers if p.address.split("/")[0] in in_use]
            assert len(first_hop) == 1 and first_hop[0].span == Span(0, 15), (
                in_use,
                swarm.addresses,
            )
            first_hop[0].stop(signal.SIGKILL)
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert first_hop[0].process.returncode == -signal.SIGKILL
    assert "".join(pieces) == undisturbed.choices[0].message.content
    assert reasons[-1] == "length"


def test_a_json_schema_stream_survives_kill_9_of_its_last_hop(
    client: Any, model: str, swarm: LocalSwarm, api_url: str
) -> None:
    """The grammar's state lives in the client's sampler: a failover leaves it as it was."""
    import json

    import jsonschema

    args: dict[str, Any] = {
        "model": model,
        "messages": BREAD,
        "response_format": STEPS_FORMAT,
        "temperature": 0,
        "max_tokens": 200,
    }
    undisturbed = client.chat.completions.create(**args)
    assert undisturbed.usage.completion_tokens > 20  # the kill lands mid-reply
    pieces = []
    for n, chunk in enumerate(client.chat.completions.create(**args, stream=True)):
        if n == 8:
            root = api_url.rsplit("/v1", 1)[0]
            auth = {"Authorization": f"Bearer {KEY}"}
            state = httpx.get(f"{root}/dashboard/state", headers=auth, timeout=30).json()
            in_use = {r["hops"][-1]["address"].split("/")[0] for r in state["routes"] if r["hops"]}
            last_hop = [p for p in swarm.peers if p.address.split("/")[0] in in_use]
            assert len(last_hop) == 1 and last_hop[0].span == Span(15, 30), in_use
            last_hop[0].stop(signal.SIGKILL)
        pieces.append(chunk.choices[0].delta.content or "")
    assert last_hop[0].process.returncode == -signal.SIGKILL
    assert "".join(pieces) == undisturbed.choices[0].message.content
    jsonschema.validate(json.loads("".join(pieces)), STEPS)


@pytest.fixture(scope="module")
def two_peers(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    spans = [Span(0, 15), Span(15, 30)]
    with start_peers(smollm2_dir, spans, tmp_path_factory.mktemp("api-2")) as swarm:
        yield swarm


def test_eight_concurrent_chat_completions_without_max_tokens_all_answer(
    smollm2_dir: Path, two_peers: LocalSwarm, open_api: OpenApi
) -> None:
    """As tools send them: no max_tokens, so each asks for the rest of the 8,192-token context.
    Peers take KV pages as sessions grow, so all eight fit (a reservation each did not)."""
    with open_api(smollm2_dir, two_peers.addresses) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        model = str(client.models.list().data[0].id)

        def ask(_: int) -> Any:
            return client.chat.completions.create(model=model, messages=FRANCE, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
    texts = [r.choices[0].message.content for r in replies]
    assert all("Paris" in t for t in texts), texts
    assert len(set(texts)) == 1  # greedy: the same question gets the same answer
    assert all(r.choices[0].finish_reason == "stop" for r in replies)


def test_a_full_queue_answers_429_and_the_openai_client_retries(
    smollm2_dir: Path, two_peers: LocalSwarm, open_api: OpenApi
) -> None:
    extra = ("--max-active", "1", "--max-waiting", "0")
    with open_api(smollm2_dir, two_peers.addresses, extra) as url:
        hasty = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        # Retry-After is 2 s: 30 retries wait a minute, for the others' replies on a busy host.
        patient = openai.OpenAI(base_url=url, api_key="none", max_retries=30, timeout=300)
        model = str(hasty.models.list().data[0].id)
        args: dict[str, Any] = {"model": model, "prompt": "Once upon a time", "max_tokens": 16}

        def ask(client: Any) -> Any:
            try:
                return client.completions.create(**args)
            except openai.RateLimitError as e:
                return e

        with ThreadPoolExecutor(3) as pool:
            hasty_replies = list(pool.map(ask, [hasty] * 3))
        refused = [r for r in hasty_replies if isinstance(r, openai.RateLimitError)]
        assert refused, "three requests at once, one allowed: some must be told to come back"
        assert refused[0].response.headers["retry-after"] == "2"
        assert "busy" in refused[0].message
        with ThreadPoolExecutor(3) as pool:
            patient_replies = list(pool.map(ask, [patient] * 3))
        assert all(r.choices[0].finish_reason == "length" for r in patient_replies)
