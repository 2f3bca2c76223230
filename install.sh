#!/usr/bin/env bash
# Installs edge-mtp into ./.venv: the package, the patched llama.cpp backend (compiled once, then
# re-used from the cache until native/patches changes) and the default model.
#   ./install.sh          runtime and `edge-mtp serve` (the server extra)
#   ./install.sh --test   plus the test extras
# Extra llama.cpp cmake flags go in CMAKE_ARGS (e.g. CMAKE_ARGS="-DGGML_BLAS=ON").
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
extras="[server]"
[ "${1:-}" = "--test" ] && extras="[server,test]"

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "edge-mtp needs Python 3.10 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
.venv/bin/python native/build.py
.venv/bin/edge-mtp pull smollm2-135m >/dev/null
echo "edge-mtp is installed in .venv (try: .venv/bin/edge-mtp chat)"
