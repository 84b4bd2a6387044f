#!/usr/bin/env bash
# Installs and caches the real components that hostwall's peer tests talk to (docs/testing.md):
#   kafka       Apache Kafka (KRaft) jars from Maven Central      -> $CACHE/kafka/<version>/libs/*.jar
#               (+ kafka-tools for ProducerPerformance, log4j2 as the slf4j backend)
#   otelcol     OpenTelemetry Collector built with the collector   -> $CACHE/otelcol/<version>/otelcol-hostwall
#               builder from deploy/otelcol/manifest.yaml
#   prometheus  Debian's prometheus package (binary /usr/bin/prometheus); the Debian service is never used
#   alertmanager  Debian's prometheus-alertmanager package (/usr/bin/prometheus-alertmanager and amtool);
#               the Debian service is never used
#
# Usage: scripts/setup-peers.sh [--force] [--verify] [kafka] [otelcol] [prometheus] [alertmanager]
#        (default: all four)
#   --force   rebuild/re-fetch even when the cache is complete
#   --verify  re-run the start-up checks on a cached install (a fresh install is always verified)
#
# Idempotent: a component whose cache stamp matches its inputs (versions, pom, manifest) is skipped in well
# under a second. Everything downloaded or built lives under $HOSTWALL_CACHE (default /var/cache/hostwall):
# the Maven repository ($CACHE/m2), the Go module and build caches ($CACHE/go). Installs are staged in a
# temporary folder and renamed into place only after they were verified, so an interrupted run leaves no
# half-built cache behind. tests/peers/ finds the installs by the versions declared here and in the manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${HOSTWALL_CACHE:-/var/cache/hostwall}

# Versions: the Python helpers (tests/peers/) read KAFKA_VERSION from this line; keep it a plain assignment.
KAFKA_VERSION=4.3.1
LOG4J_VERSION=2.25.3
OTELCOL_MANIFEST=deploy/otelcol/manifest.yaml
# The collector version is the one on the manifest's otlpreceiver line (all components share it).
OTELCOL_VERSION=$(sed -n 's#.*go\.opentelemetry\.io/collector/receiver/otlpreceiver \(v[0-9][^ ]*\).*#\1#p' \
                  "$OTELCOL_MANIFEST" | head -n1)
[ -n "$OTELCOL_VERSION" ] || { echo "setup-peers: no otlpreceiver version in $OTELCOL_MANIFEST" >&2; exit 1; }

FORCE=0 VERIFY=0 WANT=()
for a in "$@"; do
  case $a in
    --force) FORCE=1 ;;
    --verify) VERIFY=1 ;;
    kafka|otelcol|prometheus|alertmanager) WANT+=("$a") ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "setup-peers: unknown argument: $a" >&2; exit 2 ;;
  esac
