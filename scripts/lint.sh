#!/usr/bin/env bash
# Static checks that need no Docker engine, no GPU and no network (every schema is bundled with its tool).
# Runs every check, then exits non-zero when any failed. `make lint` runs it with the venv's tools on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
# The Kubernetes versions the manifests are validated against: the oldest they need (podFailurePolicy GA in
# 1.31) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS=(1.31.0 1.37.0)
failed=()
step() { echo "== $*"; }
check() {  # check NAME COMMAND...: run it, remember a failure
    local name=$1; shift
    step "$name"
    "$@" || failed+=("$name")
}

py_paths=()
for path in app tests bench deploy; do [[ -e $path ]] && py_paths+=("$path"); done
check "ruff (${py_paths[*]})" ruff check "${py_paths[@]}"
check "hadolint Dockerfile" hadolint Dockerfile
check "compose specification: docker-compose.yml" \
    check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
check "GitHub workflow schema: .github/workflows" \
    check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
for version in "${K8S_VERSIONS[@]}"; do
    check "Kubernetes $version schemas (strict): deploy/k8s" \
        kubernetes-validate --strict --quiet --kubernetes-version "$version" deploy/k8s/*.yaml
done
check "pins, settings names, manifests' contract: tests/test_static.py" \
    python -m pytest -q -p no:cacheprovider tests/test_static.py

if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all static checks passed"
