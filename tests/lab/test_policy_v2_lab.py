"""Policy v2 end to end with the real `hostwall-enforcer` and real packets (docs/policy.md "Essential
ICMP", docs/datapath.md "Fragments"):

- IPv6 under `ingress: deny` with one TCP allow rule works (neighbour discovery passes as essential
  ICMP); with `essential_icmp: false` the client cannot resolve the host and the connection fails.
- 4,000-byte UDP datagrams, fragmented by the sender's kernel, both families: to an allowed port they
  arrive, to a denied port they do not, fragmented answers of the host's own (tracked) queries arrive,
  and the fragment table's counters add up to the verdict counters.
- Crafted fragments (scapy, sent raw from the client): in order, out of order, overlapping, a second
  offset-0 fragment naming another port, a tiny first fragment — each follows the documented rule.
"""
from __future__ import annotations

import os
import random

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from hostwall.lab import traffic
from hostwall.lab.enforcer_proc import EnforcerProcess, drops, rule_packets
from hostwall.lab.frames import send_and_collect

pytestmark = pytest.mark.lab

ONE_TCP_RULE = """
version: 1
name: nd-{name}
defaults: {{ingress: deny, egress: allow, essential_icmp: {essential}}}
rules:
  - {{name: web-in, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [8080]}}
"""
FRAG_POLICY = """
version: 1
name: fragments
defaults: {ingress: deny, egress: allow}
rules:
  - {name: mdns-in, priority: 10, direction: ingress, action: allow, protocol: udp, ports: [5353]}
  - {name: web-in, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [8080]}
"""
SIZE = 4000                 # UDP payload: 3 fragments at the lab's 1500-byte MTU, both families
LATER = 2                   # later fragments per datagram


def write(tmp_path, name: str, text: str):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def counter(st: dict, hook: str, verdict: str, reason: str) -> int:
    return st["counters"].get(hook, {}).get(verdict, {}).get(reason, {}).get("packets", 0)


def neigh(lab, host: str, addr: str) -> str:
    return lab.run(host, ["ip", "-6", "neigh", "show", addr]).stdout.strip()


def reasm(lab, host: str, fam: int) -> dict[str, int]:
    """The kernel's reassembly counters (fragments that reached IP, datagrams rebuilt, failures)."""
    if fam == 4:
        ip = lab.snmp(host)["Ip"]
        return {"reqds": ip["ReasmReqds"], "oks": ip["ReasmOKs"], "fails": ip["ReasmFails"]}
    kv = dict(line.split() for line in lab.read(host, "/proc/net/snmp6").splitlines() if line.strip())
    return {"reqds": int(kv["Ip6ReasmReqds"]), "oks": int(kv["Ip6ReasmOKs"]), "fails": int(kv["Ip6ReasmFails"])}


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b}


# ---------------------------------------------------------------- IPv6 neighbour discovery

@pytest.mark.parametrize("essential", [True, False], ids=["essential_icmp", "no_essential_icmp"])
def test_ipv6_under_ingress_deny_with_one_tcp_rule(lab, tmp_path, essential):
    pol = write(tmp_path, "nd", ONE_TCP_RULE.format(name=str(essential).lower(), essential=str(essential).lower()))
    prot6 = lab.addr("prot", 6)
    with traffic.echo_servers(lab, "prot", tcp=[8080]), EnforcerProcess(lab, pol) as enf:
        for h in ("cli", "prot"):           # nothing cached: the client must resolve the host now
            lab.run(h, ["ip", "neigh", "flush", "all"])
        v6 = traffic.tcp_client_in(lab, "cli", prot6, 8080, count=3, timeout=2.0)
        v4 = traffic.tcp_client_in(lab, "cli", lab.addr("prot", 4), 8080, count=3, timeout=2.0)
        st = enf.status()
        assert v4["ok"] == 3, v4                                    # ARP is not IP: never judged
        assert st["defaults"]["essential_icmp"] is essential
        if essential:
            assert v6["ok"] == 3, v6
            assert counter(st, "xdp_ingress", "allow", "pass_essential") >= 1       # the client's NS
            assert rule_packets(st)["essential_icmp"] >= 1
            n = neigh(lab, "cli", prot6)                    # read once: the entry's state moves on
            assert "REACHABLE" in n or "STALE" in n, n
        else:
            # documented (docs/policy.md): without essential ICMP or an icmpv6 rule for neighbour
            # discovery, the client's neighbour solicitations are dropped; its SYN is never sent
            assert v6["ok"] == 0, v6
            assert "essential_icmp" not in rule_packets(st)
            assert counter(st, "xdp_ingress", "allow", "pass_essential") == 0
            assert drops(st).get("default_deny", 0) >= 1
            n = neigh(lab, "cli", prot6)                    # read once: INCOMPLETE turns FAILED meanwhile
            assert "FAILED" in n or "INCOMPLETE" in n, n
            assert counter(st, "xdp_ingress", "allow", "pass_rule") == 3             # only the v4 SYNs


