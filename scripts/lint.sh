#!/usr/bin/env bash
# Formatting (clang-format, every C++ file) and static checks (clang-tidy, library and tool
# sources) as CI runs them. Needs a configured release build for compile_commands.json.
#   scripts/lint.sh          check; exits non-zero on any drift or finding
#   scripts/lint.sh --fix    rewrite the formatting in place
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t cxx_files < <(git ls-files -co --exclude-standard '*.h' '*.cc' '*.cu' '*.cuh')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i "${cxx_files[@]}"
  exit 0
fi

echo "lint: clang-format on ${#cxx_files[@]} files"
clang-format --dry-run --Werror "${cxx_files[@]}"

build_dir=build/release
if [ ! -f "$build_dir/compile_commands.json" ]; then
  echo "lint: $build_dir/compile_commands.json is missing; configure the release preset first" >&2
  exit 1
fi
# Library and tool sources; tests follow gtest's naming, not ours. CUDA sources are checked
# only when this build compiled them.
mapfile -t tidy_files < <(git ls-files -co --exclude-standard \
  'runtime/*.cc' 'engine/*.cc' 'router/*.cc' 'kernels/*.cc' 'offload/*.cc' 'optimizer/*.cc' 'tools/*.cc' \
  'bench/*.cc' 'examples/*.cc' 'python/*.cc' |
  while read -r file; do grep -q "\"file\": \".*/$file\"" "$build_dir/compile_commands.json" && echo "$file"; done)
echo "lint: clang-tidy on ${#tidy_files[@]} files"
# The build may treat warnings as errors (ECSS_WERROR); clang-tidy judges code by its own checks.
output=$(run-clang-tidy -p "$build_dir" -quiet -j 2 -extra-arg=-Wno-error "${tidy_files[@]}" 2>&1) || true
if echo "$output" | grep -E "(error|warning):" >/dev/null; then
  echo "$output" | grep -E "(error|warning):" -A3 | sort -u >&2
  echo "lint: clang-tidy found problems" >&2
  exit 1
fi
echo "lint: clean"
