"""`swarm-peer status`: which peers the swarm has, and which of the model's layers they serve.

    swarm-peer status --model smollm2-135m          # peers announcing on the LAN (mDNS)
    swarm-peer status --model M --bootstrap /ip4/203.0.113.5/tcp/4001/p2p/12D3KooW...
    swarm-peer status --json                         # every record seen, for scripts

It reads the same signed records that clients route by (each verified before it is shown), so
what it prints is what a client would see from here. It only listens: it announces nothing, and
its DHT node has an identity made up for the occasion.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import socket
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

from zeroconf import InterfaceChoice

from layerswarm.cli.common import (
    default_cache_dir,
    mdns_interfaces,
    read_swarm_key,
    resolve_model_cli,
    setup_logging,
)
from layerswarm.swarm.discovery import DhtLookup, RecordSource, dht_key, merged
from layerswarm.swarm.mdns import MdnsConfig
from layerswarm.swarm.mdns_browse import MdnsBrowser
from layerswarm.swarm.records import PeerRecord

MODEL_HASH = re.compile(r"[0-9a-f]{16}")
FEW_REPLICAS = 10  # peers per layer shown as a digit; this many or more show as "+"
SHORT_ID = 8  # characters of a peer ID shown (its end: the start is the same for every peer)
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
COLUMNS = (
    "PEER", "ADDRESS", "REACH", "LAYERS", "DTYPE", "FREE MEM", "TFLOPS", "STEPS/S/LAYER",
    "CACHE FREE/TOTAL", "LOAD", "AGE",
)  # fmt: skip
RIGHT_ALIGNED = frozenset(COLUMNS[5:])  # the numbers


# --- rendering: pure functions of the records ---------------------------------------------------


def layer_counts(records: Sequence[PeerRecord], num_layers: int) -> list[int]:
    """How many of `records` serve each layer of `[0, num_layers)`."""
    counts = [0] * num_layers
    for r in records:
        for layer in range(max(0, r.span_start), min(r.span_end, num_layers)):
            counts[layer] += 1
    return counts


def unserved_spans(counts: Sequence[int]) -> list[tuple[int, int]]:
    """The half-open spans `(start, end)` of layers that no peer serves, in order."""
    spans: list[tuple[int, int]] = []
    for layer, count in enumerate(counts):
        if count:
            continue
        if spans and spans[-1][1] == layer:
            spans[-1] = (spans[-1][0], layer + 1)
        else:
            spans.append((layer, layer + 1))
    return spans


def render_status(records: Sequence[PeerRecord], num_layers: int, now: float) -> str:
    """What `swarm-peer status` prints for one model: a table of peers and a coverage bar.

    Args:
        records: verified records of one model's peers, in any order.
        num_layers: layers of the whole model.
        now: unix s, to show each record's age.

    Returns:
        lines of text ending in a newline: a heading, one row per peer (sorted by span), the
        coverage bar (one character per layer: how many peers serve it, "." for none) and a
        line naming the unserved spans, or saying that every layer is served.
    """
    rows = sorted(records, key=lambda r: (r.span_start, r.span_end, r.peer_id))
    lines = [_heading(rows, num_layers), ""]
    if rows:
        lines += _table(COLUMNS, [_row(r, now) for r in rows], RIGHT_ALIGNED)
        lines.append("")
    if num_layers > 0:
        lines += _coverage(layer_counts(rows, num_layers))
    return "\n".join(lines) + "\n"


def _heading(records: Sequence[PeerRecord], num_layers: int) -> str:
    if not records:
        layers = f" ({num_layers} layers)" if num_layers > 0 else ""
        return f"no peer serves this model{layers}"
    models = sorted({f"{r.model} @{r.model_hash}" for r in records})
    peers = f"{len(records)} peer" + ("s" if len(records) != 1 else "")
    return f"{', '.join(models)}: {num_layers} layers, {peers}"


def _row(r: PeerRecord, now: float) -> list[str]:
    address = _reach(r.addresses[0]) + (
        f" (+{len(r.addresses) - 1})" if len(r.addresses) > 1 else ""
    )
    dtype = SHORT_DTYPES.get(r.dtype, r.dtype) + ("" if r.quant == "none" else f"/{r.quant}")
    cache = f"{r.cache_tokens_free}/{r.cache_tokens_total}"
    return [
        "…" + r.peer_id[-SHORT_ID:],
        address,
        reach(r),
        f"{r.span_start}:{r.span_end}",
        dtype,
        _bytes(r.free_memory_bytes),
        f"{r.tflops:.2f}",
        _rate(r.decode_steps_per_s_per_layer),
        cache,
        str(r.load),
        _age(now - r.timestamp),
    ]


def reach(r: PeerRecord) -> str:
    """How a record's peer is reached, as its best address says: "direct" (it listens there:
    public, or on this LAN) or "relayed" (behind NAT, through a relay; a client then tries a
    hole punch, and its own view says "punched" where that went direct)."""
    return "relayed" if r.addresses and "/p2p-circuit" in r.addresses[0] else "direct"


def _reach(address: str) -> str:
    """An address as the table shows it: a relayed one as `relay RELAYHOST:PORT` (the peer is
    behind NAT and reached through that relay, `swarm/relay.py`)."""
    hostport, _, rest = address.partition("/")
    return f"relay {hostport}" if rest.endswith("/p2p-circuit") else address


def _table(header: Sequence[str], rows: list[list[str]], right: frozenset[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if name in right else cell.ljust(w)
            for cell, w, name in zip(cells, widths, header, strict=True)
        ).rstrip()

    return [line(header)] + [line(row) for row in rows]


def _coverage(counts: list[int]) -> list[str]:
    """The axis, the bar and the verdict; the bar's legend is in the verdict's words."""
    axis = "".join(f"{layer:<10}" for layer in range(0, len(counts), 10))[: len(counts) + 4]
    bar = "".join(_cell(c) for c in counts)
    lines = [f"layer   {axis.rstrip()}", f"peers   {bar}"]
    gaps = unserved_spans(counts)
    if not gaps:
        fewest = min(counts)
        lines.append(
            f"every layer is served (digits: peers per layer; the fewest: {_cell(fewest)})"
        )
    else:
        missing = sum(end - start for start, end in gaps)
        spans = ", ".join(f"{start}:{end}" for start, end in gaps)
        lines.append(
            f"unserved layers: {spans} ({missing} of {len(counts)}, shown as '.'); "
            f"a peer started with --layers {gaps[0][0]}:{gaps[0][1]} fills the first"
        )
    return lines


def _cell(count: int) -> str:
    if count <= 0:
        return "."
    return str(count) if count < FEW_REPLICAS else "+"


def _bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return "0" if n == 0 else f"{n / 2**10:.0f} KiB"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def records_json(records: Sequence[PeerRecord]) -> str:
    """The records as a JSON array of objects, one per peer, fields as `PeerRecord` names them."""
    rows = sorted(records, key=lambda r: (r.model_hash, r.span_start, r.span_end, r.peer_id))
    return json.dumps([dataclasses.asdict(r) for r in rows], indent=2)


# --- the command ------------------------------------------------------------------------------


def add_status_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status` to `swarm-peer`'s subcommands."""
    p = subparsers.add_parser(
        "status", help="show the swarm's peers and which of the model's layers they serve"
    )
    p.add_argument(
        "--model",
        help="model name, folder, .gguf file or 16-hex model hash (default: every model seen; "
        "needed with --bootstrap)",
    )
    p.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP|NAME|none",
        help="browse the LAN over mDNS on this interface (repeat for more; default: every "
        "interface; none: no mDNS)",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a DHT member to join through, /ip4/A/tcp/P/p2p/ID (repeat for more): also read "
        "the records published on the DHT",
    )
    p.add_argument(
        "--swarm-key", type=Path, metavar="FILE", help="a private swarm's key (with --bootstrap)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=2.0,
        metavar="S",
        help="listen this long for announcements (default: 2; mDNS answers take ~0.1 s)",
    )
    p.add_argument("--json", action="store_true", help="print the records as JSON, for scripts")
    p.add_argument(
        "--serve",
        type=int,
        metavar="PORT",
        help="serve the web dashboard on this port (0: any free one) until stopped, instead of "
        "printing once",
    )
    p.add_argument("--host", default="127.0.0.1", help="address for --serve (default: loopback)")
    p.add_argument(
        "--api-key", help="with --serve: require `Authorization: Bearer KEY` for the data"
    )
    p.add_argument("--verbose", action="store_true")


