"""The on-call path end to end (docs/alerting.md), for tests/lab/test_oncall_lab.py and `python -m hostwall.bench
oncall`: a netns lab with the real enforcer (examples/policy.yaml) and collector (its metrics endpoint, and
optionally direct alert push), a real Prometheus (the project's rules, 1 s scrape and evaluation) and a real
Alertmanager (deploy/alertmanager/alertmanager.yml, its receivers pointed at a webhook receiver in the process).

    with OncallRig(workdir, push=True) as rig:
        rig.wait_warm()
        run = rig.flood()                                 # trafgen from the attacker, until run.stop()
        page = rig.hook.wait_for(lambda ns: rig.pages(), what="the page")

Changes to the deployed files, by substitution so the rest is exactly what is deployed: every receiver posts to
the webhook; group_wait becomes `group_wait` (default 1 s; the pushed-incident route keeps its 0 s),
group_interval 2 s; HostwallCollectorDown's `for` becomes `collector_down_for`. Everything is stopped and
removed by close(), also after a failure.
"""
from __future__ import annotations

import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hostwall.lab import traffic
from hostwall.lab.collector_proc import CollectorProcess
from hostwall.lab.enforcer_proc import EnforcerProcess
from hostwall.lab.netns import Lab

from . import free_ports
from .alertmanager import Alertmanager, Notification, WebhookReceiver, alert
from .prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts" / "hostwall.rules.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
POLICY = ROOT / "examples" / "policy.yaml"
PLACEHOLDER = "http://127.0.0.1:9099/"
ATTACKER_PREFIX = "10.66.3.0/24"
PAGE = "hostwall-page"


def am_config(receiver_url: str, group_wait: str = "1s", group_interval: str = "2s") -> str:
    text = AM_CONFIG.read_text().replace(PLACEHOLDER, receiver_url.rstrip("/") + "/")
    text = re.sub(r"(group_wait:\s*)(?!0s)\S+", rf"\g<1>{group_wait}", text)
    return re.sub(r"(group_interval:\s*)\S+", rf"\g<1>{group_interval}", text)


def rules_copy(dest: Path, collector_down_for: str) -> Path:
    text = RULES.read_text()
    head, tail = text.split("- alert: HostwallCollectorDown", 1)
    tail = re.sub(r"for: \S+", f"for: {collector_down_for}", tail, count=1)
    dest.write_text(head + "- alert: HostwallCollectorDown" + tail)
    return dest


class OncallRig:
    def __init__(self, workdir: str | Path, *, push: bool = True, group_wait: str = "1s",
                 collector_down_for: str = "15s", hold: str = "60s", flood_pps: int = 20_000):
        self.workdir = Path(workdir)
        self.push, self.group_wait, self.hold, self.flood_pps = push, group_wait, hold, flood_pps
        self.collector_down_for = collector_down_for
        self._stack = ExitStack()
        self.lab: Lab | None = None
        self.col: CollectorProcess | None = None
        self.metrics_port = free_ports(1)[0]

    # ---- life cycle -------------------------------------------------------------------------------
    def __enter__(self) -> OncallRig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        s = self._stack
        self.hook = s.enter_context(WebhookReceiver("/hook"))
        self.am = s.enter_context(Alertmanager(am_config(self.hook.url, self.group_wait),
                                               workdir=self.workdir / "alertmanager"))
        self.am.start()
        self.lab = s.enter_context(Lab())
        self.lab.warm()
        self.enf = s.enter_context(EnforcerProcess(self.lab, POLICY))      # entering starts it
        s.enter_context(traffic.echo_servers(self.lab, "prot", tcp=[80], udp=[5353]))
        self.start_collector(self.push)
        rules = rules_copy(self.workdir / "hostwall.rules.yml", self.collector_down_for)
        self.prom = s.enter_context(PrometheusServer({"hostwall": [self.target]}, rule_files=[rules],
                                                     alertmanagers=[self.am.url], scrape_interval="1s",
                                                     workdir=self.workdir / "prometheus"))
        self.prom.start()
        self.prom.wait_for_targets_up("hostwall", timeout=60)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def collector_config(self, push: bool) -> dict:
        # a small event budget: the lab flood's sampled events exceed it (as a 100k pps flood exceeds the
        # default), so the kernel sheds some — expected, counted, never paged (HostwallRecordsLost)
        cfg: dict[str, Any] = {"metrics": {"prometheus": self.target}, "event_budget": 500}
        if push:
            cfg["alerting"] = {"alertmanager": self.am.url, "hold": self.hold, "refresh_interval": "5s",
                               "timeout": "1s"}
        return cfg

    def start_collector(self, push: bool | None = None) -> CollectorProcess:
        """(Re)start the collector: same out dir, and the enforcer's state dir (checkpoint, baselines,
        incidents) — a restart, as an operator's."""
        if push is not None:
            self.push = push
        if self.col is not None:
            self.col.close()
        self.col = CollectorProcess(self.enf, self.workdir / "collector", config=self.collector_config(self.push))
        self._stack.callback(self.col.close)
        self.col.start()
        return self.col

    def restart_collector(self) -> None:
        self.col.stop()
        self.start_collector()

    def restart_alertmanager(self) -> None:
        """A fresh Alertmanager on the same port (no groups, no notification log): each bench trial alike."""
        self.am.stop()
        shutil.rmtree(self.am.data_dir, ignore_errors=True)
        self.am.start()

    def close(self) -> None:
        self._stack.close()

    # ---- driving ------------------------------------------------------------------------------------
    def wait_warm(self, timeout: float = 60.0) -> dict:
        """Until the detector is past its warm-up (or started from saved baselines)."""
        return self.col.wait_status(lambda st: (st.get("anomaly") or {}).get("warm"), timeout=timeout)

    def normal_traffic(self) -> dict:
        return traffic.tcp_client_in(self.lab, "cli", self.lab.addr("prot"), 80, count=20, timeout=1.0)

    def flood(self, pps: int | None = None, src: str | None = None):
        """A UDP flood from the attacker's namespace to udp/5353 until the returned run is stopped: from its own
        address (denied by the policy, limited by the DoS profile), or from `src`, a prefix whose addresses
        are cycled through (10.66.2.0/24: allowed to udp/5353, so up to the port's DoS limit its datagrams
        are new one-packet flows — more sampled events than the collector's event budget takes)."""
        return traffic.trafgen_in(self.lab, "att", kind="udp", dport=5353, sport=(1024, 65535), duration=None,
                                  rate_pps=pps or self.flood_pps, src=src)

    # ---- observing ----------------------------------------------------------------------------------
    def notifications(self, status: str | None = None, receiver: str | None = PAGE) -> list[Notification]:
        return [n for n in self.hook.notifications
                if (status is None or n.status == status) and (receiver is None or n.receiver == receiver)
                and "HostwallTestSentinel" not in n.alert_labels("alertname")]

    def pages(self, status: str = "firing") -> list[Notification]:
        return self.notifications(status)

    def quiesce(self, timeout: float = 30.0) -> None:
        """A sentinel in a group of its own, waited for: every group that existed before has flushed."""
        instance = f"sentinel-{time.monotonic_ns()}"
        self.am.post_alerts([alert("HostwallTestSentinel", service="hostwall", severity="critical",
                                   instance=instance)])
        self.hook.wait_for(lambda ns: [n for n in ns if instance in n.alert_labels("instance")], timeout=timeout,
                           what="the sentinel")
