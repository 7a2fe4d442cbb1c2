"""`swarm-peer status`: the rendering of tables of records, and the command's argument checks."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from layerswarm.cli.peer import build_parser
from layerswarm.cli.status import (
    collect_records,
    layer_counts,
    read_swarm_key,
    records_json,
    render_status,
    run_status,
    unserved_spans,
)
from layerswarm.swarm.dht import DhtNode
from layerswarm.swarm.discovery import dht_key
from layerswarm.swarm.identity import generate_identity
from layerswarm.swarm.records import PeerRecord, sign_record, stamped

NOW = 1_800_000_000.0  # unix s: the records below are stamped relative to it
HASH = "0123456789abcdef"


def peer(n: int, span: tuple[int, int], age: float = 5.0, **fields: object) -> PeerRecord:
    """Peer number `n` serving `span` of a 30-layer model, signed `age` seconds before NOW."""
    values: dict[str, object] = {
        "peer_id": f"12D3KooWPeer{n:04d}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxAbCd{n:04d}",
        "addresses": (f"10.0.0.{n}:4000{n}",),
        "model": "smollm2-135m",
        "model_hash": HASH,
        "span_start": span[0],
        "span_end": span[1],
        "num_layers": 30,
        "dtype": "float32",
        "software_version": "0.1.0",
        "protocol_version": 1,
        "free_memory_bytes": 6 * 2**30,
        "tflops": 0.5,
        "decode_steps_per_s_per_layer": 2500.0,
        "cache_tokens_free": 4096,
        "cache_tokens_total": 8192,
        "timestamp": NOW - age,
        "expires_at": NOW - age + 60.0,
    }
    values.update(fields)
    return PeerRecord(**values)  # type: ignore[arg-type]


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- coverage: table-driven --------------------------------------------------------------------

COVERAGE_CASES = [
    # (spans, layers, bar, unserved spans)
    ([(0, 30)], 30, "1" * 30, []),
    ([(0, 15), (15, 30)], 30, "1" * 30, []),
    ([(0, 15), (17, 30)], 30, "1" * 15 + ".." + "1" * 13, [(15, 17)]),
    ([(0, 20), (10, 30)], 30, "1" * 10 + "2" * 10 + "1" * 10, []),
    ([(2, 5), (3, 4)], 6, "..121.", [(0, 2), (5, 6)]),
    ([], 4, "....", [(0, 4)]),
    ([(0, 4)] * 12, 4, "++++", []),  # ten or more replicas
    ([(0, 40)], 30, "1" * 30, []),  # a span past the model's end (records say 30; clamp anyway)
]


@pytest.mark.parametrize(("spans", "layers", "bar", "gaps"), COVERAGE_CASES)
def test_coverage_bar_counts_the_peers_of_each_layer(
    spans: list[tuple[int, int]], layers: int, bar: str, gaps: list[tuple[int, int]]
) -> None:
    records = [peer(i, (a, min(b, 30))) for i, (a, b) in enumerate(spans)]
    counts = layer_counts(records, layers)
    assert unserved_spans(counts) == gaps
    text = render_status(records, layers, NOW)
    assert lines_starting(text, "peers   ") == [f"peers   {bar}"]
    verdict = text.splitlines()[-1]
    if gaps:
        named = ", ".join(f"{a}:{b}" for a, b in gaps)
        assert verdict.startswith(f"unserved layers: {named} (")
        assert f"--layers {gaps[0][0]}:{gaps[0][1]}" in verdict
    else:
        assert verdict.startswith("every layer is served")


def test_status_of_a_swarm_with_a_gap_and_replicas() -> None:
    records = [
        peer(3, (17, 30), age=65.0, quant="int4", load=2, cache_tokens_free=1000),
        peer(1, (0, 15), addresses=("10.0.0.1:40001", "[fe80::1]:40001")),
        peer(2, (0, 10), dtype="bfloat16", free_memory_bytes=512 * 2**20, tflops=12.25),
    ]
    text = render_status(records, 30, NOW)
    assert text == (
        "smollm2-135m @0123456789abcdef: 30 layers, 3 peers\n"
        "\n"
        "PEER       ADDRESS              REACH   LAYERS  DTYPE      FREE MEM  TFLOPS"
        "  STEPS/S/LAYER  CACHE FREE/TOTAL  LOAD  AGE\n"
        "…AbCd0002  10.0.0.2:40002       direct  0:10    bf16        512 MiB   12.25"
        "           2500         4096/8192     0   5s\n"
        "…AbCd0001  10.0.0.1:40001 (+1)  direct  0:15    fp32        6.0 GiB    0.50"
        "           2500         4096/8192     0   5s\n"
        "…AbCd0003  10.0.0.3:40003       direct  17:30   fp32/int4   6.0 GiB    0.50"
        "           2500         1000/8192     2  65s\n"
        "\n"
        "layer   0         10        20\n"
        "peers   222222222211111..1111111111111\n"
        "unserved layers: 15:17 (2 of 30, shown as '.'); "
        "a peer started with --layers 15:17 fills the first\n"
    )


def test_status_when_every_layer_is_served_says_so_with_the_fewest_replicas() -> None:
    records = [peer(1, (0, 30)), peer(2, (0, 30)), peer(3, (10, 20))]
    text = render_status(records, 30, NOW)
    assert lines_starting(text, "peers") == ["peers   " + "2" * 10 + "3" * 10 + "2" * 10]
    assert text.splitlines()[-1] == (
        "every layer is served (digits: peers per layer; the fewest: 2)"
    )


def test_status_of_no_peers_shows_every_layer_unserved() -> None:
    text = render_status([], 4, NOW)
    assert text.splitlines()[0] == "no peer serves this model (4 layers)"
    assert "PEER" not in text
    assert lines_starting(text, "peers") == ["peers   ...."]
    assert text.splitlines()[-1].startswith("unserved layers: 0:4 (4 of 4")


@pytest.mark.parametrize(
    ("age", "shown"), [(0.4, "0s"), (-3.0, "0s"), (59.6, "60s"), (150.0, "2m"), (4 * 3600, "4h")]
)
def test_record_age_is_short(age: float, shown: str) -> None:
    text = render_status([peer(1, (0, 30), age=age)], 30, NOW)
    row = lines_starting(text, "…")[0]
    assert row.split()[-1] == shown


def test_json_lists_every_field_of_every_record() -> None:
    records = [peer(2, (15, 30)), peer(1, (0, 15), quant="int8")]
    rows = json.loads(records_json(records))
    assert [r["span_start"] for r in rows] == [0, 15]
    assert rows[0]["quant"] == "int8"
    assert rows[0]["addresses"] == ["10.0.0.1:40001"]
    assert PeerRecord(**{**rows[1], "addresses": tuple(rows[1]["addresses"])}) == records[0]


# --- the command's checks, before any network --------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", *argv])


def test_status_is_a_swarm_peer_command() -> None:
    args = parse("--model", HASH, "--mdns-interface", "10.77.0.2", "--wait", "0.5", "--json")
    assert (args.command, args.model, args.mdns_interface) == ("status", HASH, ["10.77.0.2"])
    assert (args.wait, args.json, args.bootstrap) == (0.5, True, [])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"], "--bootstrap needs --model"),
        (["--mdns-interface", "none"], "with --mdns-interface none"),
        (["--wait", "-1"], "--wait"),
    ],
)
def test_status_refuses_what_cannot_work_before_listening(
    argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object) -> None:
        raise AssertionError("status listened: mDNS must not run on this machine's interfaces")

    monkeypatch.setattr("layerswarm.cli.status.collect_records", no_network)
    with pytest.raises(SystemExit, match=says):
        run_status(parse(*argv))


def test_swarm_key_is_raw_or_hex(tmp_path: Path) -> None:
    key = bytes(range(32))
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "hex").write_text(key.hex() + "\n")
    (tmp_path / "short").write_text("abcd")
    assert read_swarm_key(tmp_path / "raw") == key
    assert read_swarm_key(tmp_path / "hex") == key
    with pytest.raises(SystemExit, match="neither 32 bytes nor 64 hex digits"):
        read_swarm_key(tmp_path / "short")
    with pytest.raises(SystemExit, match="--swarm-key"):
        read_swarm_key(tmp_path / "missing")


# --- the DHT, on loopback (no mDNS: interfaces None) -------------------------------------------


def test_status_reads_verified_records_from_the_dht_of_a_private_swarm() -> None:
    swarm_key = bytes(range(32))

    async def scenario() -> list[PeerRecord]:
        identity, forger = generate_identity(), generate_identity()
        node = await DhtNode.start(identity, "127.0.0.1", 0, swarm_key=swarm_key)
        async with node:
            record = stamped(replace(peer(1, (0, 20)), peer_id=identity.peer_id), 600.0)
            await node.put_record(dht_key(HASH), sign_record(record, identity))
            other = await DhtNode.start(forger, "127.0.0.1", 0, [node.multiaddr], swarm_key)
            async with other:  # a record whose signature does not match: left out
                forged = replace(record, peer_id=forger.peer_id, span_start=20, span_end=30)
                key, body, signature = msgpack.unpackb(sign_record(forged, forger))
                tampered = [key, body, bytes([signature[0] ^ 1]) + signature[1:]]
                await other.put_record(dht_key(HASH), msgpack.packb(tampered))
                records = await collect_records(None, [node.multiaddr], swarm_key, HASH, 0.0)
        assert [(r.peer_id, r.span_start, r.span_end) for r in records] == [
            (identity.peer_id, 0, 20)
        ]
        return records

    records = asyncio.run(asyncio.wait_for(scenario(), 60))
    text = render_status(records, 30, records[0].timestamp)
    assert "peers   " + "1" * 20 + "." * 10 in text


def test_status_serves_the_dashboard_of_the_records_it_reads(tmp_path: Path) -> None:
    """`swarm-peer status --serve`: the page and its data (behind the key), from DHT records."""
    import subprocess
    import sys

    import httpx

    from layerswarm.cli.status_serve import READY_PREFIX

    def serve_and_read(multiaddr: str) -> tuple[dict[str, object], int, str]:
        cmd = [sys.executable, "-m", "layerswarm.cli.peer", "status", "--model", HASH]
        cmd += ["--mdns-interface", "none", "--bootstrap", multiaddr, "--serve", "0"]
        cmd += ["--api-key", "k"]
        with open(tmp_path / "status.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(READY_PREFIX), (tmp_path / "status.log").read_text()
            url = json.loads(line[len(READY_PREFIX) :])["url"]
            refused = httpx.get(url + "dashboard/state").status_code
            page = httpx.get(url).text
            state = httpx.get(url + "dashboard/state", headers={"Authorization": "Bearer k"})
            return state.json(), refused, page
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            assert proc.stdout is not None
            proc.stdout.close()

    async def scenario() -> tuple[dict[str, object], int, str]:
        identity = generate_identity()
        node = await DhtNode.start(identity, "127.0.0.1", 0)
        async with node:
            record = stamped(replace(peer(1, (0, 20)), peer_id=identity.peer_id), 600.0)
            await node.put_record(dht_key(HASH), sign_record(record, identity))
            return await asyncio.to_thread(serve_and_read, node.multiaddr)

    state, refused, page = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert refused == 401 and "<title>layerswarm</title>" in page
    assert state["num_layers"] == 30
    assert state["coverage"] == {"counts": [1] * 20 + [0] * 10, "gaps": [[20, 30]]}
    [row] = state["peers"]  # type: ignore[misc]
    assert (row["span"], row["state"], row["dtype"]) == ([0, 20], "live", "fp32")
