#!/usr/bin/env bash
# Live observability check: a real Prometheus with the shipped alert rules scrapes the
# real ingress, two real workers and RabbitMQ's own exporter while drills make the
# alerts fire; then every dashboard panel query and every alert rule is evaluated
# through Prometheus's HTTP API. Fails naming each panel or rule that saw no data.
#
#   bash deploy/live-check.sh
#
# Needs RabbitMQ on 127.0.0.1:5672 with the rabbitmq_prometheus plugin (port 15692;
# `rabbitmq-plugins enable rabbitmq_prometheus`), PostgreSQL on 127.0.0.1:5432, a Rust
# toolchain, python3 with PyYAML, and Prometheus (Debian's package `prometheus`,
# installed here when missing and run as root). Takes a few minutes.
#
# Test-only differences from what deploy/ ships, and nothing else:
#  - prometheus.yml's jobs scrape loopback addresses (static targets in place of the
#    compose service names), every second, and keep only this run's queues;
#  - alerts.yml's `for:` durations are 3s, so a drill need not wait minutes.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
    if [[ "$(id -u)" != 0 ]]; then
        echo "live-check: install the Debian packages ${missing[*]} first" >&2
        exit 1
    fi
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install -q --root-user-action=ignore pyyaml
fi

if ! curl -fsS -o /dev/null http://127.0.0.1:15692/metrics; then
    echo "live-check: RabbitMQ's Prometheus exporter does not answer on 127.0.0.1:15692;" \
        "enable it: rabbitmq-plugins enable rabbitmq_prometheus" >&2
    exit 1
fi

echo "live-check: building ingress, worker and the drill"
cargo build -q -p b24-ingress -p b24-worker -p b24-tests --bin ingress --bin worker --bin live_drill
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/debug"

tmp="$(mktemp -d)"
prom_pid=""
drill_pid=""
cleanup() {
    [[ -n "$drill_pid" ]] && kill -- "-$drill_pid" 2>/dev/null || true
    [[ -n "$prom_pid" ]] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# Free loopback ports: Prometheus, the ingress, two workers.
read -r prom_port ingress_port worker1_port worker2_port < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
prefix="live_$(date +%s)_$$"

# The shipped rules with short `for:`; nothing else may differ.
sed -E 's/^([[:space:]]+for:)[[:space:]]+[0-9]+[smh]$/\1 3s/' \
    deploy/prometheus/alerts.yml >"$tmp/alerts.yml"
if ! diff <(grep -vE '^[[:space:]]+for:' deploy/prometheus/alerts.yml) \
          <(grep -vE '^[[:space:]]+for:' "$tmp/alerts.yml") >/dev/null; then
    echo "live-check: the test rules differ from the shipped ones beyond for:" >&2
    exit 1
fi

# The shipped scrape configuration, every job kept as it is (paths, parameters such as
# RabbitMQ's metric families) but pointed at this machine's processes.
python3 - deploy/prometheus/prometheus.yml "$tmp/prometheus.yml" "$tmp/alerts.yml" "$prefix" \
    "127.0.0.1:$prom_port" "127.0.0.1:$ingress_port" \
    "127.0.0.1:$worker1_port,127.0.0.1:$worker2_port" <<'EOF'
import re, sys, yaml
src, dst, rules, prefix, prom, ingress, workers = sys.argv[1:]
config = yaml.safe_load(open(src))
config["global"]["scrape_interval"] = "1s"
config["global"]["evaluation_interval"] = "1s"
config["rule_files"] = [rules]
targets = {
    "ingress": [ingress],
    "worker": workers.split(","),
    "rabbitmq": ["127.0.0.1:15692"],
    "prometheus": [prom],
}
jobs = [job["job_name"] for job in config["scrape_configs"]]
if sorted(jobs) != sorted(targets):
    sys.exit(f"live-check: scrape jobs {jobs}, expected {sorted(targets)}")
for job in config["scrape_configs"]:
    for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
        del job[key]
    job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    if job["job_name"] == "rabbitmq":
        # The broker is shared with other test runs: only this run's queues.
        job["metric_relabel_configs"] = [{
            "source_labels": ["queue"],
            "regex": "|" + re.escape(prefix) + "[.].*",
            "action": "keep",
        }]
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
EOF

prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
for _ in $(seq 1 60); do
    curl -fsS -o /dev/null "http://127.0.0.1:$prom_port/-/ready" 2>/dev/null && break
    sleep 0.5
done
if ! curl -fsS -o /dev/null "http://127.0.0.1:$prom_port/-/ready"; then
    echo "live-check: Prometheus did not start" >&2
    cat "$tmp/prometheus.log" >&2
    exit 1
fi
echo "live-check: $(prometheus --version 2>&1 | head -1) on 127.0.0.1:$prom_port, prefix $prefix"

# The drill in its own process group, so an interrupted run leaves no binary behind.
set +e
LIVE_PROMETHEUS_ADDR="127.0.0.1:$prom_port" \
LIVE_INGRESS_ADDR="127.0.0.1:$ingress_port" \
LIVE_WORKER_ADDRS="127.0.0.1:$worker1_port,127.0.0.1:$worker2_port" \
LIVE_INGRESS_BIN="$bin/ingress" LIVE_WORKER_BIN="$bin/worker" \
LIVE_LOG_DIR="$tmp/logs" LIVE_SCRAPE_SECS=1 AMQP_PREFIX="$prefix" \
    setsid "$bin/live_drill" &
drill_pid=$!
wait "$drill_pid"
rc=$?
drill_pid=""
set -e
if ((rc != 0)); then
    echo "live-check FAILED; last lines of each log:" >&2
    for log in "$tmp"/logs/*.log "$tmp/prometheus.log"; do
        [[ -f "$log" ]] || continue
        echo "--- $(basename "$log")" >&2
        tail -n 15 "$log" >&2
    done
    exit "$rc"
fi
echo "live-check passed"
