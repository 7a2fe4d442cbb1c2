"""mDNS discovery: the TXT layout, and real announcers and browsers in two network namespaces.

The network tests run `mdns_agent.py` processes inside namespaces joined by a veth pair
(`netns.py`), so nothing multicasts on this machine's interfaces; they skip where namespaces
cannot be created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import InterfaceChoice, ServiceInfo

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.mdns import (
    MAX_CHUNKS,
    SERVICE_TYPE,
    decode_txt,
    encode_txt,
    resolve_interfaces,
    service_name,
)
from layerswarm.swarm.mdns_browse import MdnsBrowser
from layerswarm.swarm.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordFault,
    sign_record,
    stamped,
    verify_record,
)

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is no package: reach netns.py beside us
from netns import Netns, netns_unavailable, run_in_netns, veth_pair

AGENT = Path(__file__).with_name("mdns_agent.py")
REPLY_TIMEOUT = 30.0  # s: an agent answers every command within this (waits are shorter)
WAIT = 10.0  # s: how long a browser may take to see a change (it takes milliseconds)
FIELDS: dict[str, Any] = {
    "addresses": ["10.77.0.1:31337"],
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_hash": "0123456789abcdef",
    "span_start": 0,
    "span_end": 15,
    "num_layers": 30,
    "dtype": "bfloat16",
    "software_version": "0.1.0",
    "protocol_version": 1,
    "free_memory_bytes": 8 * 2**30,
    "tflops": 1.5,
    "cache_tokens_free": 4096,
    "cache_tokens_total": 8192,
}


def record_of(peer_id: str, ttl: float = 60.0, **fields: Any) -> PeerRecord:
    values = {**FIELDS, **fields, "addresses": tuple(fields.get("addresses", FIELDS["addresses"]))}
    return stamped(PeerRecord(peer_id=peer_id, **values), ttl)


# --- the TXT layout, no network ------------------------------------------------------------------


def test_txt_carries_the_signed_record_in_short_strings() -> None:
    identity = generate_identity()
    record = record_of(identity.peer_id)
    signed = sign_record(record, identity)
    properties = encode_txt(signed, record)
    info = ServiceInfo(SERVICE_TYPE, service_name(identity.peer_id), properties=properties)
    assert all(len(k) + 1 + len(v) <= 255 for k, v in properties.items())
    assert len(info.text) < 700  # one packet with room to spare
    received = ServiceInfo(SERVICE_TYPE, info.name, properties=info.text).properties
    assert received[b"id"] == identity.peer_id.encode()
    assert received[b"span"] == b"0:15"
    assert verify_record(decode_txt(received)) == record


def test_the_largest_record_fits_the_txt_layout() -> None:
    identity = generate_identity()
    record = record_of(
        identity.peer_id,
        model="m" * 128,
        addresses=[f"[fe80::1234:5678:9abc:{i}%eth0]:65535" for i in range(4)],
        software_version="v" * 32,
    )
    signed = sign_record(record, identity)
    assert len(signed) <= MAX_RECORD_BYTES
    properties = encode_txt(signed, record)
    assert len([k for k in properties if k.startswith(b"r")]) <= MAX_CHUNKS
    assert all(len(k) + 1 + len(v) <= 255 for k, v in properties.items())
    assert decode_txt(properties) == signed


@pytest.mark.parametrize(
    "properties",
    [{}, {b"r1": b"AAAA"}, {b"r0": b"not base64!"}, {b"r0": None}],
    ids=["none", "no-first-chunk", "not-base64", "empty-value"],
)
def test_txt_without_a_readable_record_is_refused(properties: dict[bytes, bytes | None]) -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode_txt(properties)
    assert caught.value.reason == RecordFault.MALFORMED


def test_interfaces_are_addresses_or_interface_names() -> None:
    assert resolve_interfaces(InterfaceChoice.All) is InterfaceChoice.All
    assert resolve_interfaces(("10.77.0.1",)) == ["10.77.0.1"]
    assert resolve_interfaces(("lo",)) == ["127.0.0.1"]
    with pytest.raises(LayerswarmError, match="no network interface"):
        resolve_interfaces(("no-such-interface0",))


def test_browser_keeps_the_newest_record_and_drops_it_when_it_expires() -> None:
    identity = generate_identity()
    name = service_name(identity.peer_id)

    def txt(record: PeerRecord) -> bytes:
        properties = encode_txt(sign_record(record, identity), record)
        return ServiceInfo(SERVICE_TYPE, name, properties=properties).text

    async def main() -> None:
        changes: list[int] = []
        browser = MdnsBrowser(on_change=lambda: changes.append(len(browser.records())))
        old = record_of(identity.peer_id, ttl=60.0, span_end=10)
        new = record_of(identity.peer_id, ttl=0.3, span_end=20)
        browser._consider(name, [txt(old), txt(new)])  # an update can leave both cached
        assert browser.records() == [new]
        browser._consider(name, [txt(old)])  # a replay of the older record
        assert browser.records() == [new]
        await browser.wait_for(lambda records: not records, timeout=WAIT)
        assert browser.rejected()[name].startswith(RecordFault.EXPIRED)
        assert changes[0] == 1 and changes[-1] == 0
        await browser.close()

    asyncio.run(main())


# --- real announcers and browsers, in two namespaces joined by a veth pair ---------------------


class Agent:
    """An `mdns_agent.py` process in a namespace: `call(op, **args)` returns its JSON reply."""

    def __init__(self, ns: Netns, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as stderr:
            self.proc = run_in_netns(
                ns,
                [sys.executable, str(AGENT), ns.address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self._buffer = b""

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._read_line())
        return reply

    def stop(self) -> None:
        """End the agent (EOF makes it close zeroconf, saying goodbye) and close its pipes."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Stop at once, with no goodbye (a crash, as far as the LAN can tell)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=REPLY_TIMEOUT)

    def _read_line(self) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"agent did not answer: {self._stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"agent exited: {self._stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[Netns, Netns]]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"mDNS tests run only inside network namespaces: {reason}")
    with veth_pair() as pair:
        yield pair


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[[Netns], Agent]]:
    agents: list[Agent] = []

    def start(ns: Netns) -> Agent:
        agents.append(Agent(ns, tmp_path / f"agent{len(agents)}.stderr"))
        return agents[-1]

    yield start
    for agent in agents:
        agent.stop()


