#!/usr/bin/env bash
# Create .venv (once) and install llamactl with its test extras. Idempotent: a second run is quick.
# torch is pinned here to the CPU build this machine kind carries on disk; pyproject keeps torch>=2.4
# for users. Override with TORCH_SPEC="torch" (e.g. on a GPU host) if you want another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.llamactl-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q --disable-pip-version-check -e ".[dev,plots]"
  echo "$want" > "$stamp"
fi
