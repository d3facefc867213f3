#!/usr/bin/env bash
# The project's demo command (the README's): installs what is missing, builds the release
# preset and runs the main example, which streams experts through the simulated device under
# a device-memory budget and writes a Chrome trace to build/stream_experts.trace.json.
# Extra arguments go to the example (see examples/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target stream_experts
build/release/examples/stream_experts --trace build/stream_experts.trace.json "$@"
