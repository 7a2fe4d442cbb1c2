"""`swarm-api` against strangers: idle connections, a slowloris client, too many headers, a body
sent without a key; each gets its refusal while a good request still succeeds. (TLS is tested
with the dashboard: tests/cli/test_dashboard.py.)"""

from __future__ import annotations

import json
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "limits-key"
PER_IP = 50
HEAD_TIMEOUT = 3.0  # s; generous for a loaded host, the test waits for the refusal, not a time
STRANGER = "127.0.0.2"  # loopback is all of 127/8: another client address, for the per-IP cap


@pytest.fixture(scope="module")
def api(
    smollm2_dir: Path, open_api: Callable[..., AbstractContextManager[str]]
) -> Iterator[tuple[str, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # the server inherits it
    extra = ("--local", "--api-key", KEY, "--max-connections-per-ip", str(PER_IP))
    extra += ("--head-timeout", str(HEAD_TIMEOUT), "--max-headers", "64")
    with open_api(smollm2_dir, [], extra) as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        yield host, int(port)


def good_request(api: tuple[str, int]) -> int:
    url = f"http://{api[0]}:{api[1]}/v1"
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    return len(client.models.list().data)


def read_reply(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """Everything the server sends until it closes (a reset after its reply ends it too)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def error_of(reply: bytes) -> dict[str, object]:
    return dict(json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"])


def test_idle_connections_past_the_cap_are_refused_and_the_rest_time_out(
    api: tuple[str, int],
) -> None:
    idle = []
    t0 = time.monotonic()
    for _ in range(1000):
        s = socket.socket()
        s.bind((STRANGER, 0))
        s.connect(api)
        idle.append(s)
    quick = time.monotonic() - t0 < HEAD_TIMEOUT  # no held one timed out while we connected
    try:
        assert good_request(api) == 1  # meanwhile, from another address
        replies = [read_reply(s) for s in idle]
    finally:
        for s in idle:
            s.close()
    statuses = [status_of(r) for r in replies]
    assert set(statuses) == {503, 408}, sorted(set(statuses))
    assert statuses.count(408) >= PER_IP  # held, until their headers were late
    if quick:  # else the first held ones timed out meanwhile, and others took their places
        assert statuses.count(503) == 1000 - PER_IP
    refused = next(r for r in replies if status_of(r) == 503)
    assert b"Retry-After: 5" in refused
    assert "too many connections from 127.0.0.2" in str(error_of(refused)["message"])
    assert good_request(api) == 1


def test_a_slowloris_client_is_cut_off_while_others_are_served(api: tuple[str, int]) -> None:
    sock = socket.create_connection(api)
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    got: list[bytes] = []

    def drip() -> None:  # one byte every 0.2 s: each keeps uvicorn's own timer from firing
        try:
            for byte in head + b"\r\nX-Slow: " + b"a" * 1000:
                if select.select([sock], [], [], 0.2)[0]:
                    return  # the server answered: stop before a byte meets a closed socket
                sock.send(bytes([byte]))
        except OSError:
            pass  # cut off

    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    assert good_request(api) == 1
    got.append(read_reply(sock))
    sock.close()
    dripping.join(10)
    assert status_of(got[0]) == 408
    assert error_of(got[0])["code"] == "request_timeout"


def test_too_many_headers_get_431(api: tuple[str, int]) -> None:
    pads = {f"X-Pad-{i}": "x" for i in range(100)}
    reply = httpx.get(f"http://{api[0]}:{api[1]}/v1/models", headers=pads)
    assert reply.status_code == 431
    assert "at most 64 headers" in reply.json()["error"]["message"]
    huge = httpx.get(f"http://{api[0]}:{api[1]}/v1/models", headers={"X-Big": "y" * 20000})
    assert huge.status_code == 431
    assert good_request(api) == 1


def test_the_key_is_checked_before_the_body_is_read(api: tuple[str, int]) -> None:
    for key, status in (("wrong", 401), (KEY, 413)):
        sock = socket.create_connection(api)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {64 * 2**20}\r\n\r\n".encode()
        )  # and no body: the answer comes without it
        reply = read_reply(sock)
        sock.close()
        assert status_of(reply) == status, reply[:200]
    assert good_request(api) == 1
