#!/usr/bin/env bash
# The project's demo command (the README's): installs what is missing, builds the release
# preset and runs the main example, which trains a small multi-domain language model with RRE
# expert layers on real text from this machine, the experts streaming through a simulated
# device whose expert cache holds 60% of them. It prints loss, tokens/s, bytes streamed, hit
# rate and stalls, the corpus's unigram entropy, and writes a Chrome trace to
# build/train_moe_lm.trace.json. Extra arguments go to the example (see examples/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target train_moe_lm
build/release/examples/train_moe_lm --trace build/train_moe_lm.trace.json "$@"
