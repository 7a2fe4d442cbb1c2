"""NAT-PMP's few bytes (RFC 6886) against a fake gateway on loopback; miniupnpd in a router
namespace answers them for real in `test_nat.py`."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from layerswarm.swarm.natpmp import (
    NatPmpError,
    default_gateway,
    exchange,
    external_address,
    map_tcp,
)


class FakeGateway(asyncio.DatagramProtocol):
    """Answers NAT-PMP as RFC 6886 lays it out; drops the first `drop` requests."""

    def __init__(self, drop: int = 0, refuse: int = 0) -> None:
        self.drop, self.refuse = drop, refuse
        self.requests: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.requests.append(data)
        if len(self.requests) <= self.drop:
            return
        assert self.transport is not None
        op = data[1]
        if op == 0:
            answer = struct.pack(">BBHI", 0, 128, self.refuse, 7) + bytes([203, 0, 113, 9])
        else:
            _, _, _, internal, external, lifetime = struct.unpack(">BBHHHI", data)
            answer = struct.pack(">BBHIHHI", 0, 130, self.refuse, 7, internal, external, lifetime)
        self.transport.sendto(answer, addr)


async def gateway(**kwargs: int) -> tuple[FakeGateway, int, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, fake = await loop.create_datagram_endpoint(
        lambda: FakeGateway(**kwargs), local_addr=("127.0.0.1", 0)
    )
    return fake, transport.get_extra_info("sockname")[1], transport


def test_external_address_map_and_unmap_over_natpmp() -> None:
    async def main() -> None:
        fake, port, transport = await gateway()
        try:
            ip, local = await external_address("127.0.0.1", port)
            assert (ip, local) == ("203.0.113.9", "127.0.0.1")
            lease = await map_tcp("127.0.0.1", 7000, 7000, 7200, port)
            assert (lease.external_port, lease.internal_port, lease.lifetime) == (7000, 7000, 7200)
            await map_tcp("127.0.0.1", 7000, 0, 0, port)
            assert fake.requests[-1] == struct.pack(">BBHHHI", 0, 2, 0, 7000, 0, 0)
        finally:
            transport.close()

    asyncio.run(main())


def test_a_lost_request_is_sent_again_and_a_refusal_says_why() -> None:
    async def main() -> None:
        fake, port, transport = await gateway(drop=2)
        try:
            await external_address("127.0.0.1", port)
            assert len(fake.requests) == 3  # 250 ms, then 500 ms, then answered
        finally:
            transport.close()
        fake, port, transport = await gateway(refuse=2)
        try:
            with pytest.raises(NatPmpError, match="not authorized"):
                await map_tcp("127.0.0.1", 7000, 7000, 7200, port)
        finally:
            transport.close()

    asyncio.run(main())


def test_no_gateway_answering_is_a_clear_error() -> None:
    async def main() -> None:
        _, port, transport = await gateway(drop=99)
        try:
            with pytest.raises(NatPmpError, match="no answer"):
                await exchange("127.0.0.1", b"\0\0", port)
        finally:
            transport.close()

    asyncio.run(main())


def test_default_gateway_reads_the_kernels_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t0065000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t0100650A\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_gateway(str(table)) == "10.101.0.1"
    assert default_gateway(str(tmp_path / "none")) is None
