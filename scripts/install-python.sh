#!/usr/bin/env bash
# Builds the `ecss` Python module (with ecss.torch) and installs it into a Python:
#   scripts/install-python.sh                      Debian's /usr/bin/python3 (the one that
#                                                  imports python3-torch): /usr/local/lib/...
#   scripts/install-python.sh /path/to/python      another interpreter, e.g. a venv made with
#                                                  --system-site-packages (its site-packages)
# It installs the Debian packages first (scripts/install-deps.sh), configures and builds the
# release preset's module target only, and installs with CMake (no pip: Debian's Python refuses
# pip installs into the system, PEP 668). Then: python3 -c "import ecss.torch".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-/usr/bin/python3}
if ! python=$(command -v "$python"); then
  echo "install-python: no interpreter '${1:-/usr/bin/python3}'" >&2
  exit 2
fi

scripts/install-deps.sh
cmake --preset release -DECSS_PYTHON=ON -DECSS_PYTHON_EXECUTABLE="$python"
cmake --build --preset release --target ecss_python
sudo=()
site=$(cat build/release/python/install_dir.txt)
if [ ! -w "$(dirname "$site")" ] && [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
"${sudo[@]}" cmake --install build/release --component python
echo "install-python: ecss installed in $site for $python"
(cd / && "$python" -c "import ecss; print('install-python: import ecss OK')")
if ! (cd / && "$python" -c "import ecss.torch" 2>/dev/null); then
  echo "install-python: warning: $python cannot import torch, so ecss.torch is unavailable" \
       "there (Debian's python3-torch is for /usr/bin/python3)" >&2
fi
