#!/usr/bin/env bash
# Validates every Job manifest the training runner's Kubernetes backend generates (CPU-only;
# GPUs with a node selector and tolerations; a custom image) with `kubernetes-validate
# --strict`, against the Kubernetes version k8s-openapi is built for and the oldest kube
# supports. Installs kubernetes-validate into its own venv under $FERRITE_CACHE once.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"

VALIDATE_VERSION=1.37.0
KUBERNETES_VERSIONS=(1.37.0 1.33.0)
VENV="$FERRITE_CACHE/k8s-validate-venv"
VALIDATE="$VENV/bin/kubernetes-validate"

if [ ! -f "$VENV/.ferrite-complete-$VALIDATE_VERSION" ]; then
  echo "test-k8s-manifests: installing kubernetes-validate $VALIDATE_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION"
  touch "$VENV/.ferrite-complete-$VALIDATE_VERSION"
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# The manifests come from the backend's own builder, through an ignored test.
FERRITE_K8S_MANIFEST_DIR="$OUT/manifests" \
  cargo test --quiet -p ferrite-training-runner --test kubernetes -- --ignored --exact dump_manifests
shopt -s nullglob
manifests=("$OUT"/manifests/*.yaml)
if [ "${#manifests[@]}" -ne 3 ]; then
  echo "test-k8s-manifests: expected 3 manifests, found ${#manifests[@]}" >&2
  exit 1
fi

# The validator must be able to fail: a field no Container has is refused under --strict.
sed 's/^\( *\)restartPolicy: Never/\1restartPolicy: Never\n\1gpuCount: 1/' \
  "$OUT/manifests/cpu-only.yaml" > "$OUT/unknown-field.yaml"
for version in "${KUBERNETES_VERSIONS[@]}"; do
  if "$VALIDATE" --strict --quiet -k "$version" "$OUT/unknown-field.yaml" > /dev/null 2>&1; then
    echo "test-k8s-manifests: kubernetes-validate $version accepted an unknown field" >&2
    exit 1
  fi
  "$VALIDATE" --strict -k "$version" "${manifests[@]}"
done
echo "test-k8s-manifests: ${#manifests[@]} manifests valid (strict) for Kubernetes ${KUBERNETES_VERSIONS[*]}"
