"""The enforced datapath: loading the programs, attaching them, and the policy swap.

Lifecycle: `Datapath.load()` compiles bpf/hostwall.bpf.c with BCC and loads the programs; `pin()`
pins every map and program under `<pin_dir>/{maps,progs}`; `Datapath.open(pin_dir)` adopts a
pinned instance from another process (apply, status, a restarted enforcer) without recompiling.
Everything that only reads or adopts an instance is hostwall.bpf.instance.Instance, its base.

Swap: the policy arrays are mmap'ed; `install()` waits one RCU grace period (so no packet still reads
the standby half), writes into it the records of the compiled policy that differ from what it holds,
then flips hw_config.gen with one map update.
The flip is the switch: every packet reads gen once, so it sees wholly the old or wholly the new policy.
"""
from __future__ import annotations

import ctypes
import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L
from hostwall.bpf.clock import calibrate_clock
from hostwall.bpf.instance import Instance
from hostwall.bpf.names import ALL_MAPS, POLICY_MAPS, PROGRAMS

from .compiler import CompiledPolicy


def build_hash() -> str:
    """Identity of the datapath code: a pinned instance is adopted only if it runs the same build."""
    h = hashlib.sha256()
    for p in L.SOURCES:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SwapTiming:
    barrier_s: float     # wait for packets still reading the standby half (one RCU grace period)
    write_s: float       # fill the standby half
    switch_s: float      # the generation flip: the moment the new policy takes effect
    old_gen: int
    new_gen: int
    written: dict[str, int] = field(default_factory=dict)   # records rewritten per policy map
    known: tuple[str, ...] = ()   # tables not compared: the very arrays this object wrote into that half


