"""The dashboard and /metrics against a real 3-peer swarm behind `swarm-api` (over TLS, with a
key): Prometheus counters move after a reply, on the API and on a peer; headless Chromium sees 3
peers and full coverage, streams a chat reply, and then the gap a stopped peer leaves.

Screenshots go to `$LAYERSWARM_SCREENSHOTS` (default: the test's temporary folder); with
`LAYERSWARM_UPDATE_DOCS=1` the dashboard's also replaces `docs/dashboard.png` (the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerswarm.peer.launch import LocalSwarm, PeerProcess, start_peers
from layerswarm.shards.config import Span

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "dashboard-key"
THIRDS = [Span(0, 10), Span(10, 20), Span(20, 30)]
DOCS = Path(__file__).resolve().parents[2] / "docs"
METRICS_LINE = re.compile(r"metrics at (http://\S+/metrics)")


@pytest.fixture(scope="module")
def swarm(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    workdir = tmp_path_factory.mktemp("dashboard")
    with start_peers(smollm2_dir, THIRDS, workdir, ["--metrics-port", "0"]) as s:
        yield s


@pytest.fixture(scope="module")
def api(
    smollm2_dir: Path,
    swarm: LocalSwarm,
    tls: tuple[Path, Path],
    open_api: Callable[..., AbstractContextManager[str]],
) -> Iterator[str]:
    """The API's base URL (https://127.0.0.1:PORT)."""
    extra = ("--api-key", KEY, "--tls-cert", str(tls[0]), "--tls-key", str(tls[1]))
    with open_api(smollm2_dir, swarm.addresses, extra) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def http(tls: tuple[Path, Path]) -> Iterator[Any]:
    trusted = ssl.create_default_context(cafile=str(tls[0]))
    with httpx.Client(verify=trusted, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def metrics_url(peer: PeerProcess) -> str:
    assert peer.stderr_path is not None
    deadline = time.monotonic() + 30
    while not (found := METRICS_LINE.search(peer.stderr_path.read_text())):
        assert time.monotonic() < deadline, "the peer did not say where its metrics are"
        time.sleep(0.2)
    return found.group(1)


def scrape(text: str) -> dict[str, float]:
    """Every sample as `name{label="v",...}` -> value, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_move_after_a_reply(api: str, swarm: LocalSwarm, http: Any) -> None:
    peer = metrics_url(swarm.peers[1])
    assert http.get(api + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    before_api, before_peer = scrape(http.get(api + "/metrics").text), scrape(httpx.get(peer).text)
    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, http_client=http)
    reply = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    after_api, after_peer = scrape(http.get(api + "/metrics").text), scrape(httpx.get(peer).text)

    def moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
        return after[name] - before.get(name, 0.0)

    done = 'layerswarm_client_tokens_total{kind="completion"}'
    assert moved(before_api, after_api, done) == reply.usage.completion_tokens == 4
    assert moved(before_api, after_api, 'layerswarm_client_replies_total{reason="length"}') == 1
    assert moved(before_api, after_api, "layerswarm_client_token_seconds_count") == 4
    # The middle peer ran the prompt's step and three decode steps, in batches.
    assert moved(before_peer, after_peer, "layerswarm_peer_steps_total") == 4
    assert moved(before_peer, after_peer, "layerswarm_peer_tokens_total") > 4
    assert moved(before_peer, after_peer, "layerswarm_peer_batches_total") >= 4
    assert moved(before_peer, after_peer, "layerswarm_peer_step_seconds_count") == 4
    assert after_peer["layerswarm_peer_kv_pages_total"] > 0
    assert "layerswarm_peer_queued_tokens" in after_peer


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium (apt-get install chromium; `scripts/setup.sh dev` does it)",
)
def test_dashboard_and_chat_in_headless_chromium(
    api: str, swarm: LocalSwarm, http: Any, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("LAYERSWARM_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1280, "height": 900}
            ).new_page()
            page.on("dialog", lambda dialog: dialog.accept(KEY))  # the page asks for the key
            page.goto(api + "/")
            page.wait_for_selector("#coverage[data-gaps='0']")
            rows = page.locator("#peers tbody tr.peer[data-state='live']")
            rows.nth(2).wait_for()
            assert rows.count() == 3
            assert "every layer is served" in page.inner_text("#coverage-verdict")
            assert page.locator("#coverage .layer").count() == 30

            chat(page, api, shots)

            with ThreadPoolExecutor(1) as pool:  # a reply in flight, for the page to show
                streaming = pool.submit(long_reply, api, http)
                page.goto(api + "/")
                route = page.locator("#routes li.route").first
                route.wait_for(timeout=60_000)
                hops = route.inner_text()
                page.screenshot(path=str(shots / "dashboard.png"))
                assert streaming.result() > 0
            assert all(f"[{span.start}:{span.end})" in hops for span in THIRDS), hops
            if os.environ.get("LAYERSWARM_UPDATE_DOCS") == "1":
                shutil.copy(shots / "dashboard.png", DOCS / "dashboard.png")

            middle = next(peer for peer in swarm.peers if peer.span == Span(10, 20))
            middle.stop(signal.SIGTERM)
            page.wait_for_selector("#coverage[data-gaps='1']", timeout=60_000)
            assert "unserved: 10:20" in page.inner_text("#coverage-verdict")
            assert page.locator("#coverage .layer.gap").count() == 10
            assert page.locator("#peers tbody tr.peer[data-state='live']").count() == 2
            page.screenshot(path=str(shots / "dashboard-gap.png"))
        finally:
            browser.close()


def long_reply(api: str, http: Any) -> int:
    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, http_client=http)
    stream = client.completions.create(
        model="smollm2-135m", prompt="Once upon a time", max_tokens=64, temperature=0, stream=True
    )
    return sum(1 for _ in stream)


def chat(page: Any, api: str, shots: Path) -> None:
    """The chat page streams the answer to the usual question, piece by piece."""
    page.goto(api + "/chat")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.evaluate(
        """() => { window.changes = 0;
        new MutationObserver(() => window.changes++).observe(document.getElementById('log'),
            {subtree: true, childList: true, characterData: true}); }"""
    )
    page.fill("#temperature", "0")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    reply = page.inner_text(".msg.assistant")
    page.screenshot(path=str(shots / "chat.png"))
    assert "Paris" in reply, reply
    assert page.evaluate("window.changes") > 3  # streamed: the text grew in several steps
    assert page.locator(".msg.error").count() == 0