def run_status(args: argparse.Namespace) -> None:
    """`swarm-peer status`: collect the records, print them."""
    if args.verbose:
        setup_logging(True)
    if args.bootstrap and not args.model:
        raise SystemExit("error: --bootstrap needs --model (the DHT is searched by model)")
    if args.wait < 0:
        raise SystemExit("error: --wait must be 0 or more seconds")
    interfaces = mdns_interfaces(args.mdns_interface)
    if interfaces is None and not args.bootstrap:
        raise SystemExit("error: with --mdns-interface none, say where to look with --bootstrap")
    model_hash, num_layers = _model_identity(args.model)
    swarm_key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if args.serve is not None:
        from layerswarm.cli.status_serve import serve_dashboard

        setup_logging(args.verbose)
        where = RecordPlaces(interfaces, tuple(args.bootstrap), swarm_key, model_hash)
        asyncio.run(serve_dashboard(args, where, args.model or "", num_layers or 0))
        return
    try:
        records = asyncio.run(
            collect_records(interfaces, args.bootstrap, swarm_key, model_hash, args.wait)
        )
    except (ValueError, TimeoutError) as e:  # a bad multiaddr; a DHT that did not start in time
        raise SystemExit(f"error: {e or type(e).__name__}") from None
    if args.json:
        print(records_json(records))
        return
    now = time.time()
    if model_hash is not None:
        if not records and num_layers is None:
            print(f"no peer serves model {model_hash} (listened {args.wait:g} s)")
            return
        print(render_status(records, num_layers or _most_layers(records), now), end="")
        return
    if not records:
        print(f"no peer announces itself here (listened {args.wait:g} s)")
    for i, key in enumerate(sorted({r.model_hash for r in records})):
        group = [r for r in records if r.model_hash == key]
        print(("\n" if i else "") + render_status(group, _most_layers(group), now), end="")