done
((${#WANT[@]})) || WANT=(kafka otelcol prometheus alertmanager)

log() { printf '[setup-peers] %s\n' "$*"; }
die() { printf '[setup-peers] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
TIMINGS=()
timing() { TIMINGS+=("$(awk -v a="$2" -v b="$(now)" -v n="$1" 'BEGIN { printf "%-22s %7.1f s", n, b - a }')"); }

mkdir -p "$CACHE"
# One setup at a time per cache (several engineers and CI may share a machine).
exec 9>"$CACHE/.setup-peers.lock"
flock -w 3600 9 || die "could not lock $CACHE/.setup-peers.lock"
# Leftovers of an interrupted run (we hold the lock, so nothing else is using them).
rm -rf "$CACHE"/kafka/*.stage.* "$CACHE"/otelcol/*/src.* "$CACHE"/otelcol/*/otelcol-hostwall.new
# A verification server still running when this script ends (error, Ctrl-C) is stopped with it.
PEER_PID= PEER_WORK=
trap 'if [ -n "$PEER_PID" ]; then kill -KILL -- "-$PEER_PID" 2>/dev/null || true; fi
      if [ -n "$PEER_WORK" ]; then rm -rf "$PEER_WORK"; fi' EXIT
trap 'exit 130' INT TERM

apt_install() {  # apt_install PKG... : install missing Debian packages, never starting their services
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Keep postinst scripts from starting daemons (prometheus would bind :9090, alertmanager :9093 — Kafka's
    # controller port in docker-compose.yml — as system services).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || rc=$?
  if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  ((rc == 0)) || die "apt-get install ${missing[*]} failed"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_port() {  # wait_port PORT SECONDS PID : until 127.0.0.1:PORT accepts, PID still alive
  local deadline=$(( $(date +%s) + $2 ))
  while (( $(date +%s) < deadline )); do
    kill -0 "$3" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

stop_group() {  # stop_group PID : TERM the process group, KILL after 20 s
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------------------------------------------ kafka
kafka_pom() {
  cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by hostwall scripts/setup-peers.sh: the jars of a Kafka ${KAFKA_VERSION} server + tools -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.hostwall.peers</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>${KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>${KAFKA_VERSION}</version></dependency>
    <!-- Kafka 4.x declares slf4j-api 1.7.36, so the slf4j 1.x binding of log4j2 (log4j-slf4j-impl) is the
         one that logs; log4j-slf4j2-impl would leave slf4j 1.7 on the NOP logger. -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>${LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>${LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
EOF
}

kafka_verify() {  # kafka_verify LIBS : format storage and start a KRaft combined node on 127.0.0.1, then stop
  local libs=$1 work bport cport cid pid
  work=$(mktemp -d "${TMPDIR:-/tmp}/hostwall-kafka-verify.XXXXXX"); PEER_WORK=$work
  bport=$(free_port); cport=$(free_port)
  while [ "$cport" = "$bport" ]; do cport=$(free_port); done
  cat > "$work/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$bport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$work/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
EOF
  cat > "$work/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $work/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
EOF
  local jopts=(-Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true
               "-Dlog4j2.configurationFile=$work/log4j2.properties" -cp "$libs/*")
  cid=$(java "${jopts[@]}" kafka.tools.StorageTool random-uuid 2>>"$work/tool.err" | tail -n1) \
    || { cat "$work/tool.err" >&2; die "kafka: StorageTool random-uuid failed"; }
  java "${jopts[@]}" kafka.tools.StorageTool format --standalone -t "$cid" -c "$work/server.properties" \
    >"$work/format.out" 2>&1 || { cat "$work/format.out" >&2; die "kafka: StorageTool format failed"; }
  setsid java "${jopts[@]}" kafka.Kafka "$work/server.properties" >"$work/stdout.log" 2>&1 9>&- &
  pid=$! PEER_PID=$!
  local ok=0
  if wait_port "$bport" 120 "$pid"; then
    local deadline=$(( $(date +%s) + 60 ))
    while (( $(date +%s) < deadline )); do
      grep -q 'Kafka Server started' "$work/server.log" 2>/dev/null && { ok=1; break; }
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
  fi
  stop_group "$pid"
  PEER_PID=
  if ((ok == 0)); then
    tail -n 40 "$work/stdout.log" "$work/server.log" >&2 2>/dev/null || true
    rm -rf "$work"
    die "kafka: the KRaft node did not start (see above)"
  fi
  if grep -q 'SLF4J' "$work/stdout.log"; then
    grep 'SLF4J' "$work/stdout.log" >&2
    rm -rf "$work"
    die "kafka: slf4j is not bound to log4j2"
  fi
  rm -rf "$work"
  log "kafka: KRaft combined node on 127.0.0.1:$bport started and stopped cleanly"
}

setup_kafka() {
  local t0; t0=$(now)
  command -v java >/dev/null || apt_install openjdk-17-jre-headless    # the tests run the broker on it
  local dir=$CACHE/kafka/$KAFKA_VERSION key
  key=$(kafka_pom | sha256sum | cut -c1-16)
  if ((FORCE == 0)) && [ "$(cat "$dir/.installed" 2>/dev/null)" = "$key" ]; then
    log "kafka $KAFKA_VERSION: cached at $dir"
    if ((VERIFY)); then kafka_verify "$dir/libs"; fi
    timing "kafka (cached)" "$t0"
    return
  fi
  command -v mvn >/dev/null || apt_install maven                         # only to fetch the jars
  log "kafka $KAFKA_VERSION: fetching jars from Maven Central"
  local stage=$dir.stage.$$
  rm -rf "$stage"; mkdir -p "$stage"
  kafka_pom > "$stage/pom.xml"
  nice mvn -B -q -Dstyle.color=never -f "$stage/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
      -Dmaven.wagon.http.retryHandler.count=3 \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$stage/libs" >"$stage/mvn.log" 2>&1 \
    || { tail -n 40 "$stage/mvn.log" >&2; rm -rf "$stage"; die "kafka: mvn dependency:copy-dependencies failed"; }
  timing "kafka jars (mvn)" "$t0"
  local t1; t1=$(now)
  kafka_verify "$stage/libs"
  timing "kafka verify" "$t1"
  echo "$key" > "$stage/.installed"
  rm -rf "$dir"; mv "$stage" "$dir"
  log "kafka $KAFKA_VERSION: $(ls "$dir/libs" | wc -l) jars in $dir/libs"
  timing "kafka total" "$t0"
}

# ---------------------------------------------------------------------------------------------- otelcol
go_env() {
  export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOFLAGS=-mod=mod GOTOOLCHAIN=local
  # Prefer the Go the image ships in /usr/local/go (Debian's golang is too old for the builder).
  [ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH
  command -v go >/dev/null || die "otelcol: no Go toolchain (need Go >= 1.25 in PATH or /usr/local/go)"
  local v; v=$(go env GOVERSION | sed 's/^go//')
  [ "$(printf '%s\n1.25\n' "$v" | sort -V | head -n1)" = 1.25 ] || die "otelcol: Go $v is too old (need >= 1.25)"
}

otelcol_verify() {  # otelcol_verify BINARY : lists our components and validates a config using all of them
  local bin=$1 work comps c
  comps=$("$bin" components 2>&1) || { echo "$comps" >&2; die "otelcol: '$bin components' failed"; }
  for c in otlp debug file prometheus health_check; do
    grep -Eq "name: $c\$" <<<"$comps" || die "otelcol: component '$c' missing from the build"
  done
  work=$(mktemp -d "${TMPDIR:-/tmp}/hostwall-otelcol-verify.XXXXXX"); PEER_WORK=$work
  cat > "$work/config.yaml" <<EOF
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "127.0.0.1:$(free_port)"}
      http: {endpoint: "127.0.0.1:$(free_port)"}
exporters:
  debug: {}
  file: {path: "$work/out.jsonl"}
  prometheus: {endpoint: "127.0.0.1:$(free_port)"}
extensions:
  health_check: {endpoint: "127.0.0.1:$(free_port)"}
service:
  extensions: [health_check]
  pipelines:
    logs: {receivers: [otlp], exporters: [file, debug]}
    metrics: {receivers: [otlp], exporters: [file, prometheus]}
EOF
  "$bin" validate --config "$work/config.yaml" >"$work/validate.out" 2>&1 \
    || { cat "$work/validate.out" >&2; rm -rf "$work"; die "otelcol: config validation failed"; }
  rm -rf "$work"
  log "otelcol: $(grep -m1 -E '^ *version:' <<<"$comps" | tr -s ' '); components and config validated"
}

setup_otelcol() {
  local t0; t0=$(now)
  local dir=$CACHE/otelcol/$OTELCOL_VERSION key
  key=$(sha256sum "$OTELCOL_MANIFEST" | cut -c1-16)
  if ((FORCE == 0)) && [ -x "$dir/otelcol-hostwall" ] && [ "$(cat "$dir/.installed" 2>/dev/null)" = "$key" ]
  then
    log "otelcol $OTELCOL_VERSION: cached at $dir/otelcol-hostwall"
    if ((VERIFY)); then otelcol_verify "$dir/otelcol-hostwall"; fi
    timing "otelcol (cached)" "$t0"
    return
  fi
  go_env
  mkdir -p "$dir/bin"
  if [ ! -x "$dir/bin/builder" ] || ((FORCE)); then
    log "otelcol: go install go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION"
    GOBIN=$dir/bin nice go install "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION" \
        >"$dir/go-install.log" 2>&1 \
      || { tail -n 40 "$dir/go-install.log" >&2; die "otelcol: go install builder@$OTELCOL_VERSION failed"; }
    timing "otelcol builder" "$t0"
  fi
  local t1; t1=$(now)
  local src=$dir/src.$$
  rm -rf "$src"; mkdir -p "$src"
  cp "$OTELCOL_MANIFEST" "$src/manifest.yaml"
  log "otelcol $OTELCOL_VERSION: building (modules + compile; the long pole, several minutes on 2 cores)"
  (cd "$src" && nice "$dir/bin/builder" --config manifest.yaml >"$src/build.log" 2>&1) \
    || { tail -n 40 "$src/build.log" >&2; die "otelcol: builder failed (full log: $src/build.log)"; }
  timing "otelcol build" "$t1"
  otelcol_verify "$src/_build/otelcol-hostwall"
  mv -f "$src/_build/otelcol-hostwall" "$dir/otelcol-hostwall.new"
  mv -f "$dir/otelcol-hostwall.new" "$dir/otelcol-hostwall"
  cp "$OTELCOL_MANIFEST" "$dir/manifest.yaml"
  echo "$key" > "$dir/.installed"
  rm -rf "$src"
  timing "otelcol total" "$t0"
}

# ------------------------------------------------------------------------------------------- prometheus
no_debian_service() {  # no_debian_service NAME : tests start their own server; never rely on (or leave
  local svc=$1         # running) the Debian service a package installed
  if [ -d /run/systemd/system ]; then
    if systemctl is-enabled --quiet "$svc" 2>/dev/null || systemctl is-active --quiet "$svc" 2>/dev/null
    then
      log "$svc: disabling the Debian service"
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  elif [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
    log "$svc: stopping the Debian service"
    "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
  fi
}

setup_prometheus() {
  local t0; t0=$(now)
  apt_install prometheus
  command -v prometheus >/dev/null || die "prometheus: not in PATH after installing the Debian package"
  no_debian_service prometheus
  if ((VERIFY)); then prometheus --version >/dev/null 2>&1 || die "prometheus: binary does not run"; fi
  log "prometheus: $(prometheus --version 2>&1 | head -n1)"
  timing "prometheus" "$t0"
}

# ----------------------------------------------------------------------------------------- alertmanager
setup_alertmanager() {
  local t0; t0=$(now)
  apt_install prometheus-alertmanager
  local b
  for b in prometheus-alertmanager amtool; do
    command -v "$b" >/dev/null || die "alertmanager: $b not in PATH after installing prometheus-alertmanager"
  done
  no_debian_service prometheus-alertmanager
  if ((VERIFY)); then
    prometheus-alertmanager --version >/dev/null 2>&1 || die "alertmanager: binary does not run"
    amtool check-config deploy/alertmanager/alertmanager.yml >/dev/null \
      || die "alertmanager: amtool check-config deploy/alertmanager/alertmanager.yml failed"
  fi
  log "alertmanager: $(prometheus-alertmanager --version 2>&1 | head -n1)"
  timing "alertmanager" "$t0"
}

T0=$(now)
for c in "${WANT[@]}"; do "setup_$c"; done
timing "setup-peers total" "$T0"
log "timings:"
for t in "${TIMINGS[@]}"; do printf '[setup-peers]   %s\n' "$t"; done
log "ready (cache: $CACHE)"