# ---------------------------------------------------------------- fragments, kernel-made

@pytest.mark.parametrize("fam", [4, 6])
def test_fragmented_datagrams_follow_their_first_fragment(lab, tmp_path, fam):
    pol = write(tmp_path, "frag", FRAG_POLICY)
    prot, cli = lab.addr("prot", fam), lab.addr("cli", fam)
    with traffic.echo_servers(lab, "prot", udp=[5353, 5354]), traffic.echo_servers(lab, "cli", udp=[7000]), \
            EnforcerProcess(lab, pol) as enf:
        lab.warm(pairs=(("cli", "prot"),), families=(fam,))
        s0, k0 = enf.status(), reasm(lab, "prot", fam)
        allowed = traffic.udp_client_in(lab, "cli", prot, 5353, count=3, size=SIZE, timeout=3.0)
        denied = traffic.udp_client_in(lab, "cli", prot, 5354, count=2, size=SIZE, timeout=1.0)
        answers = traffic.udp_client_in(lab, "prot", cli, 7000, count=3, size=SIZE, timeout=3.0)
        s1, k1 = enf.status(), reasm(lab, "prot", fam)
    assert (allowed["ok"], denied["ok"], answers["ok"]) == (3, 0, 3), (allowed, denied, answers)
    f = delta(s0["fragments"][f"ipv{fam}"], s1["fragments"][f"ipv{fam}"])
    # first fragments that passed: in, 3 to 5353 (rule) + 3 answers (conntrack); out, 3 echoes (conntrack)
    # + 3 queries (default allow)
    assert f == {"inserted": 12, "evicted": 0, "claim_lost": 0, "followed": 12 * LATER, "unmatched": 2 * LATER}, f
    c = {(h, v, r): counter(s1, h, v, r) - counter(s0, h, v, r) for h in ("xdp_ingress", "tc_egress")
         for v, r in (("allow", "pass_fragment"), ("drop", "fragment_unmatched"), ("drop", "default_deny"))}
    assert c[("xdp_ingress", "allow", "pass_fragment")] == 6 * LATER
    assert c[("tc_egress", "allow", "pass_fragment")] == 6 * LATER
    assert c[("xdp_ingress", "drop", "fragment_unmatched")] == f["unmatched"] == 2 * LATER
    assert c[("xdp_ingress", "drop", "default_deny")] == 2          # the denied datagrams' first fragments
    assert k1["oks"] - k0["oks"] == 6                               # reassembled: 3 datagrams + 3 answers
    assert k1["reqds"] - k0["reqds"] == 6 * (LATER + 1)             # no fragment of a denied datagram got in
    pressure = s1["map_pressure"][f"hw_frag{fam}"]
    assert pressure["capacity"] == 16384 and 0 < pressure["entries"] <= 12


# ---------------------------------------------------------------- fragments, hand-made

def _udp_frags(lab, fam: int, sport: int, dport: int, ident: int):
    src, dst = lab.addr("cli", fam), lab.addr("prot", fam)
    body = UDP(sport=sport, dport=dport) / Raw(os.urandom(SIZE))
    if fam == 4:
        return fragment(IP(src=src, dst=dst, id=ident) / body, fragsize=1480)
    return fragment6(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / body, 1500)


def _overlapping(f, fam: int):
    """A copy of later fragment `f` moved 8 bytes on (same length, other bytes): it overlaps the end of
    `f` and the start of the next fragment. (A fragment wholly inside data already queued would be a
    duplicate, which the kernel ignores.)"""
    g = f.copy()
    g[Raw].load = g[Raw].load[8:] + os.urandom(8)
    if fam == 4:
        g.frag += 1
        del g.len, g.chksum
    else:
        g[IPv6ExtHdrFragment].offset += 1
        del g.plen
    return g


