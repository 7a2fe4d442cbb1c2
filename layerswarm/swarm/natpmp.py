"""Port mapping over NAT-PMP (RFC 6886): a few bytes over UDP to the gateway's port 5351, what
`--upnp` falls back to where the router answers no UPnP-IGD discovery.

Three requests, all big-endian (RFC 6886 sections 3.2 and 3.3): the external address (`0 0`,
answered `0 128 result epoch ip`), a TCP mapping (`0 2 0 0 internal external lifetime`,
answered `0 130 result epoch internal external lifetime`), and its removal (the same with
lifetime 0). A request is resent after 250 ms, doubling, as section 3.1 says (4 tries here, not
9: a router that has not answered in 3.75 s speaks no NAT-PMP). A mapping lives `lifetime`
seconds unless renewed: `UpnpMapper.renew` asks again past half of it.

PCP (RFC 6887), NAT-PMP's successor, is not spoken: routers that speak PCP (miniupnpd among
them) answer NAT-PMP too.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

from layerswarm.errors import LayerswarmError

NATPMP_PORT = 5351  # the gateway's NAT-PMP port (RFC 6886)
LIFETIME = 7200  # unit: s a mapping is asked for (RFC 6886's recommendation)
FIRST_WAIT = 0.25  # unit: s before the first resend, doubling after each
TRIES = 4
OP_ADDRESS, OP_MAP_TCP = 0, 2
RESULTS = {
    1: "unsupported version",
    2: "not authorized (mapping disabled on the router)",
    3: "network failure (the router has no external address)",
    4: "out of resources",
    5: "unsupported opcode",
}


class NatPmpError(LayerswarmError):
    """The gateway did not answer NAT-PMP, or refused."""


@dataclass(frozen=True)
class NatPmpMapping:
    external_port: int
    internal_port: int
    lifetime: int  # unit: s the gateway keeps it unless renewed


def default_gateway(route_table: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway, from the kernel's routing table; None if there is none."""
    try:
        with open(route_table) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.answers.put_nowait(data)


async def exchange(gateway: str, request: bytes, port: int = NATPMP_PORT) -> tuple[bytes, str]:
    """Send `request` to the gateway (resending as RFC 6886 says); its answer to that opcode,
    and this side's local address towards it.

    Raises:
        NatPmpError: no answer after TRIES sends, or a result code other than success.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Answers, remote_addr=(gateway, port))
    try:
        local = str(transport.get_extra_info("sockname")[0])
        wait = FIRST_WAIT
        for _ in range(TRIES):
            transport.sendto(request)
            try:
                async with asyncio.timeout(wait):
                    while True:
                        answer = await protocol.answers.get()
                        if len(answer) >= 8 and answer[0] == 0 and answer[1] == 128 + request[1]:
                            break
            except TimeoutError:
                wait *= 2
                continue
            (result,) = struct.unpack_from(">H", answer, 2)
            if result:
                why = RESULTS.get(result, f"result {result}")
                raise NatPmpError(f"NAT-PMP: the gateway refused: {why}")
            return answer, local
    finally:
        transport.close()
    raise NatPmpError(f"NAT-PMP: no answer from the gateway {gateway}:{port}")


async def external_address(gateway: str, port: int = NATPMP_PORT) -> tuple[str, str]:
    """The gateway's external IPv4 address, and this side's address towards the gateway."""
    answer, local = await exchange(gateway, struct.pack(">BB", 0, OP_ADDRESS), port)
    if len(answer) < 12:
        raise NatPmpError("NAT-PMP: a short external address answer")
    return socket.inet_ntoa(answer[8:12]), local


async def map_tcp(
    gateway: str, internal: int, external: int, lifetime: int = LIFETIME, port: int = NATPMP_PORT
) -> NatPmpMapping:
    """Ask the gateway to forward TCP `external` (a wish: it may pick another) to `internal`
    on this host; lifetime 0 removes the mapping of `internal`."""
    request = struct.pack(">BBHHHI", 0, OP_MAP_TCP, 0, internal, external, lifetime)
    answer, _ = await exchange(gateway, request, port)
    if len(answer) < 16:
        raise NatPmpError("NAT-PMP: a short mapping answer")
    got_internal, got_external, got_lifetime = struct.unpack_from(">HHI", answer, 8)
    if got_internal != internal:
        raise NatPmpError(f"NAT-PMP: the gateway mapped port {got_internal}, not {internal}")
    return NatPmpMapping(got_external, got_internal, got_lifetime)
