#!/usr/bin/env bash
# Starts deploy/docker-compose.yml for real with podman where no image registry is
# reachable, runs the seed events through it with three workers, prints what landed
# where, and removes the stack. What it printed on a run is in deploy/README.md
# ("Without an image registry").
#
#   bash deploy/local/stack-check.sh
#
# Needs root, Debian's podman, runc, buildah, debootstrap and
# golang-github-containernetworking-plugin-dnsname, podman-compose (PyPI), and the
# Rust toolchain on the host (the image takes the host's release binaries:
# BINARIES=prebuilt). Grafana is not started: it has no Debian package to build a
# local image from.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
work="${STACK_WORK:-/var/tmp/b24-stack}"
mkdir -p "$work"

# This sandbox refuses rlimit changes and runs a hybrid cgroup tree crun rejects.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$work/containers.conf"
compose=("${PODMAN_COMPOSE:-podman-compose}" -p b24stack -f deploy/docker-compose.yml -f deploy/local/compose.local.yml
         --env-file "$work/stack.env")

step() { echo; echo "== $*"; }

step "base image localhost/debian:bookworm-min (debootstrap --variant=minbase)"
if ! podman image exists localhost/debian:bookworm-min; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log"
    tar -C "$work/rootfs" -c . | podman import - localhost/debian:bookworm-min
fi

step "service images from Debian's packages"
for s in rabbitmq postgres prometheus; do
    podman build -q -f "deploy/local/$s.Containerfile" -t "localhost/b24-local/$s:bookworm" deploy/local
done

step "release binaries on the host, for BINARIES=prebuilt"
cargo build --release --locked -p b24-ingress -p b24-worker --bin ingress --bin worker
cp target/release/ingress target/release/worker deploy/prebuilt/
cargo build -q -p b24-tests --bin stack_seed

# The simulated portal listens on the compose network's gateway; the workers reach it
# as host.containers.internal. Its client id and secret are the simulation's.
cat >"$work/stack.env" <<'EOF'
PUBLIC_URL=http://ingress:8080
B24_CLIENT_ID=local.b24pipeline.sim
B24_CLIENT_SECRET=sim-client-secret
B24_TOKEN_KEY=c3RhY2stY2hlY2sta2V5LXN0YWNrLWNoZWNrLWtleTA=
RABBITMQ_PASSWORD=stackcheck0rabbit
POSTGRES_PASSWORD=stackcheck0postgres
GRAFANA_ADMIN_PASSWORD=stackcheck0grafana
B24_ALLOWED_HOSTS=http://host.containers.internal:*
B24_OAUTH_URL=http://host.containers.internal:18100/oauth/token/
INGRESS_PORT=18080
EOF

cleanup() {
    step "down"
    "${compose[@]}" down -v >/dev/null 2>&1 || true
    # podman-compose leaves scaled replicas, volumes and the network behind.
    { podman ps -a --format '{{.Names}}' | grep '^b24stack_' | xargs -r podman rm -f; } >/dev/null || true
    { podman volume ls -q | grep '^b24stack_' | xargs -r podman volume rm; } >/dev/null || true
    podman network rm b24stack_default >/dev/null 2>&1 || true
    echo "left: $(podman ps -a -q --filter name=b24stack_ | wc -l) containers," \
        "$(podman volume ls -q | grep -c '^b24stack_' || true) volumes"
}
trap cleanup EXIT

step "up --build, worker scaled to 3"
services=(rabbitmq postgres ingress worker prometheus)
"${compose[@]}" up -d --build "${services[@]}" 2>&1 | grep -vE 'systemd connection' | tail -3
"${compose[@]}" up -d --scale worker=3 "${services[@]}" 2>&1 | grep -vE 'systemd connection' | tail -1

step "health checks (podman runs them on demand: no systemd timers here)"
for _ in $(seq 1 60); do
    failing=0
    for c in $(podman ps --format '{{.Names}}' | grep '^b24stack_'); do
        podman healthcheck run "$c" >/dev/null 2>&1 || failing=$((failing + 1))
    done
    ((failing == 0)) && break
    sleep 2
done
podman ps --format '{{.Names}}\t{{.Image}}\t{{.Status}}' | grep '^b24stack_' | sort

gateway="$(podman network inspect b24stack_default --format '{{range .Subnets}}{{.Gateway}}{{end}}')"
step "seed events through 127.0.0.1:18080, simulated portal on $gateway:18099"
STACK_INGRESS=127.0.0.1:18080 STACK_PORTAL_BIND="$gateway:18099" \
    STACK_PORTAL_HOST=host.containers.internal target/debug/stack_seed

step "PostgreSQL"
podman exec b24stack_postgres_1 psql -U b24 -d b24_pipeline \
    -c "SELECT event, status, attempts FROM events ORDER BY id" \
    -c "SELECT kind, entity_id FROM entities ORDER BY kind, entity_id" \
    -c "SELECT member_id, domain, status, app_status FROM portals"

step "RabbitMQ"
podman exec b24stack_rabbitmq_1 rabbitmqctl -q list_queues name type messages consumers

step "Prometheus (127.0.0.1:9090): targets and messages done per worker replica"
sleep 20 # a scrape of every replica found by DNS
curl -s http://127.0.0.1:9090/api/v1/query --data-urlencode 'query=up' | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    print(r["metric"]["job"], r["metric"]["instance"], "up" if r["value"][1] == "1" else "DOWN")'
curl -s http://127.0.0.1:9090/api/v1/query \
    --data-urlencode 'query=sum by (instance) (b24_worker_messages_total{outcome="done"})' | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    print("done by", r["metric"]["instance"], r["value"][1])'

step "stop: every replica drains and exits"
podman stop -t 40 $(podman ps --format '{{.Names}}' | grep '^b24stack_' | sort) >/dev/null
podman ps -a --format '{{.Names}}\t{{.Status}}' | grep '^b24stack_' | sort
