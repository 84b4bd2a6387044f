#!/usr/bin/env bash
# Installs everything hostwall needs on a fresh Debian 12 machine. Idempotent; safe to re-run.
#   - Debian packages: BCC, kernel headers, iproute2, nftables, iptables, traffic tools, DNS (dnsmasq-base:
#     the binary only, no service, the FQDN lab's upstream in a test namespace; dnsperf: the dns benchmark;
#     xdp-tools: xdp-filter, the peer the datapath and lab benchmarks measure hostwall against)
#   - the kernel-header links BCC needs (/lib/modules/$(uname -r)/{build,source})
#   - bpffs at /sys/fs/bpf
#   - a venv (.venv) on /usr/bin/python3 that sees Debian's BCC, with hostwall installed editable
# Big downloads/builds (later: Kafka jars, OTel Collector) are cached under $HOSTWALL_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=${HOSTWALL_CACHE:-/var/cache/hostwall}
mkdir -p "$CACHE"

log() { printf '[setup] %s\n' "$*"; }

DEB_PKGS=(python3-bpfcc libbpfcc linux-headers-amd64 iproute2 nftables iptables netsniff-ng hping3
          netcat-openbsd iputils-ping python3-venv python3-dev dnsmasq-base dnsperf xdp-tools)
missing=()
for p in "${DEB_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]} (a few minutes on a fresh machine)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>"$CACHE/apt.log" ||
    { tail -n 20 "$CACHE/apt.log" >&2; echo "setup: apt-get install failed (log: $CACHE/apt.log)" >&2; exit 1; }
fi

# BCC compiles against kernel headers. Debian's 6.1 headers build XDP/TC programs fine for newer kernels;
# point /lib/modules/$(uname -r)/{build,source} at them when the running kernel has none of its own.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$hdr" ] && [ -n "$common" ] || { echo "setup: no linux-headers found under /usr/src" >&2; exit 1; }
  log "linking kernel headers: $KDIR/build -> $hdr, source -> $common"
  mkdir -p "$KDIR"
  ln -sfn "$hdr" "$KDIR/build"
  ln -sfn "$common" "$KDIR/source"
fi

mountpoint -q /sys/fs/bpf || { log "mounting bpffs at /sys/fs/bpf"; mount -t bpf bpf /sys/fs/bpf; }

# A venv on Debian's python that sees BCC: a .pth pointing at a folder holding only a `bcc` symlink,
# so the rest of Debian's dist-packages does not leak into the venv.
VENV=$ROOT/.venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
BCC_SRC=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
SHIM=$VENV/bcc-shim
mkdir -p "$SHIM"
ln -sfn "$BCC_SRC" "$SHIM/bcc"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SHIM" > "$SITE/bcc-shim.pth"

stamp=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  # pip and the build backend talk a lot (progress bars, editable-install notices); keep it in a log and
  # show it only when something fails.
  pip_log=$CACHE/pip-install.log
  log "installing hostwall and its Python dependencies into the venv (about a minute; log: $pip_log)"
  if ! { PIP_CACHE_DIR=$CACHE/pip "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip &&
         PIP_CACHE_DIR=$CACHE/pip "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"; } \
       >"$pip_log" 2>&1; then
    tail -n 40 "$pip_log" >&2
    echo "setup: pip install failed (full log: $pip_log)" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' || { echo "setup: bcc not importable from the venv" >&2; exit 1; }

# The on-call path (docs/alerting.md, `python -m hostwall.bench oncall`): Debian's prometheus and
# prometheus-alertmanager, installed by setup-peers.sh so that their Debian services never start (they
# would bind :9090 / :9093); idempotent and quick once installed.
bash scripts/setup-peers.sh prometheus alertmanager >/dev/null ||
  { echo "setup: installing prometheus / prometheus-alertmanager failed (run scripts/setup-peers.sh)" >&2; exit 1; }
log "ready: $VENV/bin/python"