class Datapath(Instance):
    """A pinned instance this process loaded (or adopted) and enforces: loading, attaching, the swap."""

    _grace: tuple | None = None          # (future of the grace period, (gen, revision_id) it flipped to)
    _grace_pool: ThreadPoolExecutor | None = None
    _grace_barrier: bpfsys.RcuBarrier
    _installs = 0                        # one-shot objects (`apply` from the CLI) start no worker
    _flipped: tuple[int, int] | None = None   # (gen, revision_id) of this object's last flip
    # per half, the header and the read-only arrays (compiler memo) this object last wrote there: the
    # arrays are not compared again while the half still holds that header
    _held: list[tuple[bytes, dict]]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._held = [(b"", {}), (b"", {})]

    @classmethod
    def load(cls) -> Datapath:
        """Compile with BCC and load (≈1-3 s, CPU bound). Raises RuntimeError with the verifier's log."""
        from bcc import BPF, lib  # imported here: control commands never need the compiler

        cflags = [f"-I{L.HEADER.parent}", "-Wno-unused-function", "-Wno-compare-distinct-pointer-types"]
        bpf = BPF(text=L.program_text().encode(), cflags=cflags)
        progs = {}
        for name, kind in PROGRAMS.items():
            ptype = BPF.XDP if kind == "xdp" else BPF.SCHED_CLS
            try:
                progs[name] = bpf.load_func(name.encode(), ptype).fd
            except Exception as e:  # noqa: BLE001 — BCC raises bare Exception; re-raised with the verifier log
                start = lib.bpf_function_start(bpf.module, name.encode())
                size = lib.bpf_function_size(bpf.module, name.encode())
                _, log = bpfsys.prog_load_verbose(ptype, ctypes.string_at(start, size), name)
                raise RuntimeError(f"loading {name} failed: {e}\n{log[-3000:]}") from None
        maps = {name: bpf[name.encode()].map_fd for name in ALL_MAPS}
        # xdp_ingress tail-calls xdp_judge, the TC programs tail-call tc_frag_ingress /
        # tc_frag_egress for fragments; a pinned
        # prog array keeps its entry across restarts
        bpfsys.map_update(maps["hw_jump"], b"\0" * 4, progs["xdp_judge"].to_bytes(4, "little"))
        for i, name in enumerate(("tc_frag_ingress", "tc_frag_egress")):      # frag.h FRAG_JUMP_*
            bpfsys.map_update(maps["hw_jump_tc"], i.to_bytes(4, "little"), progs[name].to_bytes(4, "little"))
        dp = cls(progs, maps, bpf)
        tick_ns, base_ns = calibrate_clock(bpf.load_func(b"clock_probe", BPF.XDP).fd)
        dp.set_config(tick_ns=tick_ns, tick_base_ns=base_ns, table_seed=secrets.randbits(64))
        dp.init_collect_defaults()
        return dp

    def attach(self, ifname: str, xdp_mode: str = "auto", netns: str | None = None) -> str:
        """Attach XDP ingress and TC egress on one interface; returns the XDP mode that took.

        No TC ingress: XDP judges every ingress packet (fails closed when it cannot), and a clsact
        ingress filter would cost ~110 ns a packet for nothing (docs/datapath.md "Hooks"). Our
        ingress filter an older build attached is removed once the new XDP program is in place, so
        no old program runs there any more (control.py _runs_nothing)."""
        from . import attach
        mode = attach.attach_xdp(ifname, self.prog_fds["xdp_ingress"], xdp_mode, netns)
        attach.attach_tc(ifname, None, self.prog_fds["tc_egress"], netns)
        return mode

    @staticmethod
    def detach(ifname: str, netns: str | None = None) -> None:
        from . import attach
        attach.detach_xdp(ifname, netns)
        attach.detach_tc(ifname, netns)

    def grace_period(self) -> None:
        """Wait one RCU grace period: no packet that started before this call is still running."""
        if self._barrier is None:
            self._barrier = bpfsys.RcuBarrier()
        self._barrier.wait()

    def install(self, cp: CompiledPolicy) -> SwapTiming:
        """Write `cp` into the standby generation and switch to it atomically.

        Only the records that differ from what the standby half holds are written (one compare of
        each table, ~1 ms per MB), so a change of one rule rewrites that rule's records, whatever
        the policy's size. From an object's second install on, the grace period that frees the old
        half runs on a worker thread right after the flip, so the next install usually finds it over
        (docs/benchmarks.md "swap"). hw_policy is written first: another writer's apply that stops before
        its flip (killed) has changed the standby header, so this object then compares every table."""
        old = self.active_gen()
        new = old ^ 1
        t0 = time.perf_counter()
        ours = self._standby_free(old)   # a packet that read `new` before the last flip has finished
        t1 = time.perf_counter()
        if not ours:                     # someone else flipped since: what either half holds is unknown
            self._held = [(b"", {}), (b"", {})]
        (hdr, held), self._held[new] = self._held[new], (b"", {})   # unknown until every write is done
        if self.view("hw_policy")[new].tobytes() != hdr:
            held = {}                    # another writer's apply, stopped before its flip, wrote here first
        parts = {"hw_policy": cp.hdr, "hw_rules": cp.rules, "hw_peer_cls": cp.peer_cls, "hw_l4_cls": cp.l4_cls,
                 "hw_top4": cp.top4, "hw_top6": cp.top6, "hw_iv4": cp.iv4, "hw_iv6": cp.iv6, "hw_l4": cp.l4,
                 "hw_sub4": cp.sub4, "hw_sub6": cp.sub6,
                 "hw_dos_profiles": cp.dos_profiles, "hw_dos_ifs": cp.dos_ifs}
        if cp.fqdn_rules is not None:
            parts.update(hw_fqdn_rules=cp.fqdn_rules, hw_fqdn_l4=cp.fqdn_l4)
        if cp.xmatch is not None:         # without it xm_stride is 0: the table is not read
            parts["hw_xmatch"] = cp.xmatch
        written, known = {}, []
        for name, arr in parts.items():
            if held.get(name) is arr:        # a read-only array this object wrote there itself
                written[name] = 0
                known.append(name)
                continue
            per_gen = POLICY_MAPS[name][1]
            written[name] = write_changed(self.view(name)[new * per_gen: new * per_gen + len(arr)], arr)
        self._held[new] = (cp.hdr.tobytes(), {k: a for k, a in parts.items() if not a.flags.writeable})
        t2 = time.perf_counter()
        self.set_config(gen=new)           # the switch: one map update
        t3 = time.perf_counter()
        self._flipped = (new, int(cp.hdr["revision_id"][0]))
        if self._installs:               # a second install: this object swaps again, likely soon
            self._start_grace(*self._flipped)
        self._installs += 1
        return SwapTiming(barrier_s=t1 - t0, write_s=t2 - t1, switch_s=t3 - t2, old_gen=old, new_gen=new,
                          written=written, known=tuple(known))

    def _standby_free(self, active: int) -> bool:
        """Return once no packet reads the standby half; True if this object's own last flip is still the
        last one (same gen and revision in force), so the standby half holds what it wrote there. The
        grace period started after that flip counts only then; after anyone else's flip, or if that
        wait failed, wait one now."""
        if self._barrier is None:
            self._barrier = bpfsys.RcuBarrier()
        grace, self._grace = self._grace, None
        ours = self._flipped is not None and self._flipped == (active, int(self.active_header()["revision_id"]))
        if ours and grace is not None and grace[1] == self._flipped:
            if grace[0].exception() is not None:     # waits for it; it failed: wait one here
                self._barrier.wait()
            return True
        self._barrier.wait()
        return ours

    def _start_grace(self, gen: int, revision_id: int) -> None:
        """One grace period on this object's worker thread, with the worker's own barrier (started once:
        a queued call costs ~10 µs, a new thread's start a scheduling round, ms on a loaded machine)."""
        if self._grace_pool is None:
            self._grace_pool = ThreadPoolExecutor(1, thread_name_prefix="hostwall-grace")
            self._grace_barrier = bpfsys.RcuBarrier()
        self._grace = (self._grace_pool.submit(self._grace_barrier.wait), (gen, revision_id))

    def close(self) -> None:
        """Does not wait for a grace period still running: the worker closes its barrier after it."""
        self._grace = None
        if self._grace_pool is not None:
            self._grace_pool.submit(self._grace_barrier.close)
            self._grace_pool.shutdown(wait=False)
            self._grace_pool = None
        super().close()


def write_changed(dst: np.ndarray, src: np.ndarray) -> int:
    """Copy the records of `src` that differ from `dst` (same dtype and length) into `dst`; returns
    how many. Records compare as rows of the widest integer that divides their size."""
    n = len(src)
    if n == 0:
        return 0
    src = np.ascontiguousarray(src)
    size = src.dtype.itemsize
    word = next(w for w in (8, 4, 2, 1) if size % w == 0)
    a, b = dst.view(f"u{word}"), src.view(f"u{word}")
    ne = a != b
    diff = np.flatnonzero(ne if size == word else ne.reshape(n, size // word).any(axis=1))
    if len(diff) == n:
        dst[:] = src
    elif len(diff):
        dst[diff] = src[diff]
    return len(diff)
