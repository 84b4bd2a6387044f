"""Community ID v1 against the spec's published baseline (corelight/community-id-spec, baseline/).

baseline_deflt.json is the spec's JSON data set, checked in unchanged under tests/collector/data; the
table vectors below are the spec's baseline/README.md tables (defaults, seed=1, no base64).
ICMP rows carry (type, code) in the port columns, as the spec's tables do.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostwall.collector.community_id import community_id

DATA = Path(__file__).parent / "data"
BASELINE = json.loads((DATA / "community_id_baseline_deflt.json").read_text())

A6 = "fe80:0001:0203:0405:0607:0809:0A0B:0C0D"
B6 = "fe80:1011:1213:1415:1617:1819:1A1B:1C1D"

# (proto, saddr, daddr, sport, dport, default, seed=1, no-base64)
TABLE = [
    (6, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk=",
     "1:c026f7386ef200559e95a53276ed03fb5db908b3"),
    (6, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:wCb3OG7yAFWelaUydu0D+125CLM=", "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk=",
     "1:c026f7386ef200559e95a53276ed03fb5db908b3"),
    (17, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw=",
     "1:d0cbbd227431eb3e1988264cffb1d78b658c84e8"),
    (17, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg=", "1:OShq+iKDAMVouh/4bMxB9Sz4amw=",
     "1:d0cbbd227431eb3e1988264cffb1d78b658c84e8"),
    (132, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s=",
     "1:10ab7832cc6ec9a13a98bfa19ab12443d72c0c3f"),
    (132, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8=", "1:uitchpn5MMGAQKBJh7bIr/bAr7s=",
     "1:10ab7832cc6ec9a13a98bfa19ab12443d72c0c3f"),
    (1, "1.2.3.4", "5.6.7.8", 8, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU=",
     "1:72ba1d4472f6144b078dbbf752446b7dbb386d9d"),
    (1, "5.6.7.8", "1.2.3.4", 0, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0=", "1:9pr4ZGTICiuZoIh90RRYE2RyXpU=",
     "1:72ba1d4472f6144b078dbbf752446b7dbb386d9d"),
    (1, "1.2.3.4", "5.6.7.8", 11, 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk=", "1:1DD7cWGC/Yg91YGsQeni8du3pIA=",
     "1:7ff6224b25aa733ad381f5026650549ef1d170f9"),
    (58, A6, B6, 128, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE=",
     "1:d1b7fb872309530b777cc103ef3f0b21f46905ea"),
    (58, B6, A6, 129, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo=", "1:IO27GQzPuCtNnwFvjWALMHu5tJE=",
     "1:d1b7fb872309530b777cc103ef3f0b21f46905ea"),
    (58, A6, B6, 146, 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10=", "1:Cv4IKJe56BNkF0MBW2YxQ3Nwc3s=",
     "1:7d80bcfa9cf6e04f8484034fd44661a57d03c35d"),
    (46, "1.2.3.4", "5.6.7.8", None, None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8=",
     "1:8a4bf79267fcf65b9fef758fcf58ceb38f52efaf"),
    (46, "5.6.7.8", "1.2.3.4", None, None, "1:ikv3kmf89luf73WPz1jOs49S768=", "1:/buhqeOmaRCopOZFy9HnoJd5XW8=",
     "1:8a4bf79267fcf65b9fef758fcf58ceb38f52efaf"),
    (46, A6, B6, None, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM=",
     "1:c10ff69b0ae75cfe259897077462f978f8d1f9ed"),
    (46, B6, A6, None, None, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0=", "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM=",
     "1:c10ff69b0ae75cfe259897077462f978f8d1f9ed"),
]


def test_baseline_json_has_all_rows():
    assert len(BASELINE) == 23          # the spec's file, not a trimmed copy


@pytest.mark.parametrize("row", BASELINE, ids=lambda r: f"{r['proto']}-{r['saddr']}-{r['sport']}")
def test_spec_baseline_json(row):
    assert community_id(row["saddr"], row["daddr"], row["proto"], row["sport"], row["dport"]) == row["communityid"]


@pytest.mark.parametrize("proto,sa,da,sp,dp,deflt,seed1,nob64", TABLE)
def test_spec_readme_tables(proto, sa, da, sp, dp, deflt, seed1, nob64):
    assert community_id(sa, da, proto, sp, dp) == deflt
    assert community_id(sa, da, proto, sp, dp, seed=1) == seed1
    assert community_id(sa, da, proto, sp, dp, b64=False) == nob64


def test_packed_and_object_addresses_agree():
    a, b = ipaddress.ip_address("1.2.3.4"), ipaddress.ip_address("5.6.7.8")
    assert community_id(a.packed, b.packed, 6, 1122, 3344) == community_id(a, b, 6, 1122, 3344) \
        == "1:wCb3OG7yAFWelaUydu0D+125CLM="


def test_missing_port_of_port_protocol_is_empty_not_guessed():
    assert community_id("1.2.3.4", "5.6.7.8", 6, None, 80) == ""


def test_mixed_families_rejected():
    with pytest.raises(ValueError):
        community_id("1.2.3.4", "::1", 6, 1, 2)


_v4 = st.ip_addresses(v=4).map(str)
_port = st.integers(0, 65535)


@given(_v4, _v4, st.sampled_from([6, 17, 132]), _port, _port)
def test_direction_independent(sa, da, proto, sp, dp):
    assert community_id(sa, da, proto, sp, dp) == community_id(da, sa, proto, dp, sp)


@given(_v4, _v4, st.integers(0, 255).filter(lambda t: t not in (0, 8, 9, 10, 13, 14, 15, 16, 17, 18)),
       st.integers(0, 255))
def test_one_way_icmp_is_not_reordered(sa, da, icmp_type, code):
    # one-way messages keep (src, dst) as given: the reverse tuple is a different message
    fwd = community_id(sa, da, 1, icmp_type, code)
    assert fwd.startswith("1:") and len(fwd) == 30
    if sa != da:
        assert fwd != community_id(da, sa, 1, icmp_type, code)