@pytest.mark.parametrize("fam", [4, 6])
def test_crafted_fragments_follow_the_documented_rules(lab, tmp_path, fam):
    pol = write(tmp_path, "frag", FRAG_POLICY)
    prot = lab.addr("prot", fam)
    eth = Ether(src=lab.mac("cli"), dst=lab.mac("prot"))
    rnd = random.Random()
    with traffic.echo_servers(lab, "prot", udp=[5353, 5354]), EnforcerProcess(lab, pol) as enf:
        lab.warm(pairs=(("cli", "prot"),), families=(fam,))

        def case(port: int, frags) -> tuple[dict, dict, dict]:
            s0, k0 = enf.status(), reasm(lab, "prot", fam)
            got = send_and_collect(lab, "cli", [raw(eth / x) for x in frags], family=fam, port=port,
                                   marker_dst=prot, marker_port=5353)
            assert got["marker"], got          # everything sent before the marker was judged and echoed
            s1, k1 = enf.status(), reasm(lab, "prot", fam)
            f = delta(s0["fragments"][f"ipv{fam}"], s1["fragments"][f"ipv{fam}"])
            return got, f, {**delta(k0, k1), "malformed": drops(s1).get("malformed", 0) - drops(s0).get("malformed", 0),
                            "default_deny": drops(s1).get("default_deny", 0) - drops(s0).get("default_deny", 0)}

        def ident() -> int:
            return rnd.randrange(1, 1 << (16 if fam == 4 else 32))

        # in order: the datagram arrives and is echoed whole (the echo, fragmented by the host's kernel,
        # is a second datagram through the table: egress)
        fr = _udp_frags(lab, fam, 47001, 5353, ident())
        got, f, k = case(47001, fr)
        assert got["received"] == [SIZE] and (f["inserted"], f["followed"], f["unmatched"]) == (2, 2 * LATER, 0)
        assert (k["reqds"], k["oks"]) == (LATER + 1, 1)

        # out of order: the later fragment that overtakes its first fragment is dropped, the datagram lost
        fr = _udp_frags(lab, fam, 47002, 5353, ident())
        got, f, k = case(47002, [fr[1], fr[0], fr[2]])
        assert got["received"] == [] and (f["inserted"], f["followed"], f["unmatched"]) == (1, 1, 1)
        assert (k["reqds"], k["oks"]) == (2, 0)

        # overlapping: follows its first fragment like any later fragment; the kernel discards the
        # datagram (RFC 5722; Linux >= 4.19 for IPv4)
        fr = _udp_frags(lab, fam, 47003, 5353, ident())
        got, f, k = case(47003, [fr[0], fr[1], _overlapping(fr[1], fam), fr[2]])
        assert got["received"] == [] and (f["followed"], f["unmatched"]) == (LATER + 1, 0)
        assert k["reqds"] == LATER + 2 and k["oks"] == 0

        # a second offset-0 fragment naming a denied port is a first fragment: judged by the rules
        i = ident()
        fr, other = _udp_frags(lab, fam, 47004, 5353, i), _udp_frags(lab, fam, 47004, 5354, i)
        got, f, k = case(47004, [fr[0], other[0]])
        assert k["default_deny"] == 1 and f["inserted"] == 1 and k["reqds"] == 1

        # to a denied port: neither the first nor the later fragments get in
        fr = _udp_frags(lab, fam, 47005, 5354, ident())
        got, f, k = case(47005, fr)
        assert got["received"] == [] and (f["inserted"], f["unmatched"]) == (0, LATER)
        assert (k["reqds"], k["default_deny"]) == (0, 1)

        # tiny first fragment (RFC 1858): 8 bytes of a TCP header is malformed; the rest is unmatched
        tcp = raw(TCP(sport=47006, dport=8080, flags="S")) + b"z" * 24
        if fam == 4:
            ip = IP(src=lab.addr("cli", 4), dst=prot, id=ident(), proto=6)
            tiny = [ip.copy() / Raw(tcp[:8]), ip.copy() / Raw(tcp[8:])]
            tiny[0].flags, tiny[1].frag = "MF", 1
        else:
            i6 = ident()
            tiny = [IPv6(src=lab.addr("cli", 6), dst=prot) / IPv6ExtHdrFragment(nh=6, m=1, offset=0, id=i6) / Raw(tcp[:8]),
                    IPv6(src=lab.addr("cli", 6), dst=prot) / IPv6ExtHdrFragment(nh=6, m=0, offset=1, id=i6) / Raw(tcp[8:])]
        got, f, k = case(47006, tiny)
        assert (k["malformed"], f["unmatched"], f["inserted"], k["reqds"]) == (1, 1, 0, 0)
