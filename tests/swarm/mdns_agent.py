"""An mDNS test agent: announces, forges or browses on command, inside a test namespace.

    ip netns exec NS python mdns_agent.py 10.77.0.1

reads one JSON command a line on stdin and answers each with one JSON line on stdout:

    {"op": "announce", "fields": {...}, "ttl": 60, "refresh_interval": 20}
                                                        -> {"ok": true, "peer_id": ...}
    {"op": "update", "fields": {...}}                   -> {"ok": true, "started_at": ...}
    {"op": "refresh"}                                   -> {"ok": true}  (serve_refresh runs)
    {"op": "close"}                                     -> {"ok": true}  (goodbye sent)
    {"op": "forge", "kind": K, "fields": {...}}         -> {"ok": true, "name": service name}
    {"op": "browse"}                                    -> {"ok": true}
    {"op": "wait", "peer_id": P, "fields": F, "timeout": T, "newer_than": S}
        waits until the browser holds P's record with these field values, stamped after S
        (F null: until P is gone)                       -> {"ok": bool, "records": [...], ...}
    {"op": "wait_rejected", "names": [...], "timeout": T} -> {"ok": bool, "rejected": {...}, ...}

It refuses to start outside a network namespace of its own, so it never multicasts on the
machine's real interfaces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from typing import Any

import msgpack
from netns import in_test_netns
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from layerswarm.swarm.identity import Identity, generate_identity
from layerswarm.swarm.mdns import (
    SERVICE_TYPE,
    MdnsConfig,
    encode_txt,
    service_name,
)
from layerswarm.swarm.mdns_announce import MdnsAnnouncer
from layerswarm.swarm.mdns_browse import MdnsBrowser
from layerswarm.swarm.records import SIGNATURE_DOMAIN, PeerRecord, sign_record, stamped


class Agent:
    def __init__(self, address: str) -> None:
        self.config = MdnsConfig(interfaces=(address,))
        self.zc = AsyncZeroconf(interfaces=[address])
        self.identity = generate_identity()
        self.announcer: MdnsAnnouncer | None = None
        self.record: PeerRecord | None = None
        self.browser: MdnsBrowser | None = None
        self.refresher: asyncio.Future[None] | None = None
        self.changed_at = 0.0  # monotonic s of the browser's last change (one clock per machine)

    async def announce(
        self, fields: dict[str, Any], ttl: float = 60.0, refresh_interval: float = 20.0
    ) -> dict[str, Any]:
        config = dataclasses.replace(self.config, record_ttl=ttl, refresh_interval=refresh_interval)
        self.announcer = MdnsAnnouncer(self.identity, config, self.zc)
        self.record = _record(self.identity.peer_id, fields)
        await self.announcer.start(self.record)
        return {"peer_id": self.identity.peer_id}

    async def update(self, fields: dict[str, Any]) -> dict[str, Any]:
        assert self.announcer is not None
        started_at = time.monotonic()
        self.record = _record(self.identity.peer_id, fields)
        await self.announcer.update(self.record)
        return {"started_at": started_at}

    async def refresh(self) -> dict[str, Any]:
        """Keep the announcement fresh in the background, as a peer daemon does."""
        assert self.announcer is not None and self.record is not None
        record = self.record
        self.refresher = asyncio.ensure_future(self.announcer.serve_refresh(lambda: record))
        return {}

    async def close(self) -> dict[str, Any]:
        assert self.announcer is not None
        await self.announcer.close()
        return {}

    async def forge(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Announce a record that a browser must refuse, the way an attacker on the LAN could."""
        forger, victim = generate_identity(), generate_identity()
        record = stamped(_record(forger.peer_id, fields), 60.0)
        name = service_name(forger.peer_id)
        if kind == "bad_signature":
            signed = bytearray(sign_record(record, forger))
            signed[-1] ^= 1  # the signature is the last field
            signed = bytes(signed)
        elif kind == "key_mismatch":  # signed by the forger, claiming the victim's peer ID
            record = dataclasses.replace(record, peer_id=victim.peer_id)
            signed = _sign_as(record, forger)
            name = service_name(victim.peer_id)
        elif kind == "wrong_name":  # a genuine record, announced under another peer's name
            signed = sign_record(record, forger)
            name = service_name(victim.peer_id)
        elif kind == "expired":
            record = stamped(record, 60.0, now=time.time() - 120.0)
            signed = sign_record(record, forger)
        else:
            raise ValueError(kind)
        info = AsyncServiceInfo(
            SERVICE_TYPE, name, port=4000, properties=encode_txt(signed, record),
            server=f"forged-{kind.replace('_', '-')}.local.",
            parsed_addresses=[self.config.interfaces[0]],  # type: ignore[index]
        )  # fmt: skip
        # cooperating_responders skips probing (~1.2 s): nothing else uses these names
        await (await self.zc.async_register_service(info, cooperating_responders=True))
        return {"name": name}

    async def browse(self) -> dict[str, Any]:
        self.browser = MdnsBrowser(self.config, self.zc, on_change=self._changed)
        await self.browser.start()
        return {}

    def _changed(self) -> None:
        self.changed_at = time.monotonic()

    async def wait(
        self,
        peer_id: str,
        fields: dict[str, Any] | None,
        timeout: float,
        newer_than: float = 0.0,
    ) -> dict[str, Any]:
        """Wait for `peer_id`'s record with these field values, stamped after `newer_than`."""
        assert self.browser is not None

        def holds(records: list[PeerRecord]) -> bool:
            mine = [r for r in records if r.peer_id == peer_id and r.timestamp > newer_than]
            if fields is None:
                return not [r for r in records if r.peer_id == peer_id]
            return any(all(_jsonable(getattr(r, k)) == v for k, v in fields.items()) for r in mine)

        try:
            await self.browser.wait_for(holds, timeout)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc), **self.view()}
        return {"changed_at": self.changed_at, **self.view()}

    async def wait_rejected(self, names: list[str], timeout: float) -> dict[str, Any]:
        assert self.browser is not None
        deadline = time.monotonic() + timeout
        while not set(names) <= self.browser.rejected().keys():
            if time.monotonic() > deadline:
                return {"ok": False, "error": "timeout", **self.view()}
            await asyncio.sleep(0.05)
        return self.view()

    def view(self) -> dict[str, Any]:
        assert self.browser is not None
        records = [_jsonable(dataclasses.asdict(r)) for r in self.browser.records()]
        return {"records": records, "rejected": self.browser.rejected()}


def _record(peer_id: str, fields: dict[str, Any]) -> PeerRecord:
    values = {**fields, "peer_id": peer_id, "addresses": tuple(fields["addresses"])}
    return PeerRecord(**values)


def _sign_as(record: PeerRecord, signer: Identity) -> bytes:
    """Sign a record that names another peer with `signer`'s key (`sign_record` refuses)."""
    values = [getattr(record, f.name) for f in dataclasses.fields(record)]
    values[1] = list(values[1])  # addresses
    body = msgpack.packb(values, use_bin_type=True)
    signature = signer.sign(SIGNATURE_DOMAIN + body)
    return msgpack.packb([signer.public_key, body, signature], use_bin_type=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


async def main(address: str) -> None:
    agent = Agent(address)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.pop("op")
            try:
                reply = {"ok": True, **await getattr(agent, op)(**command)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        if agent.refresher is not None:
            agent.refresher.cancel()
        if agent.browser is not None:
            await agent.browser.close()
        await agent.zc.async_close()


if __name__ == "__main__":
    if not in_test_netns():
        sys.exit("mdns_agent: refusing to multicast outside a test network namespace")
    asyncio.run(main(sys.argv[1]))
