#!/usr/bin/env bash
# For a machine with a CUDA GPU: runs every gpu-labelled test (the backend and kernel
# conformance suites on CUDA and the session trained on CUDA against the simulated device), the
# host CPU's own code paths (every CRC-32C way and SIMD update kernel it runs, against their
# references: the development machine's CPU may lack some), and the step bench on cuda:0, each
# strategy, host and NVMe states. About two minutes on one H200 (most of it naive with NVMe
# states).
#
# Usage: scripts/gpu-check.sh [BUILD_DIR]
#   BUILD_DIR  a release build configured with CUDA (default build/release); it needs
#              tests/*_cuda_tests (every gpu-labelled test executable is named so),
#              tests/ecss_base_tests, tests/ecss_optimizer_tests (the executables are run
#              directly, so a build copied to another machine works) and bench/ecss-bench. Set ECSS_GPU_CHECK_SCRATCH for the NVMe run's directory
#              (default: a new directory under /tmp, removed at the end).
# Exits non-zero at the first failure; a test that finds no device skips, and then the step
# bench fails with the reason.
set -euo pipefail
build=${1:-build/release}
tests=("$build"/tests/*_cuda_tests)
cpu_tests=("$build/tests/ecss_base_tests" "$build/tests/ecss_optimizer_tests")
if [ ! -x "${tests[0]}" ] || [ ! -x "$build/bench/ecss-bench" ] || [ ! -x "${cpu_tests[0]}" ] ||
  [ ! -x "${cpu_tests[1]}" ]; then
  echo "gpu-check: $build lacks the CUDA test executables, the base or optimizer tests, or ecss-bench (configure with CUDA and build)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
for t in "${tests[@]}"; do
  printf '\n=== %s ===\n' "$(basename "$t")"
  "$t" --gtest_brief=1
done
printf '\n=== CPU paths (%s) ===\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
"${cpu_tests[0]}" --gtest_brief=1 --gtest_filter='EveryPath/Crc32cPathTest.*'
"${cpu_tests[1]}" --gtest_brief=1 --gtest_filter='UpdateKernelsTest.*'
scratch=${ECSS_GPU_CHECK_SCRATCH:-$(mktemp -d /tmp/ecss-gpu-check-XXXXXX)}
trap '[ -z "${ECSS_GPU_CHECK_SCRATCH:-}" ] && rm -rf "$scratch"' EXIT
for states in host nvme; do
  placement=(--states host)
  if [ "$states" = nvme ]; then placement=(--states nvme --weights nvme --dir "$scratch"); fi
  printf '\n=== ecss-bench step --device cuda:0 --strategy all %s ===\n' "${placement[*]}"
  "$build/bench/ecss-bench" step --device cuda:0 --strategy all --rounds 1 --steps 8 --warmup 2 \
    "${placement[@]}"
done
