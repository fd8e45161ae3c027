#!/usr/bin/env bash
# Set up .venv, run the policy and fused-decoder tests with numba's bounds checks on, then the whole test suite
# (offline, CPU only; its summary is the last line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
set +e
# Bounds-checked kernels. numba's cache key does not record NUMBA_BOUNDSCHECK: with the usual cache
# this run could load unchecked kernels (and would leave checked ones behind for every later run), so
# it compiles into a cache of its own.
NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/zipmoe/numba-boundscheck" \
    python -m pytest -q -x -p no:cacheprovider tests/test_policies.py tests/test_fused.py tests/test_preloader.py \
    || { echo "bounds-checked kernel tests failed" >&2; exit 1; }
python -m pytest -q "$@"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
exit $rc
