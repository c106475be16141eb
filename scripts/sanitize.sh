#!/usr/bin/env bash
# Builds fastfed._core with AddressSanitizer + UndefinedBehaviorSanitizer and runs the kernel,
# compression and fuzz tests against it on the native backend. Usage: scripts/sanitize.sh [pytest args]
# --capture=sys: a sanitizer report goes to file descriptor 2, which pytest must not swallow.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSKBUILD_PROJECT_NAME=fastfed -DSKBUILD_PROJECT_VERSION=0.0.0 \
  -DFASTFED_SANITIZE=ON -DFASTFED_WERROR=ON \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$work/build" >/dev/null
cp -r "$repo/src/fastfed" "$work/fastfed"
cp "$work"/build/_core*.so "$work/fastfed/"

# Python itself is not instrumented, so the runtime is preloaded; leaks of the interpreter are not ours.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export FASTFED_BACKEND=native FASTFED_REQUIRE_BACKENDS=native NUMBA_DISABLE_JIT=0
cd "$work"
# Import the instrumented copy, not an installed fastfed (an editable install's finder would win).
python - "$repo" "$@" <<'PY'
import sys
repo, args = sys.argv[1], sys.argv[2:]
sys.meta_path[:] = [f for f in sys.meta_path if "fastfed" not in repr(f).lower() and "scikit" not in repr(f).lower()]
sys.path.insert(0, ".")
import fastfed, fastfed._core
import os
assert fastfed._core.__file__.startswith(os.getcwd()), fastfed._core.__file__
print("sanitized extension:", fastfed._core.__file__, flush=True)
import pytest
tests = [f"{repo}/tests/{name}" for name in ("test_aggregate_kernels.py", "test_quantize_kernels.py", "test_rotate_kernels.py", "test_native_isa.py", "test_compression.py", "test_aggregation.py")]
# Kernel tests parametrized by backend, plus the codec-level tests that run on the default (native) backend.
selected = "native or rotated or shared or nmse or unbiased or fuzzed or version"
sys.exit(pytest.main(["-q", "--capture=sys", "-p", "no:cacheprovider", "-k", selected, "--rootdir", repo, "-c", f"{repo}/pyproject.toml", *tests, *args]))
PY
