"""The `hostwall-enforcer run` process (docs/cli.md): bring the instance up, then one asyncio loop (uvloop
when installed) until SIGTERM/SIGINT, serving the DNS proxy (enforcer/dnsproxy.py) while the policy has
a `dns` section, reloading the policy on SIGHUP.

- The proxy's listen sockets are bound before anything changes in the kernel: a port in use is an error
  (exit 1) that leaves the running instance as it was.
- The proxy follows the instance's fqdn config (enforcer/fqdnsets.py), whoever swapped the policy (this
  process on SIGHUP, or `hostwall-enforcer apply` from another): checked every FOLLOW_S, and on every
  query for the live sets. A reload runs on a worker thread, so queries are answered meanwhile.
- About once a second the SYN proxy's automatic switches become audit records (enforcer/syn_watch.py,
  docs/dos.md).
- Every SWEEP_S the expired entries of the dynamic sets and learnt names are removed (the datapath ignores
  them already; this frees their room).
"""
from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable

from hostwall.bpf import retired
from hostwall.bpf.fqdn import FqdnMaps
from hostwall.yamldoc import PolicyError

from . import control, fqdnsets
from .dnslearn import Learner
from .dnspolicy import DnsConf
from .dnsproxy import DnsProxy, endpoint_text
from .dnsrecords import DnsRecordLog
from .netsock import SocketMaker
from .policy import InterfaceConf, Policy
from .syn_watch import ProxyWatch, host_warnings

__all__ = ["run"]

FOLLOW_S = 0.5
SYN_WATCH_S = 1.0
SWEEP_S = 10.0


def _say(msg: str, err: bool = False) -> None:
    print(f"hostwall-enforcer: {msg}", file=sys.stderr if err else sys.stdout, flush=True)


class _Dns:
    """The proxy as the policy wants it: started, re-bound or stopped when the fqdn config changes."""

    def __init__(self, pin_dir: str, fm: FqdnMaps, maker: SocketMaker):
        self.pin_dir, self.fm, self.maker = pin_dir, fm, maker
        self.proxy: DnsProxy | None = None
        self.learner: Learner | None = None
        self._failed: tuple | None = None

    def make(self) -> DnsProxy:
        self.learner = Learner(self.fm, self.pin_dir)
        self.proxy = DnsProxy(self.learner, DnsRecordLog(self.pin_dir, self.fm.stats()), self.fm.stats(), self.maker)
        return self.proxy

    async def follow(self, socks=None) -> None:
        cfg = fqdnsets.FqdnConfig.read(self.pin_dir)
        want: DnsConf | None = cfg.dns if cfg else None
        try:
            if want is not None and self.proxy is None:
                await self.make().start(want.listen, socks)
                _say(f"DNS proxy listening on {', '.join(endpoint_text(e) for e in want.listen)} (udp, tcp), "
                     f"upstreams {', '.join(endpoint_text(e) for e in want.upstreams)}")
            elif want is not None and self.proxy is not None and tuple(want.listen) != self.proxy.listen:
                await self.proxy.configure(want)
                _say(f"DNS proxy now listening on {', '.join(endpoint_text(e) for e in want.listen)}")
            elif want is None and self.proxy is not None:
                await self.proxy.close()
                self.proxy = self.learner = None
                _say("DNS proxy stopped: the policy has no dns section")
            self._failed = None
        except OSError as e:
            if self._failed != (want, str(e)):          # say it once per change, not every FOLLOW_S
                self._failed = (want, str(e))
                _say(f"DNS proxy: {e}; fix dns.listen and apply again", err=True)

    def sweep(self) -> None:
        if self.learner is not None:
            self.learner.sweep()

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()


