#!/usr/bin/env bash
# Validates the deployment files without starting anything:
#
#   bash deploy/check.sh                 # compose file, Prometheus config, alert rules
#                                        # and their unit tests, dashboard JSON, the
#                                        # Kubernetes manifests (kustomize renders,
#                                        # every object valid for K8S_VERSION)
#   bash deploy/check.sh --list-metrics  # the b24_* metrics the dashboards and alerts
#                                        # use, one base name a line, sorted
#
# Prints one line per check and exits non-zero if any fails. Needs docker-compose,
# promtool, python3 and kubectl; when one of the first three is missing and this runs
# as root, it installs the Debian packages (docker-compose, prometheus, python3)
# first, and the PyPI package kubernetes-validate when python3 lacks it. Works from any
# directory: paths are taken from the repository root, this file's parent's parent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

compose_file=deploy/docker-compose.yml
prom_config=deploy/prometheus/prometheus.yml
alert_rules=deploy/prometheus/alerts.yml
alert_tests=deploy/prometheus/alerts_test.yml
dashboards=(deploy/grafana/dashboards/*.json)
# Every kustomization under deploy/k8s, rendered and validated against this version.
k8s_dirs=(deploy/k8s/base deploy/k8s/overlays/*/)
K8S_VERSION=1.32.0
KUBERNETES_VALIDATE_VERSION=1.37.0

# The b24_* names in the dashboards' queries ("expr") and in the alert rules (comments
# left out), histograms' _bucket/_sum/_count series reduced to the histogram's name.
list_metrics() {
    {
        # JSON escapes (\n in a multi-line query, \") become spaces first.
        grep -ohE '"expr"[[:space:]]*:[[:space:]]*"([^"\\]|\\.)*"' "${dashboards[@]}" \
            | sed -E 's/\\./ /g'
        grep -vE '^[[:space:]]*#' "$alert_rules"
    } | grep -oE '(^|[^A-Za-z0-9_:])b24_[a-z0-9_]*[a-z0-9]' \
      | sed -E 's/^[^b]//; s/_(bucket|sum|count)$//' \
      | LC_ALL=C sort -u
}

case "${1:-}" in
    --list-metrics)
        list_metrics
        exit 0
        ;;
    "") ;;
    *)
        echo "usage: bash deploy/check.sh [--list-metrics]" >&2
        exit 2
        ;;
esac

# --- tools ------------------------------------------------------------------------
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)   # promtool's package
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ! command -v kubectl >/dev/null 2>&1; then
    echo "check.sh: kubectl is needed to render deploy/k8s (kubectl kustomize)" >&2
    exit 1
fi
if ((${#missing[@]})); then
    if [[ "$(id -u)" != 0 ]]; then
        echo "check.sh: missing tools; install the Debian packages ${missing[*]} (as root:" \
            "apt-get install ${missing[*]}) or run this script as root" >&2
        exit 1
    fi
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
    echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
    python3 -m pip install -q --root-user-action=ignore "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# --- checks -----------------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Every variable the compose file requires (${NAME:?...}) gets a dummy value, so the
# check needs no deploy/.env and sees no secret.
env_file="$tmp/env"
grep -oE '\$\{[A-Za-z_][A-Za-z0-9_]*:\?' "$compose_file" \
    | sed -E 's/^\$\{//; s/:\?$//' | sort -u \
    | while read -r name; do echo "$name=dummy0check0value"; done >"$env_file"

failed=0
# check NAME COMMAND...: runs COMMAND, prints "ok   NAME" or "FAIL NAME" and the
# command's output.
check() {
    local name="$1"
    shift
    if "$@" >"$tmp/out" 2>&1; then
        echo "ok   $name"
    else
        echo "FAIL $name"
        sed 's/^/     | /' "$tmp/out"
        failed=1
    fi
}

check "docker-compose config -q $compose_file (dummy $(paste -sd' ' <(cut -d= -f1 "$env_file")))" \
    docker-compose -f "$compose_file" --env-file "$env_file" config -q
check "promtool check config $prom_config" promtool check config "$prom_config"
check "promtool check rules $alert_rules" promtool check rules "$alert_rules"
check "promtool test rules $alert_tests" promtool test rules "$alert_tests"
for dashboard in "${dashboards[@]}"; do
    check "json $dashboard" python3 -m json.tool "$dashboard"
done
# Built-in kinds against the pinned version's schemas, unknown fields refused; the
# KEDA objects (a CRD kubernetes-validate has no schema for) are checked by the
# integration test k8s_manifests instead.
for dir in "${k8s_dirs[@]}"; do
    dir="${dir%/}"
    rendered="$tmp/$(echo "$dir" | tr / _).yaml"
    check "kubectl kustomize $dir" sh -c "kubectl kustomize '$dir' >'$rendered'"
    check "kubernetes-validate -k $K8S_VERSION --strict $dir" \
        python3 -m kubernetes_validate -k "$K8S_VERSION" --strict --quiet --no-warn "$rendered"
done

if ((failed)); then
    echo "deploy checks FAILED"
    exit 1
fi
echo "deploy checks passed"