@dataclasses.dataclass(frozen=True)
class RecordPlaces:
    """Where to read records: mDNS on `interfaces` (`()` every one, None none) and, with
    `bootstrap`, the DHT under `model_hash`'s key."""

    interfaces: tuple[str, ...] | None
    bootstrap: tuple[str, ...]
    swarm_key: bytes | None
    model_hash: str | None


async def open_record_sources(
    stack: AsyncExitStack, where: RecordPlaces
) -> tuple[list[RecordSource], list[DhtLookup]]:
    """Started sources of records (closed with `stack`), and those of them to refresh."""
    sources: list[RecordSource] = []
    lookups: list[DhtLookup] = []
    if where.interfaces is not None:
        browser = MdnsBrowser(MdnsConfig(interfaces=where.interfaces or InterfaceChoice.All))
        await browser.start()
        stack.push_async_callback(browser.close)
        sources.append(browser)
    if where.bootstrap and where.model_hash is not None:
        key = dht_key(where.model_hash)
        lookup = await _open_dht_lookup(stack, where.bootstrap, where.swarm_key, key)
        sources.append(lookup)
        lookups.append(lookup)
    return sources, lookups


async def collect_records(
    interfaces: tuple[str, ...] | None,
    bootstrap: Sequence[str],
    swarm_key: bytes | None,
    model_hash: str | None,
    wait: float,
) -> list[PeerRecord]:
    """The verified records seen within `wait` s: mDNS on `interfaces` (`()` every one, None
    none) and, with `bootstrap`, the DHT under `model_hash`'s key; the newest per peer.
    """
    where = RecordPlaces(interfaces, tuple(bootstrap), swarm_key, model_hash)
    async with AsyncExitStack() as stack:
        sources, lookups = await open_record_sources(stack, where)
        # The DHT read is bounded by its own timeouts (DhtConfig); mDNS answers while we wait.
        await asyncio.gather(asyncio.sleep(wait), *(lookup.refresh() for lookup in lookups))
        return merged(sources, model_hash)


async def _open_dht_lookup(
    stack: AsyncExitStack, bootstrap: Sequence[str], swarm_key: bytes | None, key: str
) -> DhtLookup:
    """A started DHT node with a throwaway identity (closed with `stack`), read under `key`."""
    from layerswarm.swarm.dht import DhtNode  # libp2p loads only when a DHT is asked for
    from layerswarm.swarm.identity import generate_identity

    host = _source_ip(bootstrap[0])
    node = await DhtNode.start(generate_identity(), host, 0, list(bootstrap), swarm_key)
    stack.push_async_callback(node.close)
    return DhtLookup(lambda: node.get_records(key))


def _source_ip(multiaddr: str) -> str:
    """The local IPv4 address that reaches a bootstrap peer (a UDP connect sends nothing)."""
    parts = multiaddr.split("/")
    target = parts[2] if len(parts) > 2 and parts[1] == "ip4" else "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _model_identity(model: str | None) -> tuple[str | None, int | None]:
    """The model's hash and layer count; a bare hash gives no count (the records tell it)."""
    if model is None:
        return None, None
    if MODEL_HASH.fullmatch(model):
        return model, None
    from layerswarm.shards.config import ModelConfig
    from layerswarm.shards.weights import model_fingerprint

    model_dir = resolve_model_cli(model, default_cache_dir())
    return model_fingerprint(model_dir), ModelConfig.from_file(model_dir).num_layers


def _most_layers(records: Sequence[PeerRecord]) -> int:
    return max((r.num_layers for r in records), default=0)
