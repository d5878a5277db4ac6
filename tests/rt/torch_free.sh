#!/usr/bin/env bash
# tests/rt where a deploy machine stands: a virtual environment with the deploy extras alone (numpy, ONNX Runtime,
# Pillow, tritonclient; no torch), on a ResNet-20 artifact the build side exported beforehand.
#   bash tests/rt/torch_free.sh        (from a checkout with the build side installed; CI runs it after the suite)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
zeropur-export export resnet20 --out "$work/resnet20" --min-batch 1 --opt-batch 32 --max-batch 64 \
  >"$work/export.log" 2>&1 || { cat "$work/export.log"; exit 1; }
python -m venv "$work/deploy"
"$work/deploy/bin/pip" install -q ".[deploy,serve]" "pytest>=8" "hypothesis>=6.100" >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log"; exit 1; }
if "$work/deploy/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  echo "torch_free.sh: torch is importable in the deploy environment; this run would prove nothing" >&2
  exit 1
fi
# the pytest script, not python -m pytest: the checkout must not shadow the installed package (its built kernels)
ZEROPUR_TEST_ART20="$work/resnet20" "$work/deploy/bin/pytest" -q -p no:cacheprovider tests/rt
