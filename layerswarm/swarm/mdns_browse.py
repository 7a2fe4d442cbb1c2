"""Browsing the other peers' signed records over mDNS (see `mdns` for the layout and an example)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from zeroconf import ServiceStateChange, Zeroconf, current_time_millis
from zeroconf._dns import DNSText  # not re-exported by zeroconf, stable since 0.32
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from layerswarm.errors import InvalidRecord, LayerswarmError
from layerswarm.swarm.mdns import (
    CLASS_IN,
    SERVICE_TYPE,
    TYPE_TXT,
    MdnsConfig,
    decode_txt,
    new_zeroconf,
    parse_txt,
    service_name,
)
from layerswarm.swarm.records import PeerRecord, RecordFault, verify_record

log = logging.getLogger(__name__)

MAX_PEERS = 4096  # records a browser holds at most (each costs ~1 KB)
MAX_REJECTED = 256  # services whose rejection reasons a browser remembers


class MdnsBrowser:
    """The verified records of the peers announcing on the LAN, kept current as they change."""

    def __init__(
        self,
        config: MdnsConfig | None = None,
        zeroconf: AsyncZeroconf | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change()` runs on the loop after each change of `records()` or `rejected()`."""
        self._config = config or MdnsConfig()
        self._zc = zeroconf
        self._owns_zc = zeroconf is None
        self._on_change = on_change
        self._browser: AsyncServiceBrowser | None = None
        self._records: dict[str, PeerRecord] = {}  # service name -> its newest valid record
        self._rejected: dict[str, str] = {}  # service name -> why its record was refused
        self._resolving: dict[str, asyncio.Task[None]] = {}  # owned here, cancelled on close
        self._expiry: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()  # replaced on every change: waiters hold the old one

    async def start(self) -> None:
        """Start browsing: records arrive as peers answer (within ~0.1 s on a quiet LAN)."""
        if self._browser is not None:
            raise LayerswarmError("the mDNS browser is already started")
        if self._zc is None:
            self._zc = new_zeroconf(self._config)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service]
        )

    async def close(self) -> None:
        """Stop browsing and release the sockets."""
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
        if self._zc is not None and self._owns_zc:
            zc, self._zc = self._zc, None
            await zc.async_close()

    def records(self, model_hash: str | None = None) -> list[PeerRecord]:
        """The valid records now, sorted by peer ID; only those of `model_hash` if given."""
        now = time.time()
        return sorted(
            (
                r
                for r in self._records.values()
                if r.expires_at > now and model_hash in (None, r.model_hash)
            ),
            key=lambda r: r.peer_id,
        )

    def rejected(self) -> dict[str, str]:
        """Services whose last record was refused, and why (for diagnostics: clocks, forgeries)."""
        return dict(self._rejected)

    async def wait_for(
        self, predicate: Callable[[list[PeerRecord]], bool], timeout: float
    ) -> list[PeerRecord]:
        """Wait until `predicate(self.records())` holds; returns those records.

        Raises:
            TimeoutError: it did not hold within `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(records := self.records()):
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"mDNS view did not reach the wanted state in {timeout} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return records

    # --- zeroconf events, on the loop ------------------------------------------------------

    def _on_service(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            elif texts := self._cached_texts(name):
                self._consider(name, texts)
            elif name not in self._resolving:
                task = asyncio.get_running_loop().create_task(self._resolve(name))
                self._resolving[name] = task
        except Exception:  # never raise into zeroconf's packet handling
            log.exception("mDNS: handling %s of %s failed", state_change, name)

    async def _resolve(self, name: str) -> None:
        """Ask for a service's TXT record when an event came without it."""
        try:
            if self._zc is None:
                return
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            await info.async_request(self._zc.zeroconf, self._config.resolve_timeout * 1000)
            texts = self._cached_texts(name) or ([info.text] if info.text else [])
            if texts:
                self._consider(name, texts)
            else:
                self._reject(name, f"no TXT record within {self._config.resolve_timeout} s")
        except Exception:  # a bug here must not end discovery: log it, keep browsing
            log.exception("mDNS: resolving %s failed", name)
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    def _cached_texts(self, name: str) -> list[bytes]:
        """Every live TXT record zeroconf holds for `name` (an update can leave two for ~1 s)."""
        if self._zc is None:
            return []
        now = current_time_millis()
        cached = self._zc.zeroconf.cache.async_all_by_details(name, TYPE_TXT, CLASS_IN)
        return [r.text for r in cached if isinstance(r, DNSText) and not r.is_expired(now)]

    def _consider(self, name: str, texts: list[bytes]) -> None:
        """Keep the newest record among `texts` that verifies, if newer than the one held."""
        best: PeerRecord | None = None
        fault: InvalidRecord | None = None
        for text in texts:
            try:
                record = verify_record(
                    decode_txt(parse_txt(text)), max_clock_skew=self._config.max_clock_skew
                )
                if service_name(record.peer_id) != name:
                    raise InvalidRecord(
                        RecordFault.KEY_MISMATCH, f"record of {record.peer_id} announced as {name}"
                    )
            except InvalidRecord as exc:
                fault = exc
                continue
            if best is None or record.timestamp > best.timestamp:
                best = record
        held = self._records.get(name)
        if best is None:
            self._reject(name, str(fault))
        elif held is not None and best.timestamp < held.timestamp:
            log.debug("mDNS: ignoring an older record of %s", name)
        elif held is None and len(self._records) >= MAX_PEERS:
            self._reject(name, f"already holding the records of {MAX_PEERS} peers")
        elif best != held:
            self._records[name] = best
            self._rejected.pop(name, None)
            self._schedule_expiry()
            self._notify()

    def _reject(self, name: str, reason: str) -> None:
        log.info("mDNS: ignoring %s: %s", name, reason)
        self._rejected.pop(name, None)
        self._rejected[name] = reason
        while len(self._rejected) > MAX_REJECTED:
            del self._rejected[next(iter(self._rejected))]
        self._notify()

    def _forget(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        held = self._records.pop(name, None)
        self._rejected.pop(name, None)
        if held is not None:
            self._schedule_expiry()
            self._notify()

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._records:
            delay = min(r.expires_at for r in self._records.values()) - time.time()
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        now = time.time()
        expired = [name for name, r in self._records.items() if r.expires_at <= now]
        for name in expired:
            del self._records[name]
            self._reject(name, f"{RecordFault.EXPIRED}: its peer stopped refreshing it")
        self._schedule_expiry()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change()


@contextlib.asynccontextmanager
async def open_mdns_browser(
    config: MdnsConfig | None = None,
    zeroconf: AsyncZeroconf | None = None,
    on_change: Callable[[], None] | None = None,
) -> AsyncIterator[MdnsBrowser]:
    """A started `MdnsBrowser`, closed on exit."""
    browser = MdnsBrowser(config, zeroconf, on_change)
    try:
        await browser.start()
        yield browser
    finally:
        await browser.close()
