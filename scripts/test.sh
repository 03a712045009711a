#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: CPU only, Triton kernels in the interpreter.
# Then the library's tests again with the C++ extension disabled (LOWRANK_DISABLE_EXT=1): lowrank must
# work, with the same results, where the extension is absent. LOWRANK_TEST_NO_EXT_PASS=0 skips that pass.
# Extra arguments go to pytest (both passes), e.g. `bash scripts/test.sh -k nf4 -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pytest -p no:cacheprovider "$@"
if [ "${LOWRANK_TEST_NO_EXT_PASS:-1}" != "0" ]; then
    echo "== the library's tests with the C++ extension disabled (LOWRANK_DISABLE_EXT=1) =="
    if [ "$#" -eq 0 ]; then set -- tests/lowrank; fi
    LOWRANK_DISABLE_EXT=1 .venv/bin/pytest -p no:cacheprovider -q "$@"
fi