def test_browser_sees_a_peer_arrive_change_and_leave(
    namespaces: tuple[Netns, Netns], start_agent: Callable[[Netns], Agent]
) -> None:
    a, b = namespaces
    browser, announcer = start_agent(b), start_agent(a)
    assert browser.call("browse")["ok"]
    peer_id = announcer.call("announce", fields=FIELDS)["peer_id"]

    seen = browser.call("wait", peer_id=peer_id, fields={"span_end": 15}, timeout=WAIT)
    assert seen["ok"], seen
    [record] = seen["records"]
    assert {k: record[k] for k in FIELDS} == FIELDS
    assert record["peer_id"] == peer_id

    changed = {**FIELDS, "span_start": 15, "span_end": 30, "free_memory_bytes": 2**30, "load": 2}
    update = announcer.call("update", fields=changed)
    want = {"span_start": 15, "span_end": 30, "free_memory_bytes": 2**30, "load": 2}
    seen = browser.call("wait", peer_id=peer_id, fields=want, timeout=WAIT)
    assert seen["ok"], seen
    delay = seen["changed_at"] - update["started_at"]
    print(f"update seen {1000 * delay:.1f} ms after update() began")  # -s shows it; no assert

    assert announcer.call("close")["ok"]
    gone = browser.call("wait", peer_id=peer_id, fields=None, timeout=WAIT)
    assert gone["ok"], gone
    assert gone["rejected"] == {}


def test_browser_ignores_forged_records(
    namespaces: tuple[Netns, Netns], start_agent: Callable[[Netns], Agent]
) -> None:
    a, b = namespaces
    announcer = start_agent(a)
    genuine = announcer.call("announce", fields=FIELDS)["peer_id"]
    expected = {
        "bad_signature": RecordFault.BAD_SIGNATURE,
        "key_mismatch": RecordFault.KEY_MISMATCH,
        "wrong_name": RecordFault.KEY_MISMATCH,
        "expired": RecordFault.EXPIRED,
    }
    names = {kind: announcer.call("forge", kind=kind, fields=FIELDS)["name"] for kind in expected}

    browser = start_agent(b)  # starts after them all: it learns of them by asking
    assert browser.call("browse")["ok"]
    seen = browser.call("wait", peer_id=genuine, fields={}, timeout=WAIT)
    assert seen["ok"], seen
    view = browser.call("wait_rejected", names=list(names.values()), timeout=WAIT)
    assert view["ok"], view
    assert [r["peer_id"] for r in view["records"]] == [genuine]
    for kind, reason in expected.items():
        assert view["rejected"][names[kind]].startswith(f"{reason}:"), (kind, view["rejected"])


def test_a_peer_that_dies_without_goodbye_expires(
    namespaces: tuple[Netns, Netns], start_agent: Callable[[Netns], Agent]
) -> None:
    a, b = namespaces
    browser, announcer = start_agent(b), start_agent(a)
    assert browser.call("browse")["ok"]
    ttl = 3.0  # s: the record's validity; the agent re-signs it every refresh_interval (1 s)
    peer_id = announcer.call("announce", fields=FIELDS, ttl=ttl, refresh_interval=1.0)["peer_id"]
    first = browser.call("wait", peer_id=peer_id, fields={}, timeout=WAIT)
    assert first["ok"], first
    assert announcer.call("refresh")["ok"]

    # Refreshed: held past the first record's expiry, by a record signed after it.
    first_expiry = first["records"][0]["expires_at"]
    kept = browser.call("wait", peer_id=peer_id, fields={}, newer_than=first_expiry, timeout=WAIT)
    assert kept["ok"], kept

    announcer.kill()
    gone = browser.call("wait", peer_id=peer_id, fields=None, timeout=WAIT)
    assert gone["ok"], gone
    assert gone["rejected"][service_name(peer_id)].startswith(f"{RecordFault.EXPIRED}:")
