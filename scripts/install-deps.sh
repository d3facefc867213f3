#!/usr/bin/env bash
# Installs the Debian packages that ECSS builds and tests with. Idempotent: it asks apt only
# for what is missing, so a second run does nothing. Needs root or sudo.
# The CUDA toolkit is not a Debian package here: when /usr/local/cuda exists the build uses it
# (ECSS_CUDA=AUTO); without it the CUDA backend is simply not built.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtbb-dev liburing-dev libjemalloc-dev libopenblas-dev
  libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
  clang-format clang-tidy
  fio
  python3-dev pybind11-dev libdlpack-dev python3-numpy python3-pytest python3-torch
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