async def _main(a, dp, socks, load: Callable[[str], Policy], report: Callable[[PolicyError], int]) -> str:
    loop = asyncio.get_running_loop()
    stop, reload_ev = asyncio.Event(), asyncio.Event()
    why: dict[str, str] = {}
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(sig, lambda n=name: (why.setdefault("stop", n), stop.set()))
    loop.add_signal_handler(signal.SIGHUP, reload_ev.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)   # what arrived since the banner is handled now
    fm = FqdnMaps(dp.map_fds, a.pin_dir)
    dns = _Dns(a.pin_dir, fm, SocketMaker(a.netns))
    await dns.follow(socks)
    # what start-up made (BCC, the policy, dnspython's tables) lives as long as the process: out of the
    # collector's way, so a full collection does not stall queries for tens of ms
    gc.collect()
    gc.freeze()

    watch = ProxyWatch(dp, a.pin_dir, tuple(control.InstanceState.load(a.pin_dir).dos_profiles))

    async def reloads() -> None:
        while True:
            await reload_ev.wait()
            reload_ev.clear()
            try:
                # this process's Datapath, kept across reloads: its same-object shortcuts apply
                r = await loop.run_in_executor(None, lambda: control.apply(load(a.policy), a.pin_dir, dp))
                watch.profiles = tuple(control.InstanceState.load(a.pin_dir).dos_profiles)
                _say(f"SIGHUP: revision {r.old_revision} → {r.new_revision} (switch {r.switch_ms:.3f} ms; "
                     f"{r.written_records} records written, {r.known_tables} tables known)")
                if r.fqdn_full:
                    _say(f"SIGHUP: {control.fqdn_full_text(r.fqdn_full)}", err=True)
            except PolicyError as e:
                report(e)
                _say("SIGHUP: the running policy is unchanged", err=True)
            except Exception as e:  # noqa: BLE001 — a reload that fails leaves the running policy; say why
                _say(f"SIGHUP: {e}; the running policy is unchanged", err=True)
            await dns.follow()

    async def every(interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            await fn()

    async def sweep() -> None:
        dns.sweep()

    async def syn_watch() -> None:
        watch.poll()

    tasks = [loop.create_task(reloads()), loop.create_task(every(FOLLOW_S, dns.follow)),
             loop.create_task(every(SWEEP_S, sweep)), loop.create_task(every(SYN_WATCH_S, syn_watch))]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dns.close()
        fm.close()
    return why.get("stop", "stop")


_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def run(a, policy: Policy, ifaces: list[InterfaceConf], load: Callable[[str], Policy],
        report: Callable[[PolicyError], int]) -> int:
    """Start (or take over) the instance, serve until a stop signal, then detach unless --keep-attached."""
    maker = SocketMaker(a.netns)
    socks = None
    if policy.dns is not None:
        probe = DnsProxy(None, None, None, maker)       # only to bind: a port in use fails before any change
        try:
            socks = probe.bind(policy.dns.listen)
        except OSError as e:
            raise control.ControlError(f"DNS proxy: {e}; nothing was changed") from None
    # Held pending from the start on until _main's handlers are in place: a SIGTERM during the start (which
    # holds them too: control._signals_held) is a stop once it is done; from the banner on, callers may
    # signal us (a SIGHUP would otherwise end the process by its default action, a SIGTERM skip the detach).
    # A start that fails exits 1 with them still held.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        dp, st, res = control.start(policy, a.pin_dir, ifaces, a.netns)
    except BaseException:
        for s in socks or ():
            s.close()
        raise
    how = "took over the running instance (no gap)" if res.adopted else "loaded the datapath"
    if res.migrated_conntrack:
        how += f", carried {res.migrated_conntrack} tracked connections over"
    where = ", ".join(f"{i.name} (xdp {i.xdp_mode}, tc)" for i in res.interfaces)
    _say(f"{how}; enforcing {policy.name} revision {policy.revision} ({res.apply.rules} rules, "
         f"{res.apply.prefixes} prefixes) on {where}")
    if res.apply.fqdn_full:
        _say(control.fqdn_full_text(res.apply.fqdn_full), err=True)
    for w in host_warnings(policy.dos_profiles.values(), a.netns):
        _say(w, err=True)
    try:
        import uvloop
        go = uvloop.run
    except ImportError:
        go = asyncio.run
    try:
        stop = go(_main(a, dp, socks, load, report))
    finally:
        dp.close()
    if a.keep_attached:
        _say(f"{stop}: exiting, programs stay attached and pinned at {a.pin_dir}")
    else:
        _say(f"{stop}: {detach_text(a.pin_dir)}")
    return 0


def detach_text(pin_dir: str) -> str:
    """control.detach, saying where the maps went: retired for a collector to drain, or unpinned —
    with why when no collector checkpoint was found, since what no collector read then goes with them
    (docs/collector.md "Detach": only a collector that shares this HOSTWALL_STATE_DIR is seen)."""
    before = set(retired.listing(pin_dir))
    gone = control.detach(pin_dir)
    head = f"detached from {', '.join(gone) or 'nothing'}"
    kept = [p for p in retired.listing(pin_dir) if p not in before]
    if kept:
        return f"{head}; maps retired to {kept[-1]} for a collector to drain (the running one, or the next)"
    ck = retired.collector_checkpoint(pin_dir)
    if ck.exists():
        return f"{head}; unpinned {pin_dir}"
    return (f"{head}; unpinned {pin_dir}: no collector checkpoint at {ck}, so events no collector read "
            "are gone uncounted (a collector is seen only if it ran with this HOSTWALL_STATE_DIR)")
