#!/usr/bin/env bash
# The project's test command (the README's, and exactly what CI runs). On a fresh Debian
# machine it installs what is missing, then:
#   1. configures the release preset and checks formatting and clang-tidy (scripts/lint.sh);
#   2. builds it (the CUDA backend and the Python module too, when present) and runs every test
#      not labelled gpu (the Python tests with pytest among them);
#   3. installs it and builds and runs a separate project against it with find_package(ecss),
#      and installs the Python module into a scratch root and imports it from there;
#   4. builds the asan (address+undefined) preset and runs every test under it;
#   5. builds the tsan preset and runs the device, conformance, router, offload and engine tests
#      under it (the engine's and the optimizer's streaming pipeline's with oneTBB's reports
#      suppressed, tests/tsan-tbb.supp).
# `scripts/test.sh --quick` stops after step 2 (for the edit-build-test loop).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; fi

step() { printf '\n=== %s ===\n' "$*"; }

step "dependencies"
scripts/install-deps.sh

step "release: configure, lint, build (warnings are errors), test"
# The Python module is required here (ON, for Debian's interpreter), so that CI cannot lose it
# silently.
cmake --preset release -DECSS_WERROR=ON -DECSS_PYTHON=ON -DECSS_PYTHON_EXECUTABLE=/usr/bin/python3
scripts/lint.sh
cmake --build --preset release
ctest --preset release
if [ "$quick" = 1 ]; then exit 0; fi

step "install and build a find_package(ecss) consumer"
rm -rf build/release/install build/consumer
cmake --install build/release --prefix build/release/install
cmake -S tests/install_consumer -B build/consumer -G Ninja \
  -DCMAKE_PREFIX_PATH="$PWD/build/release/install"
cmake --build build/consumer
build/consumer/ecss_consumer
# The Python module as scripts/install-python.sh installs it, into a scratch root, imported
# from outside the tree.
rm -rf build/python-install
DESTDIR="$PWD/build/python-install" cmake --install build/release --component python
site=$(cat build/release/python/install_dir.txt)
(cd / && PYTHONPATH="$OLDPWD/build/python-install$site" /usr/bin/python3 -c \
  "import ecss.torch, ecss; print('python: installed module imports from', ecss.__file__)")

step "asan: address + undefined behaviour sanitizers, all tests"
cmake --preset asan
cmake --build --preset asan
ctest --preset asan

step "tsan: thread sanitizer, device, conformance, router and offload tests"
cmake --preset tsan
cmake --build --preset tsan
# Death tests fork, which ThreadSanitizer does not support in a threaded process. The optimizer
# is left out: Debian's oneTBB is not built with ThreadSanitizer, so every task hand-off inside
# libtbb looks like a race (tests/README.md); asan covers it.
ctest --preset tsan -L "device|conformance|router|offload" -E DeathTest
# The engine's tests too, with every report that passes through oneTBB suppressed
# (tests/tsan-tbb.supp): its own threads (the NVMe updater's worker, the stager, the sim's
# streams) against the session's are still checked.
ctest --preset tsan-engine -L engine -E DeathTest
# The optimizer's streaming pipeline (its loads at once, update and store threads), the same way;
# the rest of the optimizer's tests are oneTBB's kernels and take minutes under it.
ctest --preset tsan-engine -R '^StateStreamingTest\.'
