"""Direct alert push: POST /api/v2/alerts to Alertmanager from a background task (docs/alerting.md "Direct push").

The pipeline never waits for Alertmanager. `put(alert)` only records the alert's latest state in a table
keyed by its fingerprint (collector/incidents.py: a hash of its labels) and wakes the sender; the table is
the bounded queue: an alert posted again before the last post went out replaces it (the newest state wins,
nothing piles up), and at most `max_alerts` fingerprints wait — a new one beyond that is refused and
counted (`queue_full`). The sender posts everything waiting as one JSON list, on one worker thread with
`timeout_s` per request; a failure is counted by reason (`timeout`, `connect`, `http_<status>`, `error`)
with the last error kept for the status, and the batch is retried with jittered backoff (collector/backoff.py,
capped by the refresh interval) with the newest states. An alert still undelivered `hold_s` after its
endsAt is dropped (`expired`): Alertmanager has resolved it by itself by then.

Retries and repeats never page twice: Alertmanager deduplicates on the label set, and a post of an alert
it already has only moves its endsAt (and annotations).

Cost: one HTTP request per wake-up (a few per second at most), JSON of a few KB; no work on the loop
beyond building the body.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .backoff import Backoff
from .incidents import fingerprint

log = logging.getLogger("hostwall.collector.alerting")

__all__ = ["AlertPusher", "PushError", "http_post"]


class PushError(Exception):
    """A failed POST: `reason` is the counted label (timeout, connect, http_<status>, error)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def http_post(url: str, body: bytes, timeout: float) -> None:
    """POST JSON; PushError with a reason unless Alertmanager answered 2xx."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        text = e.read(300).decode(errors="replace").strip()
        raise PushError(f"http_{e.code}", f"{url} answered {e.code}: {text}") from None
    except urllib.error.URLError as e:
        why = e.reason
        if isinstance(why, TimeoutError) or "timed out" in str(why):
            raise PushError("timeout", f"{url}: no answer within {timeout:g}s") from None
        raise PushError("connect", f"{url}: {why}") from None
    except TimeoutError:
        raise PushError("timeout", f"{url}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise PushError("error", f"{url}: {e}") from None


class AlertPusher:
    """Posts alerts to `<base_url>/api/v2/alerts`. `post(url, body, timeout)` is injectable for tests."""

    def __init__(self, base_url: str, *, timeout_s: float = 2.0, max_alerts: int = 1000, retry_cap_s: float = 15.0,
                 hold_s: float = 300.0,
                 post: Callable[[str, bytes, float], None] = http_post, clock: Callable[[], float] = time.time):
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self.timeout_s = timeout_s
        self.hold_s = hold_s
        self.max_alerts = max_alerts
        self._post = post
        self._clock = clock
        self._backoff = Backoff(min(0.25, retry_cap_s), max(0.25, retry_cap_s))
        self._waiting: dict[str, dict] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.counters: Counter = Counter()
        self.failures: Counter = Counter()
        self.last_error = ""
        self.last_success: float | None = None
        self.state = "ok"

    # ---- the caller's side (never blocks) -----------------------------------------------------------
    def put(self, alert: dict) -> bool:
        """Queue the alert's newest state; False (counted queue_full) when the table is full."""
        fp = fingerprint(alert["labels"])
        if fp not in self._waiting and len(self._waiting) >= self.max_alerts:
            self.failures["queue_full"] += 1
            return False
        self._waiting[fp] = alert
        self.counters["queued"] += 1
        if self._wake is not None:
            self._wake.set()
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the sender on the running loop (idempotent; a no-op without a running loop)."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wake = asyncio.Event()
        if self._waiting:
            self._wake.set()
        self._pool = self._pool or ThreadPoolExecutor(2, thread_name_prefix="hw-alerts")
        self._task = loop.create_task(self._run(), name="alert push")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:    # never fatal: the next tick restarts it
            log.error("alert push task failed: %r", task.exception())
            self.failures["error"] += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):    # noqa: BLE001 — reported by _done
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ---- the sender ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                if await self.flush():
                    self._backoff.reset()
                    break
                await asyncio.sleep(self._backoff.next())   # a newer state does not cut the backoff short

    async def flush(self) -> bool:
        """Post every waiting alert once; True when Alertmanager took them (or nothing was waiting)."""
        now = self._clock()
        for fp in [fp for fp, a in self._waiting.items() if _ends(a) < now - self.hold_s]:
            del self._waiting[fp]                          # Alertmanager has resolved it by itself by now
            self.failures["expired"] += 1
        if not self._waiting:
            return True
        batch = dict(self._waiting)
        body = json.dumps(list(batch.values())).encode()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._pool, self._post, self.url, body, self.timeout_s),
                                   timeout=self.timeout_s + 1.0)
        except PushError as e:
            return self._failed(e.reason, str(e))
        except TimeoutError:
            return self._failed("timeout", f"{self.url}: no answer within {self.timeout_s:g}s")
        except Exception as e:                             # noqa: BLE001 — counted, never fatal
            return self._failed("error", f"{self.url}: {type(e).__name__}: {e}")
        for fp, a in batch.items():                        # sent: unless a newer state came meanwhile
            if self._waiting.get(fp) is a:
                del self._waiting[fp]
        self.counters["posts"] += 1
        self.counters["alerts_posted"] += len(batch)
        self.last_success, self.state = self._clock(), "ok"
        return True

    def _failed(self, reason: str, msg: str) -> bool:
        self.failures[reason] += 1
        if self.state == "ok" or sum(self.failures.values()) in (1, 10, 100, 1000):
            log.warning("alert push failed: %s", msg)
        self.last_error, self.state = msg, "failing"
        return False

    def stats(self) -> dict:
        return {"url": self.url, "state": self.state, "waiting": len(self._waiting),
                "posts": self.counters["posts"], "alerts_posted": self.counters["alerts_posted"],
                "queued": self.counters["queued"], "failures": dict(self.failures), "last_error": self.last_error,
                "last_success": self.last_success}


def _ends(a: dict) -> float:
    try:
        return dt.datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return float("inf")
